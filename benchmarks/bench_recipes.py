"""The step-time cost of each training recipe of issue 22 against the plain ELBO, in both backends.

On the MNIST training images (784 pixels, dynamic binarisation, batch 100), with Burda et al.'s
784-200-200-50 tanh networks (`models/vae1_mnist.toml`, constant learning rate) unless the
recipe is a model of its own:

  plain ELBO · STL (sticking the landing) · IWAE K = 5, reparameterised · IWAE K = 5, DReG ·
  free bits (0.1 nats per dimension) · a capacity target (C rising to 25 nats over half the
  steps) · a linear β warm-up (over half the steps) · Burda et al.'s learning-rate schedule ·
  skip_grad_norm (a threshold never reached: the norm is computed, nothing skipped) · the
  VampPrior with 500 pseudo-inputs (`vamp_mnist`) · two stochastic layers with the ladder
  posterior and free bits (`vae2_ladder_mnist`, 100 + 50 units) · the IAF posterior
  (`iaf_mnist`, two flow steps).

Each (recipe, backend) trains in its own fresh process (this script's worker: `ppl_vae.training.
fit`, as `ppl-vae train` runs it), the two backends of a recipe one after the other, so both see
about the same load on a shared machine. Per step: the median over the logging windows (100
steps) after the first (data loading and compilation excluded) of the wall milliseconds and of
the CPU milliseconds of the process (all its threads: on a loaded machine the CPU time moves
less than the wall time; on an idle one XLA's threads make NumPyro's CPU time exceed its wall
time). The plain ELBO runs first and again at the end of a pass: a recipe's ratio is its time
over the mean of those two in the same backend and pass, and how far the two differ (their own
ratios, below and above 1) is how much the machine's load drifted meanwhile. `--passes N` times
everything N times in turn and prints the medians. Pyro trains on one intra-op thread (the
specs' train.threads); XLA picks its own. The load average is printed before, after each pass.

    nice -n 10 python benchmarks/bench_recipes.py             # 1000 steps each (≈ 10 minutes)
    nice -n 10 python benchmarks/bench_recipes.py --passes 3  # steadier on a shared machine
    python benchmarks/bench_recipes.py --recipes plain dreg --backends numpyro
    python benchmarks/bench_recipes.py --smoke                # seconds: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Every recipe's model is the one-layer VAE at a constant learning rate unless it names another.
BASE = "vae1_mnist"
PLAIN = ('train.lr_schedule={kind="constant"}',)
RECIPES = {  # key -> (label, spec, overrides after PLAIN; "{half}" is half the run's steps)
    "plain": ("plain ELBO", BASE, ()),
    "stl": ("STL (ELBO, sticking the landing)", BASE, ('objective.gradient="stl"',)),
    "iwae5": ("IWAE K=5, reparam", BASE, ('objective.bound="iwae"', "objective.num_particles=5")),
    "dreg": ("IWAE K=5, DReG", BASE, ('objective.bound="iwae"', "objective.num_particles=5",
                                      'objective.gradient="dreg"')),
    "free_bits": ("free bits 0.1 nats/dim", BASE, ("latent.free_bits=0.1",)),
    "capacity": ("capacity C → 25 nats, γ = 1000", BASE,
                 ("latent.capacity={max=25.0, steps={half}, weight=1000.0}",)),
    "warmup": ("β warm-up (linear)", BASE,
               ('objective.beta_schedule={kind="linear", warmup={half}}',)),
    "burda": ("Burda lr schedule", BASE, ('train.lr_schedule={kind="burda"}',)),
    "skip": ("skip_grad_norm (never reached)", BASE, ("train.skip_grad_norm=1e6",)),
    "vamp": ("VampPrior, 500 pseudo-inputs", "vamp_mnist", ()),
    "ladder": ("two layers, ladder, free bits", "vae2_ladder_mnist", ()),
    "iaf": ("IAF posterior (2 steps)", "iaf_mnist", ()),
}
#: --smoke trains these, in both backends (every recipe's spec is still loaded and validated)
SMOKE_RECIPES = ("plain",)
BACKENDS = ("pyro", "numpyro")
BATCH = 100


def overrides(key: str, steps: int, mnist: Path | None, smoke: bool) -> list[str]:
    """The recipe's overrides and the benchmark's settings; `mnist` None (--smoke on a machine
    without the MNIST files): scikit-learn's 8x8 digits instead, to check that it runs."""
    _, _, extra = RECIPES[key]
    log_every = 20 if smoke else 100
    data = ['data.source="digits"', 'data.path=""'] if mnist is None else [f'data.path="{mnist}"']
    out = [*PLAIN, *(e.replace("{half}", str(steps // 2)) for e in extra), *data,
           f"train.batch_size={BATCH}", f"train.steps={steps}", f"train.log_every={log_every}",
           f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    if smoke:
        out += ["data.limit=300", "train.eval_batch_size=300"]
        if RECIPES[key][1] == "vamp_mnist":
            out.append("prior.components=50")  # initialised from the 300 images
    return out


def train_one(key: str, backend: str, steps: int, mnist: Path | None, out: Path,
              smoke: bool) -> dict:
    """Train one recipe with one backend in a fresh process (`worker`); its timings."""
    cmd = [sys.executable, __file__, "--worker", key, "--backends", backend, "--steps",
           str(steps), "--out", str(out), *(["--mnist", str(mnist)] if mnist else []),
           *(["--smoke"] if smoke else [])]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no message)"]
        raise SystemExit(f"bench_recipes: {key} with {backend} failed: {lines[-1]}")
    timings = json.loads((out / "timing.json").read_text())
    return {"recipe": key, "label": RECIPES[key][0], "backend": backend,
            "process_seconds": time.perf_counter() - t0, **timings}


def worker(key: str, backend: str, steps: int, mnist: Path | None, out: Path,
           smoke: bool) -> None:
    """In this process: train the recipe and write out/timing.json, the median over the
    logging windows after the first (the first holds the data loading and the compilation) of
    the wall and the CPU milliseconds (this process, every thread) per step."""
    from statistics import median

    from ppl_vae.spec import load_spec
    from ppl_vae.training import fit

    spec = load_spec(RECIPES[key][1], overrides(key, steps, mnist, smoke))
    marks = []

    def mark(record: dict) -> None:
        if record.get("split") == "train":
            marks.append((record["step"], time.perf_counter(), time.process_time()))

    run = fit(spec, backend=backend, out_dir=out / "run", overwrite=True, progress=False,
              on_record=mark)
    windows = [(b[0] - a[0], b[1] - a[1], b[2] - a[2]) for a, b in zip(marks[:-1], marks[1:])]
    train = run.records("train")
    timings = {"ms_per_step": 1000 * median(w / n for n, w, _ in windows),
               "cpu_ms_per_step": 1000 * median(c / n for n, _, c in windows),
               "windows": len(windows), "step_mode": run.info.get("step_mode", "?"),
               "skipped": int(sum(r.get("skipped", 0) for r in train)),
               "test_elbo": run.final_test["elbo"]}
    (out / "timing.json").write_text(json.dumps(timings))


def check_specs(steps: int, mnist: Path | None, smoke: bool) -> None:
    """Every recipe's spec loads and validates (a renamed key fails here, not half-way)."""
    from ppl_vae.spec import load_spec

    for key, (_, spec, _) in RECIPES.items():
        load_spec(spec, overrides(key, steps, mnist, smoke))


def table(rows: list[dict], backends) -> str:
    """Markdown: per recipe and backend, the wall and CPU ms per step (the median over the
    passes) and their ratios to the plain ELBO: in each pass the recipe's time over the mean of
    the plain ELBO's two times of that pass (its first run and its run again at the end, where
    there is one), the median over the passes. The plain rows' own ratios show the drift."""
    from statistics import mean, median

    keys = ("ms_per_step", "cpu_ms_per_step")
    base = {}  # (pass, backend, key) -> the plain ELBO's mean time in that pass
    for r in rows:
        if r["recipe"] == "plain":
            base.setdefault((r["pass"], r["backend"], "runs"), []).append(r)
    for (p, b, _), plain in list(base.items()):
        for k in keys:
            base[p, b, k] = mean(r[k] for r in plain)
    head = "| recipe | " + " | ".join(f"{b} ms/step | × plain | {b} CPU-ms/step | × plain"
                                     for b in backends) + " |"
    lines = [head, "|---|" + "---|---|---|---|" * len(backends)]
    for key, again in dict.fromkeys((r["recipe"], r["again"]) for r in rows):
        cells = []
        for b in backends:
            mine = [r for r in rows if r["recipe"] == key and r["backend"] == b
                    and r["again"] == again]
            for k in keys:
                cells += (["–", "–"] if not mine else
                          [f"{median(r[k] for r in mine):.2f}",
                           f"{median(r[k] / base[r['pass'], b, k] for r in mine):.2f}"])
        label = RECIPES[key][0] + (" (again, at the end of the pass)" if again else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def main(argv=None) -> list[dict]:
    from ppl_vae import experiments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=None,
                        help="which recipes (default all; the plain ELBO is always timed)")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--passes", type=int, default=1,
                        help="time every recipe this many times, in turn (the table gives the "
                             "medians): on a shared machine, more passes, steadier ratios")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)  # (the worker's folder)
    experiments.add_mnist_argument(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.backends[0], args.steps, args.mnist, args.out,
                      args.smoke)
    # the timings need MNIST; --smoke only checks that it runs, on the digits where MNIST is not
    mnist = (experiments.optional_mnist(args.mnist, parser.prog) if args.smoke
             else experiments.mnist_folder(args.mnist, parser.prog))
    if mnist is None:
        print("no MNIST folder: --smoke runs on scikit-learn's 8x8 digits instead")
    steps = 40 if args.smoke else args.steps
    check_specs(steps, mnist, args.smoke)
    chosen = args.recipes or (SMOKE_RECIPES if args.smoke else list(RECIPES))
    chosen = ["plain", *(k for k in chosen if k != "plain")]
    print(f"before: {load()}", flush=True)
    rows = []
    again = len(chosen) > 1 and not args.smoke  # the drift check
    sequence = [*chosen, "plain"] if again else chosen
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.passes):
            for i, key in enumerate(sequence):
                for backend in args.backends:
                    row = train_one(key, backend, steps, mnist,
                                    Path(tmp) / f"{p}-{i}-{backend}", args.smoke)
                    row |= {"pass": p, "again": i > 0 and key == "plain"}
                    rows.append(row)
                    print(f"  {row['label']:<36}{backend:>9}{row['ms_per_step']:>9.2f} ms/step"
                          f"{row['cpu_ms_per_step']:>9.2f} CPU-ms/step  "
                          f"({row['process_seconds']:.0f} s in all)", flush=True)
            print(f"pass {p + 1} of {args.passes} done: {load()}", flush=True)
    print(f"\nms per training step (wall, and CPU of the process's threads), batch {BATCH}, "
          f"{steps} steps, CPU, median over the windows after the first (compilation "
          f"excluded), median over {args.passes} pass(es)\n")
    print(table(rows, args.backends))
    if args.json:
        args.json.write_text(json.dumps({"steps": steps, "batch": BATCH,
                                         "passes": args.passes, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
