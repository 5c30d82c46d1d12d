"""ppl_vae against its peers on one task: the same MLP VAE trained on the 60,000 MNIST training
images, one process per trainer, one after another, in one run (issue 23).

The task: encoder 784-400-20 and decoder 20-400-784, ReLU, Bernoulli likelihood, N(0, I) prior,
Adam with lr 1e-3, batch 128, dynamic binarisation (a fresh Bernoulli draw of every pixel of
every minibatch). Each trainer keeps its library's own choices beyond that (initialisation, how
the encoder makes σ, analytic or sampled KL, minibatches drawn with replacement or by
permutation); ``done.json`` of each says what its adapter changed.

Trainers (``benchmarks/peers/*_trainer.py``, written here; see each file's docstring):

    ppl_vae-numpyro   ppl_vae.fit(models/vae_mnist.toml, backend="numpyro")
    ppl_vae-pyro      ppl_vae.fit(models/vae_mnist.toml, backend="pyro")
    pythae            pythae's VAE + BaseTrainer          --pythae-python PATH
    pyro-example      Pyro's examples/vae/vae.py main()   --pyro-example PATH [--pyro-python]
    numpyro-example   NumPyro's examples/vae.py main()    --numpyro-example PATH [--numpyro-python]

A trainer whose path is not given is reported as skipped. The peers live outside the repository;
to recreate them (what this machine has under /work/peers):

    python3.11 -m venv /work/peers/pythae
    /work/peers/pythae/bin/pip install -c constraints.txt pythae          # pythae 0.1.2
    git clone https://github.com/pyro-ppl/pyro /work/peers/pyro           # examples/vae/vae.py
    git clone https://github.com/pyro-ppl/numpyro /work/peers/numpyro     # examples/vae.py

The example scripts are run unmodified from those checkouts: the adapters import them and
replace, by name, the data loading (bench_peers' train.npy), Softplus by ReLU and z_dim 50 by 20.
Pyro's and NumPyro's examples run in this repository's .venv (its torch/pyro and jax/numpyro).

Timing. Each trainer's clock starts once its framework is imported and the images are in memory,
just before it builds the model, and is read at the end of every epoch; it holds building the
model, compiling, the data pipeline and the steps, and not the writing of the epoch's weights
(``epoch_NNN.npz``), test evaluations or plots, which run with the clock stopped. Threads: every
trainer gets ``--threads`` intra-op threads (OMP/MKL/OpenBLAS variables, torch.set_num_threads,
XLA_FLAGS); XLA keeps more threads busy than that (measured: ~1.8 cores with one thread asked),
so ``--pin CPU ...`` also holds every trainer to the same CPUs. The table shows each epoch's CPU
seconds beside its wall seconds, and the process's CPU seconds per wall second.

Evaluation. After each trainer finishes (so that nothing else runs while one trains), every
epoch's weights are scored by one NumPy estimator in float64: the test ELBO per example, nats,
on one binarisation of the 10,000 test images (seed 0), with its KL term in closed form and its
expected log-likelihood from one draw z = μ + σ ε per image, ε (seed 1) the same for every
trainer and epoch. The same images and the same ε for all make the differences between trainers
and epochs paired (their noise is far below the ±s.e. shown for the last epoch). "to −100" is the
training time at the end of the first epoch whose test ELBO ≥ ``--target`` (epoch resolution).

    python benchmarks/bench_peers.py --pythae-python /work/peers/pythae/bin/python \\
        --pyro-example /work/peers/pyro/examples/vae/vae.py \\
        --numpyro-example /work/peers/numpyro/examples/vae.py          # about 40 min, 2 cores
    python benchmarks/bench_peers.py --smoke                          # ppl_vae only, a minute

Nothing is asserted: it prints a table with ratios against ppl_vae-numpyro (and --json FILE).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS))
import protocol  # noqa: E402

#: The variable naming the MNIST folder (as ppl_vae.experiments' MNIST_ENV); --mnist wins.
MNIST_ENV = "PPL_VAE_MNIST"
REFERENCE = "ppl_vae-numpyro"
#: Smoke mode: this many training and test images, this many epochs (~150 steps).
SMOKE_TRAIN, SMOKE_TEST, SMOKE_EPOCHS = 6400, 1000, 3


@dataclass(frozen=True)
class Trainer:
    """One row: `name`, the adapter script, the Python that runs it (None: skipped, `why`)."""

    name: str
    script: str
    python: str | None
    extra: tuple[str, ...] = ()
    why: str = ""


@dataclass
class Result:
    trainer: Trainer
    status: str  # "ran" | "skipped" | "failed"
    note: str = ""
    progress: list[dict] = field(default_factory=list)
    elbos: list[float] = field(default_factory=list)
    elbo_se: float = math.nan
    wall_seconds: float = math.nan
    cpu_seconds: float = math.nan
    done: dict = field(default_factory=dict)


# ---- the estimator -------------------------------------------------------------------------
def encoder_scale(raw: np.ndarray, kind: str) -> np.ndarray:
    """σ from the encoder's second head, as each library defines it (`protocol.SCALE_KINDS`)."""
    if kind == "exp":
        return np.exp(raw)
    if kind == "exp_half":
        return np.exp(0.5 * raw)
    if kind == "softplus":
        return np.logaddexp(0.0, raw) + 1e-4
    raise ValueError(f"unknown scale_kind {kind!r}")


