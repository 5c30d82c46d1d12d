"""Encoder autonomy (the lecture, "Encoder Autonomy").

Under universal expressiveness, optimising the decoder and prior Φ for ANY fixed encoder Ψ
yields the population distribution, so a loss 𝓛(Ψ) on the encoder alone can be added,

    β Î(y, z) + Ĥ(y|z) + 𝓛(Ψ),

without moving the optimum of the model P̂_Φ(y). This script trains the digits VAE
(`models/vae_digits.toml`) four ways, four seeds each:

* without an aux term;
* with `supervised`: a classifier on the posterior mean trained on the labels of only 100 of
  the 1438 training digits (`data.labelled = 100`), with weight 10 and with weight 100 on its
  summed cross-entropy;
* with `infonce`: minus a batch lower bound on I_q(y; z) from the encoder alone (weight 1).

It measures what the aux term changes (a linear probe's test accuracy on the posterior mean,
fitted on every training label, and one fitted on the 100 labels only; active units; I_q) and
what it should not (the test ELBO and the IWAE estimate of ln p̂(y), the model itself): the
claim is that the test ELBO stays within ELBO_MARGIN nats of the run without aux, averaged over
the seeds.

    python examples/encoder_autonomy.py --backend numpyro      # the full runs (minutes)
    python examples/encoder_autonomy.py --smoke                # seconds, checks it runs

Writes runs/encoder_autonomy/: the run folders, table.md, results.json, encoder_autonomy.png.
"""

from __future__ import annotations

import time

import numpy as np

from ppl_vae import experiments, runs
from ppl_vae.data import binarize, load_data
from ppl_vae.spec import load_spec
from ppl_vae.training import evaluation_data

NAME = "encoder_autonomy"
LABELS_KEPT = 100
VARIANTS = {
    "no aux": [],
    "+ supervised, 100 labels": [f"data.labelled={LABELS_KEPT}",
                                 'objective.aux=[{kind="supervised", weight=10.0}]'],
    "+ supervised ×100, 100 labels": [f"data.labelled={LABELS_KEPT}",
                                      'objective.aux=[{kind="supervised", weight=100.0}]'],
    "+ InfoNCE": ['objective.aux=[{kind="infonce", weight=1.0}]'],
}
SEEDS = (0, 1, 2, 3)
STEPS = 5000
IWAE_K = 500
#: The claim's tolerance, fixed before the runs: |Δ test ELBO| ≤ 1 nat per example (about 4% of
#: the digits' −ELBO of ~22 nats; seed-to-seed differences are ~0.2 nats).
ELBO_MARGIN = 1.0
COLUMNS = [("aux term", "variant", "{}"), ("seed", "seed", "{}"),
           ("test −ELBO", "neg_elbo", "{:.3f}"), ("± 2 s.e.", "two_se", "{:.3f}"),
           ("IWAE −ln p̂(y)", "neg_log_likelihood", "{:.3f}"), ("rate Î", "rate", "{:.3f}"),
           ("I_q", "mutual_information", "{:.3f}"), ("active units", "active", "{}"),
           ("probe accuracy", "probe_accuracy", "{:.3f}"),
           ("probe, 100 labels", "probe_accuracy_100", "{:.3f}"), ("aux", "aux", "{:.3f}")]
SUMMARY_COLUMNS = [("aux term", "variant", "{}"), ("mean test −ELBO", "neg_elbo", "{:.3f}"),
                   ("Δ vs no aux", "delta_elbo", "{:+.3f}"),
                   ("mean IWAE −ln p̂(y)", "neg_log_likelihood", "{:.3f}"),
                   ("Δ vs no aux", "delta_nll", "{:+.3f}"),
                   ("mean probe accuracy", "probe_accuracy", "{:.3f}"),
                   ("mean probe, 100 labels", "probe_accuracy_100", "{:.3f}"),
                   ("mean I_q", "mutual_information", "{:.3f}"),
                   ("mean active units", "active_units", "{:.1f}")]


def main(args) -> dict:
    started = time.perf_counter()
    out = experiments.output_dir(args, NAME)
    rows = []
    for v, (variant, overrides) in enumerate(VARIANTS.items()):
        for seed in SEEDS[:1] if args.smoke else SEEDS:
            spec = experiments.make_spec("vae_digits", [*overrides, f"train.seed={seed}"], args,
                                         STEPS)
            folder = out / f"aux{v}-seed{seed}"
            report = experiments.train_and_evaluate(spec, folder, args, iwae_k=IWAE_K)
            rows.append(report | {"variant": variant, "seed": seed, "neg_elbo": -report["elbo"],
                                  "two_se": 2 * report["elbo_stderr"],
                                  "neg_log_likelihood": -report.get("log_likelihood", np.nan),
                                  "active": f"{report['active_units']}/{report['latent_dim']}"}
                        | probe_accuracies(folder, args))
    summary = summarise(rows)
    claims = check_claims(summary)
    table = (experiments.markdown_table(rows, COLUMNS) + "\n\n"
             + experiments.markdown_table(summary, SUMMARY_COLUMNS) + "\n\n"
             + experiments.format_claims(claims))
    plot(rows, out / "encoder_autonomy.png")
    experiments.write_results(out, NAME, rows, table, started, args,
                              {"summary": summary, "claims": claims, "elbo_margin": ELBO_MARGIN})
    return {"rows": rows, "summary": summary, "claims": claims}


