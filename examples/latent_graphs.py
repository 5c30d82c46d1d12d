"""Richer posteriors and priors at equal steps on the full MNIST, several seeds: one stochastic
layer, two (Burda et al. 2016) with a ladder posterior and free bits (Sønderby et al. 2016;
Kingma et al. 2016) or bottom-up with a β warm-up, and an inverse autoregressive flow posterior.

The ELBO is ln p̂(y) − KL(q(z|y) ‖ p̂(z|y)): it is tight only where the encoder's family can
match the model's posterior. Four models, each a bundled spec, the same 784-200-200 tanh
networks on the data:

* one layer: `models/vae1_mnist.toml`, Burda et al.'s 784-200-200-50 VAE (the reference);
* two layers, ladder + free bits: `models/vae2_ladder_mnist.toml`, p̂(z2) p̂(z1|z2) p̂(y|z1)
  (100 + 50 units) with the top-down, precision-weighted q(z2|y) q(z1|y, z2) and 0.1 free nats
  per dimension of each site;
* two layers, bottom-up, β warm-up: `models/vae2_mnist.toml`, q(z1|y) q(z2|z1), β rising
  linearly from 0 to 1 over the first quarter of the steps (the remedy the earlier run of this
  script tried: its top layer stayed collapsed);
* IAF posterior: `models/iaf_mnist.toml`, two autoregressive flow steps on the 50 latents.

Protocol: train on the 60,000 MNIST training images, test on the 10,000 test images (both in
``../shared/data/mnist``; `data.source = "mnist"` reads the train-* files where they are), with
dynamic binarisation (the test images binarised once, from the run's seed). Every model trains
for the same `STEPS` steps of batch `BATCH` (600 steps an epoch) under Burda et al.'s learning-rate
decay 1e-3 · 10^(−i/7) in stage i of 3^i epochs, once per seed (`--seeds`, default 3;
train.seed = 0, 1, 2). Per run: the test ELBO, the IWAE bound ln p̂(y) with K = 1000 over the
joint of all latent sites, and the rate and active units of each site. Per seed, the ELBO of
every model on every test image (the mean of `PAIRED_DRAWS` log-weights; the same binarised
images for every model of that seed), and its gain over the one-layer model paired over the
test images. Over seeds: the mean ± standard error of each number.

Stated before the runs (issue 22): **the two-layer model with the ladder posterior and free
bits beats the one-layer VAE by more than twice the paired standard error, and its top layer
z2 keeps at least 1 active unit in every seed.** The paired standard error is that of the mean
over seeds of the per-seed gains (each a mean over the test images of the per-image difference,
models paired by seed); with one seed, the per-image standard error of that seed's gain. The
same two tests are reported for the β warm-up model, and the first for the IAF posterior.
A unit is active where the variance over the test images of its posterior mean exceeds 0.01;
under free bits every dimension is held near its 0.1 nats, which alone may pass that test, so
the claim's evidence also counts the top layer's dimensions whose rate exceeds twice the floor.

Budget: `STEPS` = 24000 steps of batch 100 for every model, 40 epochs: exactly the first four
stages of the Burda schedule (1 + 3 + 9 + 27 epochs). Sized from a timing run of this script
with the NumPyro backend, `--steps 1200 --seeds 1`, on this project's 2-core machine while it
was shared (load average 6–10): 1391 s of wall time and 760 CPU-seconds (user + system) for the
four models. Training took 15, 20, 14 and 19 s of it (wall, compilation and data loading
included); timed by window in one process, a step after compilation cost 3.2 (one layer), 4.4
(ladder), 4.4 (warm-up) and 4.8 (IAF) CPU-ms, 16.8 CPU-ms for the four. The rest, ≈ 700
CPU-seconds a seed, does not grow with the steps: mostly the report's IWAE with K = 1000 on the
10,000 test images (130 CPU-seconds for the one-layer model's whole report, more for the
others). With 24000 steps: 3 seeds × (24000 × 16.8 ms + 700 s) plus the compilations ≈ 3450
CPU-seconds, about 58 CPU-minutes. The wall time depends on the machine's load: in the timing
run it was 1.8 times the CPU time.

    python examples/latent_graphs.py --backend numpyro              # 3 seeds (≈ 1 CPU-hour)
    python examples/latent_graphs.py --backend numpyro --seeds 5 --steps 48000
    python examples/latent_graphs.py --smoke                        # seconds, checks it runs

Finished runs are re-used and unfinished ones resumed; a longer --steps continues them, except
the β warm-up model's, whose schedule scales with the steps (it retrains). Writes
runs/latent_graphs/: one run folder per model and seed, table.md, results.json,
latent_graphs.png.
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from dataclasses import dataclass

import numpy as np

from ppl_vae import experiments
from ppl_vae.spec import load_spec

NAME = "latent_graphs"
#: Training steps of every run (40 epochs of 600 steps: see the budget in the docstring).
STEPS = 24000
#: Examples per step, every model: 600 steps an epoch of the 60,000 training images.
BATCH = 100
#: Steps per logging window: one epoch (the smoke settings replace it).
EPOCH = 600
#: The β warm-up is linear over this share of the run's steps (a schedule must fit in the
#: run, so --steps and --smoke scale it).
WARMUP_SHARE = 0.25
#: Draws of z per test example behind the paired comparison of test ELBOs.
PAIRED_DRAWS = 20
IWAE_K = 1000


@dataclass(frozen=True)
class Model:
    """One row: a bundled spec with overrides; `top` names the site whose active units the
    claim counts ("" for a one-site model)."""

    label: str
    spec: str
    overrides: tuple[str, ...] = ()
    warm_up: bool = False
    top: str = ""


#: The reference first: every gain is against it.
MODELS = {
    "one_layer": Model("one layer (50)", "vae1_mnist"),
    "ladder": Model("two layers (100, 50), ladder, free bits", "vae2_ladder_mnist", top="z2"),
    # Sønderby et al. (2016): hierarchical VAEs need a β warm-up to keep their units active
    "warm_up": Model("two layers (100, 50), bottom-up, β warm-up", "vae2_mnist", warm_up=True,
                     top="z2"),
    "iaf": Model("IAF posterior (50, 2 steps)", "iaf_mnist"),
}
REFERENCE = "one_layer"
#: The model of the claim stated before the runs; the others are reported the same way.
CLAIMED = "ladder"


def model_spec(key: str, seed: int, args):
    """The spec of one model and seed: the bundled spec, then the shared protocol (data,
    batch, lr schedule, seed, logging), then the steps or the smoke settings."""
    model = MODELS[key]
    steps = args.steps or STEPS
    every = 10 * EPOCH
    overrides = [*model.overrides, f'data.path="{args.mnist}"', f"train.batch_size={BATCH}",
                 'train.lr_schedule={kind="burda"}', f"train.seed={seed}",
                 f"train.log_every={EPOCH}", f"train.eval_every={every}",
                 f"train.checkpoint_every={every}"]
    spec = experiments.make_spec(model.spec, overrides, args, steps)
    if model.warm_up:
        warmup = int(WARMUP_SHARE * spec.train.steps)
        spec = load_spec(spec, [f'objective.beta_schedule={{kind="linear", warmup={warmup}}}'])
    return spec


def main(args) -> dict:
    started = time.perf_counter()
    out = experiments.output_dir(args, NAME)
    per_seed = []
    for seed in range(args.seeds):
        rows = []
        for key, model in MODELS.items():
            spec = model_spec(key, seed, args)
            path = out / f"{key}-seed{seed}"
            print(f"{model.label}, seed {seed}: {spec.train.steps} steps of "
                  f"{spec.train.batch_size}")
            t0 = time.perf_counter()
            report = experiments.train_and_evaluate(spec, path, args, iwae_k=IWAE_K)
            rows.append(seed_row(key, seed, report, path, spec, time.perf_counter() - t0))
        paired_elbos(rows, args)
        per_seed += rows
    models = [summarise(key, [r for r in per_seed if r["key"] == key]) for key in MODELS]
    claims = check_claims(models)
    table = (experiments.markdown_table(models, SUMMARY_COLUMNS) + "\n\nPer seed:\n\n"
             + experiments.markdown_table(per_seed, SEED_COLUMNS) + "\n\n"
             + experiments.format_claims(claims))
    plot(models, per_seed, out / "latent_graphs.png")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    experiments.write_results(out, NAME, models, table, started, args, {
        "claims": claims, "per_seed": per_seed, "seeds": args.seeds, "iwae_k": IWAE_K,
        "paired_draws": PAIRED_DRAWS, "steps": per_seed[0]["steps"], "batch": BATCH,
        "cpu_seconds": usage.ru_utime + usage.ru_stime})
    return {"rows": models, "per_seed": per_seed, "claims": claims}


def seed_row(key: str, seed: int, report: dict, path, spec, seconds: float) -> dict:
    """One run's numbers: the report plus what the tables print."""
    sites = report["sites"]
    return report | {
        "key": key, "label": MODELS[key].label, "seed": seed, "folder": str(path),
        "steps": spec.train.steps, "neg_elbo": -report["elbo"],
        "two_se": 2 * report["elbo_stderr"],
        "neg_log_likelihood": -report["log_likelihood"] if "log_likelihood" in report
        else None,
        "two_se_ll": 2 * report["log_likelihood_stderr"] if "log_likelihood" in report
        else None,
        "site_rates": {n: s["rate"] for n, s in sites.items()},
        "site_active": {n: s["active_units"] for n, s in sites.items()},
        "site_dims": {n: s["dim"] for n, s in sites.items()},
        # under free bits every dimension is held near the floor, which alone may pass the
        # active-unit test: how many carry more than twice the floor
        "site_above_free_bits": {
            s.name: sum(r > 2 * s.free_bits for r in sites[s.name]["rate_per_dim"])
            for s in spec.sites if s.free_bits > 0},
        "site_free_bits": {s.name: s.free_bits for s in spec.sites if s.free_bits > 0},
        "rates": ", ".join(f"{n} {s['rate']:.2f}" for n, s in sites.items()),
        "active": ", ".join(f"{n} {s['active_units']}/{s['dim']}" for n, s in sites.items()),
        "ms_per_step": 1000 * report["train_seconds"] / spec.train.steps,
        # this call's wall time for the run (training, or re-use, and its report)
        "seconds_here": seconds}


