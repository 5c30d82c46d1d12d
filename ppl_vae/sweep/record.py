"""A sweep's record: its folder, ``OUT/sweep.json``, each point's status, and resuming.

A sweep folder ``OUT/`` holds one ordinary run folder per point (``OUT/<index>-<short name>/``)
and ``OUT/sweep.json``: the definition (the base spec, the grid, the seeds, the backend) and each
point's status (`STATUSES`: pending, running, done, failed with its one-line error,
interrupted), its step, its seconds and its tracking run. The driver alone writes it,
atomically, when a run starts (`start_record`: each point's state read back from its folder by
`point_state`, so a second run of the same sweep skips finished points and resumes interrupted
ones) and as points start and end (`RecordKeeper`). ``OUT/.stop`` (`STOP_FILE`), which every
point polls, asks the running points to stop at the end of their window. Where the sweep is
tracked in MLflow, its parent run is opened and closed here too (`open_tracking`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from ppl_vae import runs
from ppl_vae.spec import Spec
from ppl_vae.sweep.grid import Sweep, SweepError

SWEEP_FILE, STOP_FILE = "sweep.json", ".stop"
STATUSES = ("pending", "running", "done", "failed", "interrupted")


def point_state(folder: Path, spec: Spec, backend: str) -> tuple[str, int]:
    """(state, step) of a point's run folder: "new" (nothing there), "done" (trained to
    train.steps), "resume" (a checkpoint before the end), "restart" (a start that saved no
    checkpoint: trained again from step 0). A folder holding another run (another spec or
    backend) is a `SweepError`: the sweep never overwrites what it did not write."""
    folder = Path(folder)
    if runs.is_empty(folder):
        return "new", 0
    try:
        info = runs.read_info(folder)
    except runs.RunError:
        return "restart", 0
    if not info:
        return "restart", 0
    if info.get("backend") and info["backend"] != backend:
        raise SweepError(f"{folder} holds a run trained with {info['backend']}, not {backend}: "
                         "run the sweep with the backend it was started with, or use another "
                         "--out")
    if "spec" in info:
        differences = runs.spec_differences(info["spec"], runs.spec_table(spec),
                                            ignore=runs.RESUMABLE_KEYS)
        if differences:
            raise SweepError(f"{folder} holds another run "
                             f"({runs.describe_differences(differences)}); move it away or "
                             "use another --out")
    step = int(info.get("step", 0))
    if step <= 0:
        return "restart", 0
    return ("done" if step >= spec.train.steps else "resume"), step


def one_line(err: BaseException) -> str:
    """An error as the one line a failed point records: 'ValueError: its first line'."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".strip()


