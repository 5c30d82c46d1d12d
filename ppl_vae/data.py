"""Datasets as NumPy arrays: the bundled 8x8 digits, MNIST IDX folders, .npz files, folders of
.npy files (memory-mapped: data larger than memory), and two generated sources: synthetic
populations whose entropy H(y) is known exactly (``synthetic:<name>``,
`ppl_vae.groundtruth.populations`) and procedural dSprites with their generative factors
(``dsprites``, `ppl_vae.groundtruth.dsprites`).

Every loader returns a `Dataset` of flattened float32 examples (N, D), int64 labels (-1 where
unknown) and the image shape (H, W), or None for flat data. Images are scaled to [0, 1] (digits
/16, MNIST /255); npz data are taken as they are. The random split and static binarisation are
seeded by ``train.seed``, from two independent child seeds, so binarising never moves the split.

The ``npy`` source keeps its training array a read-only memory map of x.npy: nothing is read until
used, the checks read it a chunk of rows at a time, and training data too large for the device
is streamed from it (`ppl_vae.streaming`).

Every problem with the data is a `DataError` that says what is wrong and what to do; a spec that
cannot work with the data it names (a conv network on flat data) is a `SpecError`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppl_vae.spec import LikelihoodSpec, Spec, SpecError

#: Standard MNIST file names per split (each may also end in .gz).
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: IDX type codes (third byte of the magic number) -> big-endian NumPy dtypes.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
#: A value y counts as lying on the k-grid when |y*k - round(y*k)| <= GRID_TOL.
GRID_TOL = 1e-4
_NPZ_HELP = ("an .npz with an array 'x' of shape (N, D), (N, H, W), (N, H, W, 1) or (N, 1, H, W), "
             "and optionally 'labels' (N,), 'x_test', 'labels_test' and 'entropy' (a scalar: H(y) "
             "of the population, nats per example)")


_NPY_HELP = ("a folder holding x.npy (float32, shape (N, D), (N, H, W), (N, H, W, 1) or "
             "(N, 1, H, W); memory-mapped, so it may be larger than memory) and optionally "
             "labels.npy (N,), x_test.npy and labels_test.npy (read into memory)")
#: The support checks read a memory-mapped array in chunks of rows of about this many bytes.
CHECK_CHUNK_BYTES = 64 * 2**20


class DataError(ValueError):
    """The data cannot be used as the spec asks; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split of flattened examples.

    x_train (N, D) and x_test (M, D): float32, C-contiguous, one flattened example per row;
        x_train is a read-only memory map of the file for the ``npy`` source.
    labels_train (N,) and labels_test (M,): int64, -1 where unknown.
    image_shape: (H, W) with H*W == D for images, None for flat data.
    name: where the data came from, e.g. "digits", "mnist:/path", "npz:/path/file.npz".
    entropy: H(y) of the population the examples were drawn from, nats per example, where it is
        known exactly (``synthetic:*`` sources), else None.
    factors_train (N, K) and factors_test (M, K): int64 indices of the generative factors of each
        example where they are known (``dsprites``), else None; factor_names and factor_sizes
        (K,) name them and give the number of values each takes.
    """

    x_train: np.ndarray
    x_test: np.ndarray
    labels_train: np.ndarray
    labels_test: np.ndarray
    image_shape: tuple[int, int] | None
    name: str
    entropy: float | None = None
    factors_train: np.ndarray | None = None
    factors_test: np.ndarray | None = None
    factor_names: tuple[str, ...] | None = None
    factor_sizes: tuple[int, ...] | None = None

    @property
    def dim(self) -> int:
        """D, the number of values per example."""
        return int(self.x_train.shape[1])


def binarize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One Bernoulli(x) draw per value: float32 0/1 of x's shape (x: probabilities in [0, 1])."""
    return (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)


