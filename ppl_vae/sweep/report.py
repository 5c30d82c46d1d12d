"""A sweep's report: every finished point evaluated, aggregated over seeds, tables and figures.

`sweep_report` (``ppl-vae sweep-report OUT``) evaluates every finished point
(`ppl_vae.report.evaluate_run`, cached in its report.json) and, for data whose factors are
known, scores its disentanglement (`disentanglement_scores`, over `ppl_vae.groundtruth`);
`aggregate` makes one row per grid setting: mean ± standard error over seeds. It writes
OUT/sweep_report.{md,csv,json}, the rate–distortion plane of every run
(`rate_distortion_figure`, with the line R + D = H(y) where H(y) is known) and each score against
the swept value (`scores_figure`), and logs them to MLflow where the sweep was tracked there.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from ppl_vae import runs
from ppl_vae.sweep.grid import SweepError, setting_label
from ppl_vae.sweep.record import one_line, read_sweep

#: The report's columns: (key in a point's row, header, digits).
REPORT_METRICS = (("elbo", "test ELBO", 3), ("rate", "rate", 3),
                  ("nll_distortion", "distortion", 3), ("log_likelihood", "IWAE ln p", 3),
                  ("active_units", "active units", 2), ("mutual_information", "I_q", 3),
                  ("mig", "MIG", 3), ("factor_vae", "FactorVAE", 3), ("beta_vae", "β-VAE", 3))
#: Sizes of the disentanglement scores (as examples/disentangle.py, disentanglement_lib's
#: defaults scaled down to about a minute of encoding per model on a CPU).
DISENTANGLEMENT_SIZES = {"mig_points": 10000, "train": 2000, "eval": 1000, "variance": 5000}
DISENTANGLEMENT_FILE = "disentanglement.json"


def _cached_report(folder: Path, info: dict, iwae_k: int, particles: int | None) -> dict | None:
    """RUN/report.json where it is newer than params.npz and was made at the same step with the
    same iwae_k and particles; else None (evaluate again)."""
    path = folder / "report.json"
    if not path.exists() or path.stat().st_mtime < (folder / runs.PARAMS_FILE).stat().st_mtime:
        return None
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    from ppl_vae.report import EVAL_PARTICLES

    if (report.get("step") != info.get("step") or report.get("iwae_k", 0) != iwae_k
            or report.get("particles") != (particles or EVAL_PARTICLES)):
        return None
    return report


def disentanglement_scores(folder: Path, sizes: dict | None = None, backend: str | None = None,
                           seed: int = 0) -> dict | None:
    """The disentanglement scores of a run whose data know their factors, cached in
    RUN/disentanglement.json (recomputed when the step or the sizes change); None for data
    without factors. dSprites (rendered on the fly): MIG, the FactorVAE and β-VAE metrics on
    fresh factor draws (`ppl_vae.groundtruth.disentanglement`, as examples/disentangle.py);
    other data with factors: MIG of the test split's posterior means."""
    from ppl_vae.data import load_data
    from ppl_vae.groundtruth import disentanglement

    sizes = dict(sizes or DISENTANGLEMENT_SIZES)
    run = runs.load_run(folder)
    cache = Path(folder) / DISENTANGLEMENT_FILE
    if cache.exists():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("step") == run.info.get("step") and cached.get("sizes") == sizes:
                return cached["scores"]
        except (json.JSONDecodeError, KeyError):
            pass
    if run.spec.data.source == "dsprites":
        import numpy as np

        from ppl_vae.groundtruth import dsprites

        model = run.model(backend)

        def represent(factors):
            return model.encode(dsprites.render(factors), batch_size=512)[0]

        rng = np.random.default_rng(seed)
        mig = disentanglement.mig_from_factors(represent, dsprites.FACTOR_SIZES, rng,
                                               num_points=sizes["mig_points"])
        factor_vae = disentanglement.factor_vae_score(
            represent, dsprites.FACTOR_SIZES, rng, num_train=sizes["train"],
            num_eval=sizes["eval"], num_variance_estimate=sizes["variance"])
        beta_vae = disentanglement.beta_vae_score(represent, dsprites.FACTOR_SIZES, rng,
                                                  num_train=sizes["train"],
                                                  num_eval=sizes["eval"])
        scores = {"mig": mig.score, "mig_per_factor": mig.gaps.tolist(),
                  "mutual_info": mig.mutual_info.tolist(),
                  "factor_entropy": mig.entropy.tolist(),
                  "factor_vae": factor_vae["eval_accuracy"],
                  "factor_vae_active_dims": factor_vae["num_active_dims"],
                  "beta_vae": beta_vae["eval_accuracy"]}
    else:
        dataset = load_data(run.spec)
        if dataset.factors_test is None:
            return None
        codes = run.model(backend).encode(dataset.x_test)[0]
        mig = disentanglement.mig(codes, dataset.factors_test)
        scores = {"mig": mig.score, "mig_per_factor": mig.gaps.tolist()}
    runs.write_json_atomic(cache, {"step": run.info.get("step"), "sizes": sizes,
                                   "scores": scores})
    return scores


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the finite values (NaN, NaN when none is)."""
    from ppl_vae.diagnostics import standard_error

    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return sum(finite) / len(finite), standard_error(finite)


def aggregate(rows: list[dict], keys: Sequence[str]) -> list[dict]:
    """One row per grid setting (the rows' "label", in order): n, and for each of `keys` its
    mean and standard error over the setting's seeds (``<key>``, ``<key>_se``; s.e. NaN for one
    seed) where any row has it."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        row = {"label": label, "setting": group[0]["setting"], "n": len(group)}
        for key in keys:
            values = [r[key] for r in group if isinstance(r.get(key), int | float)]
            if values:
                row[key], row[f"{key}_se"] = _mean_se([float(v) for v in values])
        out.append(row)
    return out


