"""`ppl-vae eval`'s numbers: score a run on its test split — the ELBO, rate and distortion
with their standard errors, IWAE and PSIS, each site's active units, rate per dimension, I_q
and verdict — and write ``report.json`` (backend-free: the backends' `Model` hooks compute).
`ppl_vae.report` formats the result and draws the figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ppl_vae import graph, runs
from ppl_vae.data import binarize, load_data
from ppl_vae.diagnostics import (
    active_units,
    active_units_from_draws,
    code_usage,
    ess_from_log_weights,
    information_limited,
    iwae_bound,
    log_weights_from_parts,
    marginal_kl,
    mutual_information,
    psis_khat,
    psis_summary,
    standard_error,
)
from ppl_vae.objective import rate_sites
from ppl_vae.spec import LABEL_SITE
from ppl_vae.training import evaluate, evaluation_data

KHAT_FILE = "khat.npy"  # PSIS k̂ per test example, written by eval for the histogram

#: A dimension whose rate is below this many nats carries (almost) no information about y.
COLLAPSE_RATE = 0.01



#: Draws per example behind the posterior means of sites without a closed-form mean.
MEAN_DRAWS = 64


def collapse_verdict(n_active: int, dim: int, rate: float, mutual_info: float | None) -> str:
    """One line on posterior collapse that names its evidence (I_q where it is estimated)."""
    evidence = f"{n_active} of {dim} dimensions active, rate {rate:.3g} nats" + (
        f", I_q {mutual_info:.3g} nats" if mutual_info is not None else "")
    if n_active == 0 or rate < COLLAPSE_RATE * dim:
        return f"posterior collapse: {evidence}"
    if n_active < dim:
        return f"partial collapse: {evidence}"
    return f"no collapse: {evidence}"


def posterior_means(model, spec, x: np.ndarray, labels=None, seed: int = 0,
                    batch_size: int = 1000) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """{site: (means (N, width), draws (N, S, width) or None)}: the exact posterior mean of
    sites whose q(z|y) is Gaussian (`encode`) or discrete (`posterior_probs`: the
    probabilities) and reads the data only, else the mean of `MEAN_DRAWS` joint draws (kept,
    for `active_units_from_draws`)."""
    out, need_draws = {}, []
    for s in spec.sites:
        if graph.is_gaussian_of_data(s):
            out[s.name] = (model.encode(x, batch_size, labels=labels, site=s.name)[0], None)
        elif graph.is_discrete_of_data(s):
            out[s.name] = (model.posterior_probs(x, batch_size, labels=labels, site=s.name),
                           None)
        else:  # an IAF, or a site inferred from other sites
            need_draws.append(s.name)
    if need_draws:
        draws = model.posterior_draws(x, labels, MEAN_DRAWS, seed=seed, batch_size=batch_size)
        out |= {name: (draws[name].mean(1), draws[name]) for name in need_draws}
    return {s.name: out[s.name] for s in spec.sites}


def importance_sampling(model, x: np.ndarray, num_samples: int, seed: int = 0,
                        progress: bool = True, labels=None) -> dict:
    """IWAE bound L_K (Burda et al. 2016) as the log-likelihood estimate, with PSIS k̂ (Vehtari
    et al. 2015), the effective sample size per example and the ELBO of the same draws (the
    mean log-weight, L_1 averaged over the K draws), from one set of K importance weights per
    example; examples in blocks so that K in the thousands fits in memory."""
    block = max(1, int(2e7 // (min(num_samples, 500) * model.data_dim)))
    starts = range(0, len(x), block)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"IWAE, K={num_samples}", unit="block", leave=False)
    bounds, elbos, khat, ess = [], [], [], []
    for i in starts:
        log_w = model.log_weights(x[i:i + block], num_samples, seed=seed + i,
                                  labels=None if labels is None else labels[i:i + block])
        bounds.append(iwae_bound(log_w).per_example)
        elbos.append(log_w.mean(1))
        khat.append(psis_khat(log_w) if num_samples >= 2 else np.full(len(log_w), np.nan))
        ess.append(ess_from_log_weights(log_w))
    per_example, elbo = np.concatenate(bounds), np.concatenate(elbos)
    return {"per_example": per_example, "mean": float(per_example.mean()),
            "stderr": standard_error(per_example), "elbo": float(elbo.mean()),
            "gap_stderr": standard_error(per_example - elbo),
            "khat": np.concatenate(khat), "ess": np.concatenate(ess)}


def per_example_stderrs(model, spec, x: np.ndarray, labels=None, seed: int = 0,
                        num_particles: int = 1) -> dict[str, float]:
    """Standard errors (nats) of the test means of −ELBO, rate, −ln p(y|z) and each site's rate
    (``rate/<site>``), from `num_particles` joint draws of z ~ q(z|y) per example, averaged per
    example (rates by Monte Carlo, ln q − ln p̂): they cover the sampling of both the examples
    and z, and are what a difference of two test means should be compared with."""
    parts = model.log_density_parts(x, num_particles, seed=seed, labels=labels).mean(1)
    site_rates = {f"rate/{name}": parts[:, 2 + 2 * i] - parts[:, 1 + 2 * i]
                  for i, name in enumerate(rate_sites(spec))}
    draws = {"elbo": log_weights_from_parts(parts[:, None])[:, 0],
             "rate": sum(site_rates.values()), "nll": -parts[:, 0], **site_rates}
    return {k: standard_error(v) for k, v in draws.items()}


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


def site_reports(model, spec, x: np.ndarray, labels, metrics: dict, stderr: dict,
                 seed: int = 0, pool=None, entropy: float | None = None) -> dict[str, dict]:
    """Per latent site, per example in nats: rate (and its standard error), rate per dimension
    (where posterior and prior factorise), active units and the posterior-mean variances behind
    them, I_q(y; z_site) and KL(q(z_site) ‖ p̂(z_site)) where q(z_site|y) is a diagonal
    Gaussian of the data (their estimator needs its density at every pair of examples), and
    the collapse verdict.

    :param pool: (x, labels) of every example available for the aggregate posterior (see
        `aggregate_pool`), x among them; default x alone. The I_q ceiling is ln of its size.
    :param entropy: H(y) where the data's is known: with the rate, an upper bound on I_q (and on
        I_q given the label), which decides whether the estimate may be limited by its ceiling.
    """
    pool_x, pool_labels = (x, labels) if pool is None else pool
    means = posterior_means(model, spec, x, labels, seed, spec.train.eval_batch_size)
    out = {}
    for s in spec.sites:
        rate = (metrics[f"rate/{s.name}"] if graph.is_graph(spec)
                else metrics["rate"] - metrics.get(f"rate/{LABEL_SITE}", 0.0))
        keys = [graph.rate_dim_key(spec, s.name, i) for i in range(s.dim)]
        mean, draws = means[s.name]
        site = {"dim": s.dim, "posterior": s.posterior.kind, "prior": s.prior.kind,
                "rate": rate, "rate_stderr": stderr[f"rate/{s.name}"],
                "rate_per_dim": [metrics[k] for k in keys if k in metrics],
                "mutual_information": None}
        if s.discrete:
            site |= discrete_site_report(s, mean)
        else:
            n_active, variance = (active_units(mean) if draws is None else
                                  active_units_from_draws(draws))
            site |= {"active_units": int(n_active),
                     "posterior_mean_variance": [float(v) for v in variance]}
        if s.posterior.kind == "diagonal" and not graph.posterior_sites(s) and not s.discrete:
            bs = spec.train.eval_batch_size
            loc, scale = model.encode(x, bs, labels=labels, site=s.name)
            pool_q = model.encode(pool_x, bs, labels=pool_labels, site=s.name)
            # given the label where the prior reads it, and for a latent label (M2: the style
            # information z holds beside the class; the true test labels condition q)
            by_label = (spec.label.prior and s.prior.kind == "conditional") or spec.label.latent
            mi, ceiling = site_information(loc, scale, labels if by_label else None, seed,
                                           pool=(*pool_q, pool_labels if by_label else None))
            # I_q ≤ rate, and I_q ≤ H(y) (information about y is at most its entropy)
            bound = rate if entropy is None else min(rate, entropy)
            limited = information_limited(bound, ceiling)
            site |= {
                "mutual_information": mi.value, "mutual_information_stderr": mi.stderr,
                "mutual_information_given_label": bool(by_label),
                # over M examples the aggregate posterior has M components: I_q ≤ ln M
                "mutual_information_ceiling": ceiling,
                "mutual_information_pool": len(pool_x),
                # a bound on I_q (the rate, or H(y)) within INFORMATION_MARGIN of ln M: the
                # estimate may be the ceiling's, not the encoder's
                "mutual_information_limited": limited,
            }
            if not graph.prior_parents(s) and not spec.label.latent and not limited:
                # Hoffman & Johnson 2016: rate = I_q + KL(q(z) ‖ p̂(z)), Î − I in the lecture
                # (given the label, per class, for a label-conditional prior). A prior that
                # reads other sites splits the rate otherwise: no marginal KL is printed.
                site["marginal_kl"] = marginal_kl(rate, mi.value)
        site["verdict"] = collapse_verdict(site["active_units"], s.dim, rate,
                                           site["mutual_information"])
        out[s.name] = site
    return out


def discrete_site_report(s, probs: np.ndarray) -> dict:
    """The lines of a discrete site beside its rate: its kind, estimator and prior, and how its
    code is used over the evaluated examples (`ppl_vae.diagnostics.code_usage`, from the
    posterior probabilities `probs` (N, width), exact or the mean of draws): each variable's
    activation frequency q̄(z_i = 1) (Bernoulli) or aggregate posterior q̄(z_i = ·)
    (categorical), its perplexity, and the active variables (Σ_k Var_y q(z_i = k|y) > 0.01).
    I_q is not estimated for it (`mutual_information` stays None)."""
    categories = s.categories if s.kind == "categorical" else None
    usage = code_usage(probs, categories)
    out = {"kind": s.kind, "estimator": s.estimator,
           "posterior": s.kind, "prior": "learned_probs" if s.prior.kind == "learned_probs"
           else "uniform",
           "active_units": usage.n_active,
           "posterior_mean_variance": [float(v) for v in usage.statistic],
           "perplexity": [float(v) for v in usage.perplexity]}
    if categories is None:
        out["activation"] = [float(v) for v in usage.aggregate[:, 1]]
    else:
        out |= {"categories": categories,
                "usage": [[float(v) for v in row] for row in usage.aggregate]}
    return out


def site_information(loc, scale, labels=None, seed: int = 0, pool=None):
    """I_q(y; z) of a diagonal-Gaussian posterior over the evaluation set (`mutual_information`)
    and its ceiling ln M, M the examples of the aggregate posterior; with `labels`,
    I_q(y; z | label) = Σ_k p(k) I_q within class k (the aggregate posterior of each class),
    the information a label-conditional prior p̂(z|label) is compared with, and its ceiling
    Σ_k p(k) ln M_k.

    loc, scale (N, d), labels (N,): the evaluated examples' posteriors. pool = (loc, scale,
    labels) of every example the aggregate posterior is built from (the N among them; labels
    None without `labels`); default the N themselves.
    """
    rng = np.random.default_rng(seed)
    pool_loc, pool_scale, pool_labels = (loc, scale, labels) if pool is None else pool
    if labels is None:
        mi = mutual_information(loc, scale, rng, pool=(pool_loc, pool_scale))
        return mi, math.log(len(pool_loc))
    classes, counts = np.unique(labels, return_counts=True)
    weights = counts / counts.sum()
    sizes = np.array([np.sum(pool_labels == k) for k in classes])
    parts = [mutual_information(loc[labels == k], scale[labels == k], rng,
                                pool=(pool_loc[pool_labels == k], pool_scale[pool_labels == k]))
             for k in classes]
    value = float(sum(w * p.value for w, p in zip(weights, parts)))
    stderr = float(np.sqrt(sum((w * p.stderr) ** 2 for w, p in zip(weights, parts)
                               if np.isfinite(p.stderr))))
    ceiling = float(np.sum(weights * np.log(sizes)))
    return type(parts[0])(value, stderr), ceiling


#: At most this many examples make the aggregate posterior behind I_q (the evaluated ones and a
#: seeded subset of the rest): the estimate costs O(N · M · d).
POOL_MAX = 100_000


def aggregate_pool(spec, dataset, n_eval: int, seed: int = 0):
    """(x, labels) of the examples whose posteriors make the aggregate posterior q(z) for I_q:
    the whole test split (its first `n_eval` examples, the evaluated ones, first), then the
    train split, binarised as the test split is for evaluation; with a label-conditional
    encoder only examples whose label is known; at most `POOL_MAX`, the evaluated ones kept and
    the rest a seeded subset (read row by row, so a memory-mapped train split is not copied
    whole). More examples lift the estimator's ceiling ln M (`site_information`)."""
    x_test, labels_test = evaluation_data(spec, dataset)
    labels = np.concatenate([labels_test, dataset.labels_train])
    keep = np.ones(len(labels), bool) if not spec.label.condition else labels >= 0
    keep[:n_eval] = True
    rest = np.flatnonzero(keep[n_eval:]) + n_eval
    room = max(0, POOL_MAX - n_eval)
    if len(rest) > room:
        rest = np.sort(np.random.default_rng(seed).choice(rest, room, replace=False))
    from_test, from_train = rest[rest < len(x_test)], rest[rest >= len(x_test)] - len(x_test)
    x_train = np.asarray(dataset.x_train[from_train], np.float32)
    if spec.data.binarize == "dynamic":
        x_train = binarize(x_train, np.random.default_rng(spec.train.seed + 2))
    x = np.concatenate([x_test[:n_eval], x_test[from_test], x_train])
    index = np.concatenate([np.arange(n_eval), rest])
    return x, (labels[index] if spec.label.condition else None)


