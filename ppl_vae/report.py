"""`ppl-vae eval`: score a run on its test split and write ``report.json`` (backend-free)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ppl_vae import runs
from ppl_vae.data import load_data
from ppl_vae.diagnostics import (
    active_units,
    ess_from_log_weights,
    iwae_bound,
    log_weights_from_parts,
    marginal_kl,
    mutual_information,
    psis_khat,
    psis_summary,
)
from ppl_vae.training import evaluate, evaluation_data

KHAT_FILE = "khat.npy"  # PSIS k̂ per test example, written by eval for the histogram

#: A dimension whose rate is below this many nats carries (almost) no information about y.
COLLAPSE_RATE = 0.01


def collapse_verdict(n_active: int, dim: int, rate: float, mutual_info: float) -> str:
    """One line on posterior collapse that names its evidence."""
    evidence = (f"{n_active} of {dim} dimensions active, rate {rate:.3g} nats, "
                f"I_q {mutual_info:.3g} nats")
    if n_active == 0 or rate < COLLAPSE_RATE * dim:
        return f"posterior collapse: {evidence}"
    if n_active < dim:
        return f"partial collapse: {evidence}"
    return f"no collapse: {evidence}"


def importance_sampling(model, x: np.ndarray, num_samples: int, seed: int = 0,
                        progress: bool = True) -> dict:
    """IWAE bound L_K (Burda et al. 2016) as the log-likelihood estimate, with PSIS k̂ (Vehtari
    et al. 2015) and the effective sample size per example, from one set of K importance
    weights per example; examples in blocks so that K in the thousands fits in memory."""
    block = max(1, int(2e7 // (min(num_samples, 500) * model.data_dim)))
    starts = range(0, len(x), block)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"IWAE, K={num_samples}", unit="block", leave=False)
    bounds, khat, ess = [], [], []
    for i in starts:
        log_w = model.log_weights(x[i:i + block], num_samples, seed=seed + i)  # (n, K)
        bounds.append(iwae_bound(log_w).per_example)
        khat.append(psis_khat(log_w) if num_samples >= 2 else np.full(len(log_w), np.nan))
        ess.append(ess_from_log_weights(log_w))
    per_example = np.concatenate(bounds)
    return {"per_example": per_example, "mean": float(per_example.mean()),
            "stderr": float(per_example.std(ddof=1) / np.sqrt(len(per_example)))
            if len(per_example) > 1 else float("nan"),
            "khat": np.concatenate(khat), "ess": np.concatenate(ess)}


def per_example_stderrs(model, x: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Standard errors (nats) of the test means of −ELBO, rate and −ln p(y|z), from one draw of
    z ~ q(z|y) per example (the rate by Monte Carlo, ln q − ln p̂): they cover the sampling of
    both the examples and z, and are what a difference of two test means should be compared
    with."""
    parts = model.log_density_parts(x, 1, seed=seed)[:, 0]  # (N, 3)
    draws = {"elbo": log_weights_from_parts(parts[:, None])[:, 0],
             "rate": parts[:, 2] - parts[:, 1], "nll": -parts[:, 0]}
    n = len(x)
    return {k: float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
            for k, v in draws.items()}


def entropy_checks(entropy: float, report: dict) -> dict:
    """The lecture's bounds against a known H(y), nats per example:

    * −ELBO − H(y) = rate + distortion − H(y) ≥ 0 (H(y) = I + H(y|z) ≤ Î + Ĥ);
    * H(y) − distortion ≤ I_q(y; z) ≤ rate (I = H(y) − H(y|z) ≥ H(y) − Ĥ, and I ≤ Î);
    * −ln p̂(y) − H(y) ≥ 0 (a cross-entropy is at least the entropy), with IWAE's ln p̂(y).
    """
    out = {"entropy": entropy, "elbo_excess": -report["elbo"] - entropy,
           "mutual_information_lower": entropy - report["nll_distortion"]}
    if "log_likelihood" in report:
        out["log_likelihood_excess"] = -report["log_likelihood"] - entropy
    return out


