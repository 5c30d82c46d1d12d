"""`ppl-vae eval`'s text and `ppl-vae plot`'s figures, from the numbers of
`ppl_vae.evaluation` (whose names a report user reaches from here too: ``evaluate_run``)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ppl_vae import graph, runs
from ppl_vae.data import load_data
from ppl_vae.diagnostics import INFORMATION_MARGIN
from ppl_vae.evaluation import (  # noqa: F401 - re-exported: ppl_vae.report.evaluate_run
    COLLAPSE_RATE,
    EVAL_PARTICLES,
    KHAT_FILE,
    evaluate_run,
    export_posterior_draws,
    posterior_means,
    site_information,
)
from ppl_vae.training import evaluation_data

#: At most this many dimensions of a site get a row in its traversal figure (by rate).
TRAVERSAL_ROWS = 10


def ceiling_text(site: dict) -> str:
    """The ceiling of I_q in words. Over M examples the aggregate posterior has M components:
    I_q ≤ ln M; given the label, the ceiling is Σ_k p(k) ln M_k over the classes' pools
    (`site_information`), about ln(M / classes), so M alone would not match the number."""
    ceiling, pool = site["mutual_information_ceiling"], site["mutual_information_pool"]
    if site.get("mutual_information_given_label"):
        return (f"Σ_k p(k) ln M_k = {ceiling:.2f}, M_k the examples of label k among the "
                f"{pool} (e^{ceiling:.2f} ≈ {math.exp(ceiling):.0f} per label)")
    return f"ln M = {ceiling:.2f}, M = {pool} examples"


def psis_line(report: dict) -> str:
    """PSIS k̂ in one line; k̂ that could not be estimated (too few draws for the tail fit, or
    equal weights) is said so, never printed as nan."""
    psis, k = report["psis"], report["iwae_k"]
    ess = f"; mean ESS {report['ess_mean']:.1f} of {k}"
    missing = psis.get("n_not_estimable", 0)
    if missing == psis["n"]:
        return (f"  PSIS k̂: not estimable: K = {k} draws per example are too few for its tail "
                f"fit (about 25 or more are needed; eval's default is 1000){ess}")
    if psis["khat_max"] == -np.inf:
        return ("  PSIS k̂: none (every example's weights are equal: q(z|y) is its posterior)"
                + ess)
    line = (f"  PSIS k̂: mean {psis['khat_mean']:.2f}, max {psis['khat_max']:.2f}, "
            f"{100 * psis['share_above_0.7']:.1f}% of examples above 0.7")
    if missing:
        line += f" (of the {psis['n'] - missing} whose k̂ could be fitted)"
    return line + ess


def _site_lines(name: str | None, site: dict) -> list[str]:
    """The lines of one latent site (`name` None: the one site of a one-site spec)."""
    head = "" if name is None else f"  site {name} (d = {site['dim']}, posterior "
    kind = ("" if "categories" not in site else f" of {site['categories']} values")
    lines = [] if name is None else [
        "", f"{head}{site['posterior']}{kind}, prior {site['prior']}): rate "
        f"{site['rate']:.3f} ± {site['rate_stderr']:.3f} nats"]
    if site["mutual_information"] is not None:
        given = " | label" if site.get("mutual_information_given_label") else ""
        z = name or "z"
        lines.append(f"  {('' if name is None else '  ') + f'I_q(y; {z}{given})':<24}"
                     f"{site['mutual_information']:>16.3f}  ± "
                     f"{site['mutual_information_stderr']:.3f}")
        if "marginal_kl" in site:
            label = f"KL(q({z}) ‖ p̂({z}))" if not given else "KL(q ‖ p̂) given label"
            lines.append(f"  {('' if name is None else '  ') + label:<24}"
                         f"{site['marginal_kl']:>16.3f}   (= rate − I_q)")
        if site.get("mutual_information_limited"):
            pad = "  " + ("" if name is None else "  ")
            lines += [f"{pad}(I_q may be limited by its ceiling {ceiling_text(site)}: its upper "
                      f"bound, the rate (or H(y)), comes within {INFORMATION_MARGIN:g} nats of "
                      "it,",
                      f"{pad} so the true I_q can be larger and KL(q({z}) ‖ p̂({z})) = rate − I_q "
                      "is not resolved, and not shown)"]
    elif "kind" in site:  # a discrete site
        pad = "  " + ("" if name is None else "  ")
        lines.append(f"{pad}I_q: not estimated (a {site['kind']} site, trained by "
                     f"{ESTIMATOR_WORDS[site['estimator']]})")
        lines += usage_lines(site, pad)
    else:  # a full-covariance or IAF posterior, or a site that reads other latents
        what = "of this site" if name is not None else ""
        lines.append(f"  {'' if name is None else '  '}I_q: not estimated (q(z|y) {what}"
                     f"{' ' if what else ''}is not a diagonal Gaussian of the data)")
    return lines


#: How each discrete estimator is named in a report.
ESTIMATOR_WORDS = {"score": "score-function gradients", "enumerate": "enumeration",
                   "relaxed": "a Concrete relaxation"}


def usage_lines(site: dict, pad: str) -> list[str]:
    """A discrete site's code usage in words: activation frequencies (Bernoulli) or perplexity
    per variable (categorical), over the evaluated examples."""
    perplexity = np.asarray(site["perplexity"])
    if "activation" in site:
        act = np.asarray(site["activation"])
        return [f"{pad}activation frequency q̄(z_i = 1) over the test examples: min "
                f"{act.min():.2f}, median {np.median(act):.2f}, max {act.max():.2f}; "
                f"{int(np.sum((act > 0.05) & (act < 0.95)))} of {len(act)} units between "
                "0.05 and 0.95"]
    return [f"{pad}perplexity per variable (values used, of {site['categories']}): min "
            f"{perplexity.min():.2f}, median {np.median(perplexity):.2f}, max "
            f"{perplexity.max():.2f}"]


def format_report(report: dict, bits: bool = False) -> str:
    """A readable table of a report."""
    objective_label = f"objective (β={report['beta']:.3g}, λ={report['lam']:.3g})"
    sites = report.get("sites", {})
    one_site = len(sites) == 1
    lines = [
        f"run {report['run']}  (backend {report['backend']}, trained with "
        f"{report['trained_with']}, step {report['step']}, {report['n_test']} test examples, "
        f"{report['particles']} draws of z each)",
        "",
        f"  {'metric':<24}{'nats / example':>16}",
        f"  {'test ELBO':<24}{report['elbo']:>16.3f}  ± {report['elbo_stderr']:.3f}",
        f"  {'rate  Î(y,z)':<24}{report['rate']:>16.3f}  ± {report['rate_stderr']:.3f}",
        f"  {'distortion (trained)':<24}{report['distortion']:>16.3f}",
        f"  {'distortion −ln p(y|z)':<24}{report['nll_distortion']:>16.3f}"
        f"  ± {report['nll_distortion_stderr']:.3f}",
        f"  {objective_label:<24}{report['objective']:>16.3f}",
        f"  {'aux':<24}{report['aux']:>16.3f}",
    ]
    skipped = report.get("aux_not_evaluated")
    if skipped:  # M2's α-term: the test labels are summed out, so it adds 0, not its value
        why = (f"{', '.join(skipped)}: not evaluated, as it needs the known labels and eval "
               "sums the label out")
        lines[-2] += "   (without the aux terms not evaluated)"
        lines[-1] = (f"  {'aux':<24}{'not evaluated':>16}   {why}"
                     if len(skipped) == report.get("aux_terms", len(skipped)) else
                     f"{lines[-1]}   (without {why})")
    if "accuracy" in report:
        lines += [f"  {'rate of the label':<24}{report['label_rate']:>16.3f}"
                  f"  ± {report['label_rate_stderr']:.3f}   KL(q(label|y) ‖ p̂(label)), in the rate",
                  f"  {'classifier accuracy':<24}{report['accuracy']:>16.3f}   q(label|y), "
                  "most probable class against the test labels"]
    if one_site:
        lines += _site_lines(None, next(iter(sites.values())))
    if "log_likelihood" in report:
        iwae_label = f"IWAE ln p(y), K={report['iwae_k']}"
        lines += [
            f"  {iwae_label:<24}{report['log_likelihood']:>16.3f}"
            f"  ± {report['log_likelihood_stderr']:.3f}",
            f"  {'ln p(y) − ELBO':<24}{report['elbo_gap']:>16.3f}  ± "
            f"{report['elbo_gap_stderr']:.3f}   (IWAE and the ELBO of the same K draws, "
            f"{report['elbo_same_draws']:.3f})",
            "",
            psis_line(report),
        ]
    if bits:
        lines.append(f"  {'bits per dimension':<24}{report['bits_per_dim']:>16.4f}"
                     f"   (−ELBO / (D ln 2), D = {report['data_dim']}: from the test ELBO)")
        if "bits_per_dim_iwae" in report:
            lines.append(f"  {'  from IWAE':<24}{report['bits_per_dim_iwae']:>16.4f}"
                         "   (−ln p̂(y) / (D ln 2): from the tighter IWAE bound)")
    lines += _entropy_lines(report)
    if one_site:
        site = next(iter(sites.values()))
        lines += ["", f"  active units: {site['active_units']} of {site['dim']}"]
        lines += _rate_per_dim_lines(site["rate_per_dim"], "  ")
        lines += ["", f"  {site['verdict']}"]
        return "\n".join(lines)
    lines += ["", f"  latent sites: {len(sites)}; active units {report['active_units']} of "
                  f"{report['latent_dim']}"]
    for name, site in sites.items():
        lines += _site_lines(name, site)
        lines.append(f"    active units: {site['active_units']} of {site['dim']}")
        lines += _rate_per_dim_lines(site["rate_per_dim"], "    ")
        lines.append(f"    {site['verdict']}")
    return "\n".join(lines)


def _entropy_lines(report: dict) -> list[str]:
    """Where the data's H(y) is known: the lecture's bounds against it."""
    lines: list[str] = []
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
        if report.get("mutual_information") is not None:
            lines.append(f"  H(y) − distortion ≤ I_q ≤ rate:  "
                         f"{report['mutual_information_lower']:.3f} ≤ "
                         f"{report['mutual_information']:.3f} ≤ {report['rate']:.3f}")
        else:
            lines.append(f"  H(y) − distortion ≤ I_q(y; z) ≤ rate:  "
                         f"{report['mutual_information_lower']:.3f} ≤ I_q ≤ "
                         f"{report['rate']:.3f}")
    return lines


def _rate_per_dim_lines(rates: list[float], indent: str, shown: int = 16) -> list[str]:
    """Every dimension's rate, or for a wide site the `shown` largest and a count."""
    if not rates:
        return []
    if len(rates) <= shown:
        return [f"{indent}rate per dimension (nats): " + "  ".join(
            f"{i}:{v:.2f}" for i, v in enumerate(rates))]
    top = np.argsort(rates)[::-1][:shown]
    above = sum(v >= COLLAPSE_RATE for v in rates)
    return [f"{indent}rate per dimension (nats), the {shown} largest: " + "  ".join(
        f"{i}:{rates[i]:.2f}" for i in top),
        f"{indent}{above} of {len(rates)} dimensions carry >= {COLLAPSE_RATE} nats "
        "(all of them in report.json)"]