def unevaluated_aux(spec) -> list[str]:
    """The aux terms the test metrics leave out: a supervised term of a latent label (M2) needs
    the known labels, and eval sums the label out of every test example (its test labels are
    not shown to the model), so such a term adds 0 to ``aux`` and to the ``objective``."""
    if not spec.label.latent:
        return []
    return [f"{aux.kind} (weight {aux.weight:g})" for aux in spec.objective.aux
            if aux.kind == "supervised"]


#: Draws of z per example behind eval's ELBO, rate and distortion (`--particles`): one draw
#: leaves Monte Carlo noise within each example that the examples' spread hides.
EVAL_PARTICLES = 16


def evaluate_run(path, backend: str | None = None, device: str = "cpu", iwae_k: int = 1000,
                 n: int | None = None, progress: bool = True,
                 particles: int | None = None, write: bool = True) -> dict:
    """Test-split report of a run (per example, nats); also written to RUN/report.json (and
    the PSIS k̂ to RUN/khat.npy) unless `write` is False (a read-only run folder).

    The whole model's lines (ELBO, rate, distortion, IWAE and PSIS over the joint of all latent
    sites) come first; ``sites`` holds each latent site's rate, active units, rate per
    dimension, I_q and verdict (`site_reports`); a one-site spec also has them at the top
    level, as always.

    :param iwae_k: importance samples per example for the IWAE log-likelihood and PSIS (0: skip).
        Their mean log-weight is the ELBO of the same draws (``elbo_same_draws``), so
        ``elbo_gap`` = IWAE − ELBO carries no Monte Carlo noise of a second set of draws.
    :param n: evaluate only the first n test examples, n ≥ 1 (default None: all).
    :param write: False: write nothing into the run folder. A folder in use (a run training in
        it: `runs.in_use`) is never written either: its report is of the checkpoint the run
        saved last (``report["in_use"]`` holds the owner, ``report["step"]`` the step) and
        would be stale within minutes.
    :param particles: draws of z per example behind the ELBO, rate, distortion and their
        standard errors (averaged per example; default `EVAL_PARTICLES`); the rate is in
        closed form where it is exact.
    """
    particles = EVAL_PARTICLES if particles is None else particles
    _check_counts(particles, iwae_k, n)
    owner = runs.in_use(path)
    run = runs.load_run(path)
    spec = run.spec
    dataset = load_data(spec)
    x, labels = evaluation_data(spec, dataset)
    if n is not None:
        x, labels = x[:n], labels[:n]
    model = run.model(backend, device)
    train = run.records("train")
    beta = train[-1]["beta"] if train else spec.objective.beta
    metrics = evaluate(model, spec, x, labels, beta, spec.objective.lam, num_particles=particles)
    label_input = labels if spec.label.condition else None
    stderr = per_example_stderrs(model, spec, x, label_input, seed=spec.train.seed,
                                 num_particles=particles)
    sites = site_reports(model, spec, x, label_input, metrics, stderr, seed=spec.train.seed,
                         pool=aggregate_pool(spec, dataset, len(x), seed=spec.train.seed),
                         entropy=dataset.entropy)
    report = _whole_model(run, spec, dataset, len(x), backend, beta, particles, metrics,
                          stderr, sites)
    if owner is not None:
        report["in_use"] = owner
        write = False
    if iwae_k:
        iwae = importance_sampling(model, x, iwae_k, seed=spec.train.seed, progress=progress,
                                   labels=label_input)
        report |= _iwae_entries(iwae, iwae_k, dataset.dim)
        if write:
            runs.save_array(Path(path) / KHAT_FILE, iwae["khat"])
    if dataset.entropy is not None:
        report |= entropy_checks(dataset.entropy, report)
    report["verdict"] = ("; ".join(f"{name}: {site['verdict']}" for name, site in sites.items())
                         if graph.is_graph(spec) else next(iter(sites.values()))["verdict"])
    if write:
        runs.write_json_atomic(Path(path) / "report.json", report)
    return report


