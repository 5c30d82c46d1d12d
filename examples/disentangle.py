"""β > 1 and interpretability: a β sweep on procedural dSprites (the lecture, "The β-VAE").

"β > 1 may improve interpretability": a larger price on the rate pushes the encoder towards
codes whose dimensions each follow one generative factor (Higgins et al. 2017). dSprites is
rendered on the fly with its five factors known (shape, scale, orientation, x, y;
`ppl_vae.dsprites`), so the code can be scored against them (`ppl_vae.disentanglement`):

* MIG (Chen et al. 2018): per factor, the gap between the two code dimensions most informative
  about it, over its entropy, 20-bin histograms, as in disentanglement_lib; 0 = entangled;
* the FactorVAE metric (Kim & Mnih 2018): accuracy of a majority vote that names the factor
  held fixed in a batch from the code dimension of least normalised variance; chance 1/5;
* the β-VAE metric (Higgins et al. 2017): accuracy of a linear classifier that names the fixed
  factor from mean absolute code differences; chance 1/5.

Each model is `models/beta_vae_dsprites.toml` (conv encoder and decoder, 10 latents) at one β;
the metrics use fresh factor draws, rendered and encoded (posterior means). The best model (by
MIG) gets latent traversals.

    python examples/disentangle.py                          # the full sweep (58 min, 2 cores)
    python examples/disentangle.py --smoke                  # seconds, checks it runs

Writes runs/disentangle/: one run folder per β, table.md, results.json, disentangle.png and
traversals.png. On a CPU the Pyro backend is the faster one here (convolutions).
"""

from __future__ import annotations

import time

import numpy as np

from ppl_vae import disentanglement, dsprites, experiments, runs

NAME = "disentangle"
BETAS = (1.0, 4.0, 16.0)
SMOKE_BETAS = (1.0, 4.0)
#: Sized for a 2-core CPU (0.12-0.17 s a step with Pyro: 58 minutes for the sweep with the
#: metrics); disentanglement_lib trains for 300,000 steps, so on a GPU use --steps 30000 or more.
STEPS = 6000
#: Metric sizes (disentanglement_lib's defaults are 10000 points for MIG and 10000 / 5000
#: training / evaluation points of 64-image batches for the classifier metrics; smaller here to
#: keep the encoding of rendered images to about a minute per model on a CPU).
METRIC_SIZES = {"mig_points": 10000, "train": 2000, "eval": 1000, "variance": 5000}
SMOKE_METRIC_SIZES = {"mig_points": 500, "train": 40, "eval": 20, "variance": 200}
COLUMNS = [("β", "beta", "{:g}"), ("test −ELBO", "neg_elbo", "{:.1f}"),
           ("rate Î", "rate", "{:.2f}"), ("distortion", "nll_distortion", "{:.1f}"),
           ("active units", "active", "{}"),
           ("MIG", "mig", "{:.3f}"), ("FactorVAE metric", "factor_vae", "{:.3f}"),
           ("β-VAE metric", "beta_vae", "{:.3f}"), ("train s", "train_seconds", "{:.0f}")]


def main(args) -> dict:
    started = time.perf_counter()
    out = experiments.output_dir(args, NAME)
    sizes = SMOKE_METRIC_SIZES if args.smoke else METRIC_SIZES
    smoke_data = ["data.size=300", "latent.dim=4", "encoder.channels=[8, 8, 8, 8]",
                  "decoder.channels=[8, 8, 8, 8]", "encoder.hidden=[16]", "decoder.hidden=[16]"]
    rows = []
    for beta in SMOKE_BETAS if args.smoke else BETAS:
        overrides = [f"objective.beta={beta}", *(smoke_data if args.smoke else [])]
        spec = experiments.make_spec("beta_vae_dsprites", overrides, args, STEPS)
        folder = out / f"beta{beta:g}"
        report = experiments.train_and_evaluate(spec, folder, args)
        scores = score(folder, args, sizes)
        active = f"{report['active_units']}/{report['latent_dim']}"
        rows.append(report | scores | {"neg_elbo": -report["elbo"], "folder": str(folder),
                                       "active": active})
    best = max(rows, key=lambda r: r["mig"])
    chance = 1 / len(dsprites.FACTOR_NAMES)
    summary = (f"Best MIG at β = {best['beta']:g} ({best['mig']:.3f}); chance level of the "
               f"FactorVAE and β-VAE metrics is {chance:.2f}. Metric sizes: MIG on "
               f"{sizes['mig_points']} codes; classifier metrics on {sizes['train']} training / "
               f"{sizes['eval']} evaluation batches of 64.")
    table = experiments.markdown_table(rows, COLUMNS) + "\n\n" + summary
    plot(rows, best, out / "disentangle.png")
    traversals(best, args, out / "traversals.png")
    experiments.write_results(out, NAME, rows, table, started, args, {"metric_sizes": sizes})
    return {"rows": rows}


