"""Procedural dSprites: the dSprites images rendered on the fly on the original factor grid.

dSprites (Matthey, Higgins, Hassabis and Lerchner 2017, "dSprites: Disentanglement testing
Sprites dataset", https://github.com/deepmind/dsprites-dataset) consists of 64x64 binary images
of one white sprite on black, generated from independent factors on a grid. Nothing is
downloaded here: images are rendered from their factors with NumPy. The factor grid and the
index order are the original's; the sprites themselves are drawn by the geometry below, so the
images resemble the original ones but are not pixel-identical to them.

Factors (index ranges and values, as in the original):

    ===========  ====  ==========================================================
    factor       size  values
    ===========  ====  ==========================================================
    shape        3     0 = square, 1 = ellipse, 2 = heart
    scale        6     np.linspace(0.5, 1.0, 6)
    orientation  40    np.linspace(0.0, 2*pi, 40), radians; index 0 and 39 are the
                       same angle (both ends included, as in the original) and
                       render identical images
    pos_x        32    np.linspace(0.0, 1.0, 32)
    pos_y        32    np.linspace(0.0, 1.0, 32)
    ===========  ====  ==========================================================

The original's sixth factor, 'color' (size 1, always white), is left out: it carries no
information. 3*6*40*32*32 = 737,280 grid points (NUM_IMAGES). Grid points are numbered as in the
original, mixed radix with the LAST factor fastest:

    index = (((shape*6 + scale)*40 + orientation)*32 + pos_x)*32 + pos_y

Geometry. Pixel (row r, column c) has its centre at p = ((c + 0.5)/64, (r + 0.5)/64) in the
unit square: x grows to the right with the column, y grows DOWNWARD with the row. A pixel is 1.0
when its centre lies inside the sprite (no anti-aliasing), else 0.0. The sprite centre is
``0.2 + 0.6 * (pos_x, pos_y)`` (so it stays in [0.2, 0.8]^2) and its size is
``R = 0.15 * scale`` (R is at most 0.15, i.e. 9.6 pixels). A pixel centre is mapped to local
sprite coordinates (u, v), with (dx, dy) = p - centre in the image's y-down frame:

    u = ( cos(theta) * dx - sin(theta) * dy) / R
    v = ( sin(theta) * dx + cos(theta) * dy) / R

so the sprite turns COUNTER-CLOCKWISE on screen as the orientation theta grows (at theta = pi/2
what points right at theta = 0 points up). In the usual y-up frame (x, -y) this is
(u, -v) = Rot(-theta) (dx, -dy) / R. At theta = 0, u points right and v points down, like x and
y. theta is reduced modulo 2*pi first, so orientation index 39 (2*pi) renders bit-identically
to index 0. The shapes, in local coordinates:

* square:  max(|u|, |v|) <= 0.65  (corners at radius 0.919);
* ellipse: (u / 0.95)^2 + (v / 0.5)^2 <= 1  (long axis along u, so its period is pi);
* heart:   (X^2 + Y^2 - 1)^3 - X^2 Y^3 <= 0 with X = 1.45 u, Y = 0.25 - 1.45 v. The classic
  heart curve spans X in [-1.139, 1.139], Y in [-1, 1.236] and its smallest enclosing circle
  has centre (0, 0.25) and radius 1.25, so the heart lies within radius 1.25/1.45 = 0.862 of the
  sprite centre, with its lobes up and its tip pointing down (+v) at theta = 0.

Every shape therefore lies inside the unit disc u^2 + v^2 <= 1, so every sprite stays within
0.15 of its centre and never reaches the 3 outermost pixels of the image. Areas, in units of
R^2: square 1.69, ellipse 1.49, heart 1.74 (3.662 / 1.45^2); at scale 1 (R = 9.6 pixels) that is
about 156, 137 and 160 pixels.
"""

from __future__ import annotations

import operator

import numpy as np

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
SHAPES = ("square", "ellipse", "heart")
IMAGE_SHAPE = (64, 64)
NUM_IMAGES = 737280

#: Sprite centre = _POS_OFFSET + _POS_SPAN * pos, size R = _MAX_RADIUS * scale (unit-square units).
_POS_OFFSET = 0.2
_POS_SPAN = 0.6
_MAX_RADIUS = 0.15
#: Shape constants in local (u, v) coordinates; see the module docstring.
_SQUARE_HALF_SIDE = 0.65
_ELLIPSE_AXES = (0.95, 0.5)
_HEART_SCALE = 1.45
_HEART_SHIFT = 0.25


