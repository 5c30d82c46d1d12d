"""`ppl_vae.download` against a local HTTP server on 127.0.0.1 that serves copies of the shared
MNIST files, damaged copies, 404s and a transfer that breaks off: the fall-through to the next
mirror, the md5 refusal, files kept or replaced, and nothing half-written. No test reaches
outside the machine (the one unreachable mirror is a closed port on 127.0.0.1)."""

import argparse
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ppl_vae import download
from ppl_vae.data import DataError, read_idx
from ppl_vae.download import MNIST_IDX, DownloadError, download_mnist

MNIST = Path(__file__).parents[1].parent / "shared" / "data" / "mnist"
ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(not all((MNIST / f.served_as).is_file() for f in MNIST_IDX),
                                reason=f"the MNIST IDX files are not in {MNIST}")
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = MNIST_IDX


def gunzipped_md5(path: Path) -> str:
    """The md5 of a file's content, gunzipped when it is gzipped (an independent reference:
    hashlib over the whole content at once)."""
    data = path.read_bytes()
    return hashlib.md5(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).hexdigest()


def damaged_copy(expected, flip_at: int = 100) -> bytes:
    """A valid gzip stream of `expected`'s content with one byte changed (size kept)."""
    content = bytearray(gzip.decompress((MNIST / expected.served_as).read_bytes()))
    content[flip_at] ^= 0xFF
    return gzip.compress(bytes(content), compresslevel=1)


class Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the served folder; under /short/ a file whose transfer breaks off halfway
    (Content-Length says the whole file, the connection closes after half of it)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.startswith("/short/"):
            body = (Path(self.directory) / "good" / Path(self.path).name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Base URL of a server on 127.0.0.1 with mirrors good/ (the shared files), missing/ (404s),
    damaged/ (train-labels with one byte changed, the images cut short: a broken gzip stream),
    short/ (transfers that break off) and an unreachable one (a port nobody listens on)."""
    www = tmp_path_factory.mktemp("www")
    for name in ("good", "missing", "damaged"):
        (www / name).mkdir()
    for f in MNIST_IDX:
        shutil.copy(MNIST / f.served_as, www / "good" / f.served_as)
    (www / "damaged" / TRAIN_LABELS.served_as).write_bytes(damaged_copy(TRAIN_LABELS))
    images = (MNIST / TRAIN_IMAGES.served_as).read_bytes()
    (www / "damaged" / TRAIN_IMAGES.served_as).write_bytes(images[: len(images) // 3])

    def handler(*args, **kwargs):
        return Handler(*args, directory=str(www), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    with socket.socket() as s:  # a free port, closed again: connections to it are refused
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield {"good": f"{base}/good/", "missing": f"{base}/missing", "damaged": f"{base}/damaged/",
           "short": f"{base}/short/", "unreachable": f"http://127.0.0.1:{closed_port}/"}
    httpd.shutdown()
    httpd.server_close()


def leftovers(folder: Path) -> list[str]:
    """Temporary files a download left behind (there should be none)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def seeded(folder: Path, *files) -> Path:
    """`folder` holding good copies of `files` (so a test downloads only what it is about)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(MNIST / f.served_as, folder / f.served_as)
    return folder


def test_falls_through_404_and_damaged_mirrors_to_a_good_one(server, tmp_path):
    out = tmp_path / "new" / "mnist"  # created with its parents
    lines = []
    paths = download_mnist(out, [server["missing"], server["damaged"], server["good"]],
                           progress=True, log=lines.append)
    assert paths == [out / f.served_as for f in MNIST_IDX]
    for f, path in zip(MNIST_IDX, paths):
        assert path.read_bytes() == (MNIST / f.served_as).read_bytes()
        assert gunzipped_md5(path) == f.md5
    assert read_idx(paths[0]).shape == (60000, 28, 28)
    assert read_idx(paths[3]).shape == (10000,)
    assert all(line.startswith("downloaded: ") and server["good"] in line for line in lines)
    assert leftovers(out) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths} == {0o666 & ~umask}


def test_valid_files_are_kept_without_asking_a_mirror(tmp_path, server):
    out = seeded(tmp_path, *MNIST_IDX)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lines = []
    download_mnist(out, [server["unreachable"]], progress=False, log=lines.append)
    assert [line.split(" ")[0] for line in lines] == ["present:"] * 4
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_wrong_md5_is_refused_and_nothing_is_kept(tmp_path, server):
    out = seeded(tmp_path, TRAIN_IMAGES)  # train-labels comes next, from the damaged mirror
    with pytest.raises(DownloadError) as caught:
        download_mnist(out, [server["damaged"]], progress=False, log=lambda line: None)
    message = str(caught.value)
    assert "\n" not in message
    assert TRAIN_LABELS.served_as in message and TRAIN_LABELS.md5 in message
    assert "--mirror" in message
    assert isinstance(caught.value, DataError)
    assert sorted(p.name for p in out.iterdir()) == [TRAIN_IMAGES.served_as]


def test_a_broken_gzip_stream_a_cut_transfer_and_a_404_are_all_refused(tmp_path, server):
    out = tmp_path / "mnist"
    mirrors = [server["damaged"], server["short"], server["missing"], server["unreachable"],
               "not a url"]
    with pytest.raises(DownloadError) as caught:
        download_mnist(out, mirrors, progress=False, log=lambda line: None)
    message = str(caught.value)
    assert "gzip stream is damaged" in message  # the images cut to a third
    assert "transfer" in message  # the connection that closed halfway
    assert "HTTP 404" in message
    assert "not a url" in message
    assert list(out.iterdir()) == []


def test_damaged_present_files_are_replaced_in_their_own_form(tmp_path, server):
    out = seeded(tmp_path, TRAIN_IMAGES, TEST_IMAGES)
    (out / TRAIN_LABELS.served_as).write_bytes(damaged_copy(TRAIN_LABELS))
    plain = out / TEST_LABELS.name  # an uncompressed file, cut short: read before its .gz
    plain.write_bytes(gzip.decompress((MNIST / TEST_LABELS.served_as).read_bytes())[:5000])
    lines = []
    paths = download_mnist(out, [server["good"]], progress=False, log=lines.append)
    assert paths[1] == out / TRAIN_LABELS.served_as and paths[3] == plain
    assert gunzipped_md5(paths[1]) == TRAIN_LABELS.md5
    assert plain.read_bytes()[:2] != b"\x1f\x8b"  # still plain
    assert hashlib.md5(plain.read_bytes()).hexdigest() == TEST_LABELS.md5
    assert [line.split(" ")[0] for line in lines] == [
        "present:", "damaged:", "replaced:", "present:", "damaged:", "replaced:"]
    assert "has md5" in lines[1] and "5,000 bytes" in lines[4]
    assert leftovers(out) == []


def test_a_damaged_file_stays_as_it_was_when_no_mirror_helps(tmp_path, server):
    out = seeded(tmp_path, TRAIN_IMAGES)
    bad = damaged_copy(TRAIN_LABELS)
    (out / TRAIN_LABELS.served_as).write_bytes(bad)
    with pytest.raises(DownloadError, match="no mirror gave a valid copy"):
        download_mnist(out, [server["missing"]], progress=False, log=lambda line: None)
    assert (out / TRAIN_LABELS.served_as).read_bytes() == bad
    assert leftovers(out) == []


def test_a_file_where_the_folder_should_be(tmp_path):
    path = tmp_path / "mnist"
    path.write_text("not a folder")
    with pytest.raises(DownloadError, match="is a file"):
        download_mnist(path, [], progress=False)


def test_main_through_add_parser(tmp_path, server, capsys):
    parser = argparse.ArgumentParser(prog="ppl-vae")
    download.add_parser(parser.add_subparsers(dest="command", required=True))
    out = seeded(tmp_path, TRAIN_IMAGES, TEST_IMAGES)  # the labels come from the mirror
    args = parser.parse_args(["data", "mnist", str(out), "--mirror", server["missing"],
                              "--mirror", server["good"], "--no-progress"])
    assert args.command == "data" and args.dataset == "mnist"
    assert download.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("downloaded: ") == 2 and printed.count("present: ") == 2
    assert f"--set data.path={str(out)!r}" in printed
    args = parser.parse_args(["data", "mnist", str(tmp_path / "other"), "--mirror",
                              server["missing"], "--no-progress"])
    with pytest.raises(DownloadError):
        download.main(args)


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "ppl_vae.download", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_python_m_downloads_and_refuses_in_one_line(tmp_path, server):
    out = seeded(tmp_path / "a", TRAIN_IMAGES, TEST_IMAGES)
    done = run_module("mnist", str(out), "--mirror", server["good"], "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("downloaded: ") == 2
    assert all(gunzipped_md5(out / f.served_as) == f.md5 for f in MNIST_IDX)
    done = run_module("mnist", str(seeded(tmp_path / "b", TRAIN_IMAGES)), "--mirror",
                      server["damaged"], "--no-progress")
    assert done.returncode == 2
    assert done.stderr.startswith("python -m ppl_vae.download: error: train-labels")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_importing_it_loads_no_backend():
    code = ("import sys, ppl_vae.download\n"
            "print(' '.join(m for m in ('torch', 'jax', 'pyro', 'numpyro') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
