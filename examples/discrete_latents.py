"""Discrete latents: three estimators of the gradient of a VAE with binary latent units.

A VAE on binarised MNIST with 200 binary latent units (`models/binary_vae_mnist.toml`:
Bernoulli q(z|y) from a 784-512-256 MLP, a uniform p(z), a 256-512 MLP decoder), trained with
each estimator a discrete site can declare (``latent.estimator``):

* ``score``: z sampled, its gradient the score-function (REINFORCE) estimator with NVIL's
  input-dependent baseline network (Mnih & Gregor 2014), the rate the closed-form KL;
* ``relaxed``: the Concrete / Gumbel-softmax relaxation (Maddison et al. 2017; Jang et al.
  2017) at a temperature annealed from 1.0 to 0.5 over the run, the rate the discrete KL;
* ``enumerate``: z summed out exactly. Not at 200 units (2^200 values): a small variant with 8
  units (256 values) is trained with all three estimators, the comparison where enumeration,
  the exact gradient, applies.

Every run is scored on the same discrete model (a relaxed run's decoder reads binary z at test
time): the test ELBO (± 2 s.e.) and the IWAE estimate of ln p(y) (K = `IWAE_K`) on the first
`N_TEST` test images; the variance of the encoder's gradient at the end of training (Σ over its
weights of the variance over `DRAWS` draws of the latents, one fixed batch of 100 test images:
0 for enumeration, whose gradient draws nothing); and the time per training step (the median
window after the first, which compiles).

The claims, fixed before the runs:

1. With 200 units the relaxed estimator reaches a better test ELBO than the score-function one
   with NVIL's baseline, by more than 2 standard errors of the difference (the ordering Jang
   et al. 2017 report between Gumbel-softmax and score-function estimators on a Bernoulli VAE).
2. ... and its encoder gradient has a lower variance (at the end of training).
3. With 8 units, enumeration (exact gradients) is at least as good as either sampled
   estimator: its test −ELBO no more than 2 standard errors of the difference above theirs.
4. Enumeration costs a decoder pass per value: with 256 values a step takes more than 4 times
   the score-function step.

    python examples/discrete_latents.py --backend numpyro      # the full runs (15-20 minutes)
    python examples/discrete_latents.py --smoke                # seconds, checks it runs

Writes runs/discrete_latents/: the run folders, table.md, results.json, discrete_latents.png.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ppl_vae import experiments, runs
from ppl_vae.data import load_data
from ppl_vae.training import evaluation_data

NAME = "discrete_latents"
SPEC = "binary_vae_mnist"
#: name -> (binary units, estimator)
VARIANTS = {
    "200 units, score + NVIL": (200, "score"),
    "200 units, relaxed": (200, "relaxed"),
    "8 units, score + NVIL": (8, "score"),
    "8 units, relaxed": (8, "relaxed"),
    "8 units, enumerate": (8, "enumerate"),
}
#: training steps by the number of units (the small variant converges sooner; enumeration's
#: steps cost 256 decoder passes)
STEPS = {200: 10000, 8: 5000}
N_TEST = 2000
IWAE_K = 200
DRAWS = 100
GRADIENT_BATCH = 100
COLUMNS = [("run", "variant", "{}"), ("test −ELBO", "neg_elbo", "{:.2f}"),
           ("± 2 s.e.", "two_se", "{:.2f}"), ("IWAE −ln p̂(y)", "neg_log_likelihood", "{:.2f}"),
           ("rate", "rate", "{:.2f}"), ("active units", "active", "{}"),
           ("gradient variance", "gradient_variance", "{:.3g}"),
           ("ms / step", "ms_per_step", "{:.1f}"), ("steps", "steps", "{}")]


def overrides(units: int, estimator: str) -> list[str]:
    return [f"latent.dim={units}", f'latent.estimator="{estimator}"']


def step_time(path) -> float:
    """Milliseconds per training step: the median window after the first (which compiles)."""
    run = runs.load_run(path)
    windows = [r for r in run.records("train") if "seconds" in r]
    steps = run.spec.train.log_every
    times = [r["seconds"] / steps for r in windows[1:]] or [r["seconds"] / steps
                                                            for r in windows]
    return 1000 * float(np.median(times)) if times else float("nan")


def gradient_variance(path, args, x: np.ndarray) -> float:
    """Σ_i Var(∂loss/∂ψ_i) over `DRAWS` draws of the latents on the batch x, ψ the encoder's
    weights: the estimator's noise at the trained parameters."""
    run = runs.load_run(path)
    model = run.model(args.backend, "cpu" if args.device == "auto" else args.device)
    draws = model.gradient_draws(x, 5 if args.smoke else DRAWS, seed=run.spec.train.seed)
    return float(draws.var(0, ddof=1).sum())


def evaluate(spec, path, args) -> dict:
    """Train (or re-use) and score one run on the first `N_TEST` test images."""
    from ppl_vae.evaluation import evaluate_run

    run, seconds = experiments.train(spec, path, args)
    smoke = args.smoke
    report = evaluate_run(run.path, device="cpu" if args.device == "auto" else args.device,
                          iwae_k=10 if smoke else IWAE_K, n=50 if smoke else N_TEST,
                          progress=not args.no_progress)
    return report | {"train_seconds": seconds}