def paired_elbos(rows: list[dict], args) -> None:
    """Per test example, the ELBO of each model of one seed as the mean of `PAIRED_DRAWS`
    importance log-weights (the same binarised images for every model: they come from the
    seed), so that a difference of two models has the standard error of the paired
    differences, not of two independent means: adds ``paired_gain`` and
    ``paired_gain_stderr`` (against the reference, the first row) to each row."""
    from ppl_vae import runs
    from ppl_vae.data import load_data
    from ppl_vae.training import evaluation_data

    per_example, images = [], {}
    for row in rows:
        run = runs.load_run(row["folder"])
        key = (repr(run.spec.data), run.spec.train.seed)
        if key not in images:  # the same data spec and seed: the same test images
            images[key] = evaluation_data(run.spec, load_data(run.spec))[0]
        model = run.model(args.backend)
        per_example.append(model.log_weights(images[key], PAIRED_DRAWS, seed=1).mean(1))
    for row, elbo in zip(rows, per_example):
        diff = elbo - per_example[0]
        row["paired_gain"] = float(diff.mean())
        row["paired_gain_stderr"] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        row["paired_two_se"] = 2 * row["paired_gain_stderr"]


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error over seeds (NaN s.e. for one value)."""
    values = np.asarray([v for v in values if v is not None], float)
    if len(values) == 0:
        return math.nan, math.nan
    se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), se


def _pm(mean: float, se: float, fmt: str = "{:.2f}") -> str:
    if math.isnan(mean):
        return "–"
    return fmt.format(mean) + ("" if math.isnan(se) else " ± " + fmt.format(se))


def summarise(key: str, seeds: list[dict]) -> dict:
    """A model's mean ± s.e. over its seeds, with the per-seed values beside."""
    out = {"key": key, "label": MODELS[key].label, "spec": MODELS[key].spec,
           "seeds": len(seeds), "folders": [s["folder"] for s in seeds],
           "train_seconds": float(sum(s["train_seconds"] for s in seeds)),
           "ms_per_step": float(np.mean([s["ms_per_step"] for s in seeds]))}
    for name, field in (("neg_elbo", "neg_elbo"), ("neg_log_likelihood", "neg_log_likelihood"),
                        ("elbo_gap", "elbo_gap"), ("paired_gain", "paired_gain")):
        out[name], out[f"{name}_se"] = mean_se(s.get(field) for s in seeds)
        out[f"{name}_per_seed"] = [s.get(field) for s in seeds]
        out[f"{name}_text"] = _pm(out[name], out[f"{name}_se"])
    # the paired s.e. of the mean gain: over seeds, or with one seed over its test images
    if key == REFERENCE:
        out["paired_gain_text"] = "(the reference)"
    out["paired_gain_claim_se"] = (out["paired_gain_se"] if len(seeds) > 1
                                   else seeds[0]["paired_gain_stderr"])
    sites = seeds[0]["site_rates"].keys()
    out["site_rates"] = {n: mean_se(s["site_rates"][n] for s in seeds) for n in sites}
    out["site_rates_per_seed"] = {n: [s["site_rates"][n] for s in seeds] for n in sites}
    out["site_active_per_seed"] = {n: [s["site_active"][n] for s in seeds] for n in sites}
    out["site_dims"] = seeds[0]["site_dims"]
    out["site_free_bits"] = seeds[0]["site_free_bits"]
    out["site_above_free_bits_per_seed"] = {
        n: [s["site_above_free_bits"][n] for s in seeds] for n in out["site_free_bits"]}
    out["rates_text"] = ", ".join(f"{n} {_pm(*out['site_rates'][n])}" for n in sites)
    out["active_text"] = ", ".join(
        f"{n} {'/'.join(str(a) for a in out['site_active_per_seed'][n])} of {out['site_dims'][n]}"
        for n in sites)
    return out


