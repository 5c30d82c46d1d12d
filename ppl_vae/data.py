"""Datasets as NumPy arrays: the bundled 8x8 digits, MNIST IDX folders and .npz files.

Every loader returns a `Dataset` of flattened float32 examples (N, D), labels (−1 = unknown)
and the image shape. Images are scaled to [0, 1] (digits /16, MNIST /255); npz data are taken as
they are. Splits and static binarisation are seeded by ``train.seed``. Every problem is a
`DataError` that says what is wrong and what to do.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppl_vae.spec import LikelihoodSpec, Spec, SpecError

#: Standard MNIST file names (each may also end in .gz).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """The data cannot be used as the spec asks; the message says what to do."""


@dataclass(frozen=True)
class Dataset:
    """x_* (N, D) float32, labels_* (N,) int64 with −1 for unknown, image_shape (H, W) or None."""

    x_train: np.ndarray
    x_test: np.ndarray
    labels_train: np.ndarray
    labels_test: np.ndarray
    image_shape: tuple[int, int] | None
    name: str

    @property
    def dim(self) -> int:
        return int(self.x_train.shape[1])


def binarize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One Bernoulli(x) draw per value, as float32 0/1 (x in [0, 1])."""
    return (rng.random(x.shape) < x).astype(np.float32)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped when the name ends in .gz."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path}: header says shape {shape} but the file holds "
                        f"{len(raw) - offset} bytes of data; is it truncated?")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


# ---- sources ------------------------------------------------------------------------------
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64), (8, 8), None


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist(folder: Path):
    if not folder.is_dir():
        raise DataError(f"MNIST folder {str(folder)!r} does not exist; set data.path to a folder "
                        "holding the IDX files " + ", ".join(sum(MNIST_FILES.values(), ())))
    found = {split: [_find(folder, n) for n in names] for split, names in MNIST_FILES.items()}
    usable = {s: f for s, f in found.items() if all(f)}
    if not usable:
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise DataError(
            f"no MNIST IDX files in {folder}: expected {' + '.join(MNIST_FILES['test'])} (and "
            f"optionally {' + '.join(MNIST_FILES['train'])}), each possibly .gz; found "
            f"{present or 'nothing'}")
    parts = {}
    for split, (images, labels) in usable.items():
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or len(x) != len(y):
            raise DataError(f"{images.name} / {labels.name}: {x.shape} images with {y.shape} "
                            "labels; expected (N, H, W) images and N labels")
        parts[split] = ((x.reshape(len(x), -1) / 255.0).astype(np.float32), y.astype(np.int64))
    shape = tuple(read_idx(usable[next(iter(usable))][0]).shape[1:])
    if "train" in parts and "test" in parts:
        return *parts["train"], shape, parts["test"]
    only = parts.get("train") or parts["test"]
    return *only, shape, None


def _images(x: np.ndarray, where: str):
    """(N, ...) -> flat (N, D) and the image shape (H, W) or None."""
    if x.ndim == 2:
        return x, None
    if x.ndim == 3:
        return x.reshape(len(x), -1), tuple(x.shape[1:])
    if x.ndim == 4 and 1 in (x.shape[1], x.shape[3]):
        hw = x.shape[2:] if x.shape[1] == 1 else x.shape[1:3]
        return x.reshape(len(x), -1), tuple(hw)
    raise DataError(f"{where}: x has shape {x.shape}; expected (N, D), (N, H, W) or one-channel "
                    "(N, H, W, 1) / (N, 1, H, W)")


def _npz(path: Path):
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} does not exist; set data.path to an .npz with "
                        "an array 'x' (and optionally 'labels', 'x_test', 'labels_test')")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    if "x" not in arrays:
        raise DataError(f"{path} has arrays {sorted(arrays)}; it needs one named 'x'")
    x, shape = _images(np.asarray(arrays["x"], np.float32), f"{path.name}['x']")

    def labels_for(key, n):
        if key not in arrays:
            return np.full(n, -1, np.int64)
        lab = np.asarray(arrays[key]).astype(np.int64).reshape(-1)
        if len(lab) != n:
            raise DataError(f"{path.name}['{key}'] has {len(lab)} entries for {n} examples")
        return lab

    labels = labels_for("labels", len(x))
    test = None
    if "x_test" in arrays:
        xt, shape_t = _images(np.asarray(arrays["x_test"], np.float32), f"{path.name}['x_test']")
        if xt.shape[1:] != x.shape[1:] or shape_t != shape:
            raise DataError(f"{path.name}: x_test examples have shape {arrays['x_test'].shape[1:]}"
                            f" but x examples {arrays['x'].shape[1:]}; they must match")
        test = (xt, labels_for("labels_test", len(xt)))
    return x, labels, shape, test


