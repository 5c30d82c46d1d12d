"""Data that streams (`ppl_vae.streaming`): the npy source is memory-mapped and checked in chunks;
a data set larger than data.device_memory_mb trains from prefetched host minibatches with the
in-memory result for the same batches (NumPyro: the very same batches, bit for bit), and a
streamed run resumes exactly, in both backends."""

import threading

import numpy as np
import pytest

from ppl_vae import data as data_mod
from ppl_vae import streaming
from ppl_vae.data import DataError, load_data
from ppl_vae.spec import load_spec
from ppl_vae.training import fit

#: 25 steps in windows of 10, 10 and 5: windows that do not match the prefetcher's chunks.
TINY = ["encoder.hidden=[32]", "decoder.hidden=[32]", "latent.dim=4", "train.batch_size=32",
        "train.log_every=10", "train.eval_every=20", "train.checkpoint_every=20",
        "train.eval_batch_size=200", "train.steps=25", 'data.binarize="dynamic"']
#: The digits' training split takes 1437 * 64 * 4 bytes ≈ 0.35 MiB: over this limit.
SMALL_LIMIT = "data.device_memory_mb=0.1"


@pytest.fixture(scope="module")
def npy_folder(tmp_path_factory):
    """The digits written as an npy source folder (x.npy is what gets memory-mapped)."""
    d = load_data(load_spec("vae_digits"))
    folder = tmp_path_factory.mktemp("npy")
    for name, value in dict(x=d.x_train, labels=d.labels_train, x_test=d.x_test,
                            labels_test=d.labels_test).items():
        np.save(folder / f"{name}.npy", value)
    return folder


def _sets(folder, *extra):
    return ['data.source="npy"', f'data.path="{folder}"', *TINY, *extra]


def _fit(tmp_path, name, backend, overrides, **kw):
    return fit("vae_digits", backend, "cpu", tmp_path / name, overrides=overrides,
               progress=False, **kw)


