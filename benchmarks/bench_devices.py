"""The cost of data-parallel training (train.devices = 2) against one device, per backend.

Each way runs in a fresh process of its own and times `Trainer.run_steps` (the training step
alone: no evaluation, no checkpoints), after a warm-up window:

  numpyro x1   one CPU device (a plain process)
  numpyro x2   two devices simulated on the CPU
               (XLA_FLAGS=--xla_force_host_platform_device_count=2), the minibatch split over
               a mesh of both
  pyro x1      one process (its threads on every core)
  pyro x2      two processes under torchrun (gloo, OMP_NUM_THREADS = cores / 2 each)

It prints ms/step and the ratio x2 / x1 per backend (> 1: the two devices cost more). On a CPU
both ways compute the same steps with the same cores, so the ratio is the price of splitting
(collectives, per-device dispatch), not a speed-up: simulated devices share the host's cores.
The spec is vae_mnist (784-400-20, batch 128) on the MNIST files of --mnist (default
$PPL_VAE_MNIST, else ../shared/data/mnist beside the repository; vae_digits when they are
missing), 1000 examples of them with --smoke. Nothing is asserted.

    python benchmarks/bench_devices.py           # ~1 minute on 2 cores
    python benchmarks/bench_devices.py --smoke   # a few steps of the x2 ways (the x1 ways are
                                                 # bench_step.py's): checks that they run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WAYS = (("numpyro", 1), ("numpyro", 2), ("pyro", 1), ("pyro", 2))


def _spec(devices: int, window: int, mnist: str, smoke: bool):
    """vae_mnist on the folder `mnist` ("" : vae_digits); 1000 examples in a smoke run."""
    from ppl_vae.spec import load_spec

    overrides = [f"train.devices={devices}", "train.batch_size=128", f"train.log_every={window}"]
    if mnist:
        overrides.append(f'data.path="{mnist}"')
    if smoke:
        overrides.append("data.limit=1000")
    return load_spec("vae_mnist" if mnist else "vae_digits", overrides)


def worker(backend: str, devices: int, windows: int, window: int, mnist: str,
           smoke: bool) -> None:
    """Time `windows` windows of `window` steps after one warm-up window; rank 0 prints JSON."""
    import numpy as np

    from ppl_vae.backends import backend_module
    from ppl_vae.data import load_data
    from ppl_vae.schedules import step_scalars

    spec = _spec(devices, window, mnist, smoke)
    train_mod = backend_module(backend, "train")
    rank = train_mod.process_rank(spec)
    trainer = train_mod.Trainer(spec, load_data(spec), "cpu")
    betas = step_scalars(spec, np.arange(window), trainer.n_train)
    trainer.run_steps(betas, 1.0)  # compilation, allocation, Adam's state
    t0 = time.perf_counter()
    for _ in range(windows):
        trainer.run_steps(betas, 1.0)  # returns host values: the steps have finished
    ms = (time.perf_counter() - t0) / (windows * window) * 1e3
    if rank == 0:
        print(json.dumps({"backend": backend, "devices": devices, "ms_per_step": ms,
                          "spec": spec.name, "step_mode": trainer.step_mode}))


def run_way(backend: str, devices: int, windows: int, window: int, mnist: str,
            smoke: bool) -> dict:
    env = dict(os.environ)
    args = ["--worker", backend, str(devices), "--windows", str(windows), "--window", str(window),
            "--mnist", mnist or "", *(["--smoke"] if smoke else [])]
    cmd = [sys.executable, __file__, *args]
    if backend == "numpyro" and devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if backend == "pyro" and devices > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={devices}", __file__, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{backend} x{devices} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps per way")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "DEVICES"), help=argparse.SUPPRESS)
    parser.add_argument("--mnist", metavar="DIR", help="folder of the MNIST IDX files (default "
                        "$PPL_VAE_MNIST, else ../shared/data/mnist beside the repository; "
                        "vae_digits where there are none)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.windows, args.window, args.mnist,
               args.smoke)
        return
    from ppl_vae import experiments

    mnist = experiments.optional_mnist(Path(args.mnist) if args.mnist else None, parser.prog)
    windows, window = (1, 5) if args.smoke else (args.windows, args.window)
    results = {}
    for backend, devices in WAYS:
        if args.smoke and devices == 1:
            continue
        r = results[backend, devices] = run_way(backend, devices, windows, window,
                                                str(mnist or ""), args.smoke)
        print(f"{backend:8s} x{devices}  {r['ms_per_step']:8.3f} ms/step  ({r['step_mode']}; "
              f"{r['spec']}, batch 128, {os.cpu_count()} CPU cores)", flush=True)
    for backend in ("numpyro", "pyro"):
        if (backend, 1) not in results:
            continue
        ratio = results[backend, 2]["ms_per_step"] / results[backend, 1]["ms_per_step"]
        print(f"{backend:8s} x2 / x1 = {ratio:.2f}")


if __name__ == "__main__":
    main()
