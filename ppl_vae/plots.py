"""Figures (matplotlib, imported lazily and drawn off-screen with the Agg canvas)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np


def figure(figsize):
    """A matplotlib Figure on the off-screen Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)  # off-screen: no display and no global pyplot state
    return fig


def save_image_grid(images: np.ndarray, path, title: str = "", ncols: int | None = None) -> Path:
    """Save images (n, H, W) with values in [0, 1] as one grid PNG; returns the path."""
    images = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    n, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    inches = max(0.6, 0.016 * h)  # per image: small digits stay small, 64x64 sprites readable
    grid = np.full((nrows * (h + 1) + 1, ncols * (w + 1) + 1), 0.35)  # grey separators
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    width = max(3.0, ncols * inches)
    # a long title wraps to the figure's width (about 13 characters an inch at 9 points)
    lines = textwrap.wrap(title, width=int(13 * width)) if title else []
    fig = figure((width, max(1.5, nrows * inches) + 0.2 + 0.17 * len(lines)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if lines:
        ax.set_title("\n".join(lines), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def save(fig, path) -> Path:
    """Lay out `fig` and write it to `path` (the format from the suffix); returns the path."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def reconstructions(x: np.ndarray, recon: np.ndarray, shape, path, n: int = 16) -> Path:
    """Originals (top row of each pair) above their reconstructions E[y | z = posterior mean]."""
    n = min(n, len(x))
    pairs = np.concatenate([x[:n].reshape(n, *shape), recon[:n].reshape(n, *shape)])
    return save_image_grid(pairs, path, "test images (top) and reconstructions E[y|z=μ(y)]",
                           ncols=n)


def latent_traversals(decode, order: np.ndarray, dim: int, shape, path,
                      span: float = 3.0, steps: int = 9, base: np.ndarray | None = None,
                      title: str = "") -> Path:
    """One row per latent dimension (in `order`, e.g. by rate): E[y|z] with z_i swept over
    [−span, span] and every other coordinate at `base` (d,) (default 0, the prior mean; the
    posterior mean of a real example shows its factors changing one at a time)."""
    values = np.linspace(-span, span, steps)
    base = np.zeros(dim) if base is None else np.asarray(base, dtype=np.float64)
    rows = []
    for i in order:
        z = np.tile(base, (len(values), 1))
        z[:, i] = values
        rows.append(decode(z).reshape(len(values), *shape))
    where = title or ("the others at 0" if not base.any() else "the others at a given code")
    return save_image_grid(np.concatenate(rows), path,
                           f"latent traversals, z_i from {values[0]:g} to {values[-1]:g} "
                           f"(rows: dimensions by rate; {where})", ncols=len(values))


def training_curves(metrics: list[dict], path) -> Path:
    """rate, distortion, −ELBO and the objective against step, train (lines) and test (dots)."""
    fig = figure((7, 4))
    ax = fig.add_subplot(1, 1, 1)
    for key, color in (("rate", "C0"), ("distortion", "C1"), ("objective", "C3")):
        for split, style in (("train", "-"), ("test", "o")):
            rec = [r for r in metrics if r.get("split") == split and key in r]
            if rec:
                ax.plot([r["step"] for r in rec], [r[key] for r in rec], style, color=color,
                        label=f"{key} ({split})", ms=4)
    train = [r for r in metrics if r.get("split") == "train"]
    sites = [k for k in (train[-1] if train else {}) if k.startswith("rate/")
             and k.count("/") == 1]  # the per-site rates of a latent graph
    for i, key in enumerate(sites):
        ax.plot([r["step"] for r in train], [r[key] for r in train], "--", color=f"C{4 + i}",
                label=f"{key} (train)", lw=1)
    rec = [r for r in metrics if r.get("split") == "test" and "elbo" in r]
    if rec:
        ax.plot([r["step"] for r in rec], [-r["elbo"] for r in rec], "s", color="k", ms=4,
                label="−ELBO (test, β=λ=1)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per example")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("training curves")
    return save(fig, path)


def rate_per_dim_bars(rates: list[float], path) -> Path:
    fig = figure((max(4, 0.4 * len(rates) + 2), 3))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(rates)), rates, color="C0")
    ax.axhline(0.01, color="grey", lw=0.8, ls="--", label="0.01 nats")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL(q(z_i|y) ‖ p(z_i)), nats")
    ax.set_title("rate per dimension")
    ax.legend(fontsize=7)
    return save(fig, path)


def rate_per_dim_by_site(rates: dict[str, list[float]], path) -> Path:
    """The rate of each dimension of each latent site, one panel per site (shared axis)."""
    total = sum(len(r) for r in rates.values())
    fig = figure((min(12, max(4, 0.3 * total + 1.5 * len(rates))), 3))
    axes = fig.subplots(1, len(rates), sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [max(len(r), 2) for r in rates.values()]})[0]
    for ax, (name, r) in zip(axes, rates.items()):
        ax.bar(range(len(r)), r, color="C0")
        ax.axhline(0.01, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(f"dimension of {name}")
        ax.set_title(f"{name}: {sum(r):.2f} nats", fontsize=9)
    axes[0].set_ylabel("KL per dimension, nats")
    fig.suptitle("rate per dimension, per latent site (dashed: 0.01 nats)", fontsize=10)
    return save(fig, path)


def rate_distortion_plane(points: list[tuple[str, float, float]], path,
                          entropy: float | None = None) -> Path:
    """(label, rate, distortion) points in nats; the line R + D = H(y) where H is known (every
    VAE lies on or above it: rate + distortion = −ELBO ≥ H(y))."""
    fig = figure((5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for label, r, d in points:
        ax.plot(r, d, "o")
        ax.annotate(label, (r, d), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if entropy is not None:
        top = max(entropy, *(r for _, r, _ in points))
        ax.plot([0, top], [entropy, entropy - top], "k--", lw=1, label="R + D = H(y)")
        ax.legend(fontsize=7)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("rate Î(y, z), nats")
    ax.set_ylabel("distortion Ĥ(y|z), nats")
    ax.set_title("rate–distortion plane" + ("" if entropy is not None else " (H(y) unknown)"))
    return save(fig, path)


def khat_histogram(khat: np.ndarray, path) -> Path:
    """Pareto k̂ per example; above 0.7 importance sampling is unreliable (Vehtari et al.)."""
    fig = figure((5, 3))
    ax = fig.add_subplot(1, 1, 1)
    finite = khat[np.isfinite(khat)]
    ax.hist(finite, bins=40, color="C0")
    for level, style in ((0.5, ":"), (0.7, "--")):
        ax.axvline(level, color="C3", ls=style, lw=1, label=f"k̂ = {level}")
    ax.set_xlabel("PSIS k̂ of the encoder as a proposal")
    ax.set_ylabel("examples")
    ax.legend(fontsize=7)
    return save(fig, path)
