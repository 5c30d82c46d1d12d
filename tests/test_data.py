"""Data loading: the digits, the IDX reader (on files written here and on the real MNIST test
set), MNIST folders, npz files, splits, limits, binarisation and every data error."""

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest

from ppl_vae.data import DataError, Dataset, binarize, check_support, load_data, read_idx
from ppl_vae.spec import LikelihoodSpec, Spec, SpecError, load_spec

MNIST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def spec(*overrides) -> Spec:
    return load_spec(Spec(), list(overrides))


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write `array` as an IDX file (big-endian values after the header); gzipped as path.gz."""
    big = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, IDX_CODES[big.dtype], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + big.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(folder: Path, prefix: str, n: int, side: int = 4, seed: int = 0,
                gz: bool = True) -> None:
    rng = np.random.default_rng(seed)
    write_idx(folder / f"{prefix}-images-idx3-ubyte",
              rng.integers(0, 256, (n, side, side), dtype=np.uint8), gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8),
              not gz)


def npz_spec(tmp_path: Path, *overrides, **arrays) -> Spec:
    np.savez(tmp_path / "d.npz", **arrays)
    return spec("data.source=npz", f'data.path="{tmp_path / "d.npz"}"', *overrides)


def assert_well_formed(d: Dataset) -> None:
    for x, labels in ((d.x_train, d.labels_train), (d.x_test, d.labels_test)):
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 2
        assert labels.dtype == np.int64 and labels.shape == (len(x),)
        assert x.shape[1] == d.dim
    if d.image_shape is not None:
        assert d.image_shape[0] * d.image_shape[1] == d.dim


# ---- digits ---------------------------------------------------------------------------------
def test_digits_shapes_ranges_labels():
    d = load_data(spec())
    assert_well_formed(d)
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64)  # 359 = round(0.2*1797)
    assert d.image_shape == (8, 8) and d.dim == 64 and d.name == "digits"
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    np.testing.assert_allclose(d.x_train * 16, np.round(d.x_train * 16), atol=1e-5)
    assert set(np.unique(d.labels_train)) == set(range(10))
    assert set(np.unique(d.labels_test)) == set(range(10))


def test_digits_are_scikit_learns_load_digits_over_16():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    d = load_data(spec())
    x = np.concatenate([d.x_train, d.x_test])
    labels = np.concatenate([d.labels_train, d.labels_test])
    order = np.lexsort(np.column_stack([x, labels]).T)  # compare as multisets of (image, label)
    ref = np.column_stack([bunch.data / 16.0, bunch.target])
    ref = ref[np.lexsort(ref.T)]
    np.testing.assert_array_equal(np.column_stack([x, labels])[order],
                                  ref.astype(np.float32))


def test_split_is_reproducible_and_follows_the_seed():
    d, again, other = load_data(spec()), load_data(spec()), load_data(spec("train.seed=1"))
    np.testing.assert_array_equal(d.x_test, again.x_test)
    np.testing.assert_array_equal(d.labels_train, again.labels_train)
    assert not np.array_equal(d.x_test, other.x_test)


def test_test_fraction_sets_the_split_size():
    d = load_data(spec("data.test_fraction=0.5"))
    assert (len(d.x_train), len(d.x_test)) == (899, 898)  # round(898.5) = 898 (half to even)


def test_limit_keeps_the_first_examples_of_each_split():
    full, d = load_data(spec()), load_data(spec("data.limit=100"))
    assert len(d.x_train) == 100 and len(d.x_test) == 100
    np.testing.assert_array_equal(d.x_train, full.x_train[:100])
    np.testing.assert_array_equal(d.labels_test, full.labels_test[:100])
    big = load_data(spec("data.limit=1000"))  # more than the test split holds: all of it
    assert len(big.x_train) == 1000 and len(big.x_test) == 359


def test_static_binarisation_is_binary_reproducible_and_keeps_the_split():
    d = load_data(spec("data.limit=200", "data.binarize=static"))
    assert_well_formed(d)
    assert set(np.unique(d.x_train)) == {0.0, 1.0} and set(np.unique(d.x_test)) == {0.0, 1.0}
    again = load_data(spec("data.limit=200", "data.binarize=static"))
    np.testing.assert_array_equal(d.x_train, again.x_train)
    np.testing.assert_array_equal(d.x_test, again.x_test)
    grey = load_data(spec("data.limit=200"))
    np.testing.assert_array_equal(grey.labels_train, d.labels_train)
    # each pixel is a draw from its grey value: where the grey image is 0 or 1 the draw equals it
    sure = (grey.x_train == 0) | (grey.x_train == 1)
    np.testing.assert_array_equal(d.x_train[sure], grey.x_train[sure])
    assert abs(d.x_train.mean() - grey.x_train.mean()) < 0.01


def test_dynamic_binarisation_leaves_grey_values():
    d = load_data(spec("data.binarize=dynamic"))
    np.testing.assert_array_equal(d.x_train, load_data(spec()).x_train)
    assert len(np.unique(d.x_train)) == 17


def test_binarize_draws_with_the_given_probability():
    x = np.full((400, 50), 0.3, np.float32)
    b = binarize(x, np.random.default_rng(0))
    assert b.dtype == np.float32 and b.shape == x.shape and set(np.unique(b)) == {0.0, 1.0}
    assert abs(b.mean() - 0.3) < 0.01  # sd of the mean is 0.0032
    np.testing.assert_array_equal(b, binarize(x, np.random.default_rng(0)))
    edges = binarize(np.array([[0.0, 1.0]] * 100, np.float32), np.random.default_rng(1))
    assert (edges[:, 0] == 0).all() and (edges[:, 1] == 1).all()


# ---- IDX ------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips(tmp_path, gz):
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 256, (5, 4, 3), dtype=np.uint8),
        "labels": rng.integers(0, 10, 5).astype(np.uint8),
        "bytes": rng.integers(-128, 128, (3, 2), dtype=np.int8),
        "shorts": rng.integers(-30000, 30000, (7,), dtype=np.int16),
        "ints": rng.integers(-2**31, 2**31 - 1, (2, 2, 2, 2), dtype=np.int32),
        "floats": rng.normal(size=(2, 3)).astype(np.float32),
        "doubles": rng.normal(size=(4,)),
    }
    for name, array in arrays.items():
        back = read_idx(write_idx(tmp_path / name, array, gz))
        assert back.dtype == array.dtype and back.dtype.isnative and back.shape == array.shape
        np.testing.assert_array_equal(back, array)
        assert back.flags.writeable


def test_read_idx_recognises_gzip_by_content(tmp_path):
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    gz = write_idx(tmp_path / "x", images, gz=True)
    renamed = gz.rename(tmp_path / "no-suffix")
    np.testing.assert_array_equal(read_idx(renamed), images)


def test_read_idx_rejects_other_and_damaged_files(tmp_path):
    (tmp_path / "x").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "x")
    path = write_idx(tmp_path / "t", np.zeros((4, 4), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # header promises 3 sizes, holds half of one
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\0\0\x08\x01" + bytes(40))[:20])
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "bad.gz")


# ---- MNIST ----------------------------------------------------------------------------------
def _linked(folder: Path, source: Path, prefixes) -> Path:
    """`folder` with links to the IDX files of `source` whose names start with `prefixes`."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name.startswith(tuple(prefixes)):
            (folder / path.name).symlink_to(path)
    return folder


