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

import numpy as np
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
                 marks=[pytest.mark.slow,
                        pytest.mark.skipif(not _numpyro_without_x64(),
                                           reason="needs numpyro with JAX's 64-bit mode off")]),
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


@pytest.mark.slow
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


# ---- a folder that cannot lie about its files (issue 20) -------------------------------------
def test_run_json_records_the_spec_and_a_digest_of_each_file_it_wrote(trained):
    from ppl_vae import runs
    from ppl_vae.spec import load_spec

    info = json.loads((trained / "run.json").read_text())
    assert set(info["digests"]) == {"spec.toml", "params.npz", "checkpoint.pt"}
    for name, recorded in info["digests"].items():
        assert recorded == runs.file_digest(trained / name), name
    assert info["spec"] == runs.spec_table(load_spec(trained / "spec.toml"))
    assert "previous" not in info  # only while a save is under way


def test_a_truncated_spec_toml_cannot_change_what_a_resume_trains(trained, tmp_path, capsys):
    """The issue's case: spec.toml cut to its first 150 bytes (still valid TOML), then a resume
    from it. The missing keys took their defaults (data.binarize "none" for the "dynamic" the
    run was trained with), the run went on with another objective, and spec.toml was rewritten
    with the defaults: exit 0, no warning."""
    run = copy_of(trained, tmp_path)
    spec_toml = run / "spec.toml"
    spec_toml.write_bytes(spec_toml.read_bytes()[:150])
    before = snapshot(run)
    assert main(["train", str(spec_toml), "--out", str(run), "--resume", "--set",
                 "train.steps=40", "--no-progress"]) == 2
    err = one_line_error(capsys, f"{spec_toml} was changed after training wrote it",
                         "data.binarize: recorded 'dynamic', given 'none'",
                         f"ppl-vae train {run} --resume")
    assert "data.limit: recorded 300, given 0" in err
    assert snapshot(run) == before
    # eval, plot and sample refuse it too, naming the file and a key
    for args in (["eval", str(run), *EVAL], ["plot", str(run)],
                 ["sample", str(run), "--out", str(tmp_path / "s.npy")]):
        assert main(args) == 2
        one_line_error(capsys, f"{spec_toml} is not the file training wrote",
                       "data.binarize: recorded 'dynamic', the file has 'none'")
    assert snapshot(run) == before and not (tmp_path / "s.npy").exists()
    # the command the messages give: the recorded spec continues the run and writes it back
    assert main(["train", str(run), "--resume", "--set", "train.steps=40", "--no-progress"]) == 0
    assert f"{spec_toml} had changed since training wrote it" in capsys.readouterr().err
    from ppl_vae.spec import load_spec

    resumed = load_spec(spec_toml)
    assert resumed.data.binarize == "dynamic" and resumed.train.steps == 40
    assert main(["eval", str(run), *EVAL]) == 0


