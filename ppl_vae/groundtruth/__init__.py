"""Ground truth: data whose truth is known, and the scores that use it.

A VAE trained on real data can be scored only against itself (its ELBO, its rate); on data
generated here the truth is known exactly, so a run can be scored against it:

* `populations`: synthetic populations Pop(y) whose entropy H(y) is computed exactly
  (``data.source = "synthetic:<name>"``), so a run's (rate, distortion) point can be placed
  against the line R + D = H(y) that the lecture's identities draw;
* `dsprites`: procedural dSprites, rendered from their independent generative factors
  (``data.source = "dsprites"``), with the factors kept;
* `disentanglement`: MIG, the FactorVAE and the β-VAE metrics, which score a code against
  those factors.

The name follows disentanglement_lib's ``data/ground_truth``. NumPy only (scikit-learn lazily,
in the metrics that train a classifier); only the experiments and the data loader of the
``synthetic:*`` and ``dsprites`` sources use these modules, so nothing here is imported by
``import ppl_vae``.
"""