def claims(rows: dict) -> list[dict]:
    def gap(a: str, b: str):
        """(−ELBO of a − −ELBO of b, its standard error)."""
        ra, rb = rows[a], rows[b]
        return (ra["neg_elbo"] - rb["neg_elbo"],
                math.hypot(ra["elbo_stderr"], rb["elbo_stderr"]))

    d, se = gap("200 units, score + NVIL", "200 units, relaxed")
    out = [{"claim": "200 units: relaxed beats score + NVIL on the test ELBO by > 2 s.e.",
            "held": d > 2 * se, "evidence": f"−ELBO score − relaxed = {d:.2f} ± {se:.2f}"}]
    v_score = rows["200 units, score + NVIL"]["gradient_variance"]
    v_relaxed = rows["200 units, relaxed"]["gradient_variance"]
    out.append({"claim": "200 units: relaxed's encoder gradient has the lower variance",
                "held": v_relaxed < v_score,
                "evidence": f"{v_relaxed:.3g} against {v_score:.3g}"})
    worst = []
    for other in ("8 units, score + NVIL", "8 units, relaxed"):
        d, se = gap("8 units, enumerate", other)
        worst.append((d - 2 * se, f"{other}: enumerate − it = {d:.2f} ± {se:.2f}"))
    out.append({"claim": "8 units: enumeration at least as good as either sampled estimator "
                         "(−ELBO within 2 s.e. above theirs)",
                "held": all(w <= 0 for w, _ in worst), "evidence": "; ".join(e for _, e in worst)})
    ratio = (rows["8 units, enumerate"]["ms_per_step"]
             / rows["8 units, score + NVIL"]["ms_per_step"])
    out.append({"claim": "8 units: an enumeration step costs more than 4 score-function steps",
                "held": ratio > 4, "evidence": f"{ratio:.1f} times"})
    return out


def figure(rows: dict, out, smoke: bool):
    """Test −ELBO during training (one line per run) and the gradient variance (log scale)."""
    from ppl_vae.plots import figure as make_figure
    from ppl_vae.plots import save

    fig = make_figure((11, 4))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for i, (name, row) in enumerate(rows.items()):
        test = runs.load_run(row["path"]).records("test")
        steps = [r["step"] for r in test]
        left.plot(steps, [-r["elbo"] for r in test], marker="o", ms=3, color=f"C{i}",
                  ls="-" if name.startswith("200") else "--", label=name)
    left.set_xlabel("step")
    left.set_ylabel("test −ELBO, nats (training's test records)")
    left.legend(fontsize=7)
    names = list(rows)
    variances = [max(rows[n]["gradient_variance"], 1e-12) for n in names]
    bars = right.barh(range(len(names)), variances, color=[f"C{i}" for i in range(len(names))])
    right.bar_label(bars, [f"{rows[n]['ms_per_step']:.0f} ms/step" for n in names], fontsize=7,
                    padding=2)
    right.set_xscale("log")
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("encoder gradient variance (Σ over weights)")
    fig.suptitle("binary latents: score + NVIL, relaxed, enumerated"
                 + (" (smoke: not the claims)" if smoke else ""), fontsize=10)
    return save(fig, out / f"{NAME}.png")


def main(argv=None) -> None:
    args = experiments.parse_args(__doc__, NAME, argv, mnist=True)
    out = experiments.output_dir(args, NAME)
    started = time.perf_counter()
    rows: dict[str, dict] = {}
    x_batch = None
    for name, (units, estimator) in VARIANTS.items():
        data = [f'data.path="{args.mnist}"']
        spec = experiments.make_spec(SPEC, [*data, *overrides(units, estimator)], args,
                                     STEPS[units])
        path = out / f"{units}_{estimator}"
        print(f"{name}: {path}")
        report = evaluate(spec, path, args)
        if x_batch is None:  # one fixed batch of binarised test images for every run
            x_batch = evaluation_data(spec, load_data(spec))[0][:GRADIENT_BATCH]
        rows[name] = {
            "variant": name, "path": str(path), "units": units, "estimator": estimator,
            "steps": spec.train.steps, "neg_elbo": -report["elbo"],
            "elbo_stderr": report["elbo_stderr"], "two_se": 2 * report["elbo_stderr"],
            "neg_log_likelihood": (-report["log_likelihood"] if "log_likelihood" in report
                                   else None),
            "rate": report["rate"], "active": report["active_units"],
            "gradient_variance": gradient_variance(path, args, x_batch),
            "ms_per_step": step_time(path), "train_seconds": report["train_seconds"]}
    table = experiments.markdown_table(list(rows.values()), COLUMNS)
    stated = claims(rows)
    table += "\n\n" + experiments.format_claims(stated)
    if args.smoke:
        table += "\n\n(smoke run: a few steps on a few images; the claims are not tested by it)"
    figure(rows, out, args.smoke)
    experiments.write_results(out, NAME, list(rows.values()), table, started, args,
                              extra={"claims": stated, "n_test": N_TEST, "iwae_k": IWAE_K,
                                     "draws": DRAWS})


if __name__ == "__main__":
    main()
