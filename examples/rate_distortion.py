"""The β trade-off on a population whose entropy is known (the lecture, "The β-VAE").

On the synthetic bars (`models/vae_bars.toml`) H(y) = 5.734 nats is computed exactly by
enumerating all 2^16 images. For every encoder/decoder pair the lecture's identities give

    H(y) = I(y, z) + H(y|z),   I ≤ Î = rate,   H(y|z) ≤ Ĥ = distortion

so every trained model's (rate, distortion) point lies on or above the line R + D = H(y), and
the encoder's mutual information is bracketed: H(y) − D ≤ I_q ≤ R. This script sweeps β (the
price of a nat of rate), places each model in the rate–distortion plane with the line, and
checks both statements on the test split within their Monte Carlo error (2 standard errors,
from one draw of z per test example; I_q's from the aggregate posterior of the test split).

    python examples/rate_distortion.py --backend numpyro      # the full sweep (minutes)
    python examples/rate_distortion.py --backend numpyro --seeds 3   # three seeds per β
    python examples/rate_distortion.py --smoke                # seconds, checks it runs

The β values are one sweep (`ppl_vae.sweep`, as ``ppl-vae sweep vae_bars --grid
objective.beta=…``): with NumPyro its points train together in one process, vmapped (--engine
vmap, the default there), else in a process pool. Writes runs/rate_distortion/: the sweep's
folder sweep/ (sweep.json, one run folder per point, sweep_report.* and its figures), table.md,
results.json and rate_distortion.png.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from ppl_vae import experiments, sweep

NAME = "rate_distortion"
BETAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)
SMOKE_BETAS = (0.3, 1.0, 3.0)
STEPS = 20000
COLUMNS = [("β", "beta", "{:g}"), ("rate R", "rate", "{:.3f}"),
           ("distortion D", "nll_distortion", "{:.3f}"), ("R + D − H", "excess", "{:.3f}"),
           ("± 2 s.e.", "two_se", "{:.3f}"), ("R + D ≥ H", "above_line", "{}"),
           ("H − D", "mutual_information_lower", "{:.3f}"), ("I_q", "mutual_information", "{:.3f}"),
           ("± 2 s.e.", "two_se_iq", "{:.3f}"), ("H − D ≤ I_q ≤ R", "bracketed", "{}")]


def main(args) -> dict:
    started = time.perf_counter()
    out = experiments.output_dir(args, NAME)
    betas = SMOKE_BETAS if args.smoke else BETAS
    reports = sweep.experiment_sweep(
        "vae_bars", [f"objective.beta={','.join(f'{b:g}' for b in betas)}"], args, STEPS,
        out / "sweep")
    rows = [report | judge(report) | {"beta": report["beta"]} for report in reports]
    entropy = rows[0]["entropy"]
    held = [r for r in rows if r["above_line"] == "yes"]
    bracketed = [r for r in rows if r["bracketed"] == "yes"]
    summary = (f"H(y) = {entropy:.3f} nats (exact). {len(held)} of {len(rows)} points lie on or "
               f"above R + D = H(y) within 2 standard errors; H(y) − D ≤ I_q ≤ R holds for "
               f"{len(bracketed)} of {len(rows)}. Lowest R + D − H: "
               f"{min(r['excess'] for r in rows):.3f} nats at β = "
               f"{min(rows, key=lambda r: r['excess'])['beta']:g}.")
    columns = COLUMNS if args.seeds == 1 else [COLUMNS[0], ("seed", "seed", "{}"), *COLUMNS[1:]]
    table = experiments.markdown_table(rows, columns) + "\n\n" + summary
    plot(rows, entropy, out / "rate_distortion.png")
    experiments.write_results(out, NAME, rows, table, started, args, {"entropy": entropy})
    return {"rows": rows}


def judge(report: dict) -> dict:
    """The two checks of one model, each within 2 standard errors of its Monte Carlo estimate."""
    se_sum = report["elbo_stderr"]
    se_iq = report["mutual_information_stderr"]
    se_lower = math.hypot(report["nll_distortion_stderr"], se_iq)
    se_upper = math.hypot(report["rate_stderr"], se_iq)
    excess = report["rate"] + report["nll_distortion"] - report["entropy"]
    bracketed = (report["mutual_information_lower"] <= report["mutual_information"] + 2 * se_lower
                 and report["mutual_information"] <= report["rate"] + 2 * se_upper)
    return {"excess": excess, "two_se": 2 * se_sum, "two_se_iq": 2 * se_iq,
            "above_line": "yes" if excess >= -2 * se_sum else "NO",
            "bracketed": "yes" if bracketed else "NO"}


def plot(rows: list[dict], entropy: float, path) -> None:
    from ppl_vae.plots import annotate_points, figure, pad_limits, save

    fig = figure((11, 4.5))
    ax = fig.add_subplot(1, 2, 1)
    rates = np.array([r["rate"] for r in rows])
    distortions = np.array([r["nll_distortion"] for r in rows])
    x_err = np.array([2 * r["rate_stderr"] for r in rows])
    y_err = np.array([2 * r["nll_distortion_stderr"] for r in rows])
    ax.errorbar(rates, distortions, xerr=x_err, yerr=y_err, fmt="o-", ms=4,
                label="trained models (test, ± 2 s.e.)")
    # the error bars, and the line's ends (0, H) and (H, 0), inside the axes with a margin
    pad_limits(ax, [*(rates - x_err), *(rates + x_err), entropy],
               [*(distortions - y_err), *(distortions + y_err), entropy])
    annotate_points(ax, rates, distortions, [f"β={r['beta']:g}" for r in rows])
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [entropy - lo, entropy - hi], "k--", lw=1,
            label=f"R + D = H(y) = {entropy:.3f}")
    ax.set_xlabel("rate R = Î(y, z), nats")
    ax.set_ylabel("distortion D = Ĥ(y|z), nats")
    ax.set_title("β sweep in the rate–distortion plane")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    betas = [r["beta"] for r in rows]
    for key, label, style in (("rate", "rate R (upper bound)", "o-"),
                              ("mutual_information", "I_q(y; z)", "s-"),
                              ("mutual_information_lower", "H(y) − D (lower bound)", "^-")):
        ax.plot(betas, [r[key] for r in rows], style, ms=4, label=label)
    limited = [r for r in rows if r.get("mutual_information_limited")]
    if limited:  # eval's flag: the rate comes within 3 nats of ln M, the estimate's ceiling
        ax.plot([r["beta"] for r in limited], [r["mutual_information"] for r in limited], "s",
                ms=9, mfc="none", mec="C3", label="I_q may be limited by ln M (biased low)")
    ax.set_xscale("log")
    ax.set_xticks(betas, [f"{b:g}" for b in betas], fontsize=7)  # the β swept, not 10⁻¹, 10⁰
    ax.set_xticks([], minor=True)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("β")
    ax.set_ylabel("nats per example (test)")
    ax.set_title("H(y) − D ≤ I_q ≤ R")
    ax.legend(fontsize=7)
    save(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    experiments.add_arguments(parser, NAME)
    sweep.add_experiment_arguments(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