def label_arrays(spec, n: int, label: int | None, cycle: bool):
    """Labels (n,) for drawing from a label-conditional model: all `label`, or (without one)
    the classes in turn (`cycle`) or class 0; None for a model that reads no label."""
    if not spec.label.condition:
        if label is not None:
            raise ValueError("this model does not read a label (label.condition = false): "
                             "drop --label")
        return None
    classes = spec.label.classes
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"--label {label}: this model's labels are 0..{classes - 1}")
    if label is not None:
        return np.full(n, label)
    return np.arange(n) % classes if cycle else np.zeros(n, np.int64)


def writable_folder(folder: Path, create: bool = False) -> Path:
    """`folder`, checked before anything is computed for it: it exists (made, with `create`,
    inside an existing folder) and can be written; else a one-line `RunError` naming it and
    what to do."""
    folder = Path(folder)
    if create and not folder.exists():
        try:
            folder.mkdir()
        except FileNotFoundError:
            pass  # said below
        except OSError as err:
            raise runs.RunError(f"cannot create {folder} ({err.strerror}): make {folder.parent} "
                                f"writable (chmod u+w {folder.parent})") from None
    if not folder.is_dir():
        raise runs.RunError(f"the folder {folder} does not exist: create it first "
                            f"(mkdir -p {folder}), or choose another")
    if not os.access(folder, os.W_OK):
        raise runs.RunError(f"cannot write into {folder}: it is read-only (chmod u+w {folder}), "
                            "or choose another folder")
    return folder


