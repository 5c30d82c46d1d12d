"""Plumbing shared by the lecture's experiments (`examples/*.py`), backend-free.

Each experiment trains a few specs, evaluates them with `ppl_vae.evaluation.evaluate_run` and prints
one table. This module holds what they share: the command-line arguments, training a spec into a
run folder (re-using a finished run with the same spec and backend, so that re-running an
experiment re-draws its table and plots without retraining), the smoke settings the tests use,
and the table and results files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ppl_vae import runs
from ppl_vae.backends import BACKENDS
from ppl_vae.spec import Spec, load_spec

#: What --smoke changes in every spec: a few steps on a few examples, logged once.
SMOKE_OVERRIDES = ("train.steps=20", "train.log_every=10", "train.eval_every=20",
                   "train.checkpoint_every=20", "train.batch_size=32", "train.eval_batch_size=500",
                   "data.limit=400")


#: The environment variable naming the folder of MNIST IDX files that examples and benchmarks
#: read (their --mnist DIR wins over it).
MNIST_ENV = "PPL_VAE_MNIST"


def default_mnist() -> Path:
    """$PPL_VAE_MNIST, else ``../shared/data/mnist`` beside the repository (found from this
    file, not from the working directory)."""
    env = os.environ.get(MNIST_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def add_mnist_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mnist", type=Path, default=None, metavar="DIR",
                        help="folder of the MNIST IDX files (t10k-*, and train-* if present; "
                             f"default ${MNIST_ENV}, else ../shared/data/mnist beside the "
                             f"repository: {default_mnist()})")


def mnist_folder(given: Path | None, prog: str) -> Path:
    """--mnist (`given`) or `default_mnist()`, as an absolute path; where it holds no MNIST
    test files, one line on stderr naming the folder and what to do, and exit code 2."""
    from ppl_vae.data import MNIST_FILES, _find_file

    folder = (given or default_mnist()).expanduser().resolve()
    images, labels = MNIST_FILES["test"]
    if not (folder.is_dir() and _find_file(folder, images) and _find_file(folder, labels)):
        what = "does not exist" if not folder.exists() else "holds no MNIST test files"
        print(f"{prog}: error: the MNIST folder {folder} {what} ({images}[.gz] and {labels}"
              f"[.gz] expected); pass --mnist DIR, or set {MNIST_ENV}, to a folder that "
              "holds them (`ppl-vae data mnist DIR` downloads them)", file=sys.stderr)
        raise SystemExit(2)
    return folder


def optional_mnist(given: Path | None, prog: str) -> Path | None:
    """For a benchmark that can do without MNIST: --mnist checked (`mnist_folder`) when given,
    else the default folder where it holds the test files, else None."""
    if given is not None:
        return mnist_folder(given, prog)
    from ppl_vae.data import MNIST_FILES, _find_file

    folder = default_mnist().resolve()
    return folder if folder.is_dir() and _find_file(folder, MNIST_FILES["test"][0]) else None


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """--backend, --device, --out, --steps, --threads, --fresh, --smoke, --no-progress."""
    parser.add_argument("--backend", choices=list(BACKENDS), default="pyro",
                        help="pyro or numpyro (numpyro is several times faster on a CPU for "
                             "these small networks)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", default=None,
                        help=f"folder of the runs, table and figure (default runs/{name}, "
                             f"runs/{name}-smoke with --smoke)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of every run (default: the experiment's own)")
    parser.add_argument("--threads", type=int, default=None,
                        help="train.threads of every run: the Pyro backend's intra-op threads "
                             "on a CPU (default: the spec's, 1)")
    parser.add_argument("--fresh", action="store_true",
                        help="retrain every run even where a finished run with the same spec "
                             "and backend is in --out")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps on a few examples: checks that everything runs "
                             "(seconds), not the lecture's claims")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_args(doc: str, name: str, argv=None, mnist: bool = False) -> argparse.Namespace:
    """The arguments of an experiment script (`add_arguments`, and --mnist for one that reads
    MNIST: `args.mnist` is then the checked folder), its docstring's first paragraph as the
    description."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    add_arguments(parser, name)
    if mnist:
        add_mnist_argument(parser)
    args = parser.parse_args(argv)
    if mnist:
        args.mnist = mnist_folder(args.mnist, parser.prog)
    return args


def output_dir(args, name: str) -> Path:
    out = Path(args.out or Path("runs") / (f"{name}-smoke" if args.smoke else name))
    out.mkdir(parents=True, exist_ok=True)
    return out