def elbo_per_example(weights: dict, x: np.ndarray, eps: np.ndarray,
                     batch: int = 2000) -> np.ndarray:
    """Per-example ELBO, nats, (N,): ln p(x|z) at z = μ + σ ε (one draw) minus KL(q(z|x) ‖
    N(0, I)) in closed form, for binary x (N, 784) and ε (N, 20); float64.

    ln p(x|z) = Σ_d x_d ℓ_d − softplus(ℓ_d) with ℓ the decoder's logits (Bernoulli);
    KL = ½ Σ_k (μ_k² + σ_k² − 1) − Σ_k ln σ_k."""
    w = {k: np.asarray(weights[k], dtype=np.float64) for k in protocol.SNAPSHOT_KEYS}
    kind = str(weights["scale_kind"])
    out = np.empty(len(x))
    for i in range(0, len(x), batch):
        xb, eb = x[i:i + batch].astype(np.float64), eps[i:i + batch]
        h = np.maximum(xb @ w["enc.W1"].T + w["enc.b1"], 0.0)
        loc = h @ w["enc.loc.W"].T + w["enc.loc.b"]
        scale = encoder_scale(h @ w["enc.scale.W"].T + w["enc.scale.b"], kind)
        z = loc + scale * eb
        logits = (np.maximum(z @ w["dec.W1"].T + w["dec.b1"], 0.0) @ w["dec.out.W"].T
                  + w["dec.out.b"])
        log_lik = (xb * logits - np.logaddexp(0.0, logits)).sum(1)
        kl = 0.5 * (loc**2 + scale**2 - 1.0).sum(1) - np.log(scale).sum(1)
        out[i:i + batch] = log_lik - kl
    return out