def plot_run(path, others=(), backend: str | None = None, device: str = "cpu",
             label: int | None = None) -> list[Path]:
    """Write the figures of a run to RUN/plots/: prior samples, reconstructions, latent
    traversals (one figure per site of a latent graph; a discrete site's variables set to each
    of their values), training curves, rate per dimension (per site), the rate–distortion plane
    (with `others`, more run folders, as further points), after `ppl-vae eval` the PSIS k̂
    histogram and each discrete site's code usage, and for a label-conditional model the samples of
    every class with the same noise (`samples_by_label.png`). `label` draws the samples and
    traversals of a label-conditional model for that class (default: the classes in turn for
    samples, class 0 for traversals)."""
    from ppl_vae import plots

    run = runs.load_run(path)
    spec = run.spec
    out = writable_folder(Path(path) / "plots", create=True)
    model = run.model(backend, device)
    dataset = load_data(spec)
    written = [plots.training_curves(run.metrics, out / "curves.png", spec.objective.distortion)]
    shape = run.info.get("image_shape")
    test = run.final_test
    rates = {s.name: [test.get(graph.rate_dim_key(spec, s.name, i), float("nan"))
                      for i in range(s.dim)] for s in spec.sites}
    if shape:
        written += _image_figures(model, spec, dataset, tuple(shape), rates, label, out)
    finite = {k: v for k, v in rates.items() if np.isfinite(v).all()}
    if finite and not graph.is_graph(spec):
        written.append(plots.rate_per_dim_bars(next(iter(finite.values())),
                                               out / "rate_per_dim.png"))
    elif finite:
        written.append(plots.rate_per_dim_by_site(finite, out / "rate_per_dim.png"))
    points = []
    for p in (path, *others):
        t = runs.load_run(p).final_test
        points.append((Path(p).name, t["rate"], t["nll"]))
    written.append(plots.rate_distortion_plane(points, out / "rate_distortion.png",
                                               dataset.entropy))
    if (Path(path) / KHAT_FILE).exists():
        written.append(plots.khat_histogram(np.load(Path(path) / KHAT_FILE),
                                            out / "khat.png"))
    report = Path(path) / "report.json"
    if report.exists():  # after `ppl-vae eval`: the discrete sites' code usage
        import json

        sites = json.loads(report.read_text()).get("sites", {})
        for name, site in sites.items():
            if "perplexity" in site:
                file = "code_usage.png" if len(sites) == 1 else f"code_usage_{name}.png"
                written.append(plots.code_usage_bars(site, out / file))
    return written


