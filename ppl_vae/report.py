"""`ppl-vae eval`: score a run on its test split and write ``report.json`` (backend-free)."""

from __future__ import annotations

import math
from pathlib import Path

from ppl_vae import runs
from ppl_vae.data import load_data
from ppl_vae.diagnostics import active_units
from ppl_vae.training import evaluate, evaluation_data

#: A dimension whose rate is below this many nats carries (almost) no information about y.
COLLAPSE_RATE = 0.01


def collapse_verdict(n_active: int, dim: int, rate: float) -> str:
    """One line on posterior collapse that names its evidence."""
    evidence = f"{n_active} of {dim} dimensions active, rate {rate:.3g} nats"
    if n_active == 0 or rate < COLLAPSE_RATE * dim:
        return f"posterior collapse: {evidence}"
    if n_active < dim:
        return f"partial collapse: {evidence}"
    return f"no collapse: {evidence}"


def evaluate_run(path, backend: str | None = None, device: str = "cpu") -> dict:
    """Test-split report of a run (per example, nats); also written to RUN/report.json."""
    run = runs.load_run(path)
    spec = run.spec
    dataset = load_data(spec)
    x, labels = evaluation_data(spec, dataset)
    model = run.model(backend, device)
    train = run.records("train")
    beta = train[-1]["beta"] if train else spec.objective.beta
    metrics = evaluate(model, spec, x, labels, beta, spec.objective.lam)
    loc, _ = model.encode(x, spec.train.eval_batch_size)
    n_active, variance = active_units(loc)
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
    report["verdict"] = collapse_verdict(report["active_units"], spec.latent.dim, report["rate"])
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
        f"  {'test ELBO':<24}{report['elbo']:>16.3f}",
        f"  {'rate  Î(y,z)':<24}{report['rate']:>16.3f}",
        f"  {'distortion (trained)':<24}{report['distortion']:>16.3f}",
        f"  {'distortion −ln p(y|z)':<24}{report['nll_distortion']:>16.3f}",
        f"  {objective_label:<24}{report['objective']:>16.3f}",
        f"  {'aux':<24}{report['aux']:>16.3f}",
    ]
    if bits:
        lines.append(f"  {'bits per dimension':<24}{report['bits_per_dim']:>16.4f}")
    lines += ["", f"  active units: {report['active_units']} of {report['latent_dim']}"]
    if report["rate_per_dim"]:
        lines.append("  rate per dimension (nats): " + "  ".join(
            f"{i}:{v:.2f}" for i, v in enumerate(report["rate_per_dim"])))
    lines += ["", f"  {report['verdict']}"]
    return "\n".join(lines)
