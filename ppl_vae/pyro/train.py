"""The Pyro SVI loop: Adam on the modules' parameters with `ScaledELBO`, one window at a time.

The backend-free driver (`ppl_vae.training`) decides β per step, logging, evaluation,
checkpoints and interruption; this class runs the steps. Within a window nothing is copied to the
host: per-step terms go to a device buffer that comes back once, as one array, when the window
ends. Pyro's param store is not used (parameters are optimised directly), so building twice in one
process trains each model correctly.

One step (`Trainer._step`) never waits for the device: minibatch indices and dynamic
binarisation are drawn on the device, the per-step scalars (β per site, λ, the capacity targets;
under a CUDA graph the learning rate, Adam's Tensor lr) are 0-d device tensors filled in place,
an update to skip (train.skip_grad_norm) is decided and undone on the device (`_UpdateGuard`),
and nothing calls ``.item()``. So on CUDA the step can be captured once in a CUDA graph and
replayed (``train.cuda_graphs = "auto"``): a replay launches the step's few hundred kernels with
no Python, no Pyro tracing and no allocation, which is what makes a small network fast on a GPU
(issue 11 measured 4-5 ms eager against 0.44 ms replayed on an H200). Before capturing, a few
steps run eagerly on a side stream (PyTorch's rule for warm-up: Adam's state, cuBLAS workspaces)
and are then undone, so every step of a run, straight or resumed, is a replay and a resumed run
repeats the straight one. When capture fails (an aux function that reads a value on the host, a
data-dependent shape), the run says so in one line and trains eagerly.

Streaming (`ppl_vae.streaming`: data.stream, data.device_memory_mb): the data set stays in host
memory and is never copied to the device. Step t reads the rows `streaming.step_indices(seed, t,
…)`, gathered ahead by a background thread; each window's rows go to the device in one copy, and
before each step (eager or replayed) its rows are copied into two fixed device buffers that the
step reads, so the CUDA graph captures that path too. The draws that follow (binarisation, the
ELBO's noise) still come from torch's generator, which the in-memory path also uses to draw its
indices: streaming gives the in-memory result for the same batches, not the same batches as
in memory. Resuming is exact (the rows depend on the step alone).
"""

from __future__ import annotations

import sys

import numpy as np
import pyro
import torch

from ppl_vae import init, schedules, streaming
from ppl_vae.data import Dataset
from ppl_vae.objective import rate_sites, site_betas, step_term_keys
from ppl_vae.pyro import devices
from ppl_vae.pyro.elbo import ScaledELBO
from ppl_vae.pyro.hooks import Model
from ppl_vae.pyro.precision import matmul_precision
from ppl_vae.pyro.threads import intra_op_threads
from ppl_vae.spec import Spec

GRAPH_WARMUP_STEPS = 3  # eager steps before capture (PyTorch's whole-network example uses 3)

process_rank = devices.process_rank  # the driver's question: does this process write? (0 does)


