"""`ppl-vae data mnist DIR`: the four MNIST IDX files from the public mirrors, md5-checked.

    $ ppl-vae data mnist ~/data/mnist
    $ ppl-vae train vae_mnist --set data.path="$HOME/data/mnist"

Each file is ``<name>.gz`` on the mirrors (`MNIST_MIRRORS`, tried in order: the ones torchvision
uses, then the original site). What is checked is the *uncompressed* content: its size and md5
(`MNIST_IDX`, the values in the README beside the project's copy of MNIST). Gzip headers carry a
timestamp and a compression level, so two good copies of a .gz can differ byte for byte while
their content cannot.

Guarantees:

* Nothing half-written: a file is downloaded to a hidden temporary file in DIR, checked, then
  renamed into place (a rename within one folder is atomic). A failed, interrupted or wrong
  download leaves no file behind, and the next mirror is tried.
* A file already present and valid is kept and not downloaded again. "Present" means the file
  that ``data.source = "mnist"`` would read (`ppl_vae.data`: ``<name>`` before ``<name>.gz``).
* A present file that is damaged (wrong size or md5, or a broken gzip stream) is said so, and
  downloaded again; it is replaced, under its own name and in its own form (plain or gzipped),
  only once a good copy has been checked, so a failed download leaves it as it was. A damaged
  file is of no use to the loader (it would refuse it), so replacing it is what the user wants;
  the message names it in case it was something else put there by mistake.
* Every failure is a `DownloadError` (a `DataError`) in one line that names the file, what each
  mirror answered and what to do.

Standard library only (tqdm for the progress bar); importing it imports neither torch nor jax.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import secrets
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from ppl_vae.data import DataError, _find_file
from ppl_vae.version import __version__

#: Folders holding the four .gz files, tried in this order (torchvision's two, Google's copy for
#: TensorFlow's datasets, then Y. LeCun's original site, which often refuses scripted downloads).
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

#: Bytes read per network read, per file write and per digest update.
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class IdxFile:
    """One MNIST file: its name without ``.gz``, its uncompressed size (bytes) and md5 (hex)."""

    name: str
    size: int
    md5: str

    @property
    def served_as(self) -> str:
        """The file name on the mirrors."""
        return f"{self.name}.gz"


#: The four files, with the sizes and md5s of their uncompressed content
#: (``../shared/data/mnist/README.md``).
MNIST_IDX = (
    IdxFile("train-images-idx3-ubyte", 47_040_016, "6bbc9ace898e44ae57da46a324031adb"),
    IdxFile("train-labels-idx1-ubyte", 60_008, "a25bea736e30d166cdddb491f175f624"),
    IdxFile("t10k-images-idx3-ubyte", 7_840_016, "2646ac647ad5339dbf082846283269ea"),
    IdxFile("t10k-labels-idx1-ubyte", 10_008, "27ae3e4e09519cfbb04c329615203637"),
)


class DownloadError(DataError):
    """A dataset file could not be had: no mirror gave a valid copy, or DIR cannot hold it."""


class _MirrorFailed(Exception):
    """One mirror did not give a valid copy of one file (the next mirror is tried)."""


# ---- checking ------------------------------------------------------------------------------
def content_problem(path: Path, expected: IdxFile) -> str | None:
    """None when the content of `path` (gunzipped when it starts with the gzip magic number,
    whatever its name) has `expected`'s size and md5; else what is wrong, as a phrase.

    Reads at most ``expected.size + 1`` uncompressed bytes, so a huge or endless stream is
    refused without being inflated whole."""
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    digest, size = hashlib.md5(), 0
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
            while size <= expected.size:
                chunk = fh.read(min(CHUNK_BYTES, expected.size + 1 - size))
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        return f"its gzip stream is damaged ({err})"
    what = "uncompressed " if gzipped else ""
    if size > expected.size:
        return f"holds more than the {expected.size:,} {what}bytes of {expected.name}"
    if size != expected.size:
        return f"holds {size:,} {what}bytes, not the {expected.size:,} of {expected.name}"
    if digest.hexdigest() != expected.md5:
        return f"has md5 {digest.hexdigest()}, not {expected.md5} (the md5 of {expected.name})"
    return None


# ---- fetching ------------------------------------------------------------------------------
def _url(mirror: str, expected: IdxFile) -> str:
    return f"{mirror.rstrip('/')}/{expected.served_as}"


def _fetch(url: str, out, *, timeout: float, progress: bool) -> None:
    """Stream `url` into the open binary file `out`. Network trouble is `_MirrorFailed`; trouble
    writing `out` (a full disk) is a `DownloadError`, since no other mirror would help."""
    from tqdm.auto import tqdm

    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"ppl_vae/{__version__}"})
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        raise _MirrorFailed(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise _MirrorFailed(str(err.reason)) from None
    except (OSError, HTTPException, ValueError) as err:  # timeouts, resets, a malformed URL
        raise _MirrorFailed(str(err) or type(err).__name__) from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(total=total, desc=Path(url).name, unit="B", unit_scale=True,
                  unit_divisor=1024, disable=not progress, leave=False) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, HTTPException) as err:
                    raise _MirrorFailed(f"the transfer broke off after {received:,} bytes "
                                        f"({err or type(err).__name__})") from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as err:
                    raise DownloadError(f"cannot write {out.name}: {err.strerror or err}; "
                                        "free some space or choose another folder") from None
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise _MirrorFailed(f"the transfer ended after {received:,} of {total:,} bytes")


def _temporary(folder: Path, name: str):
    """A new hidden file in `folder` (the target's file system: the rename is atomic), open for
    binary writing; the caller removes it unless it was renamed. `open(..., "xb")` creates it,
    so it gets the mode the umask gives (`tempfile` would leave it 0600)."""
    path = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.part"
    try:
        return open(path, "xb")
    except OSError as err:
        raise DownloadError(f"cannot write in {folder}: {err.strerror or err}; choose a folder "
                            "you can write to") from None


def _gunzip_into(source: Path, out) -> None:
    with gzip.open(source, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            out.write(chunk)


def _download_one(expected: IdxFile, target: Path, mirrors: Iterable[str], *, timeout: float,
                  progress: bool) -> str:
    """A checked copy of `expected` at `target` (gzipped unless `target` is the plain name),
    from the first mirror that gives one; returns its URL. Leaves no temporary file."""
    failures = []
    for mirror in mirrors:
        url = _url(mirror, expected)
        temporaries = []
        try:
            with _temporary(target.parent, target.name) as out:
                temporaries.append(Path(out.name))
                _fetch(url, out, timeout=timeout, progress=progress)
            problem = content_problem(temporaries[0], expected)
            if problem is not None:
                raise _MirrorFailed(f"the file {problem}")
            ready = temporaries[0]
            if target.suffix != ".gz":  # replacing a plain file: keep it plain
                with _temporary(target.parent, target.name) as out:
                    temporaries.append(Path(out.name))
                    _gunzip_into(ready, out)
                ready = temporaries[1]
            os.replace(ready, target)
            return url
        except _MirrorFailed as err:
            failures.append(f"{url}: {err}")
        finally:
            for path in temporaries:
                path.unlink(missing_ok=True)
    tried = "; ".join(failures) or "no mirror was given"
    raise DownloadError(f"{expected.served_as}: no mirror gave a valid copy ({tried}); check the "
                        "connection, or pass --mirror URL (a folder holding the four .gz files)")


def download_mnist(folder, mirrors: Iterable[str] = MNIST_MIRRORS, *, progress: bool = True,
                   timeout: float = 60.0, log: Callable[[str], None] = print) -> list[Path]:
    """Make `folder` hold the four MNIST IDX files (`MNIST_IDX`), each checked by the size and
    md5 of its uncompressed content; return their paths in `MNIST_IDX`'s order.

    :param folder: created if missing (with its parents).
    :param mirrors: base URLs tried in order for each file (``http(s)://`` or ``file://``); the
        file's URL is ``<mirror>/<name>.gz``.
    :param progress: a tqdm progress bar (stderr) per download.
    :param timeout: seconds without an answer before a mirror counts as failed.
    :param log: called with one line per file: kept, downloaded, or damaged and replaced.
    :raises DownloadError: `folder` cannot hold the files, or no mirror gave a valid copy of one
        (files already completed stay; a damaged one that could not be replaced stays as it was).
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise DownloadError(f"{folder} is a file; give the folder the MNIST files should go in")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create {folder}: {err.strerror or err}; choose a folder you "
                            "can write to") from None
    mirrors = tuple(mirrors)
    paths = []
    for expected in MNIST_IDX:
        present = _find_file(folder, expected.name)  # the one data.source = "mnist" reads
        if present is not None:
            problem = content_problem(present, expected)
            if problem is None:
                log(f"present: {present} (md5 checked)")
                paths.append(present)
                continue
            log(f"damaged: {present} {problem}; downloading it again")
        target = present or folder / expected.served_as
        url = _download_one(expected, target, mirrors, timeout=timeout, progress=progress)
        log(f"{'replaced' if present else 'downloaded'}: {target} (from {url}, md5 checked)")
        paths.append(target)
    return paths


# ---- command line --------------------------------------------------------------------------
def _add_datasets(parser: argparse.ArgumentParser) -> None:
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    p = datasets.add_parser(
        "mnist", help="the four MNIST IDX files (60k train, 10k test), md5-checked",
        description="Download the four MNIST IDX .gz files into DIR from public mirrors, check "
                    "the md5 of each one's uncompressed content, and keep files already "
                    "there and valid. Then train with --set data.path=DIR.")
    p.add_argument("dir", metavar="DIR", help="folder for the files (created if missing)")
    p.add_argument("--mirror", action="append", metavar="URL",
                   help="a folder URL holding the .gz files, tried instead of the defaults "
                        "(repeatable, tried in order; file:// works); defaults: "
                        + ", ".join(MNIST_MIRRORS))
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="seconds without an answer before a mirror counts as failed (60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``data mnist DIR [--mirror URL] ...`` to the `ppl-vae` sub-commands; `main` runs it."""
    p = subparsers.add_parser("data", help="download a dataset into a folder (mnist)",
                              description="Download a public dataset into a folder, checked.")
    _add_datasets(p)
    return p


def main(args: argparse.Namespace) -> int:
    """Run ``data mnist`` as parsed by `add_parser`; 0 on success. Failures raise
    `DownloadError` (the `ppl-vae` command prints it in one line and exits 2)."""
    download_mnist(args.dir, mirrors=args.mirror or MNIST_MIRRORS,
                   progress=not args.no_progress, timeout=args.timeout)
    folder = Path(args.dir).expanduser()
    print(f"MNIST is in {folder}: train on it with --set data.path={str(folder)!r}")
    return 0


def _script(argv=None) -> int:
    """``python -m ppl_vae.download mnist DIR``: the same command outside `ppl-vae`."""
    parser = argparse.ArgumentParser(prog="python -m ppl_vae.download",
                                     description="Download a public dataset into a folder.")
    _add_datasets(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except DataError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted (nothing half-written was kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(_script())