def check_claims(models: list[dict]) -> list[dict]:
    """The claim stated before the runs, for the ladder model; the same tests for the other
    rows (the warm-up model's top layer too)."""
    base = models[0]
    claims = []
    for row in models[1:]:
        gain, se = row["paired_gain"], row["paired_gain_claim_se"]
        over = "over seeds" if row["seeds"] > 1 else "over the test images, one seed"
        per_seed = ", ".join(f"{g:+.2f}" for g in row["paired_gain_per_seed"])
        beats = bool(gain > 2 * se)
        evidence = (f"test ELBO {gain:+.2f} nats, paired s.e. {se:.2f} ({over}; per seed "
                    f"{per_seed})")
        if row["neg_log_likelihood"] is not None and not math.isnan(row["neg_log_likelihood"]):
            evidence += (f"; IWAE −ln p̂ {row['neg_log_likelihood']:.2f} against "
                         f"{base['neg_log_likelihood']:.2f}")
        held = beats
        top = MODELS[row["key"]].top
        text = f"{row['label']} beats {base['label']} by more than twice the paired s.e."
        if top:
            active = row["site_active_per_seed"][top]
            held = beats and min(active) >= 1
            text += f", and its top layer {top} keeps ≥ 1 active unit in every seed"
            evidence += (f"; {top} active units per seed {active}, rate "
                         f"{', '.join(f'{r:.2f}' for r in row['site_rates_per_seed'][top])}")
            if top in row["site_free_bits"]:
                floor = row["site_free_bits"][top]
                evidence += (f", dimensions above twice its free bits ({2 * floor:g} nats) "
                             f"{row['site_above_free_bits_per_seed'][top]}")
        if row["key"] == CLAIMED:
            text = "Stated before the runs: " + text
        claims.append({"claim": text, "held": bool(held), "evidence": evidence})
    return claims


