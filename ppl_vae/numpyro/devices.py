"""Data-parallel training with NumPyro: one `jit` over a 1-D mesh of devices (`train.devices`).

The window function is the one-device function, compiled once for the mesh: the dataset, the
parameters, Adam's state and the key are replicated on every device; inside each step the
minibatch (train.batch_size rows, the global batch) is constrained to the mesh's ``batch`` axis,
so each device computes the terms of its rows and XLA sums the gradients across the mesh (an
all-reduce). JAX's counter-based random numbers (``jax_threefry_partitionable``, the default)
give every row the same draws however the batch is split, so N devices compute the one-device
result, to float rounding in the sums.

Several hosts: each host starts one process; `start_distributed` calls
``jax.distributed.initialize`` before JAX touches a device, when the environment describes a
multi-process run and the spec asks for more than one device:

* ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` (0 … N−1), or
* a cluster JAX detects itself (Slurm's ``srun`` with several tasks, Open MPI's ``mpirun``).

Then `jax.devices()` lists every host's devices, the mesh spans them all (train.devices = "all"
or their number) and process 0 alone writes the run folder.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ppl_vae.backends import BackendError
from ppl_vae.spec import Spec, SpecError

AXIS = "batch"  # the mesh's one axis: the minibatch's rows
HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"
#: Variables that describe a multi-process run to `jax.distributed.initialize`.
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _cluster_tasks(environ) -> int:
    """Processes a Slurm step or an Open MPI job started (1 outside one)."""
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 1


def start_distributed(spec: Spec, environ=os.environ) -> bool:
    """Join a multi-process run (``jax.distributed.initialize``) when train.devices ≠ 1 and the
    environment describes one (`DISTRIBUTED_ENV`, or a Slurm/Open MPI job with several tasks).
    Returns whether this process is part of one. Must run before JAX initialises its devices."""
    if jax.distributed.is_initialized():
        return True
    address = environ.get("JAX_COORDINATOR_ADDRESS")
    if spec.train.devices == 1 or (not address and _cluster_tasks(environ) == 1):
        return False
    kwargs = {key: int(environ[name]) for key, name in
              (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
              if name in environ}
    try:
        jax.distributed.initialize(address, **kwargs)
    except (RuntimeError, ValueError) as err:
        raise BackendError(f"could not start the multi-process JAX run ({err}); set "
                           + ", ".join(DISTRIBUTED_ENV) + " in every process before Python "
                           "starts, or unset JAX_COORDINATOR_ADDRESS for one process") from None
    return True


def process_rank(spec: Spec) -> int:
    """This process's index in a multi-process run (0 writes the run folder), 0 alone."""
    return jax.process_index() if start_distributed(spec) else 0


def simulate_host_devices(n: int, environ=os.environ) -> None:
    """Ask XLA for `n` CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=n``)
    unless XLA_FLAGS already sets a count. Takes effect only before JAX initialises its devices:
    the command line calls it first; a GPU's devices are unaffected."""
    flags = environ.get("XLA_FLAGS", "")
    if HOST_DEVICES_FLAG not in flags:
        # first: XLA stops reading at a word that is not a flag, so an appended one could be lost
        environ["XLA_FLAGS"] = f"{HOST_DEVICES_FLAG}={n} {flags}".strip()


def launch(spec: Spec, argv) -> int | None:
    """The command line's hook before training: simulated CPU devices for train.devices = N
    (harmless where N GPUs exist); training then runs in this process (None)."""
    if isinstance(spec.train.devices, int) and spec.train.devices > 1:
        simulate_host_devices(spec.train.devices)
    return None


def mesh_devices(spec: Spec, first) -> list:
    """The devices of the mesh: the first train.devices of `first`'s platform (`first`, the
    model's device, is this process's first); every process's in a multi-process run."""
    want = spec.train.devices
    found = jax.devices(first.platform)
    if want == "all":
        want = len(found)
    if want > len(found):
        hint = (f"; on a CPU, start Python with XLA_FLAGS={HOST_DEVICES_FLAG}={want} to simulate "
                f"{want} (`ppl-vae train` sets it itself)" if first.platform == "cpu" else "")
        raise BackendError(f"train.devices = {spec.train.devices} but JAX sees {len(found)} "
                           f"{first.platform} device(s){hint}")
    if jax.process_count() > 1 and want != len(found):
        raise BackendError(f"a multi-process run trains on every process's devices: set "
                           f'train.devices = "all" (or {len(found)}), not {want}')
    if spec.train.batch_size % want:
        raise SpecError("train.batch_size", spec.train.batch_size,
                        f"a multiple of the {want} devices (train.devices = "
                        f"{spec.train.devices!r}): each device takes an equal slice",
                        spec.source or None)
    # every process lists the mesh in the same (global) order; the model's device is the first
    # of this process's
    return found[:want]


class DataParallel:
    """A 1-D mesh over `devices`: `replicated` and `batch` (rows split on the mesh) shardings,
    and the moves between host, one device and the mesh."""

    def __init__(self, devices):
        self.size = len(devices)
        self.mesh = Mesh(np.array(devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch = NamedSharding(self.mesh, PartitionSpec(AXIS))

    def replicate(self, tree):
        """A copy of every leaf (host or device arrays) on every device of the mesh; through the
        host when the mesh spans several processes (each passes the same values)."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)

        def put(leaf):
            host = np.asarray(leaf)
            return jax.make_array_from_callback(host.shape, self.replicated, lambda i: host[i])

        return jax.tree_util.tree_map(put, tree)

    @staticmethod
    def local(tree):
        """This process's first copy of replicated arrays: one-device arrays, no transfer (they
        share the mesh arrays' buffers)."""
        return jax.tree_util.tree_map(lambda a: a.addressable_data(0), tree)

    def shard_rows(self, a):
        """Inside the jitted window: `a`'s rows (axis 0) split over the mesh."""
        return jax.lax.with_sharding_constraint(a, self.batch)

