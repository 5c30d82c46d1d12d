"""Posterior collapse, and two ways out of it (the lecture, "Posterior (Encoder) Collapse").

Under universal expressiveness the decoder alone can model the population, P̂_Φ(y|z) = Pop(y),
and then an encoder that says nothing about y (rate Î = 0) is an optimum of
rate + distortion = Î + Ĥ. This script trains four models on the synthetic bars
(`models/collapse_bars.toml`, 16 binary pixels, H(y) = 5.734 nats known exactly):

* an autoregressive (MADE) decoder at β = 1: expressive enough to model the bars without z, so
  the encoder collapses (rate → 0, I_q → 0) while −ELBO stays close to H(y);
* the same at β = 0.3: a nat of rate now costs 0.3 nats of objective, so the encoder is used;
* the same at β = 1 with an encoder-only InfoNCE term: the encoder is made to carry
  information whatever the decoder does;
* a factorised (MLP) decoder at β = 1 for reference: its pixels are independent given z, so
  it needs z to model the bars at all.

    python examples/posterior_collapse.py --backend numpyro      # the full runs (minutes)
    python examples/posterior_collapse.py --smoke                # seconds, checks it runs

Writes runs/posterior_collapse/: one run folder per model, table.md, results.json and
collapse.png (the rate during training, and where the nats went).
"""

from __future__ import annotations

import time

import numpy as np

from ppl_vae import experiments, runs

NAME = "posterior_collapse"
#: label -> (bundled spec, overrides)
RUNS = {
    "autoregressive, β=1": ("collapse_bars", []),
    "autoregressive, β=0.3": ("collapse_bars", ["objective.beta=0.3"]),
    "autoregressive, β=1 + InfoNCE": ("collapse_bars",
                                      ['objective.aux=[{kind="infonce", weight=1.0}]']),
    "factorised (MLP), β=1": ("collapse_bars", ['decoder.kind="mlp"']),
}
STEPS = 60000
#: The claims, stated before the runs: the β = 1 autoregressive encoder carries less than this
#: share of the reference run's rate and I_q, and −ELBO − H(y) stays below this many nats.
COLLAPSED_SHARE = 0.05
GOOD_ELBO_EXCESS = 0.25
COLUMNS = [("run", "label", "{}"), ("β", "beta", "{:g}"), ("test −ELBO", "neg_elbo", "{:.3f}"),
           ("−ELBO − H(y)", "elbo_excess", "{:.3f}"), ("± 2 s.e.", "two_se", "{:.3f}"),
           ("rate Î", "rate", "{:.3f}"), ("distortion", "nll_distortion", "{:.3f}"),
           ("I_q", "mutual_information", "{:.3f}"), ("active units", "active", "{}"),
           ("aux", "aux", "{:.2f}"), ("train s", "train_seconds", "{:.0f}")]


def main(args) -> dict:
    started = time.perf_counter()
    out = experiments.output_dir(args, NAME)
    rows = []
    for i, (label, (base, overrides)) in enumerate(RUNS.items()):
        spec = experiments.make_spec(base, overrides, args, STEPS)
        report = experiments.train_and_evaluate(spec, out / f"run{i}", args)
        rows.append(report | {"label": label, "neg_elbo": -report["elbo"],
                              "two_se": 2 * report["elbo_stderr"],
                              "active": f"{report['active_units']}/{report['latent_dim']}",
                              "folder": str(out / f"run{i}")})
    claims = check_claims(rows)
    table = experiments.markdown_table(rows, COLUMNS) + "\n\n" + experiments.format_claims(claims)
    plot(rows, out / "collapse.png")
    experiments.write_results(out, NAME, rows, table, started, args,
                              {"entropy": rows[0]["entropy"], "claims": claims})
    return {"rows": rows, "claims": claims}


def check_claims(rows: list[dict]) -> list[dict]:
    collapsed, low_beta, infonce, reference = rows
    share = collapsed["rate"] / reference["rate"]
    return [
        {"claim": "β = 1 with the autoregressive decoder collapses while its ELBO stays good",
         "held": bool(share < COLLAPSED_SHARE
                      and collapsed["mutual_information"] < COLLAPSED_SHARE
                      * reference["mutual_information"]
                      and collapsed["elbo_excess"] < GOOD_ELBO_EXCESS),
         "evidence": f"rate {collapsed['rate']:.3f} nats = {100 * share:.1f}% of the factorised "
                     f"decoder's {reference['rate']:.3f}; I_q {collapsed['mutual_information']:.3f}"
                     f"; −ELBO − H(y) = {collapsed['elbo_excess']:.3f} nats; "
                     f"{collapsed['active']} units above the 0.01 variance threshold"},
        {"claim": "β < 1 resists collapse",
         "held": bool(low_beta["rate"] > 10 * collapsed["rate"]
                      and low_beta["mutual_information"] > 1.0),
         "evidence": f"rate {low_beta['rate']:.3f}, I_q {low_beta['mutual_information']:.3f} "
                     f"nats at β = 0.3"},
        {"claim": "an encoder-only InfoNCE term at β = 1 resists collapse",
         "held": bool(infonce["rate"] > 10 * collapsed["rate"]
                      and infonce["mutual_information"] > 1.0),
         "evidence": f"rate {infonce['rate']:.3f}, I_q {infonce['mutual_information']:.3f} nats"},
    ]


def plot(rows: list[dict], path) -> None:
    from ppl_vae.plots import figure, save

    fig = figure((11, 4))
    ax = fig.add_subplot(1, 2, 1)
    for row in rows:
        train = runs.load_run(row["folder"]).records("train")
        ax.plot([r["step"] for r in train], [max(r["rate"], 1e-4) for r in train],
                label=row["label"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("rate Î on training batches, nats")
    ax.set_title("the rate during training")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    keys = [("rate", "rate Î"), ("mutual_information", "I_q(y; z)"),
            ("nll_distortion", "distortion"), ("elbo_excess", "−ELBO − H(y)")]
    width = 0.8 / len(keys)
    x = np.arange(len(rows))
    for j, (key, label) in enumerate(keys):
        ax.bar(x + (j - 1.5) * width, [r[key] for r in rows], width, label=label)
    ax.axhline(rows[0]["entropy"], color="k", ls="--", lw=1, label="H(y)")
    ax.set_xticks(x, [r["label"].replace(", ", "\n") for r in rows], fontsize=7)
    ax.set_ylabel("nats per example (test)")
    ax.set_title("where the nats go")
    ax.legend(fontsize=7)
    save(fig, path)


if __name__ == "__main__":
    main(experiments.parse_args(__doc__, NAME))