SUMMARY_COLUMNS = [
    ("model", "label", "{}"), ("seeds", "seeds", "{}"), ("test −ELBO", "neg_elbo_text", "{}"),
    (f"−ln p̂(y), IWAE K={IWAE_K}", "neg_log_likelihood_text", "{}"),
    ("ln p̂ − ELBO", "elbo_gap_text", "{}"),
    ("ELBO gain over one layer, paired", "paired_gain_text", "{}"),
    ("rate per site", "rates_text", "{}"),
    ("active units per site (per seed)", "active_text", "{}"),
    ("train s (all seeds)", "train_seconds", "{:.0f}"), ("ms / step", "ms_per_step", "{:.2f}")]
SEED_COLUMNS = [
    ("model", "label", "{}"), ("seed", "seed", "{}"), ("test −ELBO", "neg_elbo", "{:.2f}"),
    ("± 2 s.e.", "two_se", "{:.2f}"),
    (f"−ln p̂(y), IWAE K={IWAE_K}", "neg_log_likelihood", "{:.2f}"),
    ("± 2 s.e. ", "two_se_ll", "{:.2f}"), ("ELBO gain, paired", "paired_gain", "{:+.2f}"),
    ("± 2 s.e.  ", "paired_two_se", "{:.2f}"), ("rate per site", "rates", "{}"),
    ("active units per site", "active", "{}"), ("distortion", "nll_distortion", "{:.2f}"),
    ("train s", "train_seconds", "{:.0f}"), ("ms / step", "ms_per_step", "{:.2f}")]