def test_real_mnist_test_files_alone_are_split_80_20(mnist_dir, tmp_path):
    """A folder holding only the 10k test files (how ../shared first shipped MNIST): split,
    seeded, into train and test by data.test_fraction."""
    folder = _linked(tmp_path / "t10k", mnist_dir, ["t10k-"])
    images = read_idx(next(folder.glob("t10k-images-idx3-ubyte*")))
    labels = read_idx(next(folder.glob("t10k-labels-idx1-ubyte*")))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == MNIST_LABEL_COUNTS
    d = load_data(spec("data.source=mnist", f'data.path="{folder}"', "data.test_fraction=0.25"))
    assert_well_formed(d)
    assert d.x_train.shape == (7500, 784) and d.x_test.shape == (2500, 784)
    assert d.image_shape == (28, 28) and d.name == f"mnist:{folder}"
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    all_labels = np.concatenate([d.labels_train, d.labels_test])
    assert np.bincount(all_labels).tolist() == MNIST_LABEL_COUNTS
    # the split keeps whole images with their labels: the pixel sums match the file's
    x = np.concatenate([d.x_train, d.x_test])
    np.testing.assert_allclose(np.sort(x.sum(axis=1) * 255),
                               np.sort(images.reshape(10000, -1).sum(axis=1)), rtol=1e-5)
    check_support(d.x_train, LikelihoodSpec(kind="binomial", total_count=255), "mnist")