def make_spec(base: str | Spec, overrides: Sequence[str], args, steps: int) -> Spec:
    """`base` with `overrides`, then the steps (--steps or `steps`) or the smoke settings, and
    --threads."""
    tail = list(SMOKE_OVERRIDES) if args.smoke else [f"train.steps={args.steps or steps}"]
    if getattr(args, "threads", None) is not None:
        tail.append(f"train.threads={args.threads}")
    return load_spec(base, [*overrides, *tail])


def _recorded(path: Path, spec: Spec, backend: str):
    """The run in `path` if it was trained with `backend` on `spec` but perhaps for fewer
    steps (a resume may continue it: the specs differ at most in `runs.RESUMABLE_KEYS`), else
    None."""
    try:
        run = runs.load_run(path)
    except runs.RunError:
        return None
    differences = runs.spec_differences(runs.spec_table(run.spec), runs.spec_table(spec),
                                        ignore=runs.RESUMABLE_KEYS)
    return run if not differences and run.info.get("backend") == backend else None


def train(spec: Spec, path: Path, args) -> tuple[runs.Run, float]:
    """Train `spec` into `path` with --backend: re-use a finished identical run there, resume
    an unfinished one from its checkpoint (a long table killed half-way loses one window),
    else start afresh (--fresh always does).

    A run there trained further than `spec.train.steps` is not cut back: it is retrained.

    Returns the run and its training wall time in seconds (as recorded when it was trained).
    """
    from ppl_vae.training import fit

    run = None if args.fresh else _recorded(path, spec, args.backend)
    step = run.info.get("step", 0) if run is not None else 0
    if run is not None and step == spec.train.steps:
        print(f"  {path.name}: re-using the finished run (--fresh retrains)")
    else:
        resume = run is not None and 0 < step < spec.train.steps
        if resume:
            print(f"  {path.name}: resuming at step {step} of {spec.train.steps}")
        run = fit(spec, backend=args.backend, device=args.device, out_dir=path,
                  overwrite=not resume, resume=resume, progress=not args.no_progress)
    return run, float(run.info.get("wall_seconds", float("nan")))


def _recorded_report(path: Path, run: runs.Run, iwae_k: int) -> dict | None:
    """RUN/report.json when it evaluated this run's last step with the same IWAE K (so a
    re-run of a table does not spend minutes re-estimating ln p)."""
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return None
    same = (report.get("step") == run.info.get("step") and report.get("iwae_k", 0) == iwae_k
            and report.get("n_test") == run.info.get("n_test")
            and report.get("backend") == run.info.get("backend"))
    return report if same else None


def train_and_evaluate(spec: Spec, path: Path, args, iwae_k: int = 0) -> dict:
    """Train (or re-use) and evaluate one run; returns its report (`evaluate_run`, or the run's
    own report.json when that evaluated the same step with the same `iwae_k`) plus
    ``train_seconds``."""
    from ppl_vae.evaluation import evaluate_run

    run, seconds = train(spec, path, args)
    iwae_k = 0 if args.smoke else iwae_k
    report = None if args.fresh else _recorded_report(path, run, iwae_k)
    if report is None:
        report = evaluate_run(run.path, device="cpu" if args.device == "auto" else args.device,
                              iwae_k=iwae_k, progress=not args.no_progress)
    return report | {"train_seconds": seconds}


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table: `columns` are (header, key, format) with format e.g. "{:.3f}"; a
    missing key prints as "–"."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if key in row and row[key] is not None else "–"
                 for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_claims(claims: Sequence[dict]) -> str:
    """One Markdown bullet per claim {"claim", "held", "evidence"}: whether it held, and why."""
    return "\n".join(f"* {c['claim']}: {'held' if c['held'] else 'did NOT hold'} "
                     f"({c['evidence']})" for c in claims)


def write_results(out: Path, name: str, rows: Sequence[dict], table: str, started: float,
                  args, extra: dict | None = None) -> None:
    """Write `out/results.json` (rows, settings, wall time) and `out/table.md`; print the
    table and the wall time."""
    wall = time.perf_counter() - started
    payload = {"experiment": name, "backend": args.backend, "smoke": args.smoke,
               "wall_seconds": wall, "rows": list(rows), **(extra or {})}
    runs.write_json_atomic(out / "results.json", json.loads(json.dumps(payload, default=float)))
    runs.write_text_atomic(out / "table.md", table + "\n")
    print()
    print(table)
    print(f"\nwall time {wall:.0f} s ({args.backend}); written: {out / 'results.json'}, "
          f"{out / 'table.md'}")
