"""Procedural dSprites: factor grid, index order, rendering geometry, sampling and validation."""

from __future__ import annotations

import numpy as np
import pytest

from ppl_vae.groundtruth import dsprites as ds

SHAPE, SCALE, ORIENT, POS_X, POS_Y = range(5)


def grid_point(shape=0, scale=5, orientation=0, pos_x=15, pos_y=15):
    return [shape, scale, orientation, pos_x, pos_y]


def images(rows) -> np.ndarray:
    """Render a list of factor rows as (N, 64, 64) images."""
    return ds.render(np.asarray(rows, dtype=np.int64)).reshape(-1, *ds.IMAGE_SHAPE)


def centroid(image: np.ndarray) -> tuple[float, float]:
    """(row, column) centre of mass of the lit pixels of one (64, 64) image."""
    r, c = np.nonzero(image)
    return float(r.mean()), float(c.mean())


def centre_px(pos_x: int, pos_y: int) -> tuple[float, float]:
    """Documented sprite centre as (row, column) in pixel units (pixel k's centre is at k)."""
    v = ds.factor_values()
    cx = 0.2 + 0.6 * v["pos_x"][pos_x]
    cy = 0.2 + 0.6 * v["pos_y"][pos_y]
    return cy * 64 - 0.5, cx * 64 - 0.5


