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


def save_image_grid(images: np.ndarray, path, title: str = "", ncols: int | None = None,
                    row_labels: list[str] | None = None) -> Path:
    """Save images (n, H, W) with values in [0, 1] as one grid PNG; returns the path.
    `row_labels`, one per row, are written left of the rows (e.g. a traversal's dimension)."""
    images = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    n, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    inches = max(0.6, 0.016 * h)  # per image: small digits stay small, 64x64 sprites readable
    grid = np.full((nrows * (h + 1) + 1, ncols * (w + 1) + 1), 0.35)  # grey separators
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    width = max(3.0, ncols * inches) + (0.9 if row_labels else 0.0)
    # a long title wraps to the figure's width (about 13 characters an inch at 9 points)
    lines = textwrap.wrap(title, width=int(13 * width)) if title else []
    fig = figure((width, max(1.5, nrows * inches) + 0.2 + 0.17 * len(lines)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    if row_labels:
        ax.set_xticks([])
        ax.set_yticks([1 + r * (h + 1) + (h - 1) / 2 for r in range(len(row_labels))],
                      row_labels, fontsize=7)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    else:
        ax.set_axis_off()
    if lines:
        ax.set_title("\n".join(lines), fontsize=9)
    return save(fig, path)


def save(fig, path) -> Path:
    """Lay out `fig` and write it to `path` (the format from the suffix, PNG without one),
    atomically: a temporary file in the same folder, renamed onto `path` once complete, so an
    interrupted or failed write leaves the previous figure, not half of a new one. Returns the
    path. A folder that cannot be written is a `RunError` naming it."""
    from ppl_vae.runs import RunError, write_atomic

    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt))
    except PermissionError:
        raise RunError(f"cannot write {path}: {path.parent} is not writable (make it writable, "
                       "or choose another folder)") from None
    except FileNotFoundError:
        raise RunError(f"cannot write {path}: the folder {path.parent} does not exist "
                       "(create it, or choose another folder)") from None
    return path


def reconstructions(x: np.ndarray, recon: np.ndarray, shape, path, n: int = 16) -> Path:
    """Originals (top row of each pair) above their reconstructions E[y | z = posterior mean]."""
    n = min(n, len(x))
    pairs = np.concatenate([x[:n].reshape(n, *shape), recon[:n].reshape(n, *shape)])
    return save_image_grid(pairs, path, "test images (top) and reconstructions E[y|z=μ(y)]",
                           ncols=n)


def latent_traversals(decode, order: np.ndarray, dim: int, shape, path,
                      span: float = 3.0, steps: int = 9, base: np.ndarray | None = None,
                      title: str = "", rates=None) -> Path:
    """One row per latent dimension (in `order`, e.g. by rate): E[y|z] with z_i swept over
    [−span, span] and every other coordinate at `base` (d,) (default 0, the prior mean; the
    posterior mean of a real example shows its factors changing one at a time). Each row is
    labelled with its dimension and, given `rates` (d,) in nats, that dimension's rate."""
    values = np.linspace(-span, span, steps)
    base = np.zeros(dim) if base is None else np.asarray(base, dtype=np.float64)
    rows = []
    for i in order:
        z = np.tile(base, (len(values), 1))
        z[:, i] = values
        rows.append(decode(z).reshape(len(values), *shape))
    labels = [f"dim {i}" + ("" if rates is None else f"\n{rates[i]:.2f} nats") for i in order]
    where = title or ("the others at 0" if not base.any() else "the others at a given code")
    what = "dimension and its rate" if rates is not None else "dimension"
    return save_image_grid(np.concatenate(rows), path,
                           f"latent traversals, z_i from {values[0]:g} to {values[-1]:g} "
                           f"(rows: {what}; {where})", ncols=len(values), row_labels=labels)


def discrete_traversals(decode, order: np.ndarray, base: np.ndarray, categories: int | None,
                        shape, path, title: str = "", rates=None) -> Path:
    """The traversals of a discrete site: one row per variable (in `order`, e.g. by rate),
    E[y|z] at each code of `base` (M, width) (e.g. the posterior modes of M test images) with
    variable i set to each of its values in turn (0 and 1 for a Bernoulli unit, `categories`
    one-hot values for a categorical one), the rest of the code as it is. Rows labelled with
    the variable and, given `rates` (d,), its rate."""
    k = categories or 2
    base = np.asarray(base, dtype=np.float64)
    rows = []
    for i in order:
        codes = np.repeat(base, k, axis=0)
        for v in range(k):
            if categories is None:
                codes[v::k, i] = v
            else:
                codes[v::k, i * k:(i + 1) * k] = np.eye(k)[v]
        rows.append(decode(codes).reshape(len(codes), *shape))
    labels = [f"var {i}" + ("" if rates is None else f"\n{rates[i]:.2f} nats") for i in order]
    values = "0 and 1" if categories is None else f"each of its {k} values"
    return save_image_grid(np.concatenate(rows), path,
                           f"discrete traversals: variable i set to {values} (columns), at "
                           f"the code of each of {len(base)} test images ({title})",
                           ncols=len(base) * k, row_labels=labels)


