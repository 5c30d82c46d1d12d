"""Data loading: the digits, the IDX reader (on files written here and on the real MNIST test
set), npz files, splits, binarisation and every data error."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from ppl_vae.data import DataError, binarize, load_data, read_idx
from ppl_vae.spec import Spec, SpecError, load_spec

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
MNIST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def spec(*overrides):
    return load_spec(Spec(), list(overrides))


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    codes = {np.dtype("uint8"): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    array = array.astype(array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype)
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def test_digits_shapes_ranges_labels_and_split():
    d = load_data(spec())
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64)
    assert d.x_train.dtype == np.float32 and d.image_shape == (8, 8) and d.dim == 64
    assert d.x_train.min() == 0 and d.x_train.max() == 1
    assert np.allclose(d.x_train * 16, np.round(d.x_train * 16))
    assert set(np.unique(d.labels_train)) == set(range(10))
    again, other = load_data(spec()), load_data(spec("train.seed=1"))
    np.testing.assert_array_equal(d.x_test, again.x_test)
    assert not np.array_equal(d.x_test, other.x_test)


def test_limit_and_static_binarisation():
    d = load_data(spec("data.limit=100", 'data.binarize="static"'))
    assert len(d.x_train) == 100 and len(d.x_test) == 100
    assert set(np.unique(d.x_train)) == {0.0, 1.0}
    np.testing.assert_array_equal(d.x_train, load_data(
        spec("data.limit=100", 'data.binarize="static"')).x_train)
    # the split does not depend on binarisation draws
    grey = load_data(spec("data.limit=100"))
    np.testing.assert_array_equal(grey.labels_test, d.labels_test)


def test_binarize_draws_with_the_given_probability():
    x = np.full((200, 50), 0.3, np.float32)
    b = binarize(x, np.random.default_rng(0))
    assert b.dtype == np.float32 and set(np.unique(b)) == {0.0, 1.0}
    assert abs(b.mean() - 0.3) < 0.01


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 5).astype(np.uint8)
    floats = rng.normal(size=(2, 3)).astype(">f4")
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "i", images, gz)), images)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "l", labels, gz)), labels)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "f", floats, gz)), floats)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "x").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "x")
    path = write_idx(tmp_path / "t", np.zeros((4, 4), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"the MNIST test set is not at {MNIST}")
def test_real_mnist_test_set():
    images = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == MNIST_LABEL_COUNTS
    d = load_data(spec('data.source="mnist"', f'data.path="{MNIST}"', "data.test_fraction=0.25"))
    assert d.x_train.shape == (7500, 784) and d.x_test.shape == (2500, 784)
    assert d.image_shape == (28, 28) and d.x_train.max() == 1.0
    assert np.bincount(np.concatenate([d.labels_train, d.labels_test])).tolist() == \
        MNIST_LABEL_COUNTS


def test_mnist_folder_with_train_files_uses_them(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 4, 4),
                                                                          dtype=np.uint8), True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte",
                  rng.integers(0, 10, n).astype(np.uint8), False)
    d = load_data(spec('data.source="mnist"', f'data.path="{tmp_path}"',
                       'likelihood.kind="binomial"', "likelihood.total_count=255"))
    assert len(d.x_train) == 12 and len(d.x_test) == 4 and d.image_shape == (4, 4)


def test_npz_with_and_without_test_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.random((50, 6, 6)), labels=rng.integers(0, 3, 50))
    d = load_data(spec('data.source="npz"', f'data.path="{tmp_path / "a.npz"}"'))
    assert d.x_train.shape == (40, 36) and d.image_shape == (6, 6)
    np.savez(tmp_path / "b.npz", x=rng.random((30, 5)), x_test=rng.random((7, 5)))
    d = load_data(spec('data.source="npz"', f'data.path="{tmp_path / "b.npz"}"'))
    assert d.x_train.shape == (30, 5) and d.x_test.shape == (7, 5) and d.image_shape is None
    assert (d.labels_train == -1).all()


def _npz_spec(tmp_path, *overrides, **arrays):
    np.savez(tmp_path / "d.npz", **arrays)
    return spec('data.source="npz"', f'data.path="{tmp_path / "d.npz"}"', *overrides)


@pytest.mark.parametrize("arrays, overrides, message", [
    ({"x": np.where(np.eye(10, 2) * np.arange(10)[:, None] == 1, np.nan, 0.5)}, (),
     "1 value(s) are NaN or infinite"),
    ({"x": np.full((10, 3), 1.5)}, (), "outside [0, 1]"),
    ({"x": np.full((10, 3), 0.3)}, ('likelihood.kind="binomial"',), "binomial"),
    ({"x": np.full((10, 3), 3 / 255)}, ('likelihood.kind="binomial"',),
     "set likelihood.total_count = 255"),
    ({"x": np.full((10, 3), 0.3)}, ('likelihood.kind="categorical"',), "categories"),
    ({"x": np.zeros((10, 3)), "labels": np.zeros(9)}, (), "9 entries for 10 examples"),
    ({"x": np.zeros((10, 3)), "x_test": np.zeros((2, 4))}, (), "must match"),
    ({"x": np.zeros(10)}, (), "expected (N, D)"),
    ({"y": np.zeros((10, 3))}, (), "needs one named 'x'"),
])
def test_npz_errors(tmp_path, arrays, overrides, message):
    with pytest.raises(DataError) as err:
        load_data(_npz_spec(tmp_path, *overrides, **arrays))
    assert message in str(err.value)


def test_gaussian_accepts_any_finite_values(tmp_path):
    d = load_data(_npz_spec(tmp_path, 'likelihood.kind="gaussian"', x=np.full((10, 3), -7.0)))
    assert d.x_train.min() == -7


def test_conv_needs_images(tmp_path):
    with pytest.raises(SpecError, match="encoder.kind.*images"):
        load_data(_npz_spec(tmp_path, 'encoder.kind="conv"', x=np.zeros((10, 16))))
    with pytest.raises(SpecError, match="decoder.channels"):
        load_data(_npz_spec(tmp_path, 'decoder.kind="conv"', "decoder.channels=[4, 4, 4]",
                            x=np.zeros((10, 6, 6))))


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(spec('data.source="mnist"', f'data.path="{tmp_path / "nope"}"'))
    with pytest.raises(DataError, match="no MNIST IDX files.*t10k-images-idx3-ubyte"):
        load_data(spec('data.source="mnist"', f'data.path="{tmp_path}"'))
    with pytest.raises(DataError, match="does not exist"):
        load_data(spec('data.source="npz"', f'data.path="{tmp_path / "x.npz"}"'))
