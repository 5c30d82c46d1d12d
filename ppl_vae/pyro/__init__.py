"""The Pyro (PyTorch) backend: the only package of ppl_vae that imports torch or pyro."""
