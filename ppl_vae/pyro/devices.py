"""Data-parallel training with Pyro: one process per device under ``torchrun``, the trained
modules in `DistributedDataParallel` (`train.devices`).

* Start: ``torchrun --nproc-per-node N -m ppl_vae.cli train SPEC --backend pyro ...`` on each
  node (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint`` for several nodes), or
  ``ppl-vae train SPEC --backend pyro --devices N``, which runs ``torchrun --standalone`` itself
  (`launch`). `join` joins the launcher's process group: gloo on a CPU, NCCL on GPUs (process
  ``LOCAL_RANK`` takes ``cuda:LOCAL_RANK``).
* Every process draws the same global minibatch (the same seed, the same random state) and
  keeps its rows (`Group.rows`); the reparameterised draws of z are made for the whole global
  batch too and sliced (`GlobalNoise`), so every process consumes the random stream exactly as
  one device does and N processes compute the one-device result, to float rounding.
* DDP averages the gradients of each process's loss (its rows' terms / its rows) over the
  processes: the one-device gradient of the global batch's mean. It buckets the gradients and
  all-reduces them while the backward pass runs, which an explicit all-reduce after
  ``backward()`` cannot overlap. The metrics' per-step sums are all-reduced once per window.
* Rank 0 alone writes the run folder (`ppl_vae.training.fit`); a checkpoint is the one-device
  checkpoint, so a run resumes on any number of devices.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
)
from torch.distributions.multivariate_normal import _batch_mv
from torch.distributions.utils import _standard_normal

from ppl_vae.backends import BackendError
from ppl_vae.spec import Spec, SpecError

#: What torchrun sets in each process it starts (and `join` reads).
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DATA_PLATE = "data"  # the plate of the minibatch's rows in every model and guide of the spec


def launched(environ=os.environ) -> bool:
    """Whether torchrun (or another launcher setting RANK and WORLD_SIZE) started us."""
    return "RANK" in environ and "WORLD_SIZE" in environ


def _uses_cuda(spec: Spec) -> bool:
    return spec.train.device != "cpu" and torch.cuda.is_available()


def wanted(spec: Spec) -> int:
    """Processes train.devices asks for outside a launcher: N, or for "all" the GPUs (one
    process on a CPU, which is one device)."""
    if spec.train.devices == "all":
        return torch.cuda.device_count() if _uses_cuda(spec) else 1
    return spec.train.devices


def _command(n: int, argv) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={n}", "-m", "ppl_vae.cli", *argv]


def launch(spec: Spec, argv) -> int | None:
    """The command line's hook before training: for train.devices = N > 1 outside a launcher,
    run ``torchrun --standalone --nproc-per-node N -m ppl_vae.cli ARGV`` and return its exit
    code; None (train in this process) otherwise."""
    n = wanted(spec)
    if launched() or n == 1:
        return None
    check(spec)  # here once, rather than in each of the n processes
    env = dict(os.environ)
    # torchrun would set 1 thread per process with a warning (training itself runs on
    # train.threads, `ppl_vae.pyro.threads`); share this machine's cores meanwhile
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    child = subprocess.Popen(_command(n, argv), env=env)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached torchrun and its workers too: let them end
            continue


@dataclass(frozen=True)
class Group:
    """This process's place in the launcher's group: `rank` of `size`, `local_rank` on its
    node, and whether it trains on a GPU (``cuda:local_rank``)."""

    rank: int
    size: int
    local_rank: int
    cuda: bool

    def device(self, device: str) -> str:
        """train.device for this process: its own GPU, or the CPU."""
        return f"cuda:{self.local_rank}" if self.cuda else device

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This process's rows (axis 0) of the global minibatch `t` (a view)."""
        n = t.shape[0] // self.size
        return t.narrow(0, self.rank * n, n)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes, in place."""
        dist.all_reduce(t)
        return t

    def data_parallel(self, modules: torch.nn.Module, terms):
        """``terms(y, labels)`` (the ELBO's differentiable terms of this process's rows) as the
        forward pass of `modules` in DDP, its draws of z those of the global batch
        (`GlobalNoise`)."""
        # The modules' buffers are constants (a prior's zeros): no broadcast before each step
        # (the keyword was renamed in torch 2.13). static_graph: the same parameters take part
        # in every step, which lets DDP skip its search for unused ones.
        quiet = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
            DistributedDataParallel).parameters else "broadcast_buffers")
        return DistributedDataParallel(_Objective(modules, terms, GlobalNoise(self.rank,
                                                                              self.size)),
                                       device_ids=[self.local_rank] if self.cuda else None,
                                       static_graph=True, **{quiet: False})


DistributedDataParallel = torch.nn.parallel.DistributedDataParallel


class _Objective(torch.nn.Module):
    """The ELBO's terms as a module's forward pass, which is what DDP synchronises: it
    all-reduces the gradients of `nets`' parameters during the backward pass that follows."""

    def __init__(self, nets: torch.nn.Module, terms, noise: Messenger):
        super().__init__()
        self.nets = nets
        self._terms, self._noise = terms, noise

    def forward(self, y, labels):
        with self._noise:
            return self._terms(y, labels)