def posterior_codes(spec, means: dict) -> dict:
    """The codes to decode for reconstructions, {site: (N, width)}: the posterior mean of a
    Gaussian site, the posterior mode of a discrete one (each unit 1 where q(z_i = 1|y) > 1/2,
    each categorical variable one-hot at its most probable value): a discrete decoder never
    saw the probabilities themselves."""
    out = dict(means)
    for s in spec.sites:
        if not s.discrete:
            continue
        m = np.asarray(means[s.name])
        if s.kind == "bernoulli":
            out[s.name] = (m > 0.5).astype(np.float64)
        else:
            k = s.categories
            grouped = m.reshape(len(m), -1, k)
            out[s.name] = np.eye(k)[grouped.argmax(-1)].reshape(m.shape)
    return out


def _discrete_traversals(model, spec, s, codes: dict, order, rates, label, shape,
                         out: Path) -> Path:
    """A discrete site's traversals at the posterior modes of 4 test images (the other sites
    at their codes for the same images)."""
    from ppl_vae import plots

    fixed = label_arrays(spec, 4 * (s.categories if s.kind == "categorical" else 2), label,
                         cycle=False)
    base = codes[s.name][:4]
    others = {k: v[:4] for k, v in codes.items() if k != s.name}

    def decode(z):
        repeat = len(z) // len(base)
        rest = {k: np.repeat(v, repeat, axis=0) for k, v in others.items()}
        return model.decode_mean({s.name: z, **rest}, labels=fixed)

    where = "the posterior modes" + (f", {len(order)} of {s.dim} variables with the largest "
                                     "rate" if s.dim > len(order) else "")
    name = "traversals.png" if not graph.is_graph(spec) else f"traversals_{s.name}.png"
    return plots.discrete_traversals(
        decode, order, base, s.categories if s.kind == "categorical" else None, shape,
        out / name, title=where, rates=rates if np.isfinite(rates).all() else None)