def evaluate_run(path, backend: str | None = None, device: str = "cpu", iwae_k: int = 1000,
                 n: int | None = None, progress: bool = True) -> dict:
    """Test-split report of a run (per example, nats); also written to RUN/report.json.

    :param iwae_k: importance samples per example for the IWAE log-likelihood and PSIS (0: skip).
    :param n: evaluate only the first n test examples (default: all).
    """
    run = runs.load_run(path)
    spec = run.spec
    dataset = load_data(spec)
    x, labels = evaluation_data(spec, dataset)
    if n:
        x, labels = x[:n], labels[:n]
    model = run.model(backend, device)
    train = run.records("train")
    beta = train[-1]["beta"] if train else spec.objective.beta
    metrics = evaluate(model, spec, x, labels, beta, spec.objective.lam)
    loc, scale = model.encode(x, spec.train.eval_batch_size)
    n_active, variance = active_units(loc)
    mi = mutual_information(loc, scale, np.random.default_rng(spec.train.seed))
    dim = dataset.dim
    report = {
        "run": str(run.path),
        "backend": backend or run.info["backend"],
        "trained_with": run.info["backend"],
        "n_test": len(x),
        "step": run.info.get("step"),
        "beta": beta,
        "lam": spec.objective.lam,
        "elbo": metrics["elbo"],
        "bits_per_dim": -metrics["elbo"] / (dim * math.log(2)),
        "rate": metrics["rate"],
        "distortion": metrics["distortion"],
        "nll_distortion": metrics["nll"],
        "objective": metrics["objective"],
        "aux": metrics["aux"],
        "latent_dim": spec.latent.dim,
        "active_units": int(n_active),
        "posterior_mean_variance": [float(v) for v in variance],
        "rate_per_dim": [metrics[f"rate/dim_{i}"] for i in range(spec.latent.dim)
                         if f"rate/dim_{i}" in metrics],
    }
    stderr = per_example_stderrs(model, x, seed=spec.train.seed)
    report |= {"elbo_stderr": stderr["elbo"], "rate_stderr": stderr["rate"],
               "nll_distortion_stderr": stderr["nll"], "data": dataset.name}
    report |= {
        # Hoffman & Johnson 2016: rate = I_q + KL(q(z) || p̂(z)), i.e. Î − I in the lecture.
        "mutual_information": mi.value,
        "mutual_information_stderr": mi.stderr,
        "marginal_kl": marginal_kl(metrics["rate"], mi.value),
        # I_q over N examples cannot exceed ln N (the aggregate posterior has N components)
        "mutual_information_ceiling": math.log(len(x)),
    }
    if iwae_k:
        iwae = importance_sampling(model, x, iwae_k, seed=spec.train.seed, progress=progress)
        report |= {
            "iwae_k": iwae_k,
            "log_likelihood": iwae["mean"],
            "log_likelihood_stderr": iwae["stderr"],
            "elbo_gap": iwae["mean"] - metrics["elbo"],  # ≈ E KL(q(z|y) || p(z|y)) for large K
            "psis": psis_summary(iwae["khat"]),
            "khat_file": KHAT_FILE,
            "ess_mean": float(iwae["ess"].mean()),
        }
    if iwae_k:
        runs.save_array(Path(path) / KHAT_FILE, iwae["khat"])
    if dataset.entropy is not None:
        report |= entropy_checks(dataset.entropy, report)
    report["verdict"] = collapse_verdict(report["active_units"], spec.latent.dim, report["rate"],
                                         report["mutual_information"])
    runs.write_json_atomic(Path(path) / "report.json", report)
    return report


def format_report(report: dict, bits: bool = False) -> str:
    """A readable table of a report."""
    objective_label = f"objective (β={report['beta']:.3g}, λ={report['lam']:.3g})"
    lines = [
        f"run {report['run']}  (backend {report['backend']}, trained with "
        f"{report['trained_with']}, step {report['step']}, {report['n_test']} test examples)",
        "",
        f"  {'metric':<24}{'nats / example':>16}",
        f"  {'test ELBO':<24}{report['elbo']:>16.3f}  ± {report['elbo_stderr']:.3f}",
        f"  {'rate  Î(y,z)':<24}{report['rate']:>16.3f}  ± {report['rate_stderr']:.3f}",
        f"  {'distortion (trained)':<24}{report['distortion']:>16.3f}",
        f"  {'distortion −ln p(y|z)':<24}{report['nll_distortion']:>16.3f}"
        f"  ± {report['nll_distortion_stderr']:.3f}",
        f"  {objective_label:<24}{report['objective']:>16.3f}",
        f"  {'aux':<24}{report['aux']:>16.3f}",
        f"  {'I_q(y; z)':<24}{report['mutual_information']:>16.3f}"
        f"  ± {report['mutual_information_stderr']:.3f}",
        f"  {'KL(q(z) ‖ p̂(z))':<24}{report['marginal_kl']:>16.3f}   (= rate − I_q)",
    ]
    ceiling = report["mutual_information_ceiling"]
    if report["mutual_information"] > 0.9 * ceiling:
        lines.append(f"  (I_q is near its ceiling ln N = {ceiling:.2f}: with more test examples it "
                     "could be larger, so the KL above is an upper estimate)")
    if "log_likelihood" in report:
        iwae_label = f"IWAE ln p(y), K={report['iwae_k']}"
        psis = report["psis"]
        lines += [
            f"  {iwae_label:<24}{report['log_likelihood']:>16.3f}"
            f"  ± {report['log_likelihood_stderr']:.3f}",
            f"  {'ln p(y) − ELBO':<24}{report['elbo_gap']:>16.3f}",
            "",
            f"  PSIS k̂: mean {psis['khat_mean']:.2f}, max {psis['khat_max']:.2f}, "
            f"{100 * psis['share_above_0.7']:.1f}% of examples above 0.7; mean ESS "
            f"{report['ess_mean']:.1f} of {report['iwae_k']}",
        ]
    if bits:
        lines.append(f"  {'bits per dimension':<24}{report['bits_per_dim']:>16.4f}")
    if "entropy" in report:
        lines += [
            "",
            f"  {'H(y), exact':<24}{report['entropy']:>16.3f}   ({report['data']})",
            f"  {'−ELBO − H(y)':<24}{report['elbo_excess']:>16.3f}  ± "
            f"{report['elbo_stderr']:.3f}   (≥ 0: rate + distortion ≥ H(y))",
        ]
        if "log_likelihood_excess" in report:
            lines.append(f"  {'−ln p(y) − H(y)':<24}{report['log_likelihood_excess']:>16.3f}  ± "
                         f"{report['log_likelihood_stderr']:.3f}   (≥ 0: a cross-entropy)")
        lines.append(f"  H(y) − distortion ≤ I_q ≤ rate:  {report['mutual_information_lower']:.3f}"
                     f" ≤ {report['mutual_information']:.3f} ≤ {report['rate']:.3f}")
    lines += ["", f"  active units: {report['active_units']} of {report['latent_dim']}"]
    if report["rate_per_dim"]:
        lines.append("  rate per dimension (nats): " + "  ".join(
            f"{i}:{v:.2f}" for i, v in enumerate(report["rate_per_dim"])))
    lines += ["", f"  {report['verdict']}"]
    return "\n".join(lines)