def probe_accuracies(folder, args) -> dict[str, float]:
    """Test accuracy of a multinomial logistic regression from the posterior mean to the digit,
    fitted on every training label (`probe_accuracy`) and on only the 100 labels that
    `data.labelled = 100` keeps (`probe_accuracy_100`: what a user with few labels gets)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    run = runs.load_run(folder)
    model = run.model(args.backend)
    out = {}
    for key, kept in (("probe_accuracy", 0), ("probe_accuracy_100", LABELS_KEPT)):
        dataset = load_data(load_spec(run.spec, [f"data.labelled={kept}"]))
        x_train = binarize(dataset.x_train, np.random.default_rng(run.spec.train.seed + 2))
        x_test, labels_test = evaluation_data(run.spec, dataset)
        known = dataset.labels_train >= 0
        codes = model.encode(x_train)[0][known]
        scaler = StandardScaler().fit(codes)
        probe = LogisticRegression(max_iter=5000).fit(scaler.transform(codes),
                                                      dataset.labels_train[known])
        out[key] = float(probe.score(scaler.transform(model.encode(x_test)[0]), labels_test))
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Means over seeds per variant, and differences from the run without aux."""
    keys = ("neg_elbo", "neg_log_likelihood", "probe_accuracy", "probe_accuracy_100",
            "mutual_information", "active_units")
    out = []
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        out.append({"variant": variant, **{k: float(np.mean([r[k] for r in mine])) for k in keys}})
    for row in out:
        row["delta_elbo"] = row["neg_elbo"] - out[0]["neg_elbo"]
        row["delta_nll"] = row["neg_log_likelihood"] - out[0]["neg_log_likelihood"]
    return out


def check_claims(summary: list[dict]) -> list[dict]:
    base, supervised, strong, infonce = summary
    return [
        {"claim": f"the test ELBO stays within {ELBO_MARGIN:g} nat of the run without aux",
         "held": bool(all(abs(s["delta_elbo"]) <= ELBO_MARGIN for s in summary)),
         "evidence": ", ".join(f"{s['variant']}: Δ(−ELBO) {s['delta_elbo']:+.3f}, "
                               f"Δ(−ln p̂) {s['delta_nll']:+.3f}" for s in summary[1:])},
        *({"claim": f"the supervised aux term ({s['variant']}) changes the representation",
           "held": bool(s["probe_accuracy"] > base["probe_accuracy"] + 0.02),
           "evidence": f"probe accuracy {base['probe_accuracy']:.3f} → "
                       f"{s['probe_accuracy']:.3f} (all labels); "
                       f"{base['probe_accuracy_100']:.3f} → {s['probe_accuracy_100']:.3f} "
                       f"(a probe on the {LABELS_KEPT} labels only, not part of the claim)"}
          for s in (supervised, strong)),
        {"claim": "the InfoNCE aux term changes the representation",
         "held": bool(infonce["mutual_information"] > base["mutual_information"] + 0.1
                      or infonce["active_units"] > base["active_units"] + 0.9),
         "evidence": f"I_q {base['mutual_information']:.3f} → "
                     f"{infonce['mutual_information']:.3f} nats, active units "
                     f"{base['active_units']:.1f} → {infonce['active_units']:.1f}"},
    ]


#: x-axis labels of the figure
SHORT = {"no aux": "no aux", "+ supervised, 100 labels": "sup.\n×10",
         "+ supervised ×100, 100 labels": "sup.\n×100", "+ InfoNCE": "InfoNCE"}


def plot(rows: list[dict], path) -> None:
    from ppl_vae.plots import figure, save

    panels = [("neg_elbo", "test −ELBO, nats"), ("neg_log_likelihood", "IWAE −ln p̂(y), nats"),
              ("probe_accuracy", "probe accuracy, all labels"),
              ("probe_accuracy_100", f"probe accuracy, {LABELS_KEPT} labels"),
              ("mutual_information", "I_q, nats")]
    fig = figure((3 * len(panels), 3.6))
    names = list(VARIANTS)
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), j + 1)
        for i, variant in enumerate(names):
            values = [r[key] for r in rows if r["variant"] == variant]
            # the mean as a tick, not a bar: the axes below do not start at 0, and a bar's
            # length would overstate the differences
            ax.hlines(np.mean(values), i - 0.3, i + 0.3, color=f"C{i}", lw=3)
            ax.plot([i] * len(values), values, "k.", ms=6)
        ax.set_xticks(range(len(names)), [SHORT.get(n, n) for n in names], fontsize=7)
        ax.set_title(label, fontsize=9)
        values = np.array([r[key] for r in rows])
        if key != "mutual_information" and np.isfinite(values).all():
            # the differences are the point, not the totals
            pad = 1.0 if key.startswith("neg") else 0.05
            ax.set_ylim(values.min() - 2 * pad, values.max() + pad)
        elif np.isfinite(values).all():
            ax.set_ylim(0, 1.1 * max(values.max(), 1e-9))
    fig.suptitle("each seed (dot) and their mean (tick); the first four axes do not start at 0",
                 fontsize=9)
    save(fig, path)


if __name__ == "__main__":
    main(experiments.parse_args(__doc__, NAME))
