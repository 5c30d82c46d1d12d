"""Richer posteriors and priors at equal steps: one stochastic layer, two (Burda et al. 2016),
and an inverse autoregressive flow posterior (Kingma et al. 2016), on MNIST.

The ELBO is ln p̂(y) − KL(q(z|y) ‖ p̂(z|y)): it is tight only where the encoder's family can
match the model's posterior. Two ways to loosen the family's grip, each a spec of a few lines:

* a second stochastic layer, p̂(z2) p̂(z1|z2) p̂(y|z1) with bottom-up q(z1|y) q(z2|z1)
  (`models/vae2_mnist.toml`): a learned, hierarchical prior for z1 and a richer joint posterior;
* an IAF posterior (`models/iaf_mnist.toml`): the diagonal Gaussian pushed through two
  autoregressive flow steps, so q(z|y) can be correlated and skewed.

The reference is `iaf_mnist` with ``posterior.kind = "diagonal"``: the same 784-200-200-50 tanh
networks, a plain VAE. All three train for the same number of steps on the same data (the 10k
MNIST test images beside the repository, 8000 train / 2000 test) and are scored on the test
split by the test ELBO and the IWAE bound ln p̂(y) with K = 1000 (over the joint of all
latent sites), with the rate and the active units of each site.

Stated before the runs: a richer model "tightened the bound" if its test ELBO exceeds the
one-layer VAE's by more than twice the standard error of the difference, paired over the test
images; Burda et al. report that a second stochastic layer helps on MNIST (their Table 1).
After the first full run (the two-layer model collapsed its top layer and fell 15 nats short) a
fourth row was added: the same two-layer model with a linear β warm-up over 5000 steps, the
remedy Sønderby et al. (2016) give for inactive units in hierarchical VAEs.

    python examples/latent_graphs.py --backend numpyro     # the full runs (minutes)
    python examples/latent_graphs.py --smoke               # seconds, checks it runs

Writes runs/latent_graphs/: one run folder per model, table.md, results.json, latent_graphs.png.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ppl_vae import experiments
from ppl_vae.spec import load_spec

NAME = "latent_graphs"
MODELS = {  # label -> (bundled spec, overrides, β warm-up)
    "one layer (50)": ("iaf_mnist", ['posterior.kind="diagonal"'], False),
    "two layers (100, 50)": ("vae2_mnist", [], False),
    # Sønderby et al. (2016): hierarchical VAEs need a β warm-up to keep their units active
    "two layers, β warm-up": ("vae2_mnist", [], True),
    "IAF posterior (50, 2 steps)": ("iaf_mnist", [], False),
}
#: The β warm-up is linear over this share of the run's steps: 5000 of the 20000 (a schedule
#: must fit in the run, so --steps and --smoke scale it).
WARMUP_SHARE = 0.25
#: Draws of z per test example behind the paired comparison of test ELBOs.
PAIRED_DRAWS = 20
STEPS = 20000
IWAE_K = 1000
COLUMNS = [("model", "label", "{}"), ("test −ELBO", "neg_elbo", "{:.2f}"),
           ("± 2 s.e.", "two_se", "{:.2f}"), ("ELBO gain, paired", "paired_gain", "{:+.2f}"),
           ("± 2 s.e. ", "paired_two_se", "{:.2f}"), ("−ln p̂(y), IWAE K=1000", "neg_log_likelihood",
                                              "{:.2f}"),
           ("ln p̂ − ELBO", "elbo_gap", "{:.2f}"), ("rate per site", "rates", "{}"),
           ("active units per site", "active", "{}"), ("distortion", "nll_distortion", "{:.2f}"),
           ("train s", "train_seconds", "{:.0f}"), ("ms / step", "ms_per_step", "{:.2f}")]


def main(args) -> dict:
    started = time.perf_counter()
    out = experiments.output_dir(args, NAME)
    rows = []
    for i, (label, (base, overrides, warm_up)) in enumerate(MODELS.items()):
        spec = experiments.make_spec(base, [*overrides, f'data.path="{args.mnist}"'], args,
                                     STEPS)
        if warm_up:
            warmup = int(WARMUP_SHARE * spec.train.steps)
            spec = load_spec(spec, [f'objective.beta_schedule={{kind="linear", '
                                    f'warmup={warmup}}}'])
        report = experiments.train_and_evaluate(spec, out / f"model{i}", args, iwae_k=IWAE_K)
        sites = report["sites"]
        rows.append(report | {
            "label": label, "folder": str(out / f"model{i}"), "neg_elbo": -report["elbo"],
            "two_se": 2 * report["elbo_stderr"],
            "neg_log_likelihood": -report["log_likelihood"] if "log_likelihood" in report
            else None,
            "rates": ", ".join(f"{n} {s['rate']:.1f}" for n, s in sites.items()),
            "active": ", ".join(f"{n} {s['active_units']}/{s['dim']}" for n, s in sites.items()),
            "ms_per_step": 1000 * report["train_seconds"] / spec.train.steps})
    paired_elbos(rows, args)
    claims = check_claims(rows)
    table = experiments.markdown_table(rows, COLUMNS) + "\n\n" + experiments.format_claims(claims)
    plot(rows, out / "latent_graphs.png")
    experiments.write_results(out, NAME, rows, table, started, args, {"claims": claims})
    return {"rows": rows, "claims": claims}


def paired_elbos(rows: list[dict], args) -> None:
    """Per test example, the ELBO of each model as the mean of `PAIRED_DRAWS` importance
    log-weights (the same images for every model), so that a difference of two models has the
    standard error of the paired differences, not of two independent means: adds
    ``paired_gain`` and ``paired_gain_stderr`` (against the first row) to each row."""
    from ppl_vae import runs
    from ppl_vae.data import load_data
    from ppl_vae.training import evaluation_data

    per_example = []
    for row in rows:
        run = runs.load_run(row["folder"])
        x, _ = evaluation_data(run.spec, load_data(run.spec))
        model = run.model(args.backend)
        per_example.append(model.log_weights(x, PAIRED_DRAWS, seed=1).mean(1))
    for row, elbo in zip(rows, per_example):
        diff = elbo - per_example[0]
        row["paired_gain"] = float(diff.mean())
        row["paired_gain_stderr"] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        row["paired_two_se"] = 2 * row["paired_gain_stderr"]


def check_claims(rows: list[dict]) -> list[dict]:
    """Each richer model against the one-layer VAE: a test ELBO higher by more than twice the
    standard error of the paired per-example difference (`paired_elbos`)."""
    base = rows[0]
    claims = []
    for row in rows[1:]:
        gain, se = row["paired_gain"], row["paired_gain_stderr"]
        evidence = (f"test ELBO {gain:+.2f} nats, paired over the test images "
                    f"(2 s.e. {2 * se:.2f}; the reports' ELBOs differ by "
                    f"{row['elbo'] - base['elbo']:+.2f})")
        if row.get("log_likelihood") is not None and base.get("log_likelihood") is not None:
            evidence += f"; IWAE ln p̂ {row['log_likelihood'] - base['log_likelihood']:+.2f}"
        claims.append({"claim": f"{row['label']} tightens the bound of the one-layer VAE",
                       "held": bool(gain > 2 * se), "evidence": evidence})
    return claims


def plot(rows: list[dict], path) -> None:
    """Left: test −ELBO and −ln p̂(y) (IWAE) per model, ± 2 s.e. Middle: each model's test ELBO
    minus the one-layer VAE's, paired over the test images, ± 2 s.e. Right: the rate of each
    dimension of each site, sorted (the active part of the code)."""
    import textwrap

    from ppl_vae.plots import figure, save

    fig = figure((14, 4.2))
    names = ["\n".join(textwrap.wrap(r["label"], 14)) for r in rows]
    x = np.arange(len(rows))
    ax = fig.add_subplot(1, 3, 1)
    ax.errorbar(x - 0.1, [r["neg_elbo"] for r in rows], yerr=[r["two_se"] for r in rows],
                fmt="s", color="C0", label="test −ELBO")
    if all(r["neg_log_likelihood"] is not None for r in rows):
        ax.errorbar(x + 0.1, [r["neg_log_likelihood"] for r in rows],
                    yerr=[2 * r["log_likelihood_stderr"] for r in rows], fmt="o", color="C3",
                    label=f"−ln p̂(y), IWAE K={rows[0]['iwae_k']}")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel("nats per test example (lower is better)")
    ax.set_title("the bound and the likelihood, ± 2 s.e.", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 2)
    ax.errorbar(x[1:], [r["paired_gain"] for r in rows[1:]],
                yerr=[r["paired_two_se"] for r in rows[1:]], fmt="D", color="C2")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x[1:], names[1:], fontsize=8)
    ax.set_xlim(0.5, len(rows) - 0.5)
    ax.set_ylabel(f"test ELBO − {rows[0]['label']}'s, nats")
    ax.set_title("tighter than one layer? paired, ± 2 s.e.", fontsize=10)
    ax = fig.add_subplot(1, 3, 3)
    floor, notes = 1e-3, []
    for i, row in enumerate(rows):
        for j, (name, site) in enumerate(row["sites"].items()):
            rates = sorted(site["rate_per_dim"], reverse=True)
            if not rates:
                notes.append(f"{row['label']}: no rate per dimension (not factorised)")
            elif max(rates) < floor:
                notes.append(f"{row['label']}, {name}: every dimension < {floor:g} nats")
            else:
                ax.plot(np.arange(1, len(rates) + 1), rates, ["-", "--", ":"][j % 3],
                        color=f"C{i}", label=f"{row['label']}: {name}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.axhline(0.01, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("dimension, by rate")
    ax.set_ylabel("rate of the dimension, nats")
    ax.set_title("where the rate goes (dashed grey: 0.01 nats)", fontsize=10)
    ax.legend(fontsize=7, title="\n".join(notes), title_fontsize=6)
    save(fig, path)


if __name__ == "__main__":
    main(experiments.parse_args(__doc__, NAME, mnist=True))
