"""The Pyro SVI loop: Adam on the modules' parameters with `ScaledELBO`, one window at a time.

The backend-free driver (`ppl_vae.training`) decides β per step, logging, evaluation,
checkpoints and interruption; this class runs the steps. Within a window nothing is copied to the
host: per-step terms stay on the device and come back once, as one array, when the window ends.
Pyro's param store is not used (parameters are optimised directly), so building twice in one
process trains each model correctly.
"""

from __future__ import annotations

import numpy as np
import pyro
import torch

from ppl_vae.data import Dataset
from ppl_vae.objective import site_betas, step_term_keys
from ppl_vae.pyro.elbo import ScaledELBO
from ppl_vae.pyro.hooks import Model
from ppl_vae.spec import Spec


class Trainer:
    """State: the model's parameters, Adam's moments, the step count and torch's random state.

    Minibatches are drawn with replacement (uniform indices on the device), so the data order is
    a function of the random state alone and resuming from a checkpoint is exact.
    """

    checkpoint_name = "checkpoint.pt"

    def __init__(self, spec: Spec, dataset: Dataset, device: str = "auto"):
        tr = spec.train
        torch.manual_seed(tr.seed)  # initial weights and every draw after them
        self.spec = spec
        self.model = Model(spec, dataset.dim, dataset.image_shape, device)
        self.device = self.model.device
        self.x = self.model.tensor(dataset.x_train)
        self.labels = torch.as_tensor(dataset.labels_train, device=self.device)
        obj = spec.objective
        self.elbo = ScaledELBO(beta=obj.beta, lam=obj.lam, num_particles=obj.num_particles,
                               analytic_kl=obj.analytic_kl,
                               vectorize_particles=obj.num_particles > 1, max_plate_nesting=1)
        self.params = list(self.model.modules.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=tr.lr)
        self.step = 0
        self.term_keys = step_term_keys(spec)

    def run_steps(self, betas: np.ndarray, lam: float) -> np.ndarray:
        """One SVI step per entry of `betas`; returns (len(betas), F) per-example values of
        `objective.step_fields` (the terms `step_term_keys`), nats."""
        tr, built = self.spec.train, self.model.built
        n, batch = len(self.x), tr.batch_size
        dynamic = self.spec.data.binarize == "dynamic"
        rows = []
        self.elbo.lam = lam
        for beta in betas:
            self.elbo.beta = site_betas(self.spec, float(beta))
            idx = torch.randint(n, (batch,), device=self.device)
            y = self.x[idx]
            if dynamic:
                y = torch.bernoulli(y)
            # Pyro's argument validation catches mistakes on the first step; after that it costs
            # time on every distribution it builds and finds nothing new.
            with pyro.validation_enabled(self.step == 0):
                terms = self.elbo.differentiable_terms(built.model, built.guide, y,
                                                       self.labels[idx])
            self.optimizer.zero_grad(set_to_none=True)
            (terms["loss"] / batch).backward()
            if tr.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, tr.clip_norm)
            self.optimizer.step()
            rows.append(torch.stack([terms[k].detach() for k in self.term_keys]))
            self.step += 1
        return (torch.stack(rows) / batch).double().cpu().numpy()

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, path) -> None:
        state = {
            "step": self.step,
            "modules": self.model.modules.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(state, path)

    def load_checkpoint(self, path) -> int:
        """Restore everything `save_checkpoint` wrote; returns the step to continue from."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.modules.load_state_dict(state["modules"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.step = int(state["step"])
        return self.step