class Trainer:
    """State: the model's parameters, Adam's moments, the step count and torch's random state.

    Minibatches are drawn with replacement (uniform indices on the device), so the data order is
    a function of the random state alone and resuming from a checkpoint is exact.
    `step_mode` says how steps run: "eager", "cuda graph", or why capture was not used.
    """

    checkpoint_name = "checkpoint.pt"

    def __init__(self, spec: Spec, dataset: Dataset, device: str = "auto"):
        tr = spec.train
        # train.devices > 1: this process's place among torchrun's (`ppl_vae.pyro.devices`)
        self.group = devices.join(spec)
        if self.group is not None:
            device = self.group.device(device)
        torch.manual_seed(tr.seed)  # initial weights and every draw after them
        self.spec = spec
        self.model = Model(spec, dataset.dim, dataset.image_shape, device)
        if init.needed(spec):  # NumPy's draws: torch's random state stays a default run's
            self.model.import_params(init.initial_params(spec, self.model.export_params(),
                                                         dataset.x_train))
        self.device = self.model.device
        self.n_train = len(dataset.x_train)
        # streamed: the data stay on the host; each step reads its rows from `_given`
        self.streaming = streaming.streams(spec, dataset)
        self._host_data = (dataset.x_train, dataset.labels_train) if self.streaming else None
        self._prefetcher = None  # started at the first window, from the step count
        if self.streaming:
            self.x = self.labels = None
            self._given = (torch.zeros((tr.batch_size, dataset.dim), device=self.device,
                                       dtype=self.model.dtype),
                           torch.zeros(tr.batch_size, device=self.device, dtype=torch.int64))
        else:
            self.x = self.model.tensor(dataset.x_train)
            self.labels = torch.as_tensor(dataset.labels_train, device=self.device)
        cuda = self.device.type == "cuda"
        # β of each latent site, λ and each capacity target C_site(t): device tensors the step
        # reads and `run_steps` fills, so a schedule changes them without rebuilding anything
        # (or recapturing a graph).
        scalar = dict(device=self.device, dtype=self.model.dtype)
        self.beta = {name: torch.ones((), **scalar) for name in rate_sites(spec)}
        self.lam = torch.ones((), **scalar)
        self.capacity = {name: torch.zeros((), **scalar)
                         for name in schedules.capacity_sites(spec)}
        obj = spec.objective
        options = schedules.elbo_options(spec)
        if self.capacity:
            options["capacity"] = self.capacity
        self.elbo = ScaledELBO(beta=self.beta, lam=self.lam, num_particles=obj.num_particles,
                               analytic_kl=obj.analytic_kl,
                               vectorize_particles=obj.num_particles > 1, max_plate_nesting=1,
                               **options)
        self.params = list(self.model.modules.parameters())
        self._terms = self._elbo_terms
        if self.group is not None:  # the same function, in DDP, on this process's rows
            self._terms = self.group.data_parallel(self.model.modules, self._elbo_terms)
        # A CUDA graph of the step (not across processes: DDP's all-reduce is not captured here)
        self._graphs = cuda and tr.cuda_graphs == "auto" and self.group is None
        # capturable: Adam keeps its step count on the device and never reads it on the host;
        # needed by a graph, and by update skipping on a GPU (`_UpdateGuard` restores the count
        # on the device)
        self._capturable = cuda and (self._graphs or tr.skip_grad_norm > 0)
        # The learning rate of each step: a float set in the param group, or under a CUDA graph
        # a 0-d device tensor filled in place (Adam takes a Tensor lr with capturable=True; its
        # step count is float32 there, and so is this)
        self._lr = (torch.full((), tr.lr, device=self.device, dtype=torch.float32)
                    if self._graphs else None)
        self.optimizer = torch.optim.Adam(self.params, lr=tr.lr if self._lr is None else self._lr,
                                          capturable=self._capturable)
        self._guard = (_UpdateGuard(self.params, self.optimizer) if tr.skip_grad_norm > 0
                       else None)
        self.step = 0
        self.term_keys = step_term_keys(spec)
        self._graph = None  # (torch.cuda.CUDAGraph, the row tensor the replay writes)
        self._try_graph = self._graphs
        self.step_mode = ("eager (train.cuda_graphs = off)" if cuda and tr.cuda_graphs == "off"
                          else "eager")
        if self.group is not None:
            self.step_mode = (f"eager, data-parallel over {self.group.size} processes (DDP, "
                              f"{'NCCL' if self.group.cuda else 'gloo'})")
        self._stream_note = ", minibatches streamed from host memory" if self.streaming else ""
        self.step_mode += self._stream_note

    # -- one step ---------------------------------------------------------------------------------
    def _step(self) -> torch.Tensor:
        """One SVI step from zeroed (or absent) gradients; returns the (F,) summed terms, and
        with train.skip_grad_norm > 0 a last entry 1 where the update was skipped, else 0.

        Host-synchronisation free (tests/pyro/test_train.py checks it), hence capturable."""
        tr = self.spec.train
        y, labels = self._batch()
        if self.spec.data.binarize == "dynamic":
            y = torch.bernoulli(y)
        if self.group is not None:  # the global minibatch drawn as on one device; our rows
            y, labels = self.group.rows(y), self.group.rows(labels)
        terms = self._terms(y, labels)
        # the mean over this process's rows; DDP averages it over the processes
        (terms["loss"] / len(y)).backward()
        norm = None
        if tr.clip_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, tr.clip_norm)  # the norm before
        row = [terms[k].detach() for k in self.term_keys]
        if self._guard is None:
            self.optimizer.step()
            return torch.stack(row)
        if norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params
                                                  if p.grad is not None])
        # Child (2021): skip an update whose gradient norm is not finite or above the threshold;
        # decided on the device, the step taken and undone there (the host never waits)
        skip = ~torch.isfinite(norm) | (norm > tr.skip_grad_norm)
        self._guard.keep()
        self.optimizer.step()
        self._guard.undo(skip)
        return torch.stack([*row, skip.to(row[0].dtype)])

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's minibatch on the device, (batch, D) rows and (batch,) labels: drawn on
        the device (uniform indices, torch's generator), or, streamed, the buffers `run_steps`
        filled with the step's rows."""
        if self.streaming:
            return self._given
        idx = torch.randint(len(self.x), (self.spec.train.batch_size,), device=self.device)
        return self.x[idx], self.labels[idx]

    def _window_rows(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Streamed: the next `steps` steps' rows on the device, (steps, batch, D) and
        (steps, batch), from the prefetcher (started here at the current step)."""
        if self._prefetcher is None:
            tr, n, state = self.spec.train, self.n_train, {"step": self.step}

            def draw(k: int) -> np.ndarray:
                first, state["step"] = state["step"], state["step"] + k
                return np.stack([streaming.step_indices(tr.seed, t, n, tr.batch_size)
                                 for t in range(first, first + k)])

            x, labels = self._host_data
            self._prefetcher = streaming.Prefetcher(
                x, labels, draw, tr.log_every,
                dtype=np.float64 if self.model.dtype == torch.float64 else np.float32)
        y, labels = self._prefetcher.take(steps)
        return (torch.from_numpy(y).to(self.device), torch.from_numpy(labels).to(self.device))

    def _elbo_terms(self, y: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.elbo.differentiable_terms(self.model.built.model, self.model.built.guide, y,
                                              labels)

    def _eager_step(self, validate: bool) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        # Pyro's argument validation catches mistakes on the first step; after that it costs
        # time on every distribution it builds and finds nothing new.
        with pyro.validation_enabled(validate):
            return self._step()

    def _set_scalars(self, scalars: dict[str, float], lam: float) -> None:
        """This step's β (per site), λ, capacity targets, relaxed sites' temperatures and
        learning rate, in place."""
        for name, value in site_betas(self.spec, scalars["beta"]).items():
            self.beta[name].fill_(value)
        self.lam.fill_(lam)
        for name, target in self.capacity.items():
            target.fill_(scalars[f"capacity/{name}"])
        self.model.built.set_temperatures(schedules.step_temperatures(scalars))
        if self._lr is not None:
            self._lr.fill_(scalars["lr"])
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = scalars["lr"]

    # -- CUDA graphs -------------------------------------------------------------------------------
    def _snapshot(self):
        """Copies of what a step changes: parameters, Adam's state, the random state."""
        state = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
                 for p, s in self.optimizer.state.items()}
        return ([p.detach().clone() for p in self.params], state, torch.get_rng_state(),
                torch.cuda.get_rng_state(self.device))

    @torch.no_grad()
    def _restore(self, snapshot) -> None:
        """Undo the steps since `snapshot`, in place (a captured graph keeps its addresses)."""
        params, state, cpu_rng, cuda_rng = snapshot
        for p, saved in zip(self.params, params):
            p.copy_(saved)
        for p, s in self.optimizer.state.items():
            for k, v in s.items():
                if not torch.is_tensor(v):
                    continue
                if id(p) in state:
                    v.copy_(state[id(p)][k])
                else:  # Adam's state was created by the warm-up: back to a fresh state
                    v.zero_()
        torch.set_rng_state(cpu_rng)
        torch.cuda.set_rng_state(cuda_rng, self.device)

    def _capture(self, validate: bool):
        """Warm up, undo the warm-up, capture `_step`; None (and `step_mode` says why) on
        failure, with the state as it was."""
        snapshot = self._snapshot()
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(side):
                for i in range(GRAPH_WARMUP_STEPS - 1):
                    self._eager_step(validate and i == 0)
                # The last warm-up step runs as the graph will: whatever makes the host wait
                # (.item(), float(t), a tensor made from Python data) raises here, before any
                # capture begins. A capture that fails half-way can leave PyTorch's allocator
                # unable to capture again in this process.
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    self._eager_step(validate=False)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
        except Exception as err:  # noqa: BLE001 - any failure means: train eagerly
            return self._fall_back(err, stream, side, snapshot)
        stream.wait_stream(side)
        self._restore(snapshot)
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward writes them
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), pyro.validation_enabled(False), \
                    torch.cuda.graph(graph):
                row = self._step()
        except Exception as err:  # noqa: BLE001
            # when capture_end raises, torch.cuda.graph leaves its capture stream current, and
            # the error it raises hides the one that ended the capture
            torch.cuda.set_stream(stream)
            return self._fall_back(err.__context__ or err, stream, side, snapshot)
        self.step_mode = "cuda graph" + self._stream_note
        return graph, row

    def _fall_back(self, err: BaseException, stream, side, snapshot) -> None:
        stream.wait_stream(side)
        torch.cuda.synchronize(self.device)
        self._restore(snapshot)
        text = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {text[0] if text else ''}"
        self.step_mode = f"eager (CUDA graph capture failed: {reason}){self._stream_note}"
        sys.stderr.write(f"ppl-vae: could not capture the training step in a CUDA graph "
                         f"({reason}); training without one (train.cuda_graphs = \"off\" "
                         f"hides this line)\n")
        return None

    # -- the window ------------------------------------------------------------------------------
    def run_steps(self, scalars: dict[str, np.ndarray], lam: float) -> np.ndarray:
        """One SVI step per entry of the per-step `scalars` (`schedules.step_scalars`: beta,
        lr, capacity/<site>); returns (steps, F) per-example values of `objective.step_fields`
        (the terms `step_term_keys`, nats; then `skipped`, 0 or 1, where updates may be
        skipped)."""
        steps = schedules.check_scalars(self.spec, scalars)
        n_terms = len(self.term_keys)
        rows = torch.empty((steps, n_terms + (self._guard is not None)), device=self.device,
                           dtype=self.model.dtype)
        tr = self.spec.train
        given = self._window_rows(steps) if self.streaming else None
        with matmul_precision(tr.matmul_precision), intra_op_threads(tr.threads):
            for i in range(steps):
                self._set_scalars({k: float(v[i]) for k, v in scalars.items()}, lam)
                if given is not None:  # in place: a captured graph reads these buffers
                    self._given[0].copy_(given[0][i])
                    self._given[1].copy_(given[1][i])
                if self._try_graph and self._graph is None:
                    self._graph = self._capture(validate=self.step == 0)
                    self._try_graph = self._graph is not None
                if self._graph is not None:
                    graph, row = self._graph
                    graph.replay()
                else:
                    row = self._eager_step(validate=self.step == 0)
                rows[i] = row
                self.step += 1
        if self.group is not None:  # each process summed its rows' terms
            self.group.sum(rows)
            rows[:, n_terms:] /= self.group.size  # every process skipped the same updates
        terms = rows[:, :n_terms] / self.spec.train.batch_size
        return torch.cat([terms, rows[:, n_terms:]], 1).double().cpu().numpy()

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

    def close(self) -> None:
        """Stop the prefetching thread of a streamed run (if any); the next window starts
        another. The driver calls it when training ends, however it ends."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def load_checkpoint(self, path) -> int:
        """Restore everything `save_checkpoint` wrote; returns the step to continue from."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.modules.load_state_dict(state["modules"])
        # A checkpoint keeps the `capturable` of the device that wrote it; this device's applies
        # (Adam places its step counts by it while loading).
        for group in state["optimizer"]["param_groups"]:
            group["capturable"] = self._capturable
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the next step sets its own lr
            group["lr"] = self.spec.train.lr if self._lr is None else self._lr
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.step = int(state["step"])
        self.close()  # a prefetcher ran ahead from another step: start again
        self._graph = None  # Adam's state tensors are new objects: capture again
        self._try_graph = self._graphs
        if self._guard is not None:
            self._guard.forget()
        return self.step