# ---- checks -------------------------------------------------------------------------------------
def _grid(x: np.ndarray) -> int | None:
    """k when every value is a multiple of 1/k for a common k (1, 16, 255), else None."""
    for k in (1, 16, 255):
        if np.allclose(x * k, np.round(x * k), atol=1e-4):
            return k
    return None


def check_support(x: np.ndarray, likelihood: LikelihoodSpec, where: str) -> None:
    """Raise DataError when x lies outside the support of the likelihood."""
    kind = likelihood.kind
    if kind == "gaussian":
        return
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < 0 or hi > 1:
        raise DataError(f"{where}: values lie in [{lo:.4g}, {hi:.4g}], outside [0, 1] that a "
                        f"{kind} likelihood needs; rescale the data to [0, 1] or use "
                        "likelihood.kind = \"gaussian\"")
    if kind == "binomial":
        counts = x * likelihood.total_count
        if not np.allclose(counts, np.round(counts), atol=1e-4):
            raise DataError(f"{where}: y * total_count ({likelihood.total_count}) is not a whole "
                            "number for every value, so y is not a binomial count fraction"
                            + (f"; the data lie on a k/{k} grid: set likelihood.total_count = "
                               f"{k}" if (k := _grid(x)) else ""))
    if kind == "categorical":
        levels = x * (likelihood.categories - 1)
        if not np.allclose(levels, np.round(levels), atol=1e-4):
            raise DataError(f"{where}: y * (categories - 1) is not a whole number for every "
                            f"value ({likelihood.categories} categories)"
                            + (f"; the data lie on a k/{k} grid: set likelihood.categories = "
                               f"{k + 1}" if (k := _grid(x)) else ""))


def _check_finite(x: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        raise DataError(f"{where}: {int(bad.sum())} value(s) are NaN or infinite (in "
                        f"{int(bad.any(axis=1).sum())} examples); clean or drop them first")


def _check_conv(spec: Spec, shape) -> None:
    for part in ("encoder", "decoder"):
        net = getattr(spec, part)
        if net.kind != "conv":
            continue
        if shape is None:
            raise SpecError(f"{part}.kind", "conv", "'mlp' for flat (N, D) data; conv needs "
                            "images (N, H, W)", spec.source or None)
        if any(s % 2 ** len(net.channels) for s in shape):
            raise SpecError(f"{part}.channels", list(net.channels),
                            f"fewer entries: each halves the {shape[0]}x{shape[1]} image, whose "
                            f"sides must divide by 2^len(channels)", spec.source or None)


# ---- the loader ---------------------------------------------------------------------------
def load_data(spec: Spec) -> Dataset:
    """Load, split, check and (statically) binarise the data that `spec.data` names."""
    d = spec.data
    if d.source == "digits":
        x, labels, shape, test = _digits()
        name = "digits"
    elif d.source == "mnist":
        x, labels, shape, test = _mnist(Path(d.path))
        name = f"mnist:{d.path}"
    else:
        x, labels, shape, test = _npz(Path(d.path))
        name = f"npz:{d.path}"
    split_seed, binarize_seed = np.random.SeedSequence(spec.train.seed).spawn(2)
    if test is None:
        perm = np.random.default_rng(split_seed).permutation(len(x))
        n_test = max(1, int(round(len(x) * d.test_fraction)))
        if n_test >= len(x):
            raise DataError(f"{name}: {len(x)} examples are too few to hold out "
                            f"{d.test_fraction:.0%} for testing")
        test = (x[perm[:n_test]], labels[perm[:n_test]])
        x, labels = x[perm[n_test:]], labels[perm[n_test:]]
    x_test, labels_test = test
    if d.limit:
        x, labels = x[: d.limit], labels[: d.limit]
        x_test, labels_test = x_test[: d.limit], labels_test[: d.limit]
    for split, arr in (("train", x), ("test", x_test)):
        _check_finite(arr, f"{name} ({split} split)")
        check_support(arr, spec.likelihood, f"{name} ({split} split)")
    _check_conv(spec, shape)
    if d.binarize == "static":
        rng = np.random.default_rng(binarize_seed)
        x, x_test = binarize(x, rng), binarize(x_test, rng)
    return Dataset(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(x_test, np.float32),
                   np.asarray(labels, np.int64), np.asarray(labels_test, np.int64),
                   shape, name)