def _fmt(mean: float, se: float, digits: int) -> str:
    """'1.234 ± 0.056' ('–' for NaN; no ± for one seed)."""
    if not math.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")


def sweep_report(out: str | Path, *, iwae_k: int = 1000, particles: int | None = None,
                 device: str = "cpu", disentanglement: bool = True,
                 disentanglement_sizes: dict | None = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Evaluate every finished point of the sweep in `out` (each report.json re-used while its
    step, iwae_k and particles match) and write OUT/sweep_report.{md,csv,json} (one row per grid
    setting, mean ± s.e. over seeds of `REPORT_METRICS`) and the figures
    OUT/sweep_rate_distortion.png and OUT/sweep_scores.png. Returns {"points", "settings",
    "files"}."""
    from ppl_vae.report import evaluate_run

    out = Path(out)
    record = read_sweep(out)
    rows = []
    entries = record["points"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries), desc="sweep-report", unit="point", dynamic_ncols=True)
    skipped = []
    try:
        for entry in entries:
            folder = out / entry["folder"]
            if bar is not None:
                bar.update(1)
            try:
                info = runs.read_info(folder)
                if int(info.get("step", 0)) < entry["steps"]:
                    skipped.append(f"{entry['name']} ({entry['status']})")
                    continue
                report = _cached_report(folder, info, iwae_k, particles) or evaluate_run(
                    folder, device=device, iwae_k=iwae_k, particles=particles, progress=False)
                scores = (disentanglement_scores(folder, disentanglement_sizes)
                          if disentanglement else None)
            except (runs.RunError, OSError) as err:
                skipped.append(f"{entry['name']} ({one_line(err)})")
                continue
            setting = entry["setting"]
            row = {"name": entry["name"], "label": setting_label(setting), "setting": setting,
                   "seed": entry["seed"], "entropy": report.get("entropy")}
            for key, _, _ in REPORT_METRICS:
                if key in report:
                    row[key] = report[key]
            if scores:
                row |= {k: scores[k] for k in ("mig", "factor_vae", "beta_vae") if k in scores}
            rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    if skipped:
        log(f"sweep-report: {len(skipped)} point(s) not finished, left out: "
            + ", ".join(skipped[:6]) + (", …" if len(skipped) > 6 else ""))
    if not rows:
        raise SweepError(f"no finished point in {out} to report on (run the sweep first)")
    keys = [k for k, _, _ in REPORT_METRICS if any(k in r for r in rows)]
    settings = aggregate(rows, keys)
    files = _write_report(out, record, rows, settings, keys)
    _track_report(record, out, rows, files)
    return {"points": rows, "settings": settings, "files": [str(f) for f in files]}


def _write_report(out: Path, record: dict, rows, settings, keys) -> list[Path]:
    """OUT/sweep_report.md, .csv and .json and the figures; returns their paths."""
    headers = {k: h for k, h, _ in REPORT_METRICS}
    digits = {k: d for k, _, d in REPORT_METRICS}
    lines = ["| setting | seeds | " + " | ".join(headers[k] for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for s in settings:
        cells = [_fmt(s.get(k, float("nan")), s.get(f"{k}_se", float("nan")), digits[k])
                 for k in keys]
        lines.append(f"| {s['label']} | {s['n']} | " + " | ".join(cells) + " |")
    entropy = next((r["entropy"] for r in rows if r.get("entropy") is not None), None)
    notes = ["", "Test split, nats per example; mean ± standard error over seeds "
             f"({len(rows)} finished point(s) of {len(record['points'])})."]
    if entropy is not None:
        notes.append(f"H(y) = {entropy:.3f} nats (exact): every point has rate + distortion ≥ "
                     "H(y).")
    md = out / "sweep_report.md"
    runs.write_text_atomic(md, "\n".join(lines + notes) + "\n")
    buffer = io.StringIO()
    grid_keys = [k for k, _ in record["definition"]["grid"]]
    writer = csv.writer(buffer)
    writer.writerow([*grid_keys, "seeds", *[c for k in keys for c in (k, f"{k}_se")]])
    for s in settings:
        writer.writerow([json.dumps(s["setting"].get(k)) for k in grid_keys] + [s["n"]]
                        + [s.get(c, "") for k in keys for c in (k, f"{k}_se")])
    csv_path = out / "sweep_report.csv"
    runs.write_text_atomic(csv_path, buffer.getvalue())
    json_path = out / "sweep_report.json"
    runs.write_json_atomic(json_path, json.loads(json.dumps(
        {"definition": record["definition"], "settings": settings, "points": rows},
        default=float)))
    figures = [rate_distortion_figure(rows, entropy, out / "sweep_rate_distortion.png")]
    swept = _swept_axis(record)
    if swept is not None:
        figures.append(scores_figure(rows, settings, swept, keys, out / "sweep_scores.png"))
    return [md, csv_path, json_path, *figures]


def _swept_axis(record: dict) -> str | None:
    """The grid key the score figure puts on its x axis: the first axis of numbers."""
    for key, values in record["definition"]["grid"]:
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            return key
    return None


def rate_distortion_figure(rows: list[dict], entropy: float | None, path: Path) -> Path:
    """One point per run in the (rate, distortion) plane, a colour per grid setting; the line
    R + D = H(y) where the data know H(y)."""
    from ppl_vae.plots import annotate_points, figure, pad_limits, save

    fig = figure((6, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    rates = [r.get("rate", float("nan")) for r in rows]
    dists = [r.get("nll_distortion", float("nan")) for r in rows]
    for i, label in enumerate(labels):
        pts = [(r.get("rate"), r.get("nll_distortion")) for r in rows if r["label"] == label]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, color=f"C{i % 10}",
                alpha=0.8)
    extra = [] if entropy is None else [entropy]
    pad_limits(ax, rates + extra, dists + extra)
    centres = [(sum(r.get("rate", 0) for r in rows if r["label"] == lab)
                / sum(r["label"] == lab for r in rows),
                sum(r.get("nll_distortion", 0) for r in rows if r["label"] == lab)
                / sum(r["label"] == lab for r in rows)) for lab in labels]
    annotate_points(ax, [c[0] for c in centres], [c[1] for c in centres], labels)
    if entropy is not None:
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [entropy - lo, entropy - hi], "k--", lw=1,
                label=f"R + D = H(y) = {entropy:.3f}")
        ax.legend(fontsize=7)
    ax.set_xlabel("rate R = Î(y, z), nats")
    ax.set_ylabel("distortion D = Ĥ(y|z), nats")
    ax.set_title(f"{len(rows)} runs in the rate–distortion plane (one dot each)", fontsize=10)
    return save(fig, path)


def scores_figure(rows: list[dict], settings: list[dict], swept: str, keys: Sequence[str],
                  path: Path) -> Path:
    """Each score against the swept value: the mean over seeds (a line per setting of the other
    axes), a band of ± 1 standard error, each seed a dot."""
    from ppl_vae.plots import figure, save

    keys = [k for k in keys if any(k in r for r in rows)]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = figure((4.2 * ncols, 3.2 * nrows))
    xs_all = sorted({float(r["setting"][swept]) for r in rows})
    log_x = xs_all and xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 8
    others = lambda s: tuple((k, json.dumps(v)) for k, v in s.items() if k != swept)  # noqa: E731
    series = list(dict.fromkeys(others(s["setting"]) for s in settings))
    headers = {k: h for k, h, _ in REPORT_METRICS}
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, other in enumerate(series):
            group = sorted((s for s in settings if others(s["setting"]) == other and key in s),
                           key=lambda s: float(s["setting"][swept]))
            if not group:
                continue
            x = [float(s["setting"][swept]) for s in group]
            mean = [s[key] for s in group]
            se = [s.get(f"{key}_se", float("nan")) for s in group]
            se = [0.0 if not math.isfinite(e) else e for e in se]
            colour = f"C{j % 10}"
            name = ", ".join(f"{k.split('.')[-1]}={json.loads(v)}" for k, v in other) or None
            ax.plot(x, mean, "-", color=colour, lw=1.5, label=name)
            ax.fill_between(x, [m - e for m, e in zip(mean, se)],
                            [m + e for m, e in zip(mean, se)], color=colour, alpha=0.2)
            dots = [r for r in rows if others(r["setting"]) == other and key in r]
            ax.plot([float(r["setting"][swept]) for r in dots], [r[key] for r in dots], ".",
                    color=colour, alpha=0.6, ms=4)
        if log_x:
            ax.set_xscale("log")
            ax.set_xticks(xs_all, [f"{v:g}" for v in xs_all], fontsize=7)
            ax.set_xticks([], minor=True)
        ax.set_xlabel(swept)
        ax.set_title(headers.get(key, key), fontsize=9)
        if i == 0 and len(series) > 1:
            ax.legend(fontsize=6)
    fig.suptitle("mean over seeds ± 1 s.e. (band); each seed a dot", fontsize=9)
    return save(fig, path)


def _track_report(record: dict, out: Path, rows: list[dict], files: list[Path]) -> None:
    """The report into MLflow where the sweep was tracked there: each point's scores and
    report.json into its run, the tables and figures into the sweep's parent run."""
    config = record.get("tracking") or {}
    if config.get("kind") != "mlflow":
        return
    from ppl_vae import tracking

    by_name = {e["name"]: e for e in record["points"]}
    for row in rows:
        run_id = (by_name[row["name"]].get("tracking") or {}).get("run_id")
        if not run_id:
            continue
        run = tracking.MLflowTracker(config["uri"], config["experiment"], row["name"],
                                     run_id=run_id)
        run.log_metrics({f"report/{k}": row[k] for k, _, _ in REPORT_METRICS if k in row})
        for name in ("report.json", DISENTANGLEMENT_FILE):
            run.log_artifact(out / row["name"] / name)
        run.end("done")
    parent = tracking.MLflowTracker(config["uri"], config["experiment"], "",
                                    run_id=config["parent_run_id"])
    for f in files:
        parent.log_artifact(f)
    parent.end("done")