def _image_figures(model, spec, dataset, shape, rates: dict, label, out: Path) -> list[Path]:
    """The figures of an image model: prior samples, reconstructions, each site's latent
    traversals and, label-conditional, the samples of every class."""
    from ppl_vae import plots

    written = []
    x, labels = evaluation_data(spec, dataset)
    x, labels = x[:16], (labels[:16] if spec.label.condition else None)
    drawn = label_arrays(spec, 64, label, cycle=True)
    means = posterior_codes(spec, {k: v[0] for k, v in
                                   posterior_means(model, spec, x, labels).items()})
    what = "" if drawn is None else (f", label {label}" if label is not None
                                     else ", labels 0, 1, … in turn")
    written += [
        plots.save_image_grid(
            model.decode_mean(model.sample_prior(64, labels=drawn), labels=drawn
                              ).reshape(-1, *shape), out / "samples.png",
            f"E[y|z], z ~ prior{what}"),
        plots.reconstructions(x, model.decode_mean(means, labels=labels), shape,
                              out / "reconstructions.png"),
    ]
    for s in spec.sites:
        r = rates[s.name]
        order = np.argsort(r)[::-1] if np.isfinite(r).all() else np.arange(s.dim)
        order = order[:TRAVERSAL_ROWS]
        if s.discrete:
            written.append(_discrete_traversals(model, spec, s, means, order, r, label,
                                                shape, out))
            continue
        fixed = label_arrays(spec, 9, label, cycle=False)
        # a graph site's other coordinates at the mean code of the test images shown (its
        # prior need not be centred at 0); the sites it does not fix at their prior means
        base = None if not graph.is_graph(spec) else means[s.name].mean(0)
        where = ("the others at 0" if base is None else f"site {s.name}, its others at "
                 "the mean code of 16 test images, other sites at their prior means")
        if s.dim > TRAVERSAL_ROWS:
            where = f"the {TRAVERSAL_ROWS} of {s.dim} with the largest rate; " + where
        if fixed is not None:
            where += f"; label {fixed[0]}"

        def decode(z, name=s.name, fixed=fixed):
            return model.decode_mean({name: z}, labels=fixed)

        name = "traversals.png" if not graph.is_graph(spec) else f"traversals_{s.name}.png"
        written.append(plots.latent_traversals(
            decode, order, s.dim, shape, out / name, base=base, title=where,
            rates=r if np.isfinite(r).all() else None))
    if spec.label.condition:
        classes, columns = spec.label.classes, 8
        rows = [model.decode_mean(model.sample_prior(columns, seed=1,
                                                     labels=np.full(columns, k)),
                                  labels=np.full(columns, k)) for k in range(classes)]
        written.append(plots.save_image_grid(
            np.concatenate(rows).reshape(-1, *shape), out / "samples_by_label.png",
            "one row per label, the same prior noise in each column", ncols=columns,
            row_labels=[f"label {k}" for k in range(classes)]))
    return written