def evaluation_set(x_test: np.ndarray, latent_dim: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """The fixed binarisation of the test images (uint8 0..255 -> 0/1, seed 0) and ε (seed 1)."""
    probs = x_test.astype(np.float64) / 255.0
    x_bin = (np.random.default_rng(0).random(probs.shape) < probs).astype(np.float64)
    eps = np.random.default_rng(1).standard_normal((len(x_test), latent_dim))
    return x_bin, eps


# ---- running -------------------------------------------------------------------------------
def mnist_images(given: Path | None) -> tuple[Path, Path]:
    """The train and t10k image files in --mnist (`given`), else $PPL_VAE_MNIST, else
    ../shared/data/mnist; a `DataError` in one line naming the folder and what to do."""
    from ppl_vae.data import MNIST_FILES, DataError, _find_file

    env = os.environ.get(MNIST_ENV)
    default = Path(env) if env else ROOT.parent / "shared" / "data" / "mnist"
    folder = (given or default).expanduser().resolve()
    found = {split: _find_file(folder, MNIST_FILES[split][0]) if folder.is_dir() else None
             for split in ("test", "train")}
    for split, what in (("test", "test"), ("train", "training")):
        if found[split] is None:
            state = "does not exist" if not folder.exists() else f"holds no MNIST {what} files"
            raise DataError(f"the MNIST folder {folder} {state} ({MNIST_FILES[split][0]}[.gz] "
                            f"expected); pass --mnist DIR, or set {MNIST_ENV}, to a folder "
                            "that holds them (`ppl-vae data mnist DIR` downloads them)")
    return found["train"], found["test"]


def thread_env(threads: int) -> dict:
    """The environment that holds every framework to `threads` intra-op threads."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    eigen = "false" if threads == 1 else "true"
    env["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen={eigen} "
                        f"intra_op_parallelism_threads={threads}")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def trainers(args) -> list[Trainer]:
    here = sys.executable

    def peer(name, script, python, path, flag, extra=()):
        if path is None:
            return Trainer(name, script, None, why=f"no {flag} given")
        if not Path(path).is_file():
            return Trainer(name, script, None, why=f"{flag} {path}: no such file")
        return Trainer(name, script, python, (*extra, "--example", str(path)))

    rows = [Trainer("ppl_vae-numpyro", "ppl_vae_trainer.py", here, ("--backend", "numpyro")),
            Trainer("ppl_vae-pyro", "ppl_vae_trainer.py", here, ("--backend", "pyro"))]
    if args.pythae_python is None:
        rows.append(Trainer("pythae", "pythae_trainer.py", None, why="no --pythae-python given"))
    elif not Path(args.pythae_python).is_file():
        rows.append(Trainer("pythae", "pythae_trainer.py", None,
                            why=f"--pythae-python {args.pythae_python}: no such file"))
    else:
        rows.append(Trainer("pythae", "pythae_trainer.py", args.pythae_python))
    rows.append(peer("pyro-example", "pyro_example_trainer.py", args.pyro_python,
                     args.pyro_example, "--pyro-example", ("--jit",) if args.pyro_jit else ()))
    rows.append(peer("numpyro-example", "numpyro_example_trainer.py", args.numpyro_python,
                     args.numpyro_example, "--numpyro-example"))
    if args.only:
        unknown = set(args.only) - {r.name for r in rows}
        if unknown:
            raise SystemExit(f"--only: unknown trainer(s) {sorted(unknown)}; choose from "
                             f"{[r.name for r in rows]}")
        rows = [r for r in rows if r.name in args.only]
    return rows


def run_trainer(t: Trainer, args, work: Path, x_bin, eps) -> Result:
    if t.python is None:
        return Result(t, "skipped", t.why)
    out = work / t.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [t.python, str(PEERS / t.script), "--data", str(work / "train.npy"), "--out", str(out),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr",
           str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads), *t.extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        try:
            pin = (lambda: os.sched_setaffinity(0, args.pin)) if args.pin else None
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env=thread_env(args.threads), timeout=args.timeout,
                                  preexec_fn=pin)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    progress_path = out / "progress.jsonl"
    progress = ([json.loads(line) for line in progress_path.read_text().splitlines()]
                if progress_path.exists() else [])
    result = Result(t, "ran", progress=progress, wall_seconds=wall, cpu_seconds=cpu)
    if code != 0:
        tail = (out / "log.txt").read_text().strip().splitlines()[-3:]
        result.status = "failed"
        result.note = f"exit {code}: {' | '.join(tail)[-300:]} (log: {out / 'log.txt'})"
    if (out / "done.json").exists():
        result.done = json.loads((out / "done.json").read_text())
    for p in progress:
        with np.load(out / f"epoch_{p['epoch']:03d}.npz") as snap:
            per_example = elbo_per_example(dict(snap), x_bin, eps)
        result.elbos.append(float(per_example.mean()))
        result.elbo_se = float(per_example.std(ddof=1) / math.sqrt(len(per_example)))
    if not args.keep:
        for snap in out.glob("epoch_*.npz"):
            snap.unlink()
        shutil.rmtree(out / "run", ignore_errors=True)
    return result


# ---- the table -----------------------------------------------------------------------------
def summary(r: Result, target: float) -> dict:
    """The numbers of one row: seconds of the first epoch (it holds building and compiling),
    the median seconds of the later epochs, when the target was reached, the last ELBO."""
    secs = [p["seconds"] for p in r.progress]
    cpu = [p.get("cpu_seconds", math.nan) for p in r.progress]
    later = np.diff(secs) if len(secs) > 1 else np.array([])
    later_cpu = np.diff(cpu) if len(cpu) > 1 else np.array([])
    reached = next((i for i, e in enumerate(r.elbos) if e >= target), None)
    return {"name": r.trainer.name, "status": r.status, "note": r.note,
            "library": r.done.get("library", ""),
            "steps_per_epoch": (r.progress[0]["steps"] if r.progress else None),
            "epochs": len(secs), "first_epoch_s": secs[0] if secs else math.nan,
            "epoch_s": float(np.median(later)) if len(later) else math.nan,
            "epochs_to_target": None if reached is None else reached + 1,
            "cpu_epoch_s": float(np.median(later_cpu)) if len(later_cpu) else math.nan,
            "seconds_to_target": math.nan if reached is None else secs[reached],
            "cpu_seconds_to_target": math.nan if reached is None else cpu[reached],
            "train_seconds": secs[-1] if secs else math.nan,
            "final_elbo": r.elbos[-1] if r.elbos else math.nan, "final_elbo_se": r.elbo_se,
            "best_elbo": max(r.elbos) if r.elbos else math.nan, "elbos": r.elbos,
            "seconds": secs, "cpu_seconds": cpu, "process_wall_s": r.wall_seconds,
            "cpu_per_wall": r.cpu_seconds / r.wall_seconds if r.wall_seconds else math.nan}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if np.isfinite(a) and np.isfinite(b) and b > 0 else "—"


def format_table(rows: list[dict], target: float) -> str:
    """A Markdown table; ×ref columns divide by the ppl_vae-numpyro row's number."""
    ref = next((r for r in rows if r["name"] == REFERENCE and r["status"] == "ran"), None)

    def vs(r, key):
        return _ratio(r[key], ref[key]) if ref else "—"

    head = ("| trainer | steps/epoch | 1st epoch s | s/epoch | ×ref | CPU s/epoch | ×ref | "
            f"epochs to {target:g} | s to {target:g} | ×ref | CPU s to {target:g} | ×ref | "
            "last test ELBO | CPU s/s |")
    width = head.count("|") - 1
    lines = [head, "|" + "---|" * width]
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"| {r['name']} | skipped: {r['note']} |" + " |" * (width - 2))
            continue
        to = r["epochs_to_target"]
        lines.append(
            f"| {r['name']} | {r['steps_per_epoch']} | {r['first_epoch_s']:.1f} | "
            f"{r['epoch_s']:.2f} | {vs(r, 'epoch_s')} | {r['cpu_epoch_s']:.2f} | "
            f"{vs(r, 'cpu_epoch_s')} | {to if to else 'not in ' + str(r['epochs'])} | "
            f"{r['seconds_to_target']:.1f} | {vs(r, 'seconds_to_target')} | "
            f"{r['cpu_seconds_to_target']:.1f} | {vs(r, 'cpu_seconds_to_target')} | "
            f"{r['final_elbo']:.2f} ± {r['final_elbo_se']:.2f} | {r['cpu_per_wall']:.2f} |")
        if r["status"] == "failed":
            lines.append(f"| ↳ failed: {r['note']} |" + " |" * (width - 1))
    return "\n".join(lines)