def plot(models: list[dict], per_seed: list[dict], path) -> None:
    """Left: test −ELBO and −ln p̂(y) (IWAE) per model, each seed a small marker, the mean
    ± 2 s.e. over seeds a large one. Middle: each model's test ELBO minus the one-layer
    model's, paired over the test images: per seed ± 2 s.e. over the images, and the mean ± 2
    s.e. over seeds. Right: the rate of each dimension of each site, sorted, every seed."""
    import textwrap

    from ppl_vae.plots import figure, save

    def errors(se):
        return [0.0 if math.isnan(s) else 2 * s for s in se]

    fig = figure((15, 4.4))
    names = ["\n".join(textwrap.wrap(m["label"], 16)) for m in models]
    x = np.arange(len(models))
    index = {m["key"]: i for i, m in enumerate(models)}
    ax = fig.add_subplot(1, 3, 1)
    for r in per_seed:
        i = index[r["key"]]
        ax.plot(i - 0.12, r["neg_elbo"], ".", color="C0", alpha=0.6)
        if r["neg_log_likelihood"] is not None:
            ax.plot(i + 0.12, r["neg_log_likelihood"], ".", color="C3", alpha=0.6)
    ax.errorbar(x - 0.12, [m["neg_elbo"] for m in models],
                yerr=errors([m["neg_elbo_se"] for m in models]), fmt="s", color="C0",
                mfc="none", label="test −ELBO")
    if all(not math.isnan(m["neg_log_likelihood"]) for m in models):
        ax.errorbar(x + 0.12, [m["neg_log_likelihood"] for m in models],
                    yerr=errors([m["neg_log_likelihood_se"] for m in models]), fmt="o",
                    color="C3", mfc="none", label=f"−ln p̂(y), IWAE K={IWAE_K}")
    ax.set_xticks(x, names, fontsize=7)
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_ylabel("nats per test image (lower is better)")
    ax.set_title("seeds (dots) and their mean ± 2 s.e.", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 2)
    for r in per_seed:
        if r["key"] != REFERENCE:
            ax.errorbar(index[r["key"]] - 0.15 + 0.05 * r["seed"], r["paired_gain"],
                        yerr=r["paired_two_se"], fmt=".", color="grey", alpha=0.8)
    ax.errorbar(x[1:] + 0.2, [m["paired_gain"] for m in models[1:]],
                yerr=errors([m["paired_gain_se"] for m in models[1:]]), fmt="D", color="C2",
                label="mean over seeds ± 2 s.e.")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(x[1:], names[1:], fontsize=7)
    ax.set_xlim(0.5, len(models) - 0.5)
    ax.set_ylabel(f"test ELBO − {models[0]['label']}'s, nats")
    ax.set_title("gain over one layer, paired (grey: each seed)", fontsize=10)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 3, 3)
    floor, notes, labelled = 1e-3, [], set()
    for r in per_seed:
        i = index[r["key"]]
        for j, (name, site) in enumerate(r["sites"].items()):
            rates = sorted(site["rate_per_dim"], reverse=True)
            if not rates:
                notes.append(f"{r['label']}: no rate per dimension (not factorised)")
            elif max(rates) < floor:
                notes.append(f"{r['label']}, {name}, seed {r['seed']}: every dimension "
                             f"< {floor:g} nats")
            else:
                label = f"{r['label']}: {name}"
                ax.plot(np.arange(1, len(rates) + 1), rates, ["-", "--", ":"][j % 3],
                        color=f"C{i}", alpha=0.7, lw=1,
                        label=None if label in labelled else label)
                labelled.add(label)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.axhline(0.01, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("dimension, by rate")
    ax.set_ylabel("rate of the dimension, nats")
    ax.set_title("where the rate goes, every seed (grey: 0.01 nats)", fontsize=10)
    ax.legend(fontsize=6, title="\n".join(dict.fromkeys(notes)), title_fontsize=6)
    save(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    experiments.add_arguments(parser, NAME)
    experiments.add_mnist_argument(parser)
    parser.add_argument("--seeds", type=int, default=3,
                        help="runs of every model, train.seed = 0 … N−1 (default 3; --smoke: 1)")
    args = parser.parse_args(argv)
    args.mnist = experiments.mnist_folder(args.mnist, parser.prog)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, not {args.seeds}")
    if args.smoke:
        args.seeds = 1
    return args


if __name__ == "__main__":
    main(parse_args())