def _check_count(n, what: str, upper: int | None = None) -> int:
    """n as a Python int, checked to be an integer in [0, upper]."""
    if isinstance(n, bool):
        raise ValueError(f"{what} must be a non-negative integer; got {n!r}")
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"{what} must be a non-negative integer; got {n!r}") from None
    if n < 0:
        raise ValueError(f"{what} must be a non-negative integer; got {n}")
    if upper is not None and n > upper:
        raise ValueError(f"{what} must be at most {upper}; got {n}")
    return n


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); "
                        f"got {type(rng).__name__}")
    return rng


def _as_int_array(x, name: str) -> np.ndarray:
    """x as an int64 array; ValueError unless its dtype is integer (bools are refused too)."""
    a = np.asarray(x)
    if a.size == 0 and a.dtype.kind == "f":
        # An empty list comes in as float64; an empty batch is still a valid batch.
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers; got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_factors(factors) -> np.ndarray:
    """factors as an (N, 5) int64 array, each column checked against its factor's range."""
    f = _as_int_array(factors, "factors")
    if f.ndim != 2 or f.shape[1] != len(FACTOR_NAMES):
        raise ValueError(f"factors must have shape (N, {len(FACTOR_NAMES)}), one column per factor "
                         f"{FACTOR_NAMES}; got shape {f.shape}")
    for j, (name, size) in enumerate(zip(FACTOR_NAMES, FACTOR_SIZES)):
        col = f[:, j]
        if col.size and (col.min() < 0 or col.max() >= size):
            raise ValueError(f"factor {name!r} (column {j}) must lie in [0, {size - 1}]; got "
                             f"values from {col.min()} to {col.max()}")
    return f


def factor_values() -> dict[str, np.ndarray]:
    """The values on each factor's grid, by factor name, as fresh float64 arrays.

    shape: [0., 1., 2.] (square, ellipse, heart); scale: np.linspace(0.5, 1.0, 6);
    orientation: np.linspace(0, 2*pi, 40) in radians; pos_x and pos_y: np.linspace(0, 1, 32).
    These are the grids of dSprites (Matthey et al. 2017), without its constant 'color'.
    """
    return {
        "shape": np.arange(3, dtype=np.float64),
        "scale": np.linspace(0.5, 1.0, 6),
        "orientation": np.linspace(0.0, 2.0 * np.pi, 40),
        "pos_x": np.linspace(0.0, 1.0, 32),
        "pos_y": np.linspace(0.0, 1.0, 32),
    }


def factors_to_index(factors) -> np.ndarray:
    """Flat grid index of each row of factor indices.

    factors: (N, 5) integer array of factor indices (shape, scale, orientation, pos_x, pos_y),
    each within its factor's range. Returns (N,) int64 in [0, NUM_IMAGES), numbered as in the
    original dSprites (mixed radix, last factor fastest).
    """
    f = _check_factors(factors)
    index = np.zeros(f.shape[0], dtype=np.int64)
    for j, size in enumerate(FACTOR_SIZES):
        index = index * size + f[:, j]
    return index