def check(spec: Spec) -> None:
    """Refuse (`BackendError`) what N processes would not compute as one device does."""
    if any(aux.kind == "infonce" for aux in spec.objective.aux):
        raise BackendError("objective.aux 'infonce' compares each example with the rest of its "
                           "minibatch, and each process holds only its rows: train it with "
                           "train.devices = 1, or with the numpyro backend (one program over "
                           "every device, the same result as one)")


def join(spec: Spec, environ=os.environ) -> Group | None:
    """Join the launcher's process group (gloo on a CPU, NCCL on GPUs); None for one process.

    Outside a launcher, train.devices > 1 is an error that says how to start the run; inside
    one, the launcher's WORLD_SIZE is the number of devices (train.devices = 1, "all" or it)."""
    if not launched(environ):
        n = wanted(spec)
        if n > 1:
            raise BackendError(
                f"train.devices = {spec.train.devices!r} with the pyro backend runs one process "
                f"per device: start it with `ppl-vae train SPEC --backend pyro --devices {n}` or "
                f"`torchrun --nproc-per-node {n} -m ppl_vae.cli train SPEC --backend pyro`")
        return None
    size, rank = int(environ["WORLD_SIZE"]), int(environ["RANK"])
    if spec.train.devices not in (1, "all", size):
        raise BackendError(f"train.devices = {spec.train.devices} but the launcher started "
                           f"{size} processes (one per device): set train.devices = {size} or "
                           '"all", or start that many')
    if size == 1:
        return None
    if spec.train.batch_size % size:  # train.devices = 1 or "all" under torchrun: not checked
        raise SpecError("train.batch_size", spec.train.batch_size,  # by the spec's validation
                        f"a multiple of the {size} processes torchrun started: each takes an "
                        "equal slice of the global minibatch", spec.source or None)
    check(spec)
    local_rank = int(environ.get("LOCAL_RANK", rank))
    cuda = _uses_cuda(spec)
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_leave)
    return Group(rank, size, local_rank, cuda)


def _leave() -> None:
    """Close the process group before the interpreter's shutdown, which otherwise can abort the
    process in gloo's threads (SIGABRT, "terminate called without an active exception"); DDP's
    reducer, in a reference cycle with its trainer, holds the group until collected."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def process_rank(spec: Spec) -> int:
    """This process's rank in a data-parallel run (0 writes the run folder), 0 alone."""
    group = join(spec)
    return 0 if group is None else group.rank


def _reparameterised(fn, eps: torch.Tensor) -> torch.Tensor:
    """`fn.rsample()` with its standard normal draws `eps` given: torch's own formulas, so the
    value is what `fn.rsample` gives for the same draws."""
    if isinstance(fn, Independent):
        return _reparameterised(fn.base_dist, eps)
    if isinstance(fn, Normal):
        return fn.loc + eps * fn.scale
    if isinstance(fn, MultivariateNormal):
        return fn.loc + _batch_mv(fn._unbroadcasted_scale_tril, eps)
    if isinstance(fn, TransformedDistribution):
        x = _reparameterised(fn.base_dist, eps)
        for transform in fn.transforms:
            x = transform(x)
        return x
    raise BackendError(f"{type(fn).__name__}: a latent distribution that data-parallel "
                       "training cannot draw for the global batch; use train.devices = 1")


def _draw_dtype(fn):
    """The dtype and device of `fn`'s standard normal draws (those of its Gaussian)."""
    while isinstance(fn, Independent | TransformedDistribution):
        fn = fn.base_dist
    if not isinstance(fn, Normal | MultivariateNormal):
        _reparameterised(fn, None)  # raises, naming the distribution
    return fn.loc.dtype, fn.loc.device


class GlobalNoise(Messenger):
    """Reparameterised latent draws in the data plate made for the global minibatch (`size`
    processes' rows) and cut to this process's rows: the same values and the same use of the
    random stream as one device drawing the whole batch. Other sites are left alone."""

    def __init__(self, rank: int, size: int):
        super().__init__()
        self.rank, self.size = rank, size

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if (msg["is_observed"] or msg["value"] is not None or not fn.has_rsample
                or msg["infer"].get("enumerate")):
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.name == DATA_PLATE), None)
        if frame is None:  # not per example: every process makes the one-device draw
            return
        shape = list(msg["kwargs"].get("sample_shape", ())) + list(fn.batch_shape) + list(
            fn.event_shape)
        dim = len(shape) - len(fn.event_shape) + frame.dim  # the rows' axis of the value
        rows = shape[dim]
        shape[dim] = rows * self.size
        dtype, device = _draw_dtype(fn)
        eps = _standard_normal(shape, dtype=dtype, device=device).narrow(
            dim, self.rank * rows, rows)
        msg["value"] = _reparameterised(fn, eps)