# ---- IDX files ----------------------------------------------------------------------------
def read_idx(path) -> np.ndarray:
    """Read an IDX file (the MNIST format) into a native-endian array of the shape its header gives.

    The file may be gzipped (recognised by its content, whatever its name). The header is two zero
    bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64),
    the number of dimensions and one big-endian uint32 size per dimension; then the values,
    big-endian, row-major.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":  # the gzip magic number
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{path}: the gzip stream is damaged ({err}); download it again") \
                from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (its first bytes are {raw[:4]!r}, expected "
                        "00 00, a type code and the number of dimensions)")
    ndim, dtype = raw[3], np.dtype(IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise DataError(f"{path}: the IDX header is cut short; is the file truncated?")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DataError(f"{path}: the header says shape {shape} ({expected} bytes of data) but "
                        f"the file holds {len(raw) - offset}; is it truncated or damaged?")
    # frombuffer gives a read-only big-endian view of the bytes; astype copies to a native,
    # writable array.
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


# ---- sources: each returns (x (N, D) float32, labels (N,) int64, image_shape, test or None) ----
def _bundled_digits_csv() -> Path | None:
    """scikit-learn's digits.csv.gz, found without importing sklearn (which takes ~1 s)."""
    found = importlib.util.find_spec("sklearn")  # locates the package, does not run it
    if found is None or found.origin is None:
        return None
    path = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _digits():
    """The 1797 8x8 digits of `sklearn.datasets.load_digits`, pixel counts 0..16 scaled by /16."""
    csv = _bundled_digits_csv()
    if csv is not None:
        # The same file `load_digits` parses: 64 pixel columns, then the label.
        table = np.loadtxt(csv, delimiter=",")
        pixels, labels = table[:, :-1], table[:, -1]
    else:  # a scikit-learn that keeps its data elsewhere: ask it (slower import)
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise DataError("data.source = 'digits' needs scikit-learn: pip install "
                            "scikit-learn, or use data.source = 'npz'") from None
        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
    return (pixels / 16.0).astype(np.float32), labels.astype(np.int64), (8, 8), None


