"""A fork server for tests that start many Python programs: one process imports torch, Pyro,
JAX, NumPyro, matplotlib and ppl_vae once, then forks a child per request, so that no program
pays those imports again (3 to 4 s each in a fresh interpreter).

A request names a runner (`RUNNERS`: "script" runs a script as ``python SCRIPT ARGS`` would; a
test file may add its own), its argv, a working folder, an environment, and the client's stdin,
stdout and stderr (passed as file descriptors over a Unix socket). The forked child takes them,
runs the runner, and answers with its pid (so that a client may kill it at a timeout) and then
its exit code. A forked child starts as clean as a fresh process: `serve` checks that the
imports started no thread and no JAX backend (JAX reads XLA_FLAGS and picks its devices when a
backend starts, which happens in the child, under the request's environment), so requests share
nothing. What a library reads from the environment when it is imported, though, it read in the
server: JAX_ENABLE_X64 and JAX's other variables, the OpenMP and OpenBLAS thread counts. A
script that sets those itself before its imports (or a request whose environment changes them)
needs a fresh interpreter.

Used by tests/test_docs.py (the code blocks of the pages) and tests/test_examples.py (the smoke
runs of the examples and benchmarks). Started as ``python -P tests/forkserver.py serve SOCKET
[RUNNERS_FILE]``: RUNNERS_FILE (a test file) adds its `RUNNERS` and may replace `WARM_MODULES`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What the server imports before it forks (a runners file may name its own); torch._dynamo,
#: which torch imports lazily, because Pyro's training does import it.
WARM_MODULES = ("numpy", "torch", "torch._dynamo", "pyro", "jax", "numpyro", "flax.linen", "optax",
                "matplotlib.pyplot", "arviz", "sklearn.datasets", "ppl_vae.cli",
                "ppl_vae.training", "ppl_vae.evaluation", "ppl_vae.report", "ppl_vae.plots",
                "ppl_vae.sweep", "ppl_vae.pyro.train", "ppl_vae.pyro.hooks",
                "ppl_vae.numpyro.train", "ppl_vae.numpyro.hooks", "ppl_vae.experiments")


def run_script(argv: list[str]) -> int:
    """``python SCRIPT ARGS`` (argv: SCRIPT, ARGS): the script's folder first on sys.path, run
    as __main__. sys.executable stays this interpreter, so what the script starts with it is a
    real, fresh Python."""
    import runpy

    script = argv[0]
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        # what the interpreter's exit runs: weakref.finalize's clean-ups (temporary folders),
        # multiprocessing's (daemonic children ended), logging's flush; the child ends with
        # os._exit, which runs none of them
        atexit._run_exitfuncs()
    return 0


RUNNERS = {"script": run_script}


def _exit_code(stop: SystemExit) -> int:
    """The exit status Python gives SystemExit(code): a message is printed and gives 1."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def _handle(conn: socket.socket) -> None:
    """In a forked child: take the request's stdio, folder and environment, answer with this
    process's pid, run the request, answer with the exit code and end."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; a child waits
    message, fds, _, _ = socket.recv_fds(conn, 1 << 22, 3)
    request = json.loads(message)
    for fd, target in zip(fds, (0, 1, 2), strict=True):
        os.dup2(fd, target)
        os.close(fd)
    conn.send(str(os.getpid()).encode())
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # as a fresh interpreter would: PYTHONPATH first (a page's own module, PYTHONPATH=.)
    sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # tests/test_docs.py's pages set DOCS_PYTHON, its client on PATH: what a page's command
    # starts with sys.executable comes back to the server too; elsewhere it stays the real one
    sys.executable = os.environ.get("DOCS_PYTHON", sys.executable)
    code = 1
    try:
        code = RUNNERS[request["kind"]](request["argv"])
    except SystemExit as stop:
        code = _exit_code(stop)
    except BaseException:  # noqa: BLE001 (reported as a failed command, as Python would)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    conn.send(str(code).encode())
    os._exit(code if 0 <= code < 256 else 1)


def _load_runners(path: str) -> None:
    """Add the RUNNERS of the test file at `path` (imported as tests.NAME, the repository on
    sys.path for that import only: a script run here must not see it) and take its
    WARM_MODULES, if it has any."""
    global WARM_MODULES
    sys.path.insert(0, str(ROOT))
    try:
        module = importlib.import_module(f"tests.{Path(path).stem}")
    finally:
        sys.path.remove(str(ROOT))
    RUNNERS.update(module.RUNNERS)
    WARM_MODULES = getattr(module, "WARM_MODULES", WARM_MODULES)


def serve(path: str) -> None:
    """The fork server: import the heavy modules, then fork a child per connection."""
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 (the command that needs it reports the error)
            pass
    from jax._src import xla_bridge

    assert not xla_bridge.backends_are_initialized(), "an import started JAX: forks unsafe"
    assert threading.active_count() == 1, "an import started a thread: forks unsafe"
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(64)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            _handle(conn)
        conn.close()


class ForkServer:
    """A server of this test process (start it once per module: each pytest-xdist worker then
    has its own), with its log (`folder`/server.log) and the output of each request."""

    def __init__(self, folder: Path, env: dict[str, str], runners: str | None = None,
                 start_timeout: float = 600):
        """`env`: the server's environment and each request's unless the request has its own;
        `runners`: a test file whose RUNNERS the server adds."""
        self.folder, self.env = Path(folder), dict(env)
        # a short path: a Unix socket's may not exceed 107 bytes, and pytest's tmp paths grow
        self.socket_dir = tempfile.mkdtemp(prefix="ppl-vae-fork-")
        self.socket = os.path.join(self.socket_dir, "server.sock")
        self.log = open(self.folder / "server.log", "w")  # noqa: SIM115 (closed in close())
        # -P: tests/ not on sys.path, where tests/pyro and tests/numpyro would shadow the packages
        self.process = subprocess.Popen(
            [sys.executable, "-P", __file__, "serve", self.socket, *([runners] if runners else [])],
            env=self.env, stdout=subprocess.PIPE, stderr=self.log, text=True,
            start_new_session=True)
        started, _, _ = select.select([self.process.stdout], [], [], start_timeout)
        ready = self.process.stdout.readline() if started else f"(no answer in {start_timeout} s)"
        if ready.strip() != "ready":
            self.close()
            raise RuntimeError(f"the fork server did not start: {ready!r}\n"
                               f"{(self.folder / 'server.log').read_text()[-4000:]}")

    def run(self, kind: str, argv: list[str], cwd: Path, timeout: float,
            env: dict[str, str] | None = None) -> tuple[int, str]:
        """(exit code, stdout and stderr together) of one request; after `timeout` seconds the
        child is killed and the code is 124. The output stays in `folder`/out-*.txt."""
        out = self.folder / f"out-{os.getpid()}-{time.monotonic_ns()}.txt"
        deadline = time.monotonic() + timeout
        with open(out, "w") as fh, open(os.devnull) as devnull, \
                socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(timeout)
            conn.connect(self.socket)
            request = {"kind": kind, "argv": argv, "cwd": str(cwd),
                       "env": self.env if env is None else env}
            socket.send_fds(conn, [json.dumps(request).encode()],
                            [devnull.fileno(), fh.fileno(), fh.fileno()])
            pid, note = None, ""
            try:
                pid = int(conn.recv(16) or b"0") or None
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                code = int(conn.recv(16) or b"1")
            except TimeoutError:
                code, note = 124, f"\n(killed: still running after {timeout} s)"
                if pid:  # its own children are left to close(), as subprocess.run leaves them
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        return code, out.read_text() + note

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and any child left
        self.process.wait()
        self.process.stdout.close()
        self.log.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        if len(sys.argv) > 3:
            _load_runners(sys.argv[3])
        serve(sys.argv[2])