def code_usage_bars(site: dict, path) -> Path:
    """A discrete site's code usage (`ppl_vae.evaluation.discrete_site_report`): per variable,
    in order of its rate, the activation frequency q̄(z_i = 1) of a Bernoulli unit or the
    perplexity of a categorical variable, above its rate."""
    rates = np.asarray(site.get("rate_per_dim") or np.zeros(site["dim"]))
    order = np.argsort(rates)[::-1]
    fig = figure((min(12, max(6, 0.05 * len(order) + 3)), 4.5))
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(order))
    if "activation" in site:
        top.bar(x, np.asarray(site["activation"])[order], color="C1", width=1.0)
        top.set_ylabel("q̄(z_i = 1)")
        top.set_ylim(0, 1)
        what = "activation frequency of each unit"
    else:
        top.bar(x, np.asarray(site["perplexity"])[order], color="C1", width=1.0)
        top.axhline(site["categories"], color="grey", lw=0.8, ls="--")
        top.set_ylabel("perplexity")
        what = f"perplexity of each variable (of {site['categories']} values)"
    bottom.bar(x, rates[order], color="C0", width=1.0)
    bottom.axhline(0.01, color="grey", lw=0.8, ls="--")
    bottom.set_ylabel("rate, nats")
    bottom.set_xlabel("variable, by rate")
    top.set_title(f"code usage over the test examples: {what}; below, its rate", fontsize=8)
    return save(fig, path)


def training_curves(metrics: list[dict], path, distortion: str = "nll") -> Path:
    """rate, distortion, −ELBO and the objective against step, train (lines) and test (dots).
    `distortion` names the trained distortion: anything but "nll" (an RDA's mse or l1) is in
    its own units, not nats, and the legend says so."""
    fig = figure((7, 4))
    ax = fig.add_subplot(1, 1, 1)
    shown = []
    for key, color in (("rate", "C0"), ("distortion", "C1"), ("objective", "C3")):
        name = f"distortion ({distortion})" if key == "distortion" and distortion != "nll" else key
        # the objective dashed: where the rate is small it lies on the distortion's line
        for split, style in (("train", "--" if key == "objective" else "-"), ("test", "o")):
            rec = [r for r in metrics if r.get("split") == split and key in r]
            if rec:
                # test dots above the −ELBO squares, which they may cover exactly (β = λ = 1)
                ax.plot([r["step"] for r in rec], [r[key] for r in rec], style, color=color,
                        label=f"{name} ({split})", ms=4, zorder=3)
                shown += [r[key] for r in rec]
    train = [r for r in metrics if r.get("split") == "train"]
    sites = [k for k in (train[-1] if train else {}) if k.startswith("rate/")
             and k.count("/") == 1]  # the per-site rates of a latent graph
    for i, key in enumerate(sites):
        ax.plot([r["step"] for r in train], [r[key] for r in train], "--", color=f"C{4 + i}",
                label=f"{key} (train)", lw=1)
        shown += [r[key] for r in train]
    rec = [r for r in metrics if r.get("split") == "test" and "elbo" in r]
    if rec:
        neg_elbo = np.array([-r["elbo"] for r in rec])
        objective = np.array([r.get("objective", np.nan) for r in rec])
        same = np.allclose(objective, neg_elbo, rtol=1e-6, atol=1e-6)
        ax.plot([r["step"] for r in rec], neg_elbo, "s", mfc="none", mec="k", ms=9, mew=1.2,
                zorder=2, label="−ELBO (test, β=λ=1)" + (" = objective (test)" if same else ""))
        shown += list(neg_elbo)
    ax.set_xlabel("step")
    ax.set_ylabel("nats per example" if distortion == "nll"
                  else f"nats per example ({distortion}: its own units)")
    value_scale(ax, shown)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("training curves")
    return save(fig, path)