def read_sweep(out: Path) -> dict:
    """OUT/sweep.json, or a `SweepError` saying OUT is no sweep folder."""
    path = Path(out) / SWEEP_FILE
    if not path.exists():
        raise SweepError(f"{out} is not a sweep folder: it has no {SWEEP_FILE} (run "
                         "`ppl-vae sweep SPEC --grid … --out DIR` first)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise runs.damaged(path, err, "run the sweep again with --overwrite") from None
    return data


def _check_definition(recorded: dict, given: dict, out: Path) -> None:
    """The same sweep (train.steps may grow, as a resume allows), or a `SweepError` naming the
    difference."""
    what = []
    for key in ("grid", "seeds", "backend"):
        if recorded.get(key) != given.get(key):
            what.append(f"{key}: recorded {recorded.get(key)!r}, given {given.get(key)!r}")
    what += runs.spec_differences(recorded.get("spec", {}), given["spec"],
                                  ignore=runs.RESUMABLE_KEYS)
    if what:
        raise SweepError(f"{out} holds another sweep ({runs.describe_differences(what)}); "
                         "run the same command as before, or use another --out (or --overwrite "
                         "to delete it)")


def _now() -> str:
    """The time now, as sweep.json records it (ISO 8601, to the second)."""
    return datetime.now().isoformat(timespec="seconds")


def start_record(sweep: Sweep, out: Path, backend: str, engine: str, overwrite: bool) -> dict:
    """The sweep record at the start of a run: the folder checked against its definition (or
    cleared by `overwrite`), each point's status read from its run folder (done, interrupted,
    pending; failed as recorded before)."""
    definition = sweep.definition(backend)
    if overwrite:
        runs.clear_run_dir(out)  # all but the lock the caller holds
    record = read_sweep(out) if (out / SWEEP_FILE).exists() else None
    if record is not None:
        _check_definition(record["definition"], definition, out)
    elif not runs.is_empty(out):
        raise SweepError(f"{out} exists and holds no {SWEEP_FILE}: choose another --out "
                         "(or --overwrite to delete what is there)")
    previous = {p["name"]: p for p in (record or {}).get("points", [])}
    new = {"format": 1, "definition": definition,
           "created": (record or {}).get("created", _now()), "updated": _now(),
           "engine": engine, "tracking": (record or {}).get("tracking"), "points": []}
    for point in sweep.points:
        state, step = point_state(out / point.name, point.spec, backend)
        old = previous.get(point.name, {})
        status = {"done": "done", "resume": "interrupted"}.get(state, "pending")
        if old.get("status") == "failed" and state != "done":
            status = "failed"  # as recorded; --retry-failed runs it again
        new["points"].append({
            "index": point.index, "name": point.name, "folder": point.name,
            "setting": {k: v for k, v in point.setting}, "seed": point.seed,
            "status": status, "error": old.get("error") if status == "failed" else None,
            "step": step, "steps": point.spec.train.steps,
            "seconds": old.get("seconds", 0.0), "tracking": old.get("tracking")})
    return new


def log_start(record: dict, sweep: Sweep, out: Path, todo: list, retry_failed: bool,
              backend: str, engine: str, log: Callable[[str], None]) -> None:
    """The opening line of a run: how many points, done before, to run, failed and left alone."""
    skipped_failed = sum(r["status"] == "failed" for r in record["points"]) * (not retry_failed)
    done_before = sum(r["status"] == "done" for r in record["points"])
    failed_note = (f", {skipped_failed} failed left alone (--retry-failed runs them)"
                   if skipped_failed else "")
    log(f"sweep: {len(sweep.points)} points in {out} ({done_before} done before, "
        f"{len(todo)} to run{failed_note}); backend {backend}, engine {engine}")


def log_end(record: dict, stopped: bool, command: str, log: Callable[[str], None]) -> None:
    """The closing lines of a run: the count of each status, each failure's error, and the
    command that continues where points are left."""
    counts = {s: sum(r["status"] == s for r in record["points"]) for s in STATUSES}
    log("sweep: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for r in record["points"]:
        if r["status"] == "failed" and r.get("error"):
            log(f"  {r['name']}: failed: {r['error']}")
    if counts["interrupted"] or counts["pending"] or stopped:
        log(f"continue with: {command}")


class RecordKeeper:
    """Keeps sweep.json current while the engine runs: a point's status when it starts and
    when it ends (with its error, step, seconds and tracking run), and a bar over `total`
    points (none when 0)."""

    def __init__(self, record: dict, path: Path, total: int):
        self.record, self.path = record, path
        self.by_index = {r["index"]: r for r in record["points"]}
        self.bar = None
        if total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="sweep", unit="point", dynamic_ncols=True)

    def tracking(self, index: int, track_config: dict | None) -> dict | None:
        """The tracking config of point `index`: the sweep's, with the id of the run recorded
        for that point (continued on resume); None where the sweep is not tracked."""
        if not track_config:
            return None
        config = dict(track_config)
        config["run_id"] = (self.by_index[index].get("tracking") or {}).get("run_id")
        return config

    def started(self, indices: list[int]) -> None:
        for i in indices:
            self.by_index[i]["status"] = "running"
        runs.write_json_atomic(self.path, self.record)

    def finished(self, results: list[dict]) -> None:
        for r in results:
            entry = self.by_index[r["index"]]
            entry.update(status=r["status"], error=r.get("error"), step=r.get("step", 0),
                         seconds=entry.get("seconds", 0.0) + r.get("seconds", 0.0))
            if r.get("tracking"):
                entry["tracking"] = r["tracking"]
            if self.bar is not None:
                self.bar.update(1)
                if r["status"] == "failed":
                    self.bar.write(f"{entry['name']}: failed: {r.get('error')}")
        self.record["updated"] = _now()
        runs.write_json_atomic(self.path, self.record)

    def close(self) -> None:
        """Close the bar; a point still "running" here was cut off: interrupted."""
        if self.bar is not None:
            self.bar.close()
        for entry in self.record["points"]:
            if entry["status"] == "running":
                entry["status"] = "interrupted"
        self.record["updated"] = _now()
        runs.write_json_atomic(self.path, self.record)


def open_tracking(track, uri, out: Path, sweep: Sweep, record: dict, backend: str):
    """The sweep's tracking config for its points (MLflow: the parent run, created or
    continued; TensorBoard: the log folder)."""
    if track is None:
        return None
    from ppl_vae import tracking

    if track == "tensorboard":
        logdir = uri or tracking.default_uri("tensorboard", out)
        record["tracking"] = {"kind": "tensorboard", "logdir": logdir}
        return dict(record["tracking"])
    uri = uri or (record.get("tracking") or {}).get("uri") or tracking.default_uri("mlflow")
    previous = record.get("tracking") or {}
    same = previous.get("kind") == "mlflow" and previous.get("uri") == uri
    parent = tracking.MLflowTracker(uri, sweep.base.name, f"sweep {out.name}",
                                    run_id=previous.get("parent_run_id") if same else None,
                                    tags={"ppl_vae.sweep": str(out)})
    parent.log_params({"sweep.out": str(out), "sweep.backend": backend,
                       "sweep.seeds": json.dumps(list(sweep.seeds) if sweep.seeds else None),
                       **{f"sweep.grid.{k}": json.dumps(list(v)) for k, v in sweep.grid}})
    parent.log_artifact(out / SWEEP_FILE)
    record["tracking"] = {"kind": "mlflow", "uri": uri, "experiment": sweep.base.name,
                          "parent_run_id": parent.run_id}
    if not same:  # a new store: the points' runs there are new too
        for entry in record["points"]:
            entry["tracking"] = None
    return dict(record["tracking"])


def close_tracking(config, record: dict) -> None:
    """End the sweep's MLflow parent run with the count of each status (done when every point
    is)."""
    if not config or config["kind"] != "mlflow":
        return
    from ppl_vae import tracking

    parent = tracking.MLflowTracker(config["uri"], config["experiment"], "",
                                    run_id=config["parent_run_id"])
    counts = {s: sum(r["status"] == s for r in record["points"]) for s in STATUSES}
    parent.log_metrics({f"points_{s}": n for s, n in counts.items()})
    done = counts["done"] == len(record["points"])
    parent.end("done" if done else "interrupted")