def _check_counts(particles: int, iwae_k: int, n: int | None) -> None:
    if particles < 1:
        raise ValueError(f"--particles must be at least 1; got {particles}")
    if iwae_k < 0:
        raise ValueError(f"--iwae-k must be at least 1 importance sample per example (0 skips "
                         f"IWAE and PSIS; PSIS needs about 25 or more); got {iwae_k}")
    if n is not None and n < 1:
        raise ValueError(f"--n must be at least 1 test example; got {n} (leave --n out to "
                         "evaluate every test example)")


def _whole_model(run, spec, dataset, n_test: int, backend, beta, particles: int, metrics: dict,
                 stderr: dict, sites: dict) -> dict:
    """The report's lines for the whole model (and, in a one-site spec, its site's)."""
    dim = dataset.dim
    report = {
        "run": str(run.path),
        "backend": backend or run.info["backend"],
        "trained_with": run.info["backend"],
        "n_test": n_test,
        "particles": particles,
        "step": run.info.get("step"),
        "steps": spec.train.steps,
        "beta": beta,
        "lam": spec.objective.lam,
        "elbo": metrics["elbo"],
        "data_dim": dim,
        "bits_per_dim": -metrics["elbo"] / (dim * math.log(2)),  # from the ELBO (a bound)
        "rate": metrics["rate"],
        "distortion": metrics["distortion"],
        "nll_distortion": metrics["nll"],
        "objective": metrics["objective"],
        "aux": metrics["aux"],
        "aux_terms": len(spec.objective.aux),
        "aux_not_evaluated": unevaluated_aux(spec),
        "latent_dim": graph.total_dim(spec),
        "active_units": sum(site["active_units"] for site in sites.values()),
        "elbo_stderr": stderr["elbo"], "rate_stderr": stderr["rate"],
        "nll_distortion_stderr": stderr["nll"], "data": dataset.name,
        "sites": sites,
    }
    if spec.label.latent:  # M2: the label summed out of every number above but these
        report |= {"label_rate": metrics[f"rate/{LABEL_SITE}"],
                   "label_rate_stderr": stderr[f"rate/{LABEL_SITE}"],
                   "accuracy": metrics["accuracy"]}
    if not graph.is_graph(spec):  # the one site's lines at the top level, as always
        (site,) = sites.values()
        report |= {k: site[k] for k in ("posterior_mean_variance", "rate_per_dim",
                                        "mutual_information", "mutual_information_stderr",
                                        "marginal_kl", "mutual_information_ceiling",
                                        "mutual_information_pool",
                                        "mutual_information_limited")
                   if k in site}
    return report