def score(folder, args, sizes: dict) -> dict:
    """MIG, FactorVAE and β-VAE metrics of a run's posterior means on fresh factor draws."""
    model = runs.load_run(folder).model(args.backend)

    def represent(factors: np.ndarray) -> np.ndarray:
        return model.encode(dsprites.render(factors), batch_size=512)[0]

    rng = np.random.default_rng(0)
    mig = disentanglement.mig_from_factors(represent, dsprites.FACTOR_SIZES, rng,
                                           num_points=sizes["mig_points"])
    factor_vae = disentanglement.factor_vae_score(
        represent, dsprites.FACTOR_SIZES, rng, num_train=sizes["train"], num_eval=sizes["eval"],
        num_variance_estimate=sizes["variance"])
    beta_vae = disentanglement.beta_vae_score(represent, dsprites.FACTOR_SIZES, rng,
                                              num_train=sizes["train"], num_eval=sizes["eval"])
    return {"mig": mig.score, "mig_per_factor": mig.gaps.tolist(),
            "mutual_info": mig.mutual_info.tolist(), "factor_entropy": mig.entropy.tolist(),
            "factor_vae": factor_vae["eval_accuracy"],
            "factor_vae_active_dims": factor_vae["num_active_dims"],
            "beta_vae": beta_vae["eval_accuracy"]}


def plot(rows: list[dict], best: dict, path) -> None:
    from ppl_vae.plots import figure, save

    fig = figure((13, 4))
    betas = [r["beta"] for r in rows]
    ax = fig.add_subplot(1, 3, 1)
    for key, label in (("mig", "MIG"), ("factor_vae", "FactorVAE metric"),
                       ("beta_vae", "β-VAE metric")):
        ax.plot(betas, [r[key] for r in rows], "o-", ms=4, label=label)
    ax.axhline(1 / len(dsprites.FACTOR_NAMES), color="grey", ls=":", lw=1,
               label="chance (the two classifier metrics)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.set_xlabel("β")
    ax.set_title("disentanglement against β")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 3, 2)
    ax.plot(betas, [r["rate"] for r in rows], "o-", ms=4, label="rate Î")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("β")
    ax.set_ylabel("rate, nats")
    twin = ax.twinx()
    twin.plot(betas, [r["nll_distortion"] for r in rows], "s-", color="C1", ms=4,
              label="distortion")
    twin.set_ylabel("distortion, nats")
    ax.set_title("the price: rate down, distortion up")
    ax.legend(fontsize=7, loc="upper center")
    twin.legend(fontsize=7, loc="center right")
    ax = fig.add_subplot(1, 3, 3)
    mi = np.asarray(best["mutual_info"]) / np.asarray(best["factor_entropy"])[None, :]
    image = ax.imshow(mi, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(dsprites.FACTOR_NAMES)), dsprites.FACTOR_NAMES, fontsize=7)
    ax.set_ylabel("latent dimension")
    ax.set_title(f"I(z_i; factor) / H(factor), β = {best['beta']:g}", fontsize=9)
    fig.colorbar(image, ax=ax)
    save(fig, path)


def traversals(row: dict, args, path) -> None:
    """Latent traversals of a run around the posterior mean of one test image (a heart in the
    middle), dimensions ordered by their rate."""
    from ppl_vae.plots import latent_traversals

    run = runs.load_run(row["folder"])
    model = run.model(args.backend)
    heart = np.array([[2, 3, 0, 16, 16]])  # shape, scale, orientation, pos_x, pos_y indices
    base = model.encode(dsprites.render(heart))[0][0]
    order = np.argsort(row["rate_per_dim"])[::-1]
    latent_traversals(model.decode_mean, order, run.spec.latent.dim, dsprites.IMAGE_SHAPE, path,
                      base=base, title=f"around the code of a heart, β = {row['beta']:g}")


if __name__ == "__main__":
    main(experiments.parse_args(__doc__, NAME))