def plot_run(path, others=(), backend: str | None = None, device: str = "cpu") -> list[Path]:
    """Write the figures of a run to RUN/plots/: prior samples, reconstructions, latent
    traversals, training curves, rate per dimension, the rate–distortion plane (with `others`,
    more run folders, as further points) and, after `ppl-vae eval`, the PSIS k̂ histogram."""
    from ppl_vae import plots

    run = runs.load_run(path)
    out = Path(path) / "plots"
    out.mkdir(exist_ok=True)
    model = run.model(backend, device)
    dataset = load_data(run.spec)
    written = [plots.training_curves(run.metrics, out / "curves.png")]
    shape = run.info.get("image_shape")
    test = run.final_test
    d = run.spec.latent.dim
    rates = [test.get(f"rate/dim_{i}", float("nan")) for i in range(d)]
    if shape:
        x, _ = evaluation_data(run.spec, dataset)
        loc, _ = model.encode(x[:16])
        written += [
            plots.save_image_grid(model.decode_mean(model.sample_prior(64)).reshape(-1, *shape),
                                  out / "samples.png", "E[y|z], z ~ prior"),
            plots.reconstructions(x, model.decode_mean(loc), shape, out / "reconstructions.png"),
            plots.latent_traversals(model.decode_mean, np.argsort(rates)[::-1]
                                    if np.isfinite(rates).all() else np.arange(d), d, shape,
                                    out / "traversals.png"),
        ]
    if np.isfinite(rates).all():
        written.append(plots.rate_per_dim_bars(rates, out / "rate_per_dim.png"))
    points = []
    for p in (path, *others):
        t = runs.load_run(p).final_test
        points.append((Path(p).name, t["rate"], t["nll"]))
    written.append(plots.rate_distortion_plane(points, out / "rate_distortion.png",
                                               dataset.entropy))
    if (Path(path) / KHAT_FILE).exists():
        written.append(plots.khat_histogram(np.load(Path(path) / KHAT_FILE),
                                            out / "khat.png"))
    return written


def export_posterior_draws(path, n_examples: int, num_draws: int = 1000,
                           backend: str | None = None, device: str = "cpu") -> Path:
    """Draws z ~ q(z|y) for the first `n_examples` test examples as ArviZ InferenceData
    (posterior group, variable ``z`` with dims (chain, draw, example, latent)), written to
    RUN/posterior.nc, for ArviZ's summaries and plots (`az.summary`, `az.plot_posterior`)."""
    from ppl_vae.arviz_compat import posterior_draws_to_inference_data, save_netcdf

    run = runs.load_run(path)
    x, labels = evaluation_data(run.spec, load_data(run.spec))
    loc, scale = run.model(backend, device).encode(x[:n_examples])
    rng = np.random.default_rng(run.spec.train.seed)
    z = loc + scale * rng.standard_normal((1, num_draws, *loc.shape))
    idata = posterior_draws_to_inference_data(
        {"z": z}, coords={"example": np.arange(len(loc)), "latent": np.arange(loc.shape[1])},
        dims={"z": ["example", "latent"]})
    return save_netcdf(idata, Path(path) / "posterior.nc")
