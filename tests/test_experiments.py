"""The experiments' plumbing: specs with --steps / --smoke, re-using finished runs, tables."""

import argparse
from importlib.util import find_spec

import pytest

from ppl_vae import experiments

pytest.importorskip("torch")


def _args(tmp_path, *argv):
    parser = argparse.ArgumentParser()
    experiments.add_arguments(parser, "x")
    return parser.parse_args(["--out", str(tmp_path), "--no-progress", *argv])


def test_make_spec_takes_steps_or_the_smoke_settings(tmp_path):
    spec = experiments.make_spec("vae_bars", ["objective.beta=2"], _args(tmp_path), 123)
    assert spec.train.steps == 123 and spec.objective.beta == 2.0
    spec = experiments.make_spec("vae_bars", [], _args(tmp_path, "--steps", "7"), 123)
    assert spec.train.steps == 7
    spec = experiments.make_spec("vae_bars", [], _args(tmp_path, "--smoke"), 123)
    assert spec.train.steps == 20 and spec.train.batch_size == 32
    assert spec.train.threads == 0  # the spec's own: the backend's default
    spec = experiments.make_spec("vae_bars", [], _args(tmp_path, "--threads", "2"), 123)
    assert spec.train.threads == 2


@pytest.mark.slow
def test_a_finished_run_with_the_same_spec_is_reused(tmp_path, capsys):
    args = _args(tmp_path, "--smoke")
    spec = experiments.make_spec("vae_bars", ["data.size=500"], args, 0)
    run, seconds = experiments.train(spec, tmp_path / "a", args)
    params = dict(run.params)
    again, again_seconds = experiments.train(spec, tmp_path / "a", args)
    assert "re-using" in capsys.readouterr().out and again_seconds == seconds
    assert all((again.params[k] == v).all() for k, v in params.items())
    other = experiments.make_spec("vae_bars", ["data.size=500", "objective.beta=2"], args, 0)
    experiments.train(other, tmp_path / "a", args)  # another spec: trained again
    assert "re-using" not in capsys.readouterr().out
    experiments.train(other, tmp_path / "a", _args(tmp_path, "--smoke", "--fresh"))
    assert "re-using" not in capsys.readouterr().out
    if find_spec("numpyro") is not None:  # the same spec from the other backend is no match
        experiments.train(other, tmp_path / "a",
                          _args(tmp_path, "--smoke", "--backend", "numpyro"))
        assert "re-using" not in capsys.readouterr().out


def test_a_longer_run_of_the_same_spec_resumes_and_its_report_is_reused(tmp_path, capsys,
                                                                         monkeypatch):
    """A table built over several sessions: more steps of the same spec continue the run in
    its folder (exactly, as --resume does) instead of starting afresh, and a report of the
    same step and IWAE K is read back instead of re-estimated."""
    import numpy as np

    from ppl_vae import evaluation
    from ppl_vae.spec import load_spec

    args = _args(tmp_path, "--smoke")
    spec = experiments.make_spec("vae_bars", ["data.size=500"], args, 0)
    longer = load_spec(spec, ["train.steps=40"])
    experiments.train(spec, tmp_path / "a", args)
    resumed, _ = experiments.train(longer, tmp_path / "a", args)
    assert "resuming at step 20 of 40" in capsys.readouterr().out
    straight, _ = experiments.train(longer, tmp_path / "b", args)
    assert resumed.info["step"] == straight.info["step"] == 40
    for name, value in straight.params.items():  # N steps + N more = 2N straight steps
        np.testing.assert_array_equal(resumed.params[name], value)

    first = experiments.train_and_evaluate(longer, tmp_path / "b", args)
    calls = []
    monkeypatch.setattr(evaluation, "evaluate_run", lambda *a, **k: calls.append(a))
    again = experiments.train_and_evaluate(longer, tmp_path / "b", args)
    assert calls == [] and again["elbo"] == first["elbo"]


def test_markdown_table():
    rows = [{"a": "x", "b": 1.23456}, {"a": "y"}]
    table = experiments.markdown_table(rows, [("A", "a", "{}"), ("B", "b", "{:.2f}")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| x | 1.23 |", "| y | – |"]