def _find_file(folder: Path, name: str) -> Path | None:
    """folder/name or folder/name.gz, whichever exists (the plain one first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _mnist_expected() -> str:
    names = [n for pair in MNIST_FILES.values() for n in pair]
    return ", ".join(names) + " (each may end in .gz; the train pair is optional)"


def _read_mnist_pair(images: Path, labels: Path):
    """One split: (N, H*W) float32 in [0, 1], (N,) int64 labels, (H, W); the arrays read-only.

    Decoded once per process for the same files (same paths, sizes and modification times):
    an experiment trains and evaluates many runs on the same 70 000 images, and decoding them
    (gunzip, then bytes to float32) took 0.6 s each time; read-only, so that no caller can
    change what another one reads."""
    stamps = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in (images, labels))
    return _decode_mnist_pair(*stamps)


@functools.lru_cache(maxsize=2)  # the two splits of one folder
def _decode_mnist_pair(images_stamp: tuple, labels_stamp: tuple):
    images, labels = Path(images_stamp[0]), Path(labels_stamp[0])
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataError(f"{images}: holds {x.dtype} values of shape {x.shape}; MNIST images are "
                        "unsigned bytes of shape (N, H, W); check the file")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{labels}: holds labels of shape {y.shape} for {len(x)} images in "
                        f"{images.name}; expected ({len(x)},): check that the files belong "
                        "together")
    flat = x.reshape(len(x), -1).astype(np.float32)
    np.divide(flat, np.float32(255.0), out=flat)  # in place: one float copy, not two
    y = y.astype(np.int64)
    flat.flags.writeable = y.flags.writeable = False
    return flat, y, (int(x.shape[1]), int(x.shape[2]))


def _mnist(folder: Path):
    """train/t10k IDX pairs in `folder`; the test pair alone (or the train pair alone) is split."""
    if folder.is_file():
        raise DataError(f"data.path {str(folder)!r} is a file; data.source = 'mnist' reads a "
                        f"folder holding the IDX files {_mnist_expected()} (for an .npz file "
                        "set data.source = 'npz')")
    if not folder.is_dir():
        raise DataError(f"MNIST folder {str(folder)!r} does not exist; set data.path to a folder "
                        f"holding the IDX files {_mnist_expected()}")
    pairs = {}
    for split, names in MNIST_FILES.items():
        found = [_find_file(folder, n) for n in names]
        if any(found) and not all(found):
            have = next(n for n, f in zip(names, found) if f)
            lack = next(n for n, f in zip(names, found) if not f)
            raise DataError(f"{folder}: has {have} but not {lack}; add the missing file or "
                            f"remove {have}")
        if all(found):
            pairs[split] = found
    if not pairs:
        present = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(present[:10]) + (f" and {len(present) - 10} more"
                                           if len(present) > 10 else "")
        raise DataError(f"no MNIST IDX files in {folder}: expected {_mnist_expected()}; found "
                        f"{shown or 'nothing'}")
    parts = {split: _read_mnist_pair(*files) for split, files in pairs.items()}
    shapes = {split: part[2] for split, part in parts.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{folder}: train images are {shapes['train']} but t10k images are "
                        f"{shapes['test']}; both splits must have the same image size")
    if len(parts) == 2:
        x, labels, shape = parts["train"]
        return x, labels, shape, parts["test"][:2]
    x, labels, shape = next(iter(parts.values()))
    return x, labels, shape, None


def _as_examples(x: np.ndarray, where: str, copy: bool = True):
    """(N, ...) array -> flat (N, D) float32 and the image shape (H, W) or None; with
    copy=False a view of x (a memory map stays one), which must then be C-contiguous float32."""
    if np.iscomplexobj(x):
        raise DataError(f"{where} holds complex values ({x.dtype}); it needs real numbers "
                        "(split real and imaginary parts into features yourself)")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where} holds {x.dtype} values; it needs numbers")
    if x.ndim == 2:
        shape = None
    elif x.ndim == 3:
        shape = x.shape[1:]
    elif x.ndim == 4 and x.shape[1] == 1:  # channels first, one channel
        shape = x.shape[2:]
    elif x.ndim == 4 and x.shape[3] == 1:  # channels last, one channel
        shape = x.shape[1:3]
    else:
        raise DataError(f"{where} has shape {x.shape}; expected (N, D) flat data, (N, H, W) "
                        "images or one-channel (N, H, W, 1) / (N, 1, H, W) images")
    if len(x) == 0 or x[0].size == 0:
        raise DataError(f"{where} has shape {x.shape}; it needs at least one example and one "
                        "value per example")
    shape = None if shape is None else (int(shape[0]), int(shape[1]))
    if not copy:
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            order = "C" if x.flags.c_contiguous else "Fortran"
            raise DataError(f"{where} holds {x.dtype} values in {order} order; it is read in "
                            "place, so it must be C-ordered float32: save "
                            "it with numpy.save(path, np.ascontiguousarray(x, np.float32))")
        return x.reshape(len(x), -1), shape
    return x.reshape(len(x), -1).astype(np.float32), shape


def _as_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """(n,) integer-valued labels -> int64; -1 means unknown."""
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{where} has shape {y.shape} ({y.size} entries) for {n} examples; it "
                        f"must have shape ({n},), one label per example (-1 = unknown)")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where} holds {y.dtype} values; labels must be integers (-1 = unknown)")
    if np.issubdtype(y.dtype, np.floating) and not np.all(y == np.round(y)):
        raise DataError(f"{where} holds non-integer values; labels must be integers "
                        "(-1 = unknown)")
    return y.astype(np.int64)


def _npz_entropy(arrays: dict, path: Path) -> float | None:
    """The optional scalar array 'entropy': H(y) of the population the examples were drawn
    from, nats per example (so that `eval` prints the lecture's bounds for user data)."""
    if "entropy" not in arrays:
        return None
    value = arrays["entropy"]
    if value.shape != () or not np.issubdtype(value.dtype, np.number) or not (
            np.isfinite(value) and value >= 0):
        raise DataError(f"{path}['entropy'] is {value!r}; it must be one finite number >= 0: "
                        "H(y) of the population the examples come from, nats per example")
    return float(value)


def _npz(path: Path):
    """Arrays x / labels / x_test / labels_test of an .npz file, values as they are, and its
    population entropy (None when it has no 'entropy')."""
    if not path.is_file():
        raise DataError(f"npz file {str(path)!r} does not exist; set data.path to {_NPZ_HELP}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError) as err:
        # AttributeError/TypeError: np.load returned a plain array (.npy), not an archive.
        raise DataError(f"{path} cannot be read as an .npz archive ({type(err).__name__}: "
                        f"{err}); save the data with numpy.savez(path, x=...)") from None
    if "x" not in arrays:
        raise DataError(f"{path} has arrays {sorted(arrays)}; it needs one named 'x': {_NPZ_HELP}")
    x, shape = _as_examples(arrays["x"], f"{path.name}['x']")
    labels = (_as_labels(arrays["labels"], len(x), f"{path.name}['labels']")
              if "labels" in arrays else np.full(len(x), -1, np.int64))
    entropy = _npz_entropy(arrays, path)
    if "x_test" not in arrays:
        if "labels_test" in arrays:
            raise DataError(f"{path} has 'labels_test' but no 'x_test'; add x_test or drop "
                            "labels_test")
        return x, labels, shape, None, entropy
    if arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
        raise DataError(f"{path}: x_test examples have shape {arrays['x_test'].shape[1:]} but x "
                        f"examples have {arrays['x'].shape[1:]}; they must match")
    x_test, _ = _as_examples(arrays["x_test"], f"{path.name}['x_test']")
    labels_test = (_as_labels(arrays["labels_test"], len(x_test), f"{path.name}['labels_test']")
                   if "labels_test" in arrays else np.full(len(x_test), -1, np.int64))
    return x, labels, shape, (x_test, labels_test), entropy


def _read_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read as a .npy file ({type(err).__name__}: {err}); "
                        "save the array with numpy.save") from None


def _npy(folder: Path):
    """x.npy memory-mapped (the training rows are read only where used), labels.npy, x_test.npy
    and labels_test.npy (optional) read into memory."""
    if not folder.is_dir():
        raise DataError(f"npy folder {str(folder)!r} does not exist or is not a folder; set "
                        f"data.path to {_NPY_HELP}")
    files = {name: folder / f"{name}.npy" for name in ("x", "labels", "x_test", "labels_test")}
    if not files["x"].is_file():
        raise DataError(f"{folder} has no x.npy; data.path must be {_NPY_HELP}")
    x, shape = _as_examples(_read_npy(files["x"], mmap=True), f"{files['x']}", copy=False)
    labels = (_as_labels(_read_npy(files["labels"], False), len(x), str(files["labels"]))
              if files["labels"].is_file() else np.full(len(x), -1, np.int64))
    if not files["x_test"].is_file():
        if files["labels_test"].is_file():
            raise DataError(f"{folder} has labels_test.npy but no x_test.npy; add x_test.npy or "
                            "remove labels_test.npy")
        return x, labels, shape, None
    raw_test = _read_npy(files["x_test"], mmap=False)
    if raw_test.shape[1:] != x.shape[1:] and raw_test.reshape(len(raw_test), -1).shape[1:] != \
            x.shape[1:]:
        raise DataError(f"{folder}: x_test.npy examples have shape {raw_test.shape[1:]} but "
                        f"x.npy examples have {x.shape[1:]} values; they must match")
    x_test, _ = _as_examples(raw_test, str(files["x_test"]))
    labels_test = (_as_labels(_read_npy(files["labels_test"], False), len(x_test),
                              str(files["labels_test"]))
                   if files["labels_test"].is_file() else np.full(len(x_test), -1, np.int64))
    return x, labels, shape, (x_test, labels_test)


# ---- checks -------------------------------------------------------------------------------
def _row_chunks(x: np.ndarray):
    """x in chunks of whole rows of about CHECK_CHUNK_BYTES each (one chunk for most data held in
    memory), so a memory-mapped array is checked without reading it all at once."""
    if x.ndim == 0 or x.size == 0:
        yield np.asarray(x)
        return
    rows = max(1, CHECK_CHUNK_BYTES // (x.itemsize * (x.size // len(x))))
    for start in range(0, len(x), rows):
        yield np.asarray(x[start:start + rows])


def _unique_values(x: np.ndarray, largest: int) -> np.ndarray:
    """The distinct values of x, read by chunks; stops early past `largest` + 1 of them."""
    values = np.zeros(0, x.dtype)
    for chunk in _row_chunks(x):
        values = np.union1d(values, chunk)
        if len(values) > largest + 1:
            break
    return values


def _off_grid(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the values y for which y*k is not a whole number (within GRID_TOL)."""
    scaled = x.astype(np.float64) * k  # float64: float32 k/255 times 255 must land near k
    return np.abs(scaled - np.rint(scaled)) > GRID_TOL


def _smallest_grid(x: np.ndarray, largest: int = 1024) -> int | None:
    """The smallest k <= `largest` with every value on the grid {0, 1/k, ..., 1}, else None.

    Only called to word an error, so its cost (a sort of x) is paid only when the data are bad.
    """
    values = _unique_values(x, largest)
    if len(values) > largest + 1:  # a k-grid in [0, 1] has only k + 1 points
        return None
    ks = np.arange(1, largest + 1)
    scaled = values[:, None].astype(np.float64) * ks[None, :]
    fits = (np.abs(scaled - np.rint(scaled)) <= GRID_TOL).all(axis=0)
    return int(ks[fits][0]) if fits.any() else None


#: likelihood kind -> (its grid setting, setting − steps of the grid, what the values are)
_GRID_SETTINGS = {"binomial": ("total_count", 0, "counts"),
                  "categorical": ("categories", 1, "levels")}


def check_support(x: np.ndarray, likelihood: LikelihoodSpec, where: str) -> None:
    """Raise DataError unless every value of x is one the likelihood can score.

    x: any shape, values y. gaussian: finite. bernoulli: y in [0, 1]. binomial: y * total_count
    a whole number in 0..total_count. categorical: y * (categories - 1) a whole number in
    0..categories-1. `where` names the data in the message (e.g. "digits (train split)").
    """
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    bad_values = bad_rows = 0
    lo, hi = np.inf, -np.inf
    for chunk in _row_chunks(x):  # one pass: finite, and the range
        bad = ~np.isfinite(chunk)
        if bad.any():
            bad_values += int(bad.sum())
            bad_rows += (int(bad.reshape(len(chunk), -1).any(axis=1).sum()) if chunk.ndim >= 1
                         else 1)
        elif chunk.size:
            lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    if bad_values:
        raise DataError(f"{where}: {bad_values} value(s) are NaN or infinite (in {bad_rows} "
                        "example(s)); remove or impute them before training")
    kind = likelihood.kind
    if kind == "gaussian" or x.size == 0:
        return
    if lo < 0 or hi > 1:
        raise DataError(f"{where}: values lie in [{lo:.4g}, {hi:.4g}], outside the [0, 1] that a "
                        f"{kind} likelihood needs; rescale the data into [0, 1] or use "
                        'likelihood.kind = "gaussian"')
    if kind in _GRID_SETTINGS:
        setting, offset, noun = _GRID_SETTINGS[kind]
        value = getattr(likelihood, setting)
        steps = value - offset  # the grid {0, 1/steps, ..., 1} the likelihood scores
        count, example = 0, None
        for chunk in _row_chunks(x):
            off = _off_grid(chunk, steps)
            if off.any():
                count += int(off.sum())
                example = float(chunk[off].flat[0]) if example is None else example
        if count:
            k = _smallest_grid(x)
            fix = (f"the data lie on a k/{k} grid: set likelihood.{setting} = {k + offset}" if k
                   else f'the data are not {noun}: use likelihood.kind = "gaussian"')
            raise DataError(f"{where}: a {kind} likelihood with {setting} = {value} needs "
                            f"y * {steps} to be a whole number, but {count} value(s) are "
                            f"not (e.g. y = {example:.6g}); {fix}")


def check_labels(labels: np.ndarray, classes: int, where: str) -> None:
    """A conditional VAE (``label.condition``) reads every example's label: raise DataError
    unless each is a class 0..classes−1."""
    unknown = int(np.sum(labels < 0))
    if unknown:
        raise DataError(f"{where}: {unknown} of {len(labels)} examples have no label (-1), but "
                        "label.condition = true reads every label; use a labelled source "
                        "(digits, mnist, or an npz with 'labels' and 'labels_test')")
    if len(labels) and labels.max() >= classes:
        raise DataError(f"{where}: labels go up to {int(labels.max())} but label.classes = "
                        f"{classes}; set label.classes = {int(labels.max()) + 1}")


def _check_conv(spec: Spec, image_shape: tuple[int, int] | None) -> None:
    """A conv encoder/decoder needs images whose sides halve len(channels) times."""
    for part in ("encoder", "decoder"):
        net = getattr(spec, part)
        if net.kind != "conv":
            continue
        if image_shape is None:
            raise SpecError(f"{part}.kind", "conv", "'mlp' for flat (N, D) data; a conv network "
                            "needs images: an npz 'x' of shape (N, H, W)", spec.source or None)
        h, w = image_shape
        factor = 2 ** len(net.channels)
        if h % factor or w % factor:
            raise SpecError(f"{part}.channels", list(net.channels),
                            f"fewer entries: each halves the {h}x{w} image, so both sides must "
                            f"divide by 2**len(channels) = {factor}", spec.source or None)


# ---- generated sources: each returns (columns {"x", "labels", ...}, image_shape, extras) ------
#: Examples drawn by a generated source when data.size = 0.
DEFAULT_GENERATED_SIZE = 20000


def _synthetic(name: str, size: int, rng: np.random.Generator):
    """Draws from a `ppl_vae.groundtruth.populations` population; the label of an example is its
    component."""
    from ppl_vae.groundtruth.populations import population

    pop = population(name)
    x, components = pop.sample(size, rng)
    return {"x": x, "labels": components}, pop.image_shape, {"entropy": pop.entropy()}


def _dsprites(size: int, rng: np.random.Generator):
    """Distinct dSprites grid points drawn uniformly; the label of an example is its shape."""
    from ppl_vae.groundtruth import dsprites

    if size > dsprites.NUM_IMAGES:
        raise DataError(f"data.size = {size} but dSprites has {dsprites.NUM_IMAGES} images; "
                        "ask for fewer")
    factors, x = dsprites.sample(size, rng)
    extras = {"factor_names": tuple(dsprites.FACTOR_NAMES),
              "factor_sizes": tuple(dsprites.FACTOR_SIZES)}
    return ({"x": x, "labels": factors[:, 0].astype(np.int64), "factors": factors},
            dsprites.IMAGE_SHAPE, extras)


# ---- the loader ---------------------------------------------------------------------------
def _split(columns: dict[str, np.ndarray], test_fraction: float, seed: np.random.SeedSequence,
           name: str) -> tuple[dict, dict]:
    """Random train/test split of per-example arrays (each (N, ...)), the same rows for all:
    round(N * test_fraction) examples (at least 1) go to test."""
    n = len(columns["x"])
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        raise DataError(f"{name}: {n} example(s) are too few to hold out {test_fraction:.0%} for "
                        "testing; add data, lower data.test_fraction, or give an x_test")
    perm = np.random.default_rng(seed).permutation(n)
    test, train = perm[:n_test], perm[n_test:]
    return ({k: v[train] for k, v in columns.items()}, {k: v[test] for k, v in columns.items()})


def _tail_split(columns: dict[str, np.ndarray], test_fraction: float, name: str):
    """The last round(N * test_fraction) examples (at least 1) as the test split, copied into
    memory; the training rows stay a view (of a memory map: nothing is read). Not shuffled: a
    file whose order means something needs its own x_test.npy."""
    n = len(columns["x"])
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        raise DataError(f"{name}: {n} example(s) are too few to hold out {test_fraction:.0%} for "
                        "testing; add data, lower data.test_fraction, or give an x_test.npy")
    return ({k: v[: n - n_test] for k, v in columns.items()},
            {k: np.array(v[n - n_test:]) for k, v in columns.items()})


def _keep_labels(labels: np.ndarray, keep: int, seed: np.random.SeedSequence,
                 balanced: bool = False) -> np.ndarray:
    """`labels` with all but `keep` of them (a seeded random choice) set to -1 (unknown);
    `balanced`: keep // (number of classes) of each class, chosen at random within it."""
    if keep == 0 or keep >= len(labels):
        return labels
    out = np.full_like(labels, -1)
    rng = np.random.default_rng(seed)
    if balanced:
        classes = np.unique(labels[labels >= 0])
        per_class = keep // len(classes)
        chosen = np.concatenate([rng.choice(np.flatnonzero(labels == c), size=per_class,
                                            replace=False) for c in classes])
    else:
        chosen = rng.choice(len(labels), size=keep, replace=False)
    out[chosen] = labels[chosen]
    return out


def load_data(spec: Spec) -> Dataset:
    """Load (or generate), split, limit, check and (statically) binarise the data `spec.data`
    names.

    Raises DataError for unusable data and SpecError for a network the data cannot feed.
    Seeds: four independent children of ``train.seed`` drive the split, static binarisation,
    which labels `data.labelled` keeps, and the draws of a generated source.
    """
    d = spec.data
    split_seed, binarize_seed, label_seed, draw_seed = \
        np.random.SeedSequence(spec.train.seed).spawn(4)
    extras: dict = {}
    test = None
    if d.source == "digits":
        x, labels, shape, test = _digits()
        columns, name = {"x": x, "labels": labels}, "digits"
    elif d.source == "mnist":
        x, labels, shape, test = _mnist(Path(d.path).expanduser())
        columns, name = {"x": x, "labels": labels}, f"mnist:{d.path}"
    elif d.source == "npz":
        x, labels, shape, test, entropy = _npz(Path(d.path).expanduser())
        columns, name = {"x": x, "labels": labels}, f"npz:{d.path}"
        if entropy is not None:
            if d.binarize != "none":  # binarising makes another population
                raise DataError(f"{d.path} carries the entropy of its population, but "
                                f"data.binarize = {d.binarize!r} draws other data from it; set "
                                "data.binarize = 'none' (or drop 'entropy' from the file)")
            extras = {"entropy": entropy}
    elif d.source == "npy":
        x, labels, shape, test = _npy(Path(d.path).expanduser())
        columns, name = {"x": x, "labels": labels}, f"npy:{d.path}"
    elif d.source == "dsprites":
        columns, shape, extras = _dsprites(d.size or DEFAULT_GENERATED_SIZE,
                                           np.random.default_rng(draw_seed))
        name = "dsprites"
    elif d.source.startswith("synthetic:"):
        columns, shape, extras = _synthetic(d.source.split(":", 1)[1],
                                            d.size or DEFAULT_GENERATED_SIZE,
                                            np.random.default_rng(draw_seed))
        name = d.source
    else:  # spec validation rejects other sources; this guards a caller that bypassed it
        raise DataError(f"unknown data.source {d.source!r}; use 'digits', 'mnist', 'npz', "
                        "'npy', 'dsprites' or 'synthetic:<name>'")
    _check_conv(spec, shape)  # a spec mistake: report it before looking at the values

    if test is None and d.source == "npy":  # a random split would copy the memory map
        train, test_columns = _tail_split(columns, d.test_fraction, name)
    elif test is None:
        train, test_columns = _split(columns, d.test_fraction, split_seed, name)
    else:
        train, test_columns = columns, {"x": test[0], "labels": test[1]}
    if d.limit > 0:
        train = {k: v[: d.limit] for k, v in train.items()}
        test_columns = {k: v[: d.limit] for k, v in test_columns.items()}
    x, x_test = train["x"], test_columns["x"]

    for split, values in (("train", x), ("test", x_test)):
        check_support(values, spec.likelihood, f"{name} ({split} split)")
    if spec.label.condition:
        for split, cols in (("train", train), ("test", test_columns)):
            check_labels(cols["labels"], spec.label.classes, f"{name} ({split} split)")
    if d.binarize == "static":
        rng = np.random.default_rng(binarize_seed)
        x, x_test = binarize(x, rng), binarize(x_test, rng)
    factors = {f"factors_{split}": np.ascontiguousarray(cols["factors"], np.int64)
               for split, cols in (("train", train), ("test", test_columns)) if "factors" in cols}
    return Dataset(x_train=np.ascontiguousarray(x, np.float32),
                   x_test=np.ascontiguousarray(x_test, np.float32),
                   labels_train=np.ascontiguousarray(
                       _keep_labels(train["labels"], d.labelled, label_seed, d.balanced_labels),
                       np.int64),
                   labels_test=np.ascontiguousarray(test_columns["labels"], np.int64),
                   image_shape=shape, name=name, **extras, **factors)
