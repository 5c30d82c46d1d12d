"""Pyro backend: time per training step with 1, 2, … intra-op threads, on an idle CPU and on a
CPU that other processes keep busy (issue 13: with PyTorch's default, one thread per core, a run
slowed 20–40x when other processes shared the 2 cores; NumPyro was unaffected).

Each (spec, threads, contention) cell trains `--steps` steps of a bundled spec with
`train.threads` set, in a fresh process, while `contention` other processes spin on the CPU
(pure Python loops, one core each). It prints ms/step and the ratio of each cell to the
1-thread cell with the same contention. Nothing is asserted.

    python benchmarks/bench_threads.py                    # ~3 minutes on 2 cores
    python benchmarks/bench_threads.py --smoke            # seconds: checks that it runs
    python benchmarks/bench_threads.py --specs vae_mnist --threads 1 2 4 --contention 0 1 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from ppl_vae.data import load_data
from ppl_vae.pyro.train import Trainer
from ppl_vae.schedules import step_scalars
from ppl_vae.spec import load_spec
data = [f'data.path="{sys.argv[4]}"'] if sys.argv[4] else []
spec = load_spec(sys.argv[1], ["train.threads=" + sys.argv[2], 'train.device="cpu"', *data])
steps = int(sys.argv[3])
trainer = Trainer(spec, load_data(spec), "cpu")
trainer.run_steps(step_scalars(spec, range(20), trainer.n_train), 1.0)  # warm-up: allocations
t0 = time.perf_counter()
trainer.run_steps(step_scalars(spec, range(steps), trainer.n_train), 1.0)
print(json.dumps({"ms": 1000 * (time.perf_counter() - t0) / steps}))
"""


def _spin(stop):
    while not stop.is_set():
        pass


def measure(spec: str, threads: int, contention: int, steps: int, mnist: str = "") -> float:
    """ms/step of `steps` Pyro steps of `spec` with `threads` threads, `contention` spinners
    (`mnist`: the data.path of an MNIST spec)."""
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
                for _ in range(contention)]
    for p in spinners:
        p.start()
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, spec, str(threads), str(steps),
                              mnist],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{spec}, {threads} threads: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])["ms"]
    finally:
        stop.set()
        for p in spinners:
            p.join()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specs", nargs="+", default=["vae_digits", "vae_mnist", "iaf_mnist"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--contention", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--smoke", action="store_true",
                   help="one spec, 10 steps, no spinning process: checks that it runs")
    from ppl_vae import experiments

    experiments.add_mnist_argument(p)
    a = p.parse_args(argv)
    if a.smoke:
        # no spinning process: the tests run beside other tests, whose core a spinner would
        # take for the whole run (the spinner is a bare busy loop; the full run measures it)
        a.specs, a.steps, a.contention = a.specs[:1], 10, [0]
    # the bundled MNIST specs read data.path relative to the working directory: give it whole
    mnist = (str(experiments.mnist_folder(a.mnist, p.prog))
             if any(s.endswith("_mnist") for s in a.specs) else "")
    print(f"{os.cpu_count()} CPU cores; Pyro backend, ms/step ({a.steps} steps after 20 of "
          "warm-up); ratio to 1 thread under the same contention")
    print(f"{'spec':<12}{'busy procs':>11}" + "".join(f"{f'{t} thr':>10}" for t in a.threads)
          + "".join(f"{f'{t}/1':>8}" for t in a.threads if t != 1))
    for spec in a.specs:
        for busy in a.contention:
            t0 = time.perf_counter()
            ms = {t: measure(spec, t, busy, a.steps, mnist if spec.endswith("_mnist") else "")
                  for t in a.threads}
            base = ms.get(1)
            ratios = "".join(f"{ms[t] / base:>8.2f}" for t in a.threads if t != 1 and base)
            print(f"{spec:<12}{busy:>11}" + "".join(f"{ms[t]:>10.2f}" for t in a.threads)
                  + ratios + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