def format_milestones(rows: list[dict], targets) -> str:
    """For each trainer and test-ELBO level: the first epoch that reached it, with the wall and
    CPU seconds on its clock at that epoch's end ("—": not within the epochs run)."""
    targets = sorted(targets)
    lines = ["| trainer | " + " | ".join(f"to {t:g}: epoch, s (CPU s)" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for r in rows:
        if r["status"] == "skipped":
            continue
        cells = []
        for t in targets:
            i = next((i for i, e in enumerate(r["elbos"]) if e >= t), None)
            cells.append("—" if i is None else
                         f"{i + 1}, {r['seconds'][i]:.0f} ({r['cpu_seconds'][i]:.0f})")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(table: list[dict], target: float, milestones, load_before, load_after) -> None:
    print(format_table(table, target))
    print(f"\nload average before {' '.join(load_before)}, after {' '.join(load_after)}; "
          f"×ref: ratio to {REFERENCE} (below 1 is faster); s/epoch: median of epochs 2.., "
          "wall and the process's CPU seconds; 1st epoch holds building and compiling; CPU "
          "s/s: the whole process's CPU seconds per wall second (1 = one core, all the time)\n")
    print(format_milestones(table, {*milestones, target}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", type=Path, metavar="DIR",
                   help=f"folder of the four MNIST IDX files (default ${MNIST_ENV}, else "
                        "../shared/data/mnist beside the repository; `ppl-vae data mnist DIR` "
                        "downloads them)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--target", type=float, default=-100.0, help="test ELBO, nats per example")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every trainer")
    p.add_argument("--pin", type=int, nargs="+", metavar="CPU",
                   help="run every trainer on these CPUs only (sched_setaffinity): XLA on a "
                        "CPU does not keep to XLA_FLAGS' one thread (jax 0.10: about 1.8 "
                        "cores busy with --threads 1), affinity does")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per trainer")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these trainers")
    p.add_argument("--smoke", action="store_true",
                   help=f"{SMOKE_TRAIN} training images, {SMOKE_TEST} test images, "
                        f"{SMOKE_EPOCHS} epochs: checks that every trainer runs")
    p.add_argument("--pythae-python", help="the Python of an environment with pythae")
    p.add_argument("--pyro-example", help="Pyro's examples/vae/vae.py")
    p.add_argument("--pyro-python", default=sys.executable, help="default: this Python")
    p.add_argument("--pyro-jit", action="store_true", help="the Pyro example with --jit")
    p.add_argument("--numpyro-example", help="NumPyro's examples/vae.py")
    p.add_argument("--numpyro-python", default=sys.executable, help="default: this Python")
    p.add_argument("--work", help="folder for data, logs and snapshots (default: a temporary "
                   "one, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the snapshots and run folders")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--milestones", type=float, nargs="*", default=[-110.0, -105.0, -102.0],
                   help="more test-ELBO levels for the second table (with --target)")
    p.add_argument("--table-from", metavar="JSON", help="print the tables of an earlier "
                   "run's --json file, without training")
    args = p.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print_tables(saved["rows"], saved["args"]["target"], args.milestones,
                     saved["load_before"], saved["load_after"])
        return 0
    if args.smoke:
        args.epochs = SMOKE_EPOCHS

    from ppl_vae.data import DataError, read_idx

    try:
        images = mnist_images(args.mnist)
    except DataError as err:
        print(f"{Path(__file__).name}: error: {err}", file=sys.stderr)
        return 2
    x_train, x_test = (array.reshape(len(array), -1) for array in map(read_idx, images))
    if args.smoke:
        x_train, x_test = x_train[:SMOKE_TRAIN], x_test[:SMOKE_TEST]
    x_bin, eps = evaluation_set(x_test)
    rows = trainers(args)

    scratch = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(scratch := tempfile.mkdtemp(prefix="bench_peers-"))
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    print(f"load average before: {' '.join(load_before)}; {os.cpu_count()} CPUs; "
          f"{len(x_train)} training images, {len(x_test)} test images, {args.epochs} epochs, "
          f"{args.threads} thread(s) per trainer"
          + (f", pinned to CPU(s) {args.pin}" if args.pin else ""), flush=True)
    try:
        np.save(work / "train.npy", x_train)
        results = []
        for t in rows:
            print(f"{t.name}: {'skipped (' + t.why + ')' if t.python is None else 'training…'}",
                  flush=True)
            r = run_trainer(t, args, work, x_bin, eps)
            results.append(r)
            if r.status != "skipped":
                print(f"  {r.status}; test ELBO by epoch: "
                      + " ".join(f"{e:.1f}" for e in r.elbos) + (f" ({r.note})" if r.note
                                                                 else ""), flush=True)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    table = [summary(r, args.target) for r in results]
    print()
    print_tables(table, args.target, args.milestones, load_before, load_after)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "load_before": load_before, "load_after": load_after,
             "rows": table, "done": {r.trainer.name: r.done for r in results}}, indent=2,
            default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
