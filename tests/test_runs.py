"""Run folders under mistakes (issue 13): a lock on a folder in use, failed starts that leave
nothing behind, damaged, torn and read-only folders, and `compare` run twice. Each mistake gets
one line naming the file and what to do, exit code 2, and changes nothing."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ppl_vae.cli import main
from ppl_vae.runs import LOCK_FILE, RunError, run_lock
from tests import aux_fns

pytest.importorskip("torch")  # the CLI trains with the Pyro backend by default

TINY = ["data.limit=300", "encoder.hidden=[32]", "decoder.hidden=[32]", "latent.dim=4",
        "train.eval_batch_size=100", "train.steps=20", "train.log_every=10",
        "train.eval_every=20", "train.checkpoint_every=20"]
SETS = [a for o in TINY for a in ("--set", o)] + ["--no-progress"]
MORE = [a if a != "train.steps=20" else "train.steps=40" for a in SETS]  # a resume's target
EVAL = ["--iwae-k", "5", "--n", "20", "--no-progress"]


CALLS = {"n": 0}


def interrupt_at_15(*, y, z, loc, scale, labels, backend):
    """An aux function that is Ctrl-C pressed twice at the 15th step (the second window)."""
    CALLS["n"] += 1
    if CALLS["n"] == 15:
        raise KeyboardInterrupt
    return 0.0 * loc.sum()


def train(out, *extra, backend="pyro"):
    return main(["train", "vae_digits", "--backend", backend, "--out", str(out), *SETS, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny Pyro run, shared: each test works on a copy (`copy_of`)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(out) == 0
    return out


@pytest.fixture(scope="module")
def trained_numpyro(tmp_path_factory):
    pytest.importorskip("numpyro")
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(out, backend="numpyro") == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def snapshot(folder: Path) -> dict:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line_error(capsys, *names) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("ppl-vae ") and ": error: " in err, err
    for name in names:
        assert str(name) in err, (name, err)
    return err


def hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that takes the folder's lock (as `train` does) and keeps it."""
    code = ("import sys, time\nfrom ppl_vae.runs import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                             text=True, cwd=Path(__file__).parents[1])
    assert child.stdout.readline().strip() == "held"
    child.stdout.close()
    return child


def kill(child: subprocess.Popen) -> None:
    """kill -9: the child's own clean-up never runs."""
    child.kill()
    child.wait()


# ---- the lock --------------------------------------------------------------------------------
def test_a_folder_in_use_is_refused_before_anything_is_deleted_and_a_stale_lock_taken_over(
        trained, tmp_path, capsys):
    """A second `train --overwrite` into a folder another process trains in used to wipe it
    while the first kept writing. Killed with -9, the owner leaves its lock: taken over."""
    run = copy_of(trained, tmp_path)
    child = hold_lock(run)
    try:
        before = snapshot(run)
        assert train(run, "--overwrite") == 2
        one_line_error(capsys, run, f"process {child.pid}")
        assert train(run, "--resume") == 2
        one_line_error(capsys, run, f"process {child.pid}")
        assert snapshot(run) == before  # the lock is still the owner's, the run untouched
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == child.pid
    finally:
        kill(child)
    assert (run / LOCK_FILE).exists()  # kill -9: no clean-up ran
    assert train(run, "--overwrite") == 0
    err = capsys.readouterr().err
    assert f"{run / LOCK_FILE} was left by process {child.pid}" in err and "taking it over" in err
    assert not (run / LOCK_FILE).exists()


def test_a_lock_of_another_host_is_refused_and_an_unheld_one_taken_over(tmp_path, capsys):
    """A lock naming another host is never guessed at (a shared file system need not carry the
    kernel's flock). On this host the flock decides: a lock file nobody holds (its run killed,
    or killed before it wrote its PID) is taken over with a note."""
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getpid() + 1, "host": socket.gethostname() + "-x"}))
    with pytest.raises(RunError, match=f"on host .*-x; if that run has ended, delete {lock}"):
        with run_lock(tmp_path):
            pass
    assert lock.exists()  # another's lock is never removed
    lock.write_text("")  # created, never written: its process died first
    with run_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "was left by a process, which is no longer running" in capsys.readouterr().err
    assert not lock.exists()


def test_of_two_processes_taking_over_a_stale_lock_one_gets_it(tmp_path):
    """Both read the dead owner's PID, then both try to take over: with O_EXCL and an unlink,
    the second removed the first's fresh lock and both went on. The flock lets one through."""
    import threading

    from ppl_vae import runs

    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": 2 ** 22 + 1, "host": socket.gethostname()}))
    start, got, refused = threading.Barrier(2), [], []

    def take():
        start.wait()
        try:
            got.append(runs._acquire(lock))
        except RunError:
            refused.append(1)

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 1 and len(refused) == 1
    runs._release(lock, got[0])
    assert not lock.exists()