def _assert_same(run, reference, exact):
    for key, value in reference.params.items():
        if exact:
            np.testing.assert_array_equal(run.params[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(run.params[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # every logged training window, and the final test scores (a run stopped early and resumed
    # was also scored where it stopped)
    got = [*run.records("train"), run.records("test")[-1]]
    want = [*reference.records("train"), reference.records("test")[-1]]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("objective", "rate", "distortion"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["step"], key)


# -- the decision and the prefetcher ---------------------------------------------------------------
def test_streaming_is_chosen_by_size_against_the_limit_and_forced_by_the_key():
    spec = load_spec("vae_digits")
    dataset = load_data(spec)
    n = len(dataset.x_train)
    assert streaming.device_bytes(spec, dataset) == n * 64 * 4 + n * 8
    assert not streaming.streams(spec, dataset)  # 0.36 MiB < 2048 MiB
    assert streaming.streams(load_spec("vae_digits", [SMALL_LIMIT]), dataset)
    assert not streaming.streams(load_spec("vae_digits", [SMALL_LIMIT, "data.stream=off"]),
                                 dataset)
    assert streaming.streams(load_spec("vae_digits", ["data.stream=on"]), dataset)


def test_the_prefetcher_hands_out_the_drawn_rows_in_step_order_across_chunks(npy_folder):
    x = np.load(npy_folder / "x.npy", mmap_mode="r")
    labels = np.load(npy_folder / "labels.npy")
    rng = np.random.default_rng(0)
    drawn = rng.integers(0, len(x), size=(40, 8))
    state = {"at": 0}

    def draw(k):
        state["at"] += k
        return drawn[state["at"] - k: state["at"]]

    pre = streaming.Prefetcher(x, labels, draw, chunk_steps=4)
    got = [pre.take(k) for k in (3, 7, 1, 9)]  # 20 steps, none on a chunk boundary
    pre.close()
    y, lab = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
    assert y.shape == (20, 8, 64) and y.dtype == np.float32
    np.testing.assert_array_equal(y, np.asarray(x)[drawn[:20]])
    np.testing.assert_array_equal(lab, labels[drawn[:20]])


def test_an_error_in_the_prefetching_thread_is_raised_by_take():
    def draw(k):
        raise OSError("disk gone")

    pre = streaming.Prefetcher(np.zeros((5, 2), np.float32), np.zeros(5, np.int64), draw, 2)
    with pytest.raises(DataError, match="minibatches failed .OSError: disk gone") as err:
        pre.take(1)
    assert isinstance(err.value.__cause__, OSError)
    assert not pre._thread.is_alive()


def test_step_indices_depend_on_the_seed_and_step_alone():
    a = streaming.step_indices(0, 7, 100, 32)
    np.testing.assert_array_equal(a, streaming.step_indices(0, 7, 100, 32))
    assert not np.array_equal(a, streaming.step_indices(0, 8, 100, 32))
    assert not np.array_equal(a, streaming.step_indices(1, 7, 100, 32))
    assert a.min() >= 0 and a.max() < 100


# -- the npy source ----------------------------------------------------------------------------
def test_the_npy_source_memory_maps_x_and_splits_off_its_tail_without_x_test(tmp_path,
                                                                             npy_folder):
    d = load_data(load_spec("vae_digits", _sets(npy_folder)))
    assert isinstance(d.x_train.base, np.memmap) and not d.x_train.flags.writeable
    assert d.name == f"npy:{npy_folder}" and d.image_shape is None
    x = np.load(npy_folder / "x.npy")
    np.save(tmp_path / "x.npy", x.reshape(-1, 8, 8))  # images, no test split of their own
    d = load_data(load_spec("vae_digits", _sets(tmp_path, "data.test_fraction=0.25")))
    assert d.image_shape == (8, 8) and isinstance(d.x_train.base, np.memmap)
    n_test = round(len(x) * 0.25)
    np.testing.assert_array_equal(d.x_test, x[-n_test:])
    np.testing.assert_array_equal(d.x_train, x[:-n_test])


def test_the_npy_checks_read_in_chunks_and_find_a_bad_value_in_the_last(tmp_path, npy_folder,
                                                                        monkeypatch):
    x = np.load(npy_folder / "x.npy")
    x[-1, 5] = 1.5  # outside a Bernoulli's [0, 1], in the last row
    np.save(tmp_path / "x.npy", x)
    monkeypatch.setattr(data_mod, "CHECK_CHUNK_BYTES", 64 * 4 * 100)  # chunks of 100 rows
    chunks = list(data_mod._row_chunks(np.load(tmp_path / "x.npy", mmap_mode="r")))
    assert len(chunks) == 15 and sum(map(len, chunks)) == len(x)
    with pytest.raises(DataError, match=r"values lie in \[0, 1.5\]"):
        load_data(load_spec("vae_digits", _sets(tmp_path, "data.test_fraction=0.01")))
    x[-1, 5], x[-2, 0] = np.nan, np.inf
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"2 value\(s\) are NaN or infinite \(in 2 example"):
        load_data(load_spec("vae_digits", _sets(tmp_path)))


@pytest.mark.parametrize("case, match", [
    ("missing", "has no x.npy"),
    ("float64", "must be C-ordered float32"),
    ("labels_test", "labels_test.npy but no x_test.npy"),
])
def test_npy_folder_mistakes_are_data_errors(tmp_path, case, match):
    if case == "float64":
        np.save(tmp_path / "x.npy", np.zeros((10, 4)))
    elif case == "labels_test":
        np.save(tmp_path / "x.npy", np.zeros((10, 4), np.float32))
        np.save(tmp_path / "labels_test.npy", np.zeros(3, np.int64))
    with pytest.raises(DataError, match=match):
        load_data(load_spec("vae_digits", _sets(tmp_path)))


# -- training from the stream --------------------------------------------------------------------
def test_numpyro_streams_a_data_set_over_the_limit_with_the_in_memory_result(tmp_path,
                                                                            npy_folder):
    # one window length (one compilation per run); a streamed run stopped at step 10 and
    # resumed equals the in-memory run bit for bit: the same key draws the same rows
    steps = ["train.steps=20", "train.eval_every=20"]
    memory = _fit(tmp_path, "memory", "numpyro", _sets(npy_folder, *steps))
    _fit(tmp_path, "streamed", "numpyro", _sets(npy_folder, *steps, SMALL_LIMIT,
                                                "train.steps=10"))
    streamed = _fit(tmp_path, "streamed", "numpyro", _sets(npy_folder, *steps, SMALL_LIMIT),
                    resume=True)
    assert "streamed" not in memory.info["step_mode"]
    assert "streamed from host memory" in streamed.info["step_mode"]
    _assert_same(streamed, memory, exact=True)
    assert not _prefetching_threads()  # `fit` stops them (the NumPyro one used to run on)


def _prefetching_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "ppl-vae-prefetch" and t.is_alive()]


def test_pyro_streams_a_data_set_over_the_limit_with_the_in_memory_result_for_its_batches(
        tmp_path, npy_folder, monkeypatch):
    import torch

    from ppl_vae.pyro.train import Trainer

    streamed = _fit(tmp_path, "streamed", "pyro", _sets(npy_folder, SMALL_LIMIT))
    assert "streamed from host memory" in streamed.info["step_mode"]
    assert not _prefetching_threads()

    def same_rows(self):  # the in-memory step, fed the rows the streamed run read
        tr = self.spec.train
        idx = torch.as_tensor(streaming.step_indices(tr.seed, self.step, len(self.x),
                                                     tr.batch_size))
        return self.x[idx], self.labels[idx]

    monkeypatch.setattr(Trainer, "_batch", same_rows)
    memory = _fit(tmp_path, "memory", "pyro", _sets(npy_folder))
    assert "streamed" not in memory.info["step_mode"]
    _assert_same(streamed, memory, exact=False)


def test_a_streamed_pyro_run_resumes_exactly(tmp_path, npy_folder):
    straight = _fit(tmp_path, "straight", "pyro", _sets(npy_folder, SMALL_LIMIT))
    _fit(tmp_path, "resumed", "pyro", _sets(npy_folder, SMALL_LIMIT, "train.steps=20"))
    resumed = _fit(tmp_path, "resumed", "pyro", _sets(npy_folder, SMALL_LIMIT), resume=True)
    assert [r["step"] for r in resumed.metrics] == [r["step"] for r in straight.metrics]
    _assert_same(resumed, straight, exact=True)


def test_the_streamed_pyro_step_never_waits_for_the_device(npy_folder):
    import pyro

    from ppl_vae.pyro.train import Trainer
    from ppl_vae.schedules import step_scalars
    from tests.pyro.test_train import HostReads

    spec = load_spec("vae_digits", _sets(npy_folder, "data.stream=on"))
    trainer = Trainer(spec, load_data(spec), "cpu")
    # Adam's state exists; the buffers hold a step's rows
    trainer.run_steps(step_scalars(spec, np.arange(2), trainer.n_train), 1.0)
    trainer.optimizer.step = lambda: None  # capturable=True keeps Adam sync-free (CUDA only)
    trainer.optimizer.zero_grad(set_to_none=True)
    with pyro.validation_enabled(False), HostReads() as reads:
        trainer._step()
    assert trainer.x is None and reads.seen == []
