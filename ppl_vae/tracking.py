"""Tracking runs and sweeps in MLflow or TensorBoard, through those libraries (optional extras:
``pip install 'ppl_vae[mlflow]'`` / ``'ppl_vae[tensorboard]'``); never a store of our own.

* MLflow: each run is an MLflow run with the flattened spec as its parameters (dotted keys,
  ``objective.beta``), every record of its metrics.jsonl as metrics at its step
  (``train/rate``, ``test/elbo``, … in nats per example), and its files (spec.toml, run.json,
  then the report and figures of ``ppl-vae sweep-report``) as artifacts; a sweep is a parent run
  (``mlflow.parentRunId``) holding the grid and, after the report, its tables and figures.
  The default store is ``./mlruns`` (MLflow's own default place), a local file store;
  ``--tracking-uri`` names a server (``http://host:5000``) or a database (``sqlite:///x.db``).
  MLflow 3 keeps the file store "in maintenance mode" and refuses it unless
  ``MLFLOW_ALLOW_FILE_STORE=true``: set here for ``file:`` URIs only (a database or server is
  MLflow's recommendation for a team).
* TensorBoard: each run's scalars (the same names and steps) in an event file under
  ``OUT/tensorboard/<point>/``, written with tensorboardX (the event format without TensorFlow
  or PyTorch); ``tensorboard --logdir OUT/tensorboard`` shows the sweep's runs side by side.

A resumed run continues its MLflow run (the sweep records its id); the steps after its last
checkpoint are trained again, so their metrics appear twice in that run's history.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

TRACKERS = ("mlflow", "tensorboard")
#: MLflow's limit on one log_batch call (1000 metrics, 100 params).
_PARAMS_PER_BATCH, _METRICS_PER_BATCH = 100, 1000


def _missing(kind: str, package: str) -> ImportError:
    return ImportError(f"--track {kind} needs the {package} package: "
                       f"pip install 'ppl_vae[{kind}]' (or pip install {package})")


def default_uri(kind: str, out: Path | None = None) -> str:
    """MLflow: ``file:`` ./mlruns (absolute); TensorBoard: OUT/tensorboard."""
    if kind == "mlflow":
        return "file:" + str(Path("mlruns").resolve())
    return str(Path(out or ".").resolve() / "tensorboard")


def _mlflow_client(uri: str):
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless asked (see the module docstring)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise _missing("mlflow", "mlflow-skinny") from None
    return MlflowClient(tracking_uri=uri)


def _finite_metrics(record: dict) -> dict[str, float]:
    """{"<split>/<key>": value} of a metrics record's finite numbers (not step or split); a
    "/" inside a key becomes "." (``rate/dim_0`` -> ``train/rate.dim_0``): MLflow's file store
    keeps a metric per file under its name's folders, so ``rate`` and ``rate/dim_0`` cannot
    both be names there."""
    prefix = record.get("split", "train")
    out = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(value):
            out[f"{prefix}/{key.replace('/', '.')}"] = float(value)
    return out


class MLflowTracker:
    """One MLflow run: `log_params`, `log_record` (a metrics.jsonl record), `log_artifact`,
    `end`. A `run_id` continues that run; a `parent_run_id` nests a new run under it."""

    kind = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, *, run_id: str | None = None,
                 parent_run_id: str | None = None, tags: dict | None = None):
        self.uri = uri
        self.client = _mlflow_client(uri)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (found.experiment_id if found is not None
                             else self.client.create_experiment(experiment))
            tags = dict(tags or {})
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id

    def log_params(self, params: dict) -> None:
        """Parameters as strings (MLflow's type), in batches of MLflow's limit; values already
        logged are not logged again (MLflow refuses a changed parameter)."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        items = [Param(str(k), str(v)[:6000]) for k, v in params.items() if str(k) not in logged]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_BATCH])

    def log_record(self, record: dict) -> None:
        self.log_metrics(_finite_metrics(record), int(record.get("step", 0)))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and math.isfinite(v)]
        for i in range(0, len(items), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + _METRICS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "done") -> None:
        """done → FINISHED, failed → FAILED, anything else (interrupted) → KILLED."""
        state = {"done": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        self.client.set_terminated(self.run_id, status=state)

    @property
    def ids(self) -> dict:
        return {"run_id": self.run_id}


class TensorBoardTracker:
    """One TensorBoard log folder: scalars at their steps (tensorboardX's `SummaryWriter`); the
    spec as a text summary. Artifacts are MLflow's business: `log_artifact` does nothing."""

    kind = "tensorboard"

    def __init__(self, logdir: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboardX") from None
        self.logdir = Path(logdir)
        self.writer = SummaryWriter(str(self.logdir))

    def log_params(self, params: dict) -> None:
        text = "\n".join(f"    {k} = {v!r}" for k, v in params.items())  # markdown code block
        self.writer.add_text("spec", text, 0)

    def log_record(self, record: dict) -> None:
        self.log_metrics(_finite_metrics(record), int(record.get("step", 0)))

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        return None

    def end(self, status: str = "done") -> None:
        self.writer.close()

    @property
    def ids(self) -> dict:
        return {"logdir": str(self.logdir)}


def check_available(kind: str) -> None:
    """An `ImportError` saying what to install, before a sweep starts, where `kind`'s library
    is missing."""
    import importlib.util

    if kind not in TRACKERS:
        raise ValueError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}")
    module, package = ("mlflow", "mlflow-skinny") if kind == "mlflow" else (
        "tensorboardX", "tensorboardX")
    if importlib.util.find_spec(module) is None:
        raise _missing(kind, package)


def open_run(config: dict, name: str, params: dict | None = None):
    """The tracker of one run from a sweep's tracking `config` ({"kind", "uri", "experiment",
    "parent_run_id", "run_id"} for MLflow; {"kind", "logdir"} for TensorBoard), its `params`
    logged."""
    if config["kind"] == "mlflow":
        tracker = MLflowTracker(config["uri"], config["experiment"], name,
                                run_id=config.get("run_id"),
                                parent_run_id=config.get("parent_run_id"))
    else:
        tracker = TensorBoardTracker(Path(config["logdir"]) / name)
    if params:
        tracker.log_params(params)
    return tracker
