"""Figures (matplotlib, imported lazily and drawn off-screen with the Agg canvas)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _figure(figsize):
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
    grid = np.full((nrows * (h + 1) + 1, ncols * (w + 1) + 1), 0.35)  # grey separators
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = img
    fig = _figure((max(3.0, ncols * 0.6), max(3.0, nrows * 0.6) + (0.4 if title else 0)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