def test_real_mnist_folder_as_it_is(mnist_dir):
    """The folder the examples read, whichever it holds: with the train files, the standard
    60k/10k split in file order (data.test_fraction does not apply); without them, the test
    files split (the test above)."""
    d = load_data(spec("data.source=mnist", f'data.path="{mnist_dir}"', "data.test_fraction=0.25"))
    assert_well_formed(d)
    assert d.image_shape == (28, 28) and d.x_train.max() == 1.0
    if any(mnist_dir.glob("train-images-idx3-ubyte*")):
        assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)
        assert np.bincount(d.labels_train).tolist() == MNIST_TRAIN_LABEL_COUNTS
        assert np.bincount(d.labels_test).tolist() == MNIST_LABEL_COUNTS
        test_images = read_idx(next(mnist_dir.glob("t10k-images-idx3-ubyte*")))
        np.testing.assert_array_equal(np.rint(d.x_test * 255).astype(np.uint8),
                                      test_images.reshape(10000, -1))  # in file order
    else:
        assert d.x_train.shape == (7500, 784) and d.x_test.shape == (2500, 784)


def test_mnist_folder_with_train_files_uses_them(tmp_path):
    write_mnist(tmp_path, "train", 12, seed=1)
    write_mnist(tmp_path, "t10k", 4, seed=2, gz=False)
    d = load_data(spec("data.source=mnist", f'data.path="{tmp_path}"',
                       'likelihood.kind="binomial"', "likelihood.total_count=255"))
    assert_well_formed(d)
    assert len(d.x_train) == 12 and len(d.x_test) == 4 and d.image_shape == (4, 4)
    train = read_idx(tmp_path / "train-images-idx3-ubyte.gz").reshape(12, -1) / 255.0
    np.testing.assert_allclose(d.x_train, train, rtol=1e-6)  # in file order, not shuffled
    np.testing.assert_array_equal(d.labels_test, read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz"))


def test_mnist_folder_with_only_test_files_is_split(tmp_path):
    write_mnist(tmp_path, "t10k", 20)
    d = load_data(spec("data.source=mnist", f'data.path="{tmp_path}"', "data.test_fraction=0.25"))
    assert len(d.x_train) == 15 and len(d.x_test) == 5


def test_mnist_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*t10k-images-idx3-ubyte"):
        load_data(spec("data.source=mnist", f'data.path="{tmp_path / "nope"}"'))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no MNIST IDX files.*t10k-images-idx3-ubyte.*notes.txt"):
        load_data(spec("data.source=mnist", f'data.path="{tmp_path}"'))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 4, 4), np.uint8), gz=False)
    with pytest.raises(DataError, match="not t10k-labels-idx1-ubyte"):
        load_data(spec("data.source=mnist", f'data.path="{tmp_path}"'))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8), gz=False)
    with pytest.raises(DataError, match="for 3 images"):
        load_data(spec("data.source=mnist", f'data.path="{tmp_path}"'))