def test_compare_locks_its_folder(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    child = hold_lock(out)
    try:
        assert main(["compare", "vae_digits", "--out", str(out), *SETS[:-1]]) == 2
        one_line_error(capsys, out, f"process {child.pid}")
    finally:
        kill(child)


def test_the_lock_is_released_after_a_run_an_error_and_ctrl_c(trained, tmp_path, capsys):
    assert not (trained / LOCK_FILE).exists()  # after a run that finished
    aux_fns.CALLS["n"] = 0
    nan = tmp_path / "nan"  # NaN after the first windows were logged: kept
    assert train(nan, "--set", "train.steps=40",
                 "--set", 'objective.aux=[{kind="tests.aux_fns:nan_after_25"}]') == 2
    assert "the loss became nan at step" in capsys.readouterr().err
    assert (nan / "checkpoint.pt").exists() and not (nan / LOCK_FILE).exists()
    CALLS["n"] = 0
    ctrl_c = tmp_path / "ctrl_c"
    # a second Ctrl-C stops at once: exit 130 and one line, not a traceback
    assert train(ctrl_c, "--set", 'objective.aux=[{kind="tests.test_runs:interrupt_at_15"}]') == 130
    assert capsys.readouterr().err.strip() == "ppl-vae train: interrupted"
    assert (ctrl_c / "metrics.jsonl").exists() and not (ctrl_c / LOCK_FILE).exists()


# ---- failed starts ---------------------------------------------------------------------------
def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def _numpyro_without_x64() -> bool:
    try:
        import jax
        import numpyro  # noqa: F401
    except ImportError:
        return False
    return not jax.config.jax_enable_x64


@pytest.mark.parametrize("bad, fixed", [
    pytest.param(["--device", "cuda"], ["--device", "cpu"], id="cuda-without-a-gpu",
                 marks=pytest.mark.skipif(not _no_cuda(), reason="a GPU is present")),
    pytest.param(["--set", "objective.beta=inf"], [], id="beta-inf"),
    pytest.param(["--backend", "numpyro", "--set", 'train.dtype="float64"'],
                 ["--backend", "numpyro"], id="float64-without-x64",
                 marks=pytest.mark.skipif(not _numpyro_without_x64(),
                                          reason="needs numpyro with JAX's 64-bit mode off")),
])
def test_a_failed_start_leaves_nothing_that_blocks_its_out(bad, fixed, tmp_path, capsys):
    """A start that fails (no GPU, β = inf diverging at step 1, float64 without x64) used to
    leave a folder with spec.toml, so the fixed command said 'already exists'."""
    out = tmp_path / "new" / "run"
    assert main(["train", "vae_digits", "--out", str(out), *SETS, *bad]) == 2
    capsys.readouterr()
    assert not out.parent.exists()  # nor the folder above it, made for it
    assert main(["train", "vae_digits", "--out", str(out), *SETS, *fixed]) == 0
    existing = tmp_path / "empty"  # a folder that was there before is kept, and left empty
    existing.mkdir()
    assert main(["train", "vae_digits", "--out", str(existing), *SETS, *bad]) == 2
    assert existing.is_dir() and not any(existing.iterdir())


@pytest.mark.skipif(not _no_cuda(), reason="a GPU is present; the error needs none")
def test_overwrite_keeps_the_old_run_until_training_can_start(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    before = snapshot(run)
    assert train(run, "--overwrite", "--device", "cuda") == 2
    one_line_error(capsys, "sees no CUDA GPU")
    assert snapshot(run) == before


# ---- damaged folders -------------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_middle_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:10] + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize("damage, command, names", [
    (lambda r: truncate(r / "params.npz"), ["eval"], ["params.npz", "BadZipFile", "--overwrite"]),
    (lambda r: truncate(r / "params.npz"), ["sample", "--out", "s.npy"], ["params.npz"]),
    (lambda r: truncate(r / "run.json"), ["eval"], ["run.json", "--overwrite"]),
    (lambda r: corrupt_middle_line(r / "metrics.jsonl"), ["eval"],
     ["metrics.jsonl, line 2", "delete that line"]),
    (lambda r: corrupt_middle_line(r / "metrics.jsonl"), ["plot"], ["metrics.jsonl, line 2"]),
    (lambda r: truncate(r / "checkpoint.pt"), ["resume"],
     ["checkpoint.pt", "cannot be resumed", "--overwrite", "train.init="]),
    (lambda r: truncate(r / "run.json"), ["resume"], ["run.json"]),
    (lambda r: corrupt_middle_line(r / "metrics.jsonl"), ["resume"], ["metrics.jsonl, line 2"]),
], ids=["params-eval", "params-sample", "run.json-eval", "metrics-eval", "metrics-plot",
        "checkpoint-resume", "run.json-resume", "metrics-resume"])
