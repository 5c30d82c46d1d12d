"""The NumPyro (JAX) backend: the only package of ppl_vae that imports jax, numpyro, flax or
optax."""