# ---- npz ------------------------------------------------------------------------------------
def test_npz_images_are_split_and_taken_as_they_are(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((50, 6, 6))
    d = load_data(npz_spec(tmp_path, x=x, labels=rng.integers(0, 3, 50)))
    assert_well_formed(d)
    assert d.x_train.shape == (40, 36) and d.x_test.shape == (10, 36) and d.image_shape == (6, 6)
    assert d.name == f"npz:{tmp_path / 'd.npz'}"
    pooled = np.concatenate([d.x_train, d.x_test])
    np.testing.assert_array_equal(np.sort(pooled.sum(axis=1)),
                                  np.sort(x.reshape(50, -1).astype(np.float32).sum(axis=1)))


def test_npz_with_its_own_test_split(tmp_path):
    rng = np.random.default_rng(0)
    x, x_test = rng.random((30, 5)), rng.random((7, 5))
    d = load_data(npz_spec(tmp_path, x=x, x_test=x_test, labels_test=np.arange(7)))
    assert_well_formed(d)
    assert d.x_train.shape == (30, 5) and d.x_test.shape == (7, 5) and d.image_shape is None
    np.testing.assert_array_equal(d.x_train, x.astype(np.float32))  # not shuffled, not scaled
    np.testing.assert_array_equal(d.x_test, x_test.astype(np.float32))
    assert (d.labels_train == -1).all() and d.labels_test.tolist() == list(range(7))


@pytest.mark.parametrize("shape", [(10, 4, 6, 1), (10, 1, 4, 6)])
def test_npz_one_channel_images(tmp_path, shape):
    d = load_data(npz_spec(tmp_path, x=np.full(shape, 0.5)))
    assert d.image_shape == (4, 6) and d.dim == 24


@pytest.mark.parametrize("arrays, overrides, message", [
    pytest.param({"x": np.where(np.arange(30).reshape(10, 3) == 7, np.nan, 0.5)}, (),
                 "1 value(s) are NaN or infinite", id="nan"),
    pytest.param({"x": np.full((10, 3), 0.5), "x_test": np.full((4, 3), np.inf)}, (),
                 "(test split): 12 value(s) are NaN or infinite (in 4", id="inf-in-test"),
    pytest.param({"x": np.full((10, 3), 1.5)}, (), "outside the [0, 1] that a bernoulli",
                 id="bernoulli-support"),
    pytest.param({"x": np.full((10, 3), 0.3)}, ('likelihood.kind="binomial"',),
                 "set likelihood.total_count = 10", id="binomial-off-grid"),
    pytest.param({"x": np.arange(30).reshape(10, 3) / 255}, ('likelihood.kind="binomial"',),
                 "set likelihood.total_count = 255", id="binomial-255-grid"),
    pytest.param({"x": np.random.default_rng(0).random((10, 3))},
                 ('likelihood.kind="binomial"',), 'total_count = 16 needs', id="binomial-noise"),
    pytest.param({"x": np.full((10, 3), 0.3)}, ('likelihood.kind="categorical"',),
                 "set likelihood.categories = 11", id="categorical-off-grid"),
    pytest.param({"x": np.zeros((10, 3)), "labels": np.zeros(9)}, (),
                 "(9 entries) for 10 examples", id="labels-length"),
    pytest.param({"x": np.zeros((10, 3)), "labels": np.full(10, 0.5)}, (),
                 "non-integer", id="labels-fractional"),
    pytest.param({"x": np.zeros((10, 3)), "x_test": np.zeros((2, 4))}, (), "must match",
                 id="x-test-shape"),
    pytest.param({"x": np.zeros((10, 3)), "labels_test": np.zeros(2)}, (), "no 'x_test'",
                 id="labels-test-alone"),
    pytest.param({"x": np.zeros(10)}, (), "expected (N, D)", id="1-d"),
    pytest.param({"x": np.zeros((10, 4, 4, 3))}, (), "one-channel", id="rgb"),
    pytest.param({"x": np.zeros((0, 3))}, (), "at least one example", id="empty"),
    pytest.param({"x": np.zeros((1, 3))}, (), "too few", id="one-example"),
    pytest.param({"y": np.zeros((10, 3))}, (), "needs one named 'x'", id="no-x"),
    pytest.param({"x": np.zeros((10, 3), complex)}, (), "complex values", id="complex"),
    pytest.param({"x": np.zeros((10, 3)), "entropy": np.array([1.0, 2.0])}, (),
                 "one finite number >= 0", id="entropy-not-scalar"),
    pytest.param({"x": np.zeros((10, 3)), "entropy": np.array(-1.0)}, (),
                 "one finite number >= 0", id="entropy-negative"),
    pytest.param({"x": np.zeros((10, 3)), "entropy": np.array(2.0)},
                 ('data.binarize="dynamic"',), "set data.binarize = 'none'",
                 id="entropy-with-binarize"),
])
def test_npz_errors(tmp_path, arrays, overrides, message):
    with pytest.raises(DataError) as err:
        load_data(npz_spec(tmp_path, *overrides, **arrays))
    assert message in str(err.value)


def test_npz_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist.*'x'"):
        load_data(spec("data.source=npz", f'data.path="{tmp_path / "x.npz"}"'))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot be read as an .npz"):
        load_data(spec("data.source=npz", f'data.path="{tmp_path / "junk.npz"}"'))
    np.save(tmp_path / "plain.npy", np.zeros((4, 3)))
    with pytest.raises(DataError, match="cannot be read as an .npz"):
        load_data(spec("data.source=npz", f'data.path="{tmp_path / "plain.npy"}"'))


def test_gaussian_accepts_any_finite_values(tmp_path):
    d = load_data(npz_spec(tmp_path, 'likelihood.kind="gaussian"', x=np.full((10, 3), -7.0)))
    assert d.x_train.min() == -7


# ---- check_support on its own -------------------------------------------------------------
def test_check_support_grids():
    on16 = np.arange(17, dtype=np.float32)[None, :] / 16
    check_support(on16, LikelihoodSpec(kind="binomial", total_count=16), "x")
    check_support(on16, LikelihoodSpec(kind="binomial", total_count=32), "x")  # a finer grid
    check_support(on16, LikelihoodSpec(kind="categorical", categories=17), "x")
    check_support(on16, LikelihoodSpec(kind="bernoulli"), "x")
    with pytest.raises(DataError, match="set likelihood.total_count = 16"):
        check_support(on16, LikelihoodSpec(kind="binomial", total_count=255), "x")
    with pytest.raises(DataError, match="set likelihood.categories = 17"):
        check_support(on16, LikelihoodSpec(kind="categorical", categories=256), "x")
    # the tolerance is absolute (1e-4 on y * total_count), whatever total_count is
    near = np.array([[100 / 255 + 3e-4 / 255]], np.float64)
    with pytest.raises(DataError, match="1 value"):
        check_support(near, LikelihoodSpec(kind="binomial", total_count=255), "x")


def test_check_support_gaussian_needs_finite_values():
    check_support(np.array([[-1e6, 3.0]]), LikelihoodSpec(kind="gaussian"), "x")
    with pytest.raises(DataError, match="where: 1 value"):
        check_support(np.array([[0.0, np.nan]]), LikelihoodSpec(kind="gaussian"), "where")


# ---- conv networks need images ------------------------------------------------------------
def test_conv_needs_images(tmp_path):
    with pytest.raises(SpecError, match="encoder.kind.*flat") as err:
        load_data(npz_spec(tmp_path, 'encoder.kind="conv"', x=np.zeros((10, 16))))
    assert err.value.key == "encoder.kind"
    with pytest.raises(SpecError, match="decoder.channels.*6x6") as err:
        load_data(npz_spec(tmp_path, 'decoder.kind="conv"', "decoder.channels=[4, 4]",
                           x=np.zeros((10, 6, 6))))
    assert err.value.key == "decoder.channels"
    d = load_data(npz_spec(tmp_path, 'encoder.kind="conv"', 'decoder.kind="conv"',
                           "encoder.channels=[4, 4]", "decoder.channels=[4, 4]",
                           x=np.zeros((10, 8, 8))))
    assert d.image_shape == (8, 8)


# ---- generated sources ----------------------------------------------------------------------
def test_synthetic_population_with_its_exact_entropy():
    from ppl_vae.groundtruth.populations import bars

    d = load_data(spec('data.source="synthetic:bars"', "data.size=1000"))
    assert_well_formed(d)
    assert d.x_train.shape == (800, 16) and d.x_test.shape == (200, 16)
    assert d.image_shape == (4, 4) and d.name == "synthetic:bars"
    assert d.entropy == bars().entropy() and 5 < d.entropy < 6
    assert set(np.unique(d.x_train)) == {0.0, 1.0} and set(np.unique(d.labels_train)) <= set(
        range(8))
    assert d.factors_train is None
    again = load_data(spec('data.source="synthetic:bars"', "data.size=1000"))
    np.testing.assert_array_equal(again.x_test, d.x_test)  # seeded by train.seed
    other = load_data(spec('data.source="synthetic:bars"', "data.size=1000", "train.seed=1"))
    assert not np.array_equal(other.x_train, d.x_train)


def test_dsprites_keeps_the_factors_of_every_example():
    from ppl_vae.groundtruth import dsprites

    d = load_data(spec("data.source=dsprites", "data.size=300", "data.test_fraction=0.1"))
    assert_well_formed(d)
    assert d.x_train.shape == (270, 4096) and d.x_test.shape == (30, 4096)
    assert d.image_shape == (64, 64) and d.name == "dsprites" and d.entropy is None
    assert d.factor_names == dsprites.FACTOR_NAMES and d.factor_sizes == dsprites.FACTOR_SIZES
    for x, factors, labels in ((d.x_train, d.factors_train, d.labels_train),
                               (d.x_test, d.factors_test, d.labels_test)):
        assert factors.dtype == np.int64 and factors.shape == (len(x), 5)
        np.testing.assert_array_equal(x, dsprites.render(factors))  # each image with its factors
        np.testing.assert_array_equal(labels, factors[:, 0])  # the label is the shape
    index = dsprites.factors_to_index(np.concatenate([d.factors_train, d.factors_test]))
    assert len(np.unique(index)) == 300  # distinct grid points


def test_labelled_keeps_a_seeded_few_labels():
    full = load_data(spec())
    d = load_data(spec("data.labelled=50"))
    assert (d.labels_train >= 0).sum() == 50
    known = d.labels_train >= 0
    np.testing.assert_array_equal(d.labels_train[known], full.labels_train[known])
    np.testing.assert_array_equal(d.labels_test, full.labels_test)  # test labels are all kept
    np.testing.assert_array_equal(d.x_train, full.x_train)  # the split does not move
    assert len(set(np.unique(d.labels_train[known]))) >= 8


@pytest.mark.parametrize("overrides, key", [
    (['data.source="synthetic:nope"'], "data.source"),
    (['data.source="nope"'], "data.source"),
    (["data.source=dsprites", 'data.path="x"'], "data.path"),
    (["data.size=10"], "data.size"),
    (["data.source=dsprites", "data.size=-1"], "data.size"),
    (["data.labelled=-3"], "data.labelled"),
    (['data.source="synthetic:bars"', 'encoder.kind="conv"'], "encoder.kind"),
])
def test_generated_source_spec_errors(overrides, key):
    with pytest.raises(SpecError) as err:
        spec(*overrides)
    assert err.value.key == key


def test_dsprites_size_beyond_the_grid():
    with pytest.raises(DataError, match="737280"):
        load_data(spec("data.source=dsprites", "data.size=800000"))


def test_an_npz_can_carry_the_entropy_of_its_population(tmp_path, capsys):
    """A known H(y) for user data: `Dataset.entropy`, and `eval` prints the lecture's bounds
    (−ELBO − H(y) ≥ 0, H(y) − distortion ≤ I_q ≤ rate) as for the synthetic sources."""
    from ppl_vae.cli import main

    rng = np.random.default_rng(0)
    x = (rng.random((400, 6)) < 0.3).astype(np.float32)  # 6 independent Bernoulli(0.3) pixels
    entropy = -6 * (0.3 * np.log(0.3) + 0.7 * np.log(0.7))
    spec_ = npz_spec(tmp_path, 'data.binarize="none"', x=x, entropy=np.array(entropy))
    data = load_data(spec_)
    assert data.entropy == pytest.approx(entropy)
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "spec.toml"), "--out", str(out), "--no-progress"]
    from ppl_vae.spec import spec_to_toml

    (tmp_path / "spec.toml").write_text(spec_to_toml(spec_.replace(
        train=dataclasses.replace(spec_.train, steps=50, log_every=10, eval_every=50,
                                  checkpoint_every=50))))
    assert main(args) == 0
    assert main(["eval", str(out), "--iwae-k", "10", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "H(y), exact" in text and "−ELBO − H(y)" in text


def test_an_mnist_path_that_is_a_file_says_so(tmp_path):
    (tmp_path / "images.npz").write_bytes(b"not a folder")
    with pytest.raises(DataError, match="is a file; data.source = 'mnist' reads a folder"):
        load_data(spec("data.source=mnist", f'data.path="{tmp_path / "images.npz"}"'))


def test_balanced_labels_keep_as_many_of_each_class():
    d = load_data(load_spec("vae_digits", ["data.labelled=50", "data.balanced_labels=true"]))
    kept = d.labels_train[d.labels_train >= 0]
    assert np.bincount(kept).tolist() == [5] * 10
    other = load_data(load_spec("vae_digits", ["data.labelled=50", "data.balanced_labels=true",
                                               "train.seed=1"]))
    assert not np.array_equal(other.labels_train, d.labels_train)  # a seeded choice per class