def _iwae_entries(iwae: dict, iwae_k: int, dim: int) -> dict:
    """The report's IWAE and PSIS lines from `importance_sampling`'s result."""
    return {
        "iwae_k": iwae_k,
        "log_likelihood": iwae["mean"],
        "log_likelihood_stderr": iwae["stderr"],
        "bits_per_dim_iwae": -iwae["mean"] / (dim * math.log(2)),
        "elbo_same_draws": iwae["elbo"],
        # ≈ E KL(q(z|y) ‖ p(z|y)) for large K; both bounds from one set of K draws
        "elbo_gap": iwae["mean"] - iwae["elbo"],
        "elbo_gap_stderr": iwae["gap_stderr"],
        "psis": psis_summary(iwae["khat"]),
        "khat_file": KHAT_FILE,
        "ess_mean": float(iwae["ess"].mean()),
    }


def export_posterior_draws(path, n_examples: int, num_draws: int = 1000,
                           backend: str | None = None, device: str = "cpu") -> Path:
    """Draws from the joint posterior q(z_1, …, z_S | y) for the first `n_examples` test
    examples as ArviZ InferenceData (posterior group, one variable per latent site with dims
    (chain, draw, example, <site>_dim); a one-site model's variable ``z`` has dims (chain,
    draw, example, latent)), written to RUN/posterior.nc, for ArviZ's summaries and plots
    (`az.summary`, `az.plot_posterior`)."""
    from ppl_vae.arviz_compat import posterior_draws_to_inference_data, save_netcdf

    run = runs.load_run(path)
    spec = run.spec
    x, labels = evaluation_data(spec, load_data(spec))
    x, labels = x[:n_examples], (labels[:n_examples] if spec.label.condition else None)
    draws = run.model(backend, device).posterior_draws(x, labels, num_draws,
                                                       seed=spec.train.seed)
    one_site = not graph.is_graph(spec)
    dim_name = {s.name: "latent" if one_site else f"{s.name}_dim" for s in spec.sites}
    idata = posterior_draws_to_inference_data(
        {name: v.transpose(1, 0, 2)[None] for name, v in draws.items()},
        coords={"example": np.arange(len(x)),  # (a categorical site: d × K one-hot values)
                **{dim_name[s.name]: np.arange(s.width) for s in spec.sites}},
        dims={name: ["example", dim_name[name]] for name in draws})
    return save_netcdf(idata, Path(path) / "posterior.nc")
