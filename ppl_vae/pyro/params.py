"""Canonical parameters (Pyro): every module's parameters and persistent buffers as NumPy
arrays under ``<module>.<state_dict key>``, the names and layouts `params.npz` holds for both
backends."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def export_params(modules: nn.ModuleDict) -> dict[str, np.ndarray]:
    """Canonical {"<module>.<name>": array}: every parameter and persistent buffer."""
    return {k: v.detach().cpu().numpy().copy() for k, v in modules.state_dict().items()}


def import_params(modules: nn.ModuleDict, params: dict[str, np.ndarray]) -> None:
    """Load canonical arrays into `modules` in place; names and shapes must match exactly."""
    own = modules.state_dict()
    missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
    if missing or extra:
        raise ValueError(f"parameters do not match the spec: missing {missing}, unexpected {extra}")
    for key, value in own.items():
        if tuple(params[key].shape) != tuple(value.shape):
            raise ValueError(f"parameter {key!r}: shape {params[key].shape} in the file, "
                             f"{tuple(value.shape)} in the model")
    modules.load_state_dict({k: torch.as_tensor(params[k], dtype=own[k].dtype,
                                                 device=own[k].device) for k in own})