def reference_render(factors: np.ndarray) -> np.ndarray:
    """The module docstring's geometry evaluated on every pixel, one image at a time."""
    v = ds.factor_values()
    centres = (np.arange(64) + 0.5) / 64
    px, py = np.meshgrid(centres, centres)  # px varies along columns, py along rows
    out = []
    for shape, scale, orient, pos_x, pos_y in factors:
        radius = 0.15 * v["scale"][scale]
        theta = v["orientation"][orient] % (2 * np.pi)
        dx = px - (0.2 + 0.6 * v["pos_x"][pos_x])
        dy = py - (0.2 + 0.6 * v["pos_y"][pos_y])
        u = (np.cos(theta) * dx - np.sin(theta) * dy) / radius
        w = (np.sin(theta) * dx + np.cos(theta) * dy) / radius
        if shape == 0:
            inside = np.maximum(np.abs(u), np.abs(w)) <= 0.65
        elif shape == 1:
            inside = (u / 0.95) ** 2 + (w / 0.5) ** 2 <= 1
        else:
            x, y = 1.45 * u, 0.25 - 1.45 * w
            inside = (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
        out.append(inside.astype(np.float32).ravel())
    return np.stack(out)


# ---- constants, factor grid and index order -------------------------------------------------
def test_constants_are_consistent():
    assert ds.FACTOR_NAMES == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert ds.FACTOR_SIZES == (3, 6, 40, 32, 32)
    assert ds.SHAPES == ("square", "ellipse", "heart")
    assert ds.IMAGE_SHAPE == (64, 64)
    assert ds.NUM_IMAGES == int(np.prod(ds.FACTOR_SIZES)) == 737280


def test_factor_values_match_the_original_grid():
    v = ds.factor_values()
    assert tuple(v) == ds.FACTOR_NAMES
    for name, size in zip(ds.FACTOR_NAMES, ds.FACTOR_SIZES):
        assert v[name].shape == (size,) and v[name].dtype == np.float64, name
    np.testing.assert_array_equal(v["shape"], [0.0, 1.0, 2.0])
    np.testing.assert_allclose(v["scale"], [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], rtol=0, atol=1e-12)
    assert v["orientation"][0] == 0.0 and v["orientation"][-1] == 2 * np.pi
    np.testing.assert_allclose(np.diff(v["orientation"]), 2 * np.pi / 39, rtol=1e-12)
    for name in ("pos_x", "pos_y"):
        assert v[name][0] == 0.0 and v[name][-1] == 1.0
        np.testing.assert_allclose(np.diff(v[name]), 1 / 31, rtol=1e-12)
    v["scale"][0] = 99.0  # fresh arrays: mutating one copy changes no later call
    assert ds.factor_values()["scale"][0] == 0.5


def test_index_order_last_factor_fastest():
    np.testing.assert_array_equal(ds.index_to_factors([0]), [[0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(ds.index_to_factors([1]), [[0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(ds.index_to_factors([32]), [[0, 0, 0, 1, 0]])
    np.testing.assert_array_equal(ds.index_to_factors([32 * 32 * 40]), [[0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(ds.index_to_factors([ds.NUM_IMAGES - 1]), [[2, 5, 39, 31, 31]])
    assert ds.factors_to_index([[1, 2, 3, 4, 5]])[0] == (((1 * 6 + 2) * 40 + 3) * 32 + 4) * 32 + 5


def test_full_grid_maps_onto_arange_in_order():
    grid = np.indices(ds.FACTOR_SIZES).reshape(len(ds.FACTOR_SIZES), -1).T
    index = ds.factors_to_index(grid)
    assert index.dtype == np.int64
    np.testing.assert_array_equal(index, np.arange(ds.NUM_IMAGES))
    np.testing.assert_array_equal(ds.index_to_factors(index), grid)


def test_index_round_trip_random_and_extreme():
    rng = np.random.default_rng(0)
    index = np.concatenate([rng.integers(0, ds.NUM_IMAGES, 5000),
                            [0, 1, 31, 32, 1023, 1024, ds.NUM_IMAGES - 2, ds.NUM_IMAGES - 1]])
    factors = ds.index_to_factors(index)
    assert factors.shape == (index.size, 5) and factors.dtype == np.int64
    assert (factors >= 0).all() and (factors < np.array(ds.FACTOR_SIZES)).all()
    np.testing.assert_array_equal(ds.factors_to_index(factors), index)
    f = ds.sample_factors(5000, rng)
    np.testing.assert_array_equal(ds.index_to_factors(ds.factors_to_index(f)), f)
    # Other integer dtypes and empty batches are accepted.
    np.testing.assert_array_equal(ds.factors_to_index(f.astype(np.int16)), ds.factors_to_index(f))
    assert ds.factors_to_index(np.zeros((0, 5), np.int64)).shape == (0,)
    assert ds.index_to_factors([]).shape == (0, 5)


# ---- rendering ------------------------------------------------------------------------------
def test_render_dtype_values_shape_and_determinism():
    f = ds.sample_factors(300, np.random.default_rng(1))
    x = ds.render(f)
    assert x.shape == (300, 4096) and x.dtype == np.float32 and x.flags.c_contiguous
    assert set(np.unique(x)) <= {0.0, 1.0}
    assert (x.sum(axis=1) > 0).all()  # every image shows a sprite
    np.testing.assert_array_equal(ds.render(f), x)
    np.testing.assert_array_equal(ds.render(f, chunk=7), x)  # chunking changes nothing
    assert ds.render(np.zeros((0, 5), np.int64)).shape == (0, 4096)


def test_render_matches_the_documented_geometry():
    rng = np.random.default_rng(2)
    corners = [[s, 5, o, px, py] for s in range(3) for o in (0, 7, 39)
               for px in (0, 31) for py in (0, 31)]
    f = np.concatenate([ds.sample_factors(60, rng), np.asarray(corners)])
    expected = reference_render(f)
    got = ds.render(f)
    # Exact equality up to float rounding of pixel centres that sit on a sprite's boundary.
    assert np.abs(got - expected).sum(axis=1).max() <= 1


def test_orientation_endpoints_render_identically():
    rows0 = [grid_point(s, k, 0, px, py) for s in range(3) for k in (0, 5)
             for px, py in ((0, 0), (13, 22), (31, 31))]
    rows39 = [r[:ORIENT] + [39] + r[ORIENT + 1:] for r in rows0]
    np.testing.assert_array_equal(images(rows0), images(rows39))


def test_ellipse_rotation_matters_square_nearly_symmetric():
    # Orientation index 10 is 10/39 * 2 pi ~ 0.51 pi: a quarter turn, a little more.
    ellipse = images([grid_point(1, 5, 0), grid_point(1, 5, 10)])
    square = images([grid_point(0, 5, 0), grid_point(0, 5, 10)])
    ellipse_diff = np.sum(ellipse[0] != ellipse[1])
    square_diff = np.sum(square[0] != square[1])
    assert ellipse_diff > 0.5 * ellipse[0].sum()
    assert square_diff < 0.15 * square[0].sum()
    assert square_diff < ellipse_diff / 4
    # A horizontal ellipse turned a quarter turn is (nearly) vertical.
    rows, cols = np.nonzero(ellipse[0])
    assert np.ptp(cols) > 1.5 * np.ptp(rows)
    rows, cols = np.nonzero(ellipse[1])
    assert np.ptp(rows) > 1.5 * np.ptp(cols)


def test_rotation_is_counter_clockwise_on_screen():
    # Orientation index 5 is ~46 degrees: a horizontal ellipse turned counter-clockwise on screen
    # runs from lower left to upper right, so row (downward) falls as column grows.
    rows, cols = np.nonzero(images([grid_point(1, 5, 5)])[0])
    assert np.corrcoef(rows, cols)[0, 1] < -0.5
    rows, cols = np.nonzero(images([grid_point(1, 5, 15)])[0])  # ~138 degrees: the other diagonal
    assert np.corrcoef(rows, cols)[0, 1] > 0.5


def assert_heart_points_down(image: np.ndarray, r0: float) -> None:
    """Lobes on top (the top row of the sprite is split by the notch), tip at the bottom."""
    rows, _ = np.nonzero(image)
    top = np.flatnonzero(image[rows.min()])
    bottom = np.flatnonzero(image[rows.max()])
    assert np.ptp(top) + 1 > top.size  # a gap between the two lobes
    widest = image.sum(axis=1).max()
    assert np.ptp(bottom) + 1 == bottom.size <= 0.3 * widest  # one narrow run: the tip
    # The tip lies 0.86 R below the centre, the lobes reach 0.68 R above it.
    assert rows.max() - r0 > r0 - rows.min()


@pytest.mark.parametrize("pos", [(15, 15), (0, 0), (31, 7), (20, 31)])
def test_heart_points_down_and_turns_counter_clockwise(pos):
    up, turned = images([grid_point(2, 5, 0, *pos), grid_point(2, 5, 10, *pos)])
    r0, c0 = centre_px(*pos)
    assert_heart_points_down(up, r0)
    # A counter-clockwise quarter turn makes it point right; turning the image a quarter turn
    # clockwise (rot90 with k=-1; row r, column c -> row c, column 63 - r) undoes that.
    assert_heart_points_down(np.rot90(turned, k=-1), c0)


def test_position_moves_the_centroid():
    for shape in range(3):
        along_x = images([grid_point(shape, 3, 4, px, 9) for px in range(32)])
        along_y = images([grid_point(shape, 3, 4, 20, py) for py in range(32)])
        cx = np.array([centroid(im) for im in along_x])
        cy = np.array([centroid(im) for im in along_y])
        assert (np.diff(cx[:, 1]) > 0).all(), shape
        assert np.ptp(cx[:, 0]) < 1.0, shape
        assert (np.diff(cy[:, 0]) > 0).all(), shape
        assert np.ptp(cy[:, 1]) < 1.0, shape
        # Each step moves the sprite by 0.6/31 of the image, ~1.24 pixels.
        np.testing.assert_allclose(np.diff(cx[:, 1]).mean(), 0.6 / 31 * 64, rtol=0.05)
        np.testing.assert_allclose(np.diff(cy[:, 0]).mean(), 0.6 / 31 * 64, rtol=0.05)


def test_square_and_ellipse_are_centred_on_the_documented_centre():
    for shape in (0, 1):
        for px, py in ((0, 0), (31, 0), (7, 25), (31, 31)):
            r, c = centroid(images([grid_point(shape, 4, 3, px, py)])[0])
            r0, c0 = centre_px(px, py)
            assert abs(r - r0) < 0.5 and abs(c - c0) < 0.5, (shape, px, py)


def test_area_grows_with_scale():
    rng = np.random.default_rng(3)
    base = ds.sample_factors(90, rng)
    base[:, SHAPE] = np.arange(90) % 3
    f = np.repeat(base, 6, axis=0)
    f[:, SCALE] = np.tile(np.arange(6), 90)
    x = ds.render(f).reshape(90, 6, 4096)
    # A larger sprite of the same kind at the same place contains the smaller one, pixel by pixel.
    assert (x[:, 1:] >= x[:, :-1]).all()
    area = x.sum(axis=2)
    for shape in range(3):
        mean_area = area[base[:, SHAPE] == shape].mean(axis=0)
        assert (np.diff(mean_area) > 0).all(), (shape, mean_area)
        # Area ~ R^2: scale 1 is about four times scale 0.5.
        assert 3.0 < mean_area[-1] / mean_area[0] < 5.0, (shape, mean_area)


def test_shapes_differ_and_have_comparable_areas():
    for orient in (0, 7):
        sq, el, he = images([grid_point(s, 5, orient) for s in range(3)])
        assert (sq != el).sum() > 20 and (sq != he).sum() > 20 and (el != he).sum() > 20
        areas = np.array([sq.sum(), el.sum(), he.sum()])
        assert areas.max() < 1.4 * areas.min(), areas
        assert 100 < areas.min() and areas.max() < 200, areas


def test_sprites_stay_inside_their_disc_and_off_the_border():
    extremes = [(0, 0), (0, 31), (31, 0), (31, 31), (0, 15), (15, 0), (31, 15), (15, 31)]
    rows = [[s, 5, o, px, py] for s in range(3) for o in range(0, 40, 3) for px, py in extremes]
    x = images(rows)
    assert (x.reshape(len(rows), -1).sum(axis=1) > 0).all()
    border = np.ones((64, 64), dtype=bool)
    border[2:-2, 2:-2] = False
    assert not x[:, border].any()
    # Every lit pixel centre lies within R = 0.15 (9.6 pixels) of the documented sprite centre.
    rr, cc = np.mgrid[0:64, 0:64]
    for im, (_, _, _, px, py) in zip(x, rows):
        r0, c0 = centre_px(px, py)
        lit = im > 0
        assert (np.hypot(rr[lit] - r0, cc[lit] - c0) <= 0.15 * 64).all()


# ---- sampling -------------------------------------------------------------------------------
def test_sample_distinct_reproducible_and_consistent():
    factors, x = ds.sample(3000, np.random.default_rng(4))
    assert factors.shape == (3000, 5) and factors.dtype == np.int64
    assert x.shape == (3000, 4096) and x.dtype == np.float32
    assert np.unique(ds.factors_to_index(factors)).size == 3000
    np.testing.assert_array_equal(x, ds.render(factors))
    again, x_again = ds.sample(3000, np.random.default_rng(4))
    np.testing.assert_array_equal(again, factors)
    np.testing.assert_array_equal(x_again, x)
    other, _ = ds.sample(3000, np.random.default_rng(5))
    assert not np.array_equal(other, factors)
    empty, x_empty = ds.sample(0, np.random.default_rng(0))
    assert empty.shape == (0, 5) and x_empty.shape == (0, 4096)


def test_sample_factors_in_range_and_roughly_uniform():
    n = 60000
    f = ds.sample_factors(n, np.random.default_rng(6))
    assert f.shape == (n, 5) and f.dtype == np.int64
    for j, size in enumerate(ds.FACTOR_SIZES):
        counts = np.bincount(f[:, j], minlength=size)
        assert counts.size == size and f[:, j].min() >= 0
        np.testing.assert_allclose(counts / n, 1 / size, rtol=0.15)
    # Factors are independent: no noticeable correlation between any two columns.
    corr = np.corrcoef(f.T)
    assert np.abs(corr[np.triu_indices(5, 1)]).max() < 0.03
    np.testing.assert_array_equal(ds.sample_factors(10, np.random.default_rng(7)),
                                  ds.sample_factors(10, np.random.default_rng(7)))


# ---- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [ds.factors_to_index, ds.render])
def test_bad_factors_raise(fn):
    with pytest.raises(ValueError, match=r"shape \(N, 5\).*got shape \(3, 4\)"):
        fn(np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        fn(np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="integers; got dtype float64"):
        fn(np.zeros((2, 5)))
    for j, (name, size) in enumerate(zip(ds.FACTOR_NAMES, ds.FACTOR_SIZES)):
        for bad in (-1, size):
            f = np.zeros((2, 5), np.int64)
            f[1, j] = bad
            with pytest.raises(ValueError, match=rf"'{name}' \(column {j}\) must lie in "
                                                 rf"\[0, {size - 1}\]; got values from"):
                fn(f)


def test_bad_index_raises():
    with pytest.raises(ValueError, match=r"\[0, 737279\]; got values from 0 to 737280"):
        ds.index_to_factors([0, ds.NUM_IMAGES])
    with pytest.raises(ValueError, match="got values from -1"):
        ds.index_to_factors([-1])
    with pytest.raises(ValueError, match=r"shape \(N,\); got shape \(2, 1\)"):
        ds.index_to_factors([[0], [1]])
    with pytest.raises(ValueError, match="integers"):
        ds.index_to_factors([0.5])


def test_bad_counts_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at most 737280; got 737281"):
        ds.sample(ds.NUM_IMAGES + 1, rng)
    for fn in (ds.sample, ds.sample_factors):
        with pytest.raises(ValueError, match="non-negative integer; got -1"):
            fn(-1, rng)
        with pytest.raises(ValueError, match="non-negative integer; got 2.5"):
            fn(2.5, rng)
        with pytest.raises(TypeError, match="numpy.random.Generator"):
            fn(3, 0)
    for chunk in (0, -3, 1.5):
        with pytest.raises(ValueError, match=f"chunk must be a positive integer; got {chunk}"):
            ds.render([grid_point()], chunk=chunk)
