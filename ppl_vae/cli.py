"""The `ppl-vae` command line: train, eval, sample, models.

Examples::

    ppl-vae models
    ppl-vae train vae_digits --set objective.beta=4 --out runs/beta4
    ppl-vae eval runs/beta4
    ppl-vae sample runs/beta4 --n 64 --out samples.png
    ppl-vae data mnist ~/data/mnist
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ppl_vae.backends import BACKENDS


def _add_train(sub):
    p = sub.add_parser("train", help="train a spec (a TOML file or a bundled model name)")
    p.add_argument("spec", help="path to a .toml spec, a name from `ppl-vae models`, or a run "
                   "folder (the spec it was trained with, as its run.json records it)")
    p.add_argument("--backend", choices=list(BACKENDS), default="pyro")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value by dotted key, e.g. objective.beta=4 (repeatable)")
    p.add_argument("--out", help="run folder (default: the run folder given as the spec, else "
                   "runs/<spec name>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides train.device")
    p.add_argument("--devices", metavar="N", help='overrides train.devices: split each minibatch '
                   'over N devices, or "all" (pyro: starts torchrun with N processes; numpyro on '
                   "a CPU: simulates N devices)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --out")
    group.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_eval(sub):
    p = sub.add_parser("eval", help="test ELBO, rate, distortion and per-dimension KL of a run")
    p.add_argument("run", help="a run folder")
    p.add_argument("--backend", choices=list(BACKENDS), help="default: the one that trained it")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--bits", action="store_true",
                   help="also print bits per dimension: −ELBO / (D ln 2), D the data's "
                        "dimensions, from the test ELBO (and from IWAE's ln p(y) where it ran)")
    p.add_argument("--iwae-k", type=int, default=1000,
                   help="importance samples per example for IWAE and PSIS, >= 1 (0 skips them; "
                        "PSIS k̂ needs about 25 or more)")
    p.add_argument("--n", type=int, help="evaluate only the first N test examples, N >= 1 "
                   "(default: all of them)")
    p.add_argument("--particles", type=int,
                   help="draws of z per example behind the ELBO, rate and distortion, averaged "
                        "(default 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--export-draws", type=int, default=0, metavar="N",
                   help="also write posterior draws of z for the first N test examples to "
                        "RUN/posterior.nc (ArviZ InferenceData)")
    p.add_argument("--plots", action="store_true", help="also write the figures (ppl-vae plot)")


def _add_sample(sub):
    p = sub.add_parser("sample", help="decode draws from the prior into an image grid")
    p.add_argument("run", help="a run folder")
    p.add_argument("--n", type=int, default=64, help="how many samples (default 64)")
    p.add_argument("--out", required=True, help="a .png image grid, or .npy for the raw means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, help="a label-conditional model (label.condition): "
                   "draw this class (default: the classes in turn)")
    p.add_argument("--backend", choices=list(BACKENDS), help="default: the one that trained it")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])


def _add_compare(sub):
    p = sub.add_parser("compare", help="train a spec with both backends and compare them")
    p.add_argument("spec", help="path to a .toml spec, or a name from `ppl-vae models`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="parent folder of the two runs (default runs/<name>-compare)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true")


def cmd_compare(args) -> int:
    from ppl_vae.compare import compare_backends, format_comparison
    from ppl_vae.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    out = Path(args.out or Path("runs") / f"{spec.name}-compare")
    rows = compare_backends(args.spec, args.overrides, out, device=args.device,
                            overwrite=args.overwrite)
    print(format_comparison(rows))
    return 0


def _add_plot(sub):
    p = sub.add_parser("plot", help="write a run's figures to RUN/plots/")
    p.add_argument("run", help="a run folder")
    p.add_argument("others", nargs="*", help="more run folders: extra rate-distortion points")
    p.add_argument("--label", type=int, help="a label-conditional model: draw samples and "
                   "traversals of this class")
    p.add_argument("--backend", choices=list(BACKENDS), help="default: the one that trained it")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])


def cmd_plot(args) -> int:
    from ppl_vae.report import plot_run

    for path in plot_run(args.run, args.others, backend=args.backend, device=args.device,
                         label=args.label):
        print(f"written: {path}")
    return 0


def cmd_models(args) -> int:
    from ppl_vae.spec import list_models

    rows = list_models()
    width = max((len(n) for n, _ in rows), default=4)
    for name, description in rows:
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_train(args) -> int:
    from dataclasses import replace

    from ppl_vae.backends import backend_module
    from ppl_vae.runs import recorded_spec
    from ppl_vae.spec import load_spec, parse_override
    from ppl_vae.training import fit

    # --devices is an override that names its flag when its value is refused
    devices = ([(*parse_override(f"train.devices={args.devices}"), f"--devices {args.devices}")]
               if args.devices else [])
    overrides = [*args.overrides, *devices]
    from_run = Path(args.spec).is_dir()  # a run folder: the spec its run.json records
    spec = load_spec(recorded_spec(args.spec) if from_run else args.spec, overrides)
    if args.device:
        spec = spec.replace(train=replace(spec.train, device=args.device))
    # several devices: pyro starts torchrun (its exit code), numpyro asks XLA for CPU devices
    code = backend_module(args.backend, "devices").launch(spec, args.argv)
    if code is not None:
        return code
    out = args.out or (args.spec if from_run else str(Path("runs") / spec.name))
    run = fit(spec, backend=args.backend, device=args.device, out_dir=out, resume=args.resume,
              overwrite=args.overwrite, progress=not args.no_progress)
    if run is None:  # another process of a data-parallel run: rank 0 reports
        return 0
    test = run.final_test
    print(f"run folder: {run.path}")
    print(f"test (nats per example): elbo {test['elbo']:.3f}  rate {test['rate']:.3f}  "
          f"distortion {test['distortion']:.3f}  objective {test['objective']:.3f}")
    return 0


def cmd_eval(args) -> int:
    from ppl_vae.evaluation import evaluate_run
    from ppl_vae.report import format_report

    # A read-only run folder still gets its report printed, then one line says it was not saved.
    writable = os.access(args.run, os.W_OK)
    report = evaluate_run(args.run, backend=args.backend, device=args.device,
                          iwae_k=args.iwae_k, n=args.n, progress=not args.no_progress,
                          particles=args.particles, write=writable)
    if args.n and args.n > report["n_test"]:
        print(f"note: --n {args.n} asked, but the test split has {report['n_test']} examples; "
              "all of them were used", file=sys.stderr)
    print(format_report(report, bits=args.bits))
    if "in_use" in report:  # a run trains in it: its report would be stale, and is not saved
        owner = report["in_use"]
        who = f"process {owner['pid']}" if owner.get("pid") else "another process"
        skipped = " (nor --plots or --export-draws)" if args.plots or args.export_draws else ""
        print(f"note: {args.run} is in use ({who} is training in it): this evaluated step "
              f"{report['step']} of a running run (train.steps = {report['steps']}), its latest "
              f"checkpoint; report.json is not written{skipped}: evaluate it again when the run "
              "has ended", file=sys.stderr)
        return 0
    if not writable:
        from ppl_vae.runs import RunError

        raise RunError(f"{Path(args.run) / 'report.json'} could not be written: the run folder "
                       f"is read-only (the report above is not saved); make it writable "
                       f"(chmod u+w {args.run}) and run eval again")
    print(f"written: {Path(args.run) / 'report.json'}")
    if args.export_draws:
        from ppl_vae.evaluation import export_posterior_draws

        nc = export_posterior_draws(args.run, args.export_draws, backend=args.backend,
                                    device=args.device)
        print(f"written: {nc}")
    if args.plots:
        from ppl_vae.report import plot_run

        for path in plot_run(args.run, backend=args.backend, device=args.device):
            print(f"written: {path}")
    return 0


def cmd_sample(args) -> int:
    from ppl_vae.report import label_arrays, writable_folder
    from ppl_vae.runs import load_run, save_array

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    out = Path(args.out)
    if not out.suffix:  # matplotlib would add ".png" to the name; say what is written
        out = out.with_suffix(".png")
    writable_folder(out.parent)  # checked before anything is computed
    run = load_run(args.run)
    labels = label_arrays(run.spec, args.n, args.label, cycle=True)
    model = run.model(args.backend, args.device)
    means = model.decode_mean(model.sample_prior(args.n, seed=args.seed, labels=labels),
                              labels=labels)
    if out.suffix == ".npy":
        try:
            save_array(out, means)  # atomically: a failed write leaves no half a file
        except PermissionError:
            raise ValueError(f"cannot write {out}: {out.parent} is not writable") from None
    else:
        shape = run.info.get("image_shape")
        if not shape:
            raise ValueError("these data are not images; use --out FILE.npy for the raw means")
        from ppl_vae.plots import save_image_grid

        what = "" if labels is None else (f", label {args.label}" if args.label is not None
                                          else ", labels 0, 1, … in turn")
        save_image_grid(means.reshape(-1, *shape), out,
                        title=f"{run.spec.name}: E[y|z], z ~ prior{what}")
    print(f"written: {out}")
    return 0


def _add_sweep(sub):
    from ppl_vae.sweep import ENGINES
    from ppl_vae.tracking import TRACKERS

    p = sub.add_parser("sweep", help="train a grid of runs (overrides x seeds), each an "
                       "ordinary run folder OUT/<index>-<name>/")
    p.add_argument("spec", help="path to a .toml spec (its [sweep] table, if any, gives the "
                   "grid and seeds) or a name from `ppl-vae models`")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept key and its values, e.g. objective.beta=0.25,0.5,1 "
                        "(repeatable: the Cartesian product)")
    p.add_argument("--seeds", help="seeds per setting: a count N (train.seed = the spec's "
                   "seed + 0..N-1) or a list 0,3,7")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value in every point (repeatable)")
    p.add_argument("--out", required=True, help="the sweep folder (sweep.json and one run "
                   "folder per point); the same command again continues it")
    p.add_argument("--backend", choices=list(BACKENDS), default="pyro")
    p.add_argument("--engine", choices=list(ENGINES), help="local: a process pool; vmap "
                   "(numpyro): same-shape points in one process, vmapped, the rest in the "
                   "pool; ray: Ray tasks (default: the [sweep] table's, else local)")
    p.add_argument("--workers", type=int, help="processes at a time (default: the cores)")
    p.add_argument("--vmap-size", type=int, help="at most this many points in one vmapped "
                   "process (default: all of a group)")
    p.add_argument("--address", help="--engine ray: the cluster to join (default: a local Ray)")
    p.add_argument("--gpus-per-point", type=float, default=0.0,
                   help="--engine ray: GPUs each point asks for (fractions share one)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides train.device")
    p.add_argument("--track", choices=list(TRACKERS), help="log params, metrics and figures "
                   "to MLflow (./mlruns unless --tracking-uri) or scalars to TensorBoard "
                   "(OUT/tensorboard)")
    p.add_argument("--tracking-uri", help="MLflow: a server (http://host:5000), a database "
                   "(sqlite:///mlflow.db) or a file store; TensorBoard: the log folder")
    p.add_argument("--retry-failed", action="store_true", help="train failed points again")
    p.add_argument("--overwrite", action="store_true", help="delete what OUT holds first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_sweep(args) -> int:
    from ppl_vae.sweep import continue_command, load_sweep, run_sweep

    sweep = load_sweep(args.spec, args.grid, args.seeds, args.overrides)
    options = sweep.options
    argv = [a for a in args.argv if a != "--overwrite"]
    record = run_sweep(sweep, args.out, backend=args.backend,
                       engine=args.engine or options.get("engine", "local"),
                       workers=args.workers or options.get("workers"), device=args.device,
                       address=args.address, gpus_per_point=args.gpus_per_point,
                       vmap_size=args.vmap_size or options.get("vmap_size", 0),
                       track=args.track, tracking_uri=args.tracking_uri,
                       retry_failed=args.retry_failed, overwrite=args.overwrite,
                       progress=not args.no_progress, command=continue_command(argv))
    if record.get("stopped"):
        return 130
    return 0 if all(p["status"] == "done" for p in record["points"]) else 1


def _add_sweep_report(sub):
    p = sub.add_parser("sweep-report", help="evaluate a sweep's finished points; a table per "
                       "grid setting (mean ± s.e. over seeds) and figures")
    p.add_argument("out", help="a sweep folder (written by `ppl-vae sweep`)")
    p.add_argument("--iwae-k", type=int, default=1000, help="importance samples per example "
                   "for IWAE ln p (0 skips it; default 1000)")
    p.add_argument("--particles", type=int, help="draws of z per example (default 16)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-disentanglement", action="store_true",
                   help="skip the disentanglement scores of data with known factors")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_sweep_report(args) -> int:
    from ppl_vae.sweep import sweep_report

    result = sweep_report(args.out, iwae_k=args.iwae_k, particles=args.particles,
                          device=args.device, disentanglement=not args.no_disentanglement,
                          progress=not args.no_progress)
    print(Path(result["files"][0]).read_text())
    for path in result["files"]:
        print(f"written: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppl-vae",
        description="VAE-family models as probabilistic programs: "
                    "loss = beta*rate + lam*distortion + aux(encoder)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the bundled model specs")
    _add_train(sub)
    _add_eval(sub)
    _add_sample(sub)
    _add_compare(sub)
    _add_plot(sub)
    _add_sweep(sub)
    _add_sweep_report(sub)
    from ppl_vae import download  # standard library only: no backend is imported

    download.add_parser(sub)  # ppl-vae data mnist DIR
    return parser


def cmd_data(args) -> int:
    from ppl_vae import download

    return download.main(args)


COMMANDS = {"models": cmd_models, "train": cmd_train, "eval": cmd_eval, "sample": cmd_sample,
            "compare": cmd_compare, "plot": cmd_plot, "data": cmd_data,
            "sweep": cmd_sweep, "sweep-report": cmd_sweep_report}


def main(argv=None) -> int:
    from ppl_vae.backends import BackendError
    from ppl_vae.data import DataError
    from ppl_vae.runs import RunError
    from ppl_vae.spec import SpecError
    from ppl_vae.training import TrainingDiverged, TrainingInterrupted

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --devices` relaunches it
    if os.environ.get("PPL_VAE_DEBUG"):  # full tracebacks instead of one-line errors
        return COMMANDS[args.command](args)
    try:
        return COMMANDS[args.command](args)
    except TrainingInterrupted as err:
        print(f"\n{err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once (the last checkpoint stays)
        print(f"\nppl-vae {args.command}: interrupted", file=sys.stderr)
        return 130
    except (SpecError, DataError, RunError, TrainingDiverged, BackendError, FileNotFoundError,
            ImportError, ValueError) as err:
        print(f"ppl-vae {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
