"""Tracking (ppl_vae/tracking.py): a sweep into a temporary MLflow store, read back with
MLflow's own client, and into TensorBoard event files, read back with TensorBoard's reader."""

from __future__ import annotations

import math

import pytest

from ppl_vae import runs, sweep, tracking
from tests.test_sweep import TINY, quiet

SHORT = [*TINY, "train.steps=20"]


def test_finite_numbers_of_a_record_become_split_prefixed_metrics():
    record = {"step": 20, "split": "test", "rate": 1.5, "elbo": -3.0, "nll": math.inf,
              "note": "x", "flag": True, "rate/dim_0": 0.5}
    assert tracking._finite_metrics(record) == {"test/rate": 1.5, "test/elbo": -3.0,
                                                "test/rate.dim_0": 0.5}


def test_a_missing_library_is_one_line_saying_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'ppl_vae\[mlflow\]'"):
        tracking.check_available("mlflow")
    with pytest.raises(ValueError, match="unknown tracker"):
        tracking.check_available("wandb")


@pytest.mark.slow
def test_a_sweep_tracked_in_mlflow_reads_back_with_mlflows_client(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install "
                        "'ppl_vae[mlflow]')")
    pytest.importorskip("pyro")
    uri = f"file:{tmp_path / 'mlruns'}"
    s = sweep.load_sweep("vae_digits", ["objective.beta=0.5,2"], overrides=SHORT)
    out = tmp_path / "sweep"
    record = sweep.run_sweep(s, out, backend="pyro", engine="serial", track="mlflow",
                             tracking_uri=uri, progress=False, log=quiet)
    client = tracking._mlflow_client(uri)
    parent_id = record["tracking"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.grid.objective.beta"] == "[0.5, 2]"
    assert parent.data.metrics["points_done"] == 2
    experiment = client.get_experiment_by_name("vae_digits")
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == ["0-beta0.5", "1-beta2"]
    for child in children:
        point = next(p for p in s.points if p.name == child.info.run_name)
        assert child.info.status == "FINISHED"
        flat = runs.flatten_spec(runs.spec_table(point.spec))
        assert child.data.params["objective.beta"] == str(flat["objective.beta"])
        assert len(child.data.params) == len(flat)  # the whole flattened spec
        metrics = runs.read_metrics(out / point.name / runs.METRICS_FILE)
        history = client.get_metric_history(child.info.run_id, "train/rate")
        train = [r for r in metrics if r["split"] == "train"]
        assert [m.step for m in history] == [r["step"] for r in train] == [10, 20]
        assert [m.value for m in history] == pytest.approx([r["rate"] for r in train])
        assert [m.step for m in client.get_metric_history(child.info.run_id, "test/elbo")] \
            == [20]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"spec.toml", "run.json", "metrics.jsonl"} <= artifacts
    # the report goes to the same runs: the points' scores and report, the sweep's figures
    sweep.sweep_report(out, iwae_k=0, progress=False, log=quiet)
    for child in children:
        run = client.get_run(child.info.run_id)
        assert "report/elbo" in run.data.metrics
        assert "report.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
    parent_files = {a.path for a in client.list_artifacts(parent_id)}
    assert {"sweep_report.md", "sweep_report.csv", "sweep_rate_distortion.png",
            "sweep_scores.png"} <= parent_files


@pytest.mark.slow
def test_a_sweep_tracked_in_tensorboard_writes_event_files_with_the_scalars(tmp_path):
    pytest.importorskip("tensorboardX", reason="tensorboardX is not installed (pip install "
                        "'ppl_vae[tensorboard]')")
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard (the reader) is not installed (pip install 'ppl_vae[tensorboard]')")
    pytest.importorskip("pyro")
    s = sweep.load_sweep("vae_digits", ["objective.beta=0.5,2"], overrides=SHORT)
    out = tmp_path / "sweep"
    sweep.run_sweep(s, out, backend="pyro", engine="serial", track="tensorboard",
                    progress=False, log=quiet)
    for p in s.points:
        logdir = out / "tensorboard" / p.name
        assert list(logdir.glob("events.out.tfevents.*"))
        acc = event_accumulator.EventAccumulator(str(logdir))
        acc.Reload()
        assert {"train/rate", "train/distortion", "test/elbo"} <= set(acc.Tags()["scalars"])
        metrics = runs.read_metrics(out / p.name / runs.METRICS_FILE)
        train = [r for r in metrics if r["split"] == "train"]
        events = acc.Scalars("train/rate")
        assert [e.step for e in events] == [r["step"] for r in train]
        assert [e.value for e in events] == pytest.approx([r["rate"] for r in train], rel=1e-6)
