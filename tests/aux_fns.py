"""User aux functions for the tests ("tests.aux_fns:<name>" in a spec)."""

import os
import signal

CALLS = {"n": 0}


def zero(*, y, z, loc, scale, labels, backend):
    """An aux loss that is always 0 but touches the encoder."""
    return 0.0 * loc.sum()


def nan_after_25(*, y, z, loc, scale, labels, backend):
    """Finite for 25 calls, then NaN: a deterministic divergence."""
    CALLS["n"] += 1
    return 0.0 * loc.sum() + (float("nan") if CALLS["n"] > 25 else 0.0)


def ctrl_c_at_15(*, y, z, loc, scale, labels, backend):
    """Sends this process SIGINT on the 15th call: Ctrl-C in the middle of a window."""
    CALLS["n"] += 1
    if CALLS["n"] == 15:
        os.kill(os.getpid(), signal.SIGINT)
    return 0.0 * loc.sum()


def reads_host(*, y, z, loc, scale, labels, backend):
    """Reads a value on the host each call (``float(tensor)``): a CUDA graph cannot hold it."""
    return 0.0 * loc.sum() + 0.0 * float(scale.detach().mean())


def nan_on_device(*, y, z, loc, scale, labels, backend):
    """NaN from the first step, computed on the device (a CUDA graph replays it)."""
    return 0.0 * loc.sum() + float("nan")


def huge_after_25(*, y, z, loc, scale, labels, backend):
    """Finite but 1e9 nats from the 26th call on: a blow-up short of NaN."""
    CALLS["n"] += 1
    return 0.0 * loc.sum() + (1e9 if CALLS["n"] > 25 else 0.0)