def index_to_factors(index) -> np.ndarray:
    """Factor indices of each flat grid index; the inverse of `factors_to_index`.

    index: (N,) integer array with values in [0, NUM_IMAGES). Returns (N, 5) int64 factor
    indices in the order of FACTOR_NAMES.
    """
    idx = _as_int_array(index, "index")
    if idx.ndim != 1:
        raise ValueError(f"index must have shape (N,); got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= NUM_IMAGES):
        raise ValueError(f"index must lie in [0, {NUM_IMAGES - 1}]; got values from {idx.min()} "
                         f"to {idx.max()}")
    factors = np.empty((idx.shape[0], len(FACTOR_SIZES)), dtype=np.int64)
    rest = idx.copy()
    for j in range(len(FACTOR_SIZES) - 1, -1, -1):
        rest, factors[:, j] = np.divmod(rest, FACTOR_SIZES[j])
    return factors


def sample_factors(n: int, rng: np.random.Generator) -> np.ndarray:
    """n grid points with every factor drawn uniformly and independently (with replacement).

    Returns (n, 5) int64 factor indices in the order of FACTOR_NAMES; rows may repeat.
    """
    n = _check_count(n, "n")
    rng = _check_rng(rng)
    return rng.integers(0, np.asarray(FACTOR_SIZES), size=(n, len(FACTOR_SIZES)), dtype=np.int64)


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of the local points (u, v) that lie inside sprite `shape` (0, 1 or 2)."""
    if shape == 0:
        return np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF_SIDE
    if shape == 1:
        a, b = _ELLIPSE_AXES
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    # Y is flipped so the heart's lobes sit at -v (up on screen) and its tip at +v.
    x2 = (_HEART_SCALE * u) ** 2
    y = _HEART_SHIFT - _HEART_SCALE * v
    return (x2 + y * y - 1.0) ** 3 - x2 * y ** 3 <= 0.0


def _render_chunk(f: np.ndarray, out: np.ndarray) -> None:
    """Draw the sprites of (n, 5) checked int64 factors into out, (n, 64, 64) float32 zeros."""
    values = factor_values()
    height, width = IMAGE_SHAPE
    n = f.shape[0]
    cx = _POS_OFFSET + _POS_SPAN * values["pos_x"][f[:, 3]]
    cy = _POS_OFFSET + _POS_SPAN * values["pos_y"][f[:, 4]]
    radius = _MAX_RADIUS * values["scale"][f[:, 1]]
    # mod 2*pi maps the duplicated endpoint 2*pi to exactly 0.0, so index 39 == index 0 bitwise.
    theta = np.mod(values["orientation"][f[:, 2]], 2.0 * np.pi)
    cos_r = (np.cos(theta) / radius)[:, None, None]
    sin_r = (np.sin(theta) / radius)[:, None, None]
    # Every sprite lies within R <= _MAX_RADIUS of its centre, so only a small window around the
    # centre can be lit: evaluating the shapes there instead of on all 64x64 pixels is ~8x less
    # work. The window reaches at least one pixel beyond the disc on each side.
    half = int(np.ceil(_MAX_RADIUS * max(height, width))) + 1
    size = 2 * half + 1
    row0 = np.clip(np.rint(cy * height - 0.5).astype(np.int64) - half, 0, height - size)
    col0 = np.clip(np.rint(cx * width - 0.5).astype(np.int64) - half, 0, width - size)
    rows = row0[:, None] + np.arange(size)  # (n, size)
    cols = col0[:, None] + np.arange(size)
    dx = ((cols + 0.5) / width - cx[:, None])[:, None, :]  # (n, 1, size)
    dy = ((rows + 0.5) / height - cy[:, None])[:, :, None]  # (n, size, 1)
    window = np.zeros((n, size, size), dtype=bool)
    for shape in range(len(SHAPES)):
        sel = np.flatnonzero(f[:, 0] == shape)
        if sel.size:
            u = cos_r[sel] * dx[sel] - sin_r[sel] * dy[sel]
            v = sin_r[sel] * dx[sel] + cos_r[sel] * dy[sel]
            window[sel] = _inside(shape, u, v)
    out[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = window


def render(factors, chunk: int = 2048) -> np.ndarray:
    """Render the dSprites image of each row of factor indices.

    factors: (N, 5) integer array of factor indices (shape, scale, orientation, pos_x, pos_y).
    chunk: images rendered per vectorised step (a positive integer). Besides the (N, 4096)
    result, working memory is O(chunk): the shapes are evaluated, as (chunk, 23, 23) arrays,
    only on the 23x23 pixels around each sprite centre, which contain the whole sprite.
    Returns (N, 4096) float32 of 0.0/1.0, each 64x64 image flattened row-major (row = y growing
    downward, column = x growing rightward). The geometry is in the module docstring; the factor
    grid is that of dSprites (Matthey et al. 2017). Deterministic: the same factors always give
    the same images.
    """
    f = _check_factors(factors)
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    chunk = int(chunk)
    n_pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    images = np.zeros((f.shape[0], n_pixels), dtype=np.float32)
    for start in range(0, f.shape[0], chunk):
        stop = min(start + chunk, f.shape[0])
        _render_chunk(f[start:stop], images[start:stop].reshape(stop - start, *IMAGE_SHAPE))
    return images


def sample(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n DISTINCT grid points drawn uniformly without replacement, and their images.

    n: 0 <= n <= NUM_IMAGES. Returns (factors, images): factors (n, 5) int64 factor indices in
    random order, images (n, 4096) float32 0.0/1.0 as from `render`. The same seed gives the same
    draw. Grid and index order as in dSprites (Matthey et al. 2017).
    """
    n = _check_count(n, "n", upper=NUM_IMAGES)
    rng = _check_rng(rng)
    index = rng.choice(NUM_IMAGES, size=n, replace=False)
    factors = index_to_factors(index)
    return factors, render(factors)
