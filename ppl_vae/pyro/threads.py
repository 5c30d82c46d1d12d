"""`train.threads` for PyTorch: the intra-op threads a training window or an evaluation runs on.

PyTorch's default is one thread per core. Its OpenMP workers spin while they wait for work, so
when other processes share the cores (a second run, a test suite, a notebook kernel) each
operation waits for descheduled threads: on 2 cores, a run slowed 20–40x (issue 13). One thread
barely loses on an idle machine for the small networks of VAE experiments and does not collapse
under contention (measured in benchmarks/bench_threads.py; the README's "Speed" section). The
setting is process-wide in PyTorch, so it is made only around the work and restored after it,
as `precision.matmul_precision` does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

#: Intra-op threads when train.threads = 0.
DEFAULT_THREADS = 1


def thread_count(setting: int) -> int:
    """The threads `train.threads = setting` asks for (0: `DEFAULT_THREADS`)."""
    if setting < 0:
        raise ValueError(f"train.threads must be >= 0; got {setting}")
    return setting or DEFAULT_THREADS


@contextmanager
def intra_op_threads(setting: int):
    """Run the block on `thread_count(setting)` PyTorch intra-op threads, then restore."""
    saved = torch.get_num_threads()
    wanted = thread_count(setting)
    if wanted != saved:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)