class _UpdateGuard:
    """Undoes an optimiser step on the device when a 0-d bool tensor says so, with no host
    synchronisation (so a CUDA graph can hold it): `keep` copies the parameters and Adam's state
    (moments and step count) before the step, `undo(skip)` puts them back where `skip` is true.

    Adam's state does not exist before the first step; a skipped first step leaves it as Adam
    creates it (zero moments, step 0), which is the state it would have started from.
    """

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = params, optimizer
        self._copies: list[torch.Tensor] | None = None

    def _live(self) -> list[torch.Tensor]:
        """The parameters, then every tensor of Adam's state, in a fixed order."""
        state = [v for p in self.params for _, v in sorted(self.optimizer.state.get(p, {}).items())
                 if torch.is_tensor(v)]
        return [p.detach() for p in self.params] + state

    @torch.no_grad()
    def keep(self) -> None:
        live = self._live()
        if self._copies is None or len(self._copies) != len(live):
            self._copies = [t.clone() for t in live]  # once, outside any capture
        else:
            torch._foreach_copy_(self._copies, live)

    @torch.no_grad()
    def undo(self, skip: torch.Tensor) -> None:
        live = self._live()
        for i, t in enumerate(live):
            if i < len(self._copies):
                torch.where(skip, self._copies[i], t, out=t)  # elementwise: in place is safe
            else:  # created by this step (the first): back to Adam's initial zeros
                t.masked_fill_(skip, 0)

    def forget(self) -> None:
        """The state tensors were replaced (a checkpoint): copy them afresh at the next step."""
        self._copies = None