def test_a_damaged_file_is_one_line_naming_it_and_changes_nothing(
        damage, command, names, trained, tmp_path, capsys):
    """These used to end in tracebacks (BadZipFile, JSONDecodeError) naming no file; a
    truncated checkpoint.pt also had spec.toml rewritten (to the new train.steps) first."""
    run = copy_of(trained, tmp_path)
    damage(run)
    before = snapshot(run)
    if command == ["resume"]:
        assert train(run, "--resume", *MORE) == 2
    else:
        args = [command[0], str(run), *command[1:]]
        args = [str(tmp_path / a) if a == "s.npy" else a for a in args]
        assert main(args + (EVAL if command == ["eval"] else [])) == 2
    one_line_error(capsys, *[run / n if n.endswith((".npz", ".json", ".pt")) else n
                             for n in names])
    assert snapshot(run) == before


def test_a_damaged_numpyro_checkpoint_is_one_line_and_changes_nothing(
        trained_numpyro, tmp_path, capsys):
    run = copy_of(trained_numpyro, tmp_path)
    truncate(run / "checkpoint.pkl")
    before = snapshot(run)
    assert train(run, "--resume", *MORE, backend="numpyro") == 2
    one_line_error(capsys, run / "checkpoint.pkl", "cannot be resumed")
    assert snapshot(run) == before


def test_a_torn_last_metrics_line_is_skipped_with_a_warning(trained, tmp_path, capsys):
    """A crash mid-append leaves the last line of metrics.jsonl torn; eval, plot and resume all
    used to refuse with a JSONDecodeError naming no file."""
    run = copy_of(trained, tmp_path)
    metrics = run / "metrics.jsonl"
    records = metrics.read_text().splitlines()
    metrics.write_text("\n".join(records) + '\n{"step": 30, "split": "tr')
    warning = f"the last line of {metrics} is incomplete"
    assert main(["eval", str(run), *EVAL]) == 0
    assert warning in capsys.readouterr().err
    assert main(["plot", str(run)]) == 0
    assert warning in capsys.readouterr().err
    assert train(run, "--resume", *MORE) == 0
    assert warning in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[: len(records)] == [json.loads(r)["step"] for r in records]
    assert steps[-1] == 40


# ---- a read-only folder ----------------------------------------------------------------------
#: Root writes into a read-only folder unless it gives up CAP_DAC_OVERRIDE: as root (CI, these
#: containers) the commands then run in a child process without the capabilities.
UNPRIVILEGED = (["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0
                else None)


def _cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `ppl-vae args`, run as a user who cannot write into a
    read-only folder."""
    if UNPRIVILEGED is None:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    done = subprocess.run([*UNPRIVILEGED, sys.executable, "-m", "ppl_vae.cli", *args],
                          capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def test_eval_of_a_read_only_folder_prints_the_report_then_says_it_was_not_saved(
        trained, tmp_path, capsys):
    if UNPRIVILEGED and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: root writes into read-only folders")
    run = copy_of(trained, tmp_path)
    run.chmod(0o555)
    try:
        before = snapshot(run)
        code, out, err = _cli(capsys, "eval", str(run), *EVAL)
        assert code == 2
        assert "test ELBO" in out and "written:" not in out  # the report, printed first
        assert len(err.strip().splitlines()) == 1
        assert f"{run / 'report.json'} could not be written" in err and "chmod u+w" in err
        assert snapshot(run) == before
        code, _, err = _cli(capsys, "train", "vae_digits", "--out", str(run), "--resume", *MORE)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert str(run / LOCK_FILE) in err and "writable" in err
        assert snapshot(run) == before
    finally:
        run.chmod(0o755)


# ---- compare, twice --------------------------------------------------------------------------
def test_compare_into_a_folder_with_runs_says_overwrite_not_resume(trained, tmp_path, capsys):
    """`compare` run twice ended in "ppl-vae train: error: … pass --resume", an option compare
    does not have."""
    out = tmp_path / "cmp"
    shutil.copytree(trained, out / "pyro")
    before = snapshot(out)
    assert main(["compare", "vae_digits", "--out", str(out), *SETS[:-1]]) == 2
    err = one_line_error(capsys, out, "the pyro run", "pass --overwrite")
    assert "--resume" not in err
    assert snapshot(out) == before