def value_scale(ax, values) -> None:
    """A y scale for values spanning decades, with plain tick labels (0.1, 1, 10; no −10⁰):
    linear when they span less than a factor 10, log when all are positive, else symlog whose
    linear part reaches the decade of the smallest nonzero |value| (at most 4 decades under
    the largest), so a rate of 0.03 nats is not flattened onto 0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    v = np.abs(finite)
    if not len(v) or not v.max():
        return
    positive = (finite > 0).all()
    if positive and v.max() < 10 * v.min():
        return  # less than a decade: a linear axis reads best
    plain = FuncFormatter(lambda x, _: f"{x:g}".replace("-", "−"))
    if positive:
        ax.set_yscale("log")
        decades = np.log10(v.max() / v.min())
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades < 2.5 else (1.0,)))
    else:
        smallest = max(v[v > 0].min(), 1e-4 * v.max())
        ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(smallest)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(NullFormatter())


def rate_per_dim_bars(rates: list[float], path) -> Path:
    """The rate of each dimension, its value written over the bar (up to 16 dimensions), so a
    dimension at 0.00 nats is told from one at 0.01."""
    fig = figure((max(4, 0.4 * len(rates) + 2), 3))
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar(range(len(rates)), rates, color="C0")
    if len(rates) <= 16:
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.margins(y=0.12)  # room for the value over the tallest bar
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
    VAE lies on or above it: rate + distortion = −ELBO ≥ H(y)). The distortion is −ln p(y|z),
    which is negative for a density on continuous data; the axes hold every point."""
    fig = figure((5, 4))
    ax = fig.add_subplot(1, 1, 1)
    rates = [r for _, r, _ in points]
    distortions = [d for _, _, d in points]
    for _, r, d in points:
        ax.plot(r, d, "o")
    extra = [] if entropy is None else [entropy]  # the line's ends, (0, H) and (H, 0)
    pad_limits(ax, rates + extra, distortions + extra)
    annotate_points(ax, rates, distortions, [label for label, _, _ in points])
    if entropy is not None:
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [entropy - lo, entropy - hi], "k--", lw=1, label="R + D = H(y)")
        ax.legend(fontsize=7)
    ax.set_xlabel("rate Î(y, z), nats")
    ax.set_ylabel("distortion Ĥ(y|z), nats")
    ax.set_title("rate–distortion plane" + ("" if entropy is not None else " (H(y) unknown)"))
    return save(fig, path)


def pad_limits(ax, xs, ys, pad: float = 0.08) -> None:
    """Axis limits holding every finite x and y and the origin (rate and distortion start at 0),
    with a margin of `pad` of each range, so a point at rate 0 shows whole."""
    for set_limits, values in ((ax.set_xlim, xs), (ax.set_ylim, ys)):
        v = np.asarray([0.0, *values], dtype=np.float64)
        v = v[np.isfinite(v)]
        span = (v.max() - v.min()) or 1.0
        set_limits(v.min() - pad * span, v.max() + pad * span)


def annotate_points(ax, xs, ys, labels, fontsize: int = 7) -> None:
    """Write each label above and right of its point, or left where it would not fit, so it
    stays inside the axes (beside the point in the top eighth, clear of the title); points that
    coincide on the figure (within 2% of both ranges, e.g. several collapsed models at rate 0)
    share one label, "a, b". Set the limits first."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    width = ax.get_position().width * ax.figure.get_figwidth() * 72  # the axes, in points
    groups: list[tuple[float, float, list[str]]] = []
    for x, y, label in zip(xs, ys, labels):
        for gx, gy, names in groups:
            if abs(x - gx) <= 0.02 * (x1 - x0) and abs(y - gy) <= 0.02 * (y1 - y0):
                names.append(str(label))
                break
        else:
            groups.append((x, y, [str(label)]))
    renderer = ax.figure.canvas.get_renderer()
    placed = []  # the boxes of the labels written so far, in display units
    for x, y, names in groups:
        text = ", ".join(names)
        right = (x - x0) / (x1 - x0) + (8 + 0.6 * fontsize * len(text)) / width <= 0.97
        top = (y - y0) / (y1 - y0) > 0.88
        dx = 4 if right else -4
        # above the point; below it, then on the other side, where that would cover a label
        # already written (points close along a curve, e.g. the small-β end of a β sweep)
        tries = ([((6 if right else -6, 0), "center", right)] if top else
                 [((dx, 4), "bottom", right), ((dx, -4), "top", right),
                  ((-dx, 4), "bottom", not right)])
        for offset, va, to_right in tries:
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=offset,
                                ha="left" if to_right else "right", va=va, fontsize=fontsize)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or offset == tries[-1][0]:
                break
            label.remove()
        placed.append(box)


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