@pytest.mark.slow
def test_a_resume_names_each_key_that_differs_from_the_recorded_spec(trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    before = snapshot(run)
    assert train(run, "--resume", *MORE, "--set", "latent.dim=5", "--set",
                 "objective.beta=2") == 2
    one_line_error(capsys, "latent.dim: recorded 4, given 5",
                   "objective.beta: recorded 1.0, given 2.0", "train.steps")
    assert snapshot(run) == before
    # where it runs and how long are the resume's to change
    assert train(run, "--resume", *MORE, "--set", "train.threads=2") == 0


@pytest.mark.parametrize("swap, command, names", [
    ("params.npz", ["eval"], ["params.npz is not the file training wrote", "--overwrite"]),
    ("params.npz", ["sample", "--out", "s.npy"], ["params.npz is not the file training wrote"]),
    ("params.npz", ["plot"], ["params.npz is not the file training wrote"]),
    ("checkpoint.pt", ["resume"], ["checkpoint.pt is not the file training wrote",
                                   "cannot be resumed", "train.init="]),
], ids=["params-eval", "params-sample", "params-plot", "checkpoint-resume"])
def test_a_file_swapped_for_another_runs_is_refused_in_one_line(
        swap, command, names, trained, tmp_path, capsys):
    """Another run's params.npz or checkpoint.pt, whole and readable, used to be evaluated (or
    resumed) as if it were this run's."""
    other = tmp_path / "other"
    assert train(other, "--set", "train.seed=1") == 0
    capsys.readouterr()
    run = copy_of(trained, tmp_path)
    shutil.copy(other / swap, run / swap)
    before = snapshot(run)
    if command == ["resume"]:
        assert train(run, "--resume", *MORE) == 2
    else:
        args = [command[0], str(run), *command[1:]]
        args = [str(tmp_path / a) if a == "s.npy" else a for a in args]
        assert main(args + (EVAL if command == ["eval"] else [])) == 2
    one_line_error(capsys, *[str(run / n) if n.startswith(swap) else n for n in names])
    assert snapshot(run) == before and not (tmp_path / "s.npy").exists()


def test_a_folder_without_digests_still_works_with_a_note_and_gets_them_on_resume(
        trained, tmp_path, capsys):
    run = copy_of(trained, tmp_path)
    info = json.loads((run / "run.json").read_text())
    old = {k: v for k, v in info.items() if k not in ("digests", "spec")}  # an older folder
    (run / "run.json").write_text(json.dumps(old))
    note = f"{run / 'run.json'} records no digests"
    assert main(["eval", str(run), *EVAL]) == 0
    err = capsys.readouterr().err
    assert note in err and len([line for line in err.splitlines() if "note:" in line]) == 1
    assert train(run, "--resume", *MORE) == 0
    assert note in capsys.readouterr().err
    assert set(json.loads((run / "run.json").read_text())["digests"]) == {
        "spec.toml", "params.npz", "checkpoint.pt"}
    assert main(["eval", str(run), *EVAL]) == 0
    assert note not in capsys.readouterr().err


@pytest.mark.parametrize("crash_at", ["before the renames", "before the last run.json"])
def test_a_save_interrupted_anywhere_leaves_a_folder_that_verifies(crash_at, trained, tmp_path,
                                                                   monkeypatch):
    """run.json first records the new digests beside the old ones, then the files are renamed,
    then run.json is written alone: a crash between leaves old or new files, both recorded."""
    from ppl_vae import runs

    run = copy_of(trained, tmp_path)
    info = runs.read_info(run)
    params = runs.load_params(run / "params.npz")
    new_params = {k: v + 1.0 for k, v in params.items()}
    real_replace, real_json = os.replace, runs.write_json_atomic
    calls = {"json": 0}

    def replace(src, dst):
        if crash_at == "before the renames" and Path(dst).name == "params.npz":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    def write_json(path, obj):
        calls["json"] += 1
        if crash_at == "before the last run.json" and calls["json"] == 2:
            raise KeyboardInterrupt
        return real_json(path, obj)

    monkeypatch.setattr(runs.os, "replace", replace)
    monkeypatch.setattr(runs, "write_json_atomic", write_json)
    with pytest.raises(KeyboardInterrupt):
        runs.write_recorded(run, {"params.npz": runs.params_writer(new_params)},
                            info | {"step": 30})
    monkeypatch.undo()
    assert not list(run.glob(".*.tmp"))  # no temporary file left behind
    loaded = runs.load_run(run)
    expect = params if crash_at == "before the renames" else new_params
    assert all(np.array_equal(loaded.params[k], expect[k]) for k in params)
    assert loaded.info["step"] == (20 if crash_at == "before the renames" else 30)


# ---- eval of a folder in use -----------------------------------------------------------------
def test_eval_of_a_folder_in_use_says_which_step_it_saw_and_writes_nothing(
        trained, tmp_path, capsys):
    """eval of a folder while it trained wrote report.json (and khat.npy) from a mid-run
    checkpoint into it, unflagged."""
    run = copy_of(trained, tmp_path)
    child = hold_lock(run)
    try:
        before = snapshot(run)
        assert main(["eval", str(run), *EVAL, "--plots"]) == 0
        out, err = capsys.readouterr()
        assert "test ELBO" in out and "written:" not in out
        assert (f"{run} is in use (process {child.pid} is training in it): this evaluated step "
                "20 of a running run") in err
        assert "report.json is not written (nor --plots or --export-draws)" in err
        assert snapshot(run) == before
    finally:
        kill(child)
    assert main(["eval", str(run), *EVAL]) == 0  # once it has ended: written
    assert (run / "report.json").exists()


# ---- figures and samples into folders that cannot take them ----------------------------------
def _read_only_case(run: Path, tmp_path: Path, case: str):
    ro = tmp_path / "ro"
    ro.mkdir()
    if case == "plot, run folder read-only":
        run.chmod(0o555)
        return ["plot", str(run)], [f"cannot create {run / 'plots'}", f"chmod u+w {run}"]
    if case == "plot, plots/ read-only":
        (run / "plots").mkdir()
        (run / "plots").chmod(0o555)
        return ["plot", str(run)], [f"{run / 'plots'}", "read-only"]
    if case == "sample into a read-only folder":
        ro.chmod(0o555)
        return ["sample", str(run), "--out", str(ro / "s.png")], [str(ro), "read-only"]
    return (["sample", str(run), "--out", str(tmp_path / "missing" / "s.png")],
            [f"the folder {tmp_path / 'missing'} does not exist", "mkdir -p"])


@pytest.mark.parametrize("case", ["plot, run folder read-only", "plot, plots/ read-only",
                                  "sample into a read-only folder", "sample into a missing one"])
def test_figures_into_a_folder_that_cannot_take_them_are_one_line(case, trained, tmp_path,
                                                                    capsys):
    """These were PermissionError tracebacks, and a raw "[Errno 2]" line for a missing folder."""
    if UNPRIVILEGED and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: root writes into read-only folders")
    run = copy_of(trained, tmp_path)
    args, names = _read_only_case(run, tmp_path, case)
    before = snapshot(tmp_path)
    try:
        code, out, err = _cli(capsys, *args)
    finally:
        for folder in (run, run / "plots", tmp_path / "ro"):
            if folder.exists():
                folder.chmod(0o755)
    assert code == 2, err
    err = err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Errno" not in err, err
    for name in names:
        assert name in err, (name, err)
    assert snapshot(tmp_path) == before  # nothing written, not even half a figure
