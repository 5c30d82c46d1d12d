"""Shared fixtures. `mnist_dir`: the MNIST IDX folder the examples read (`PPL_VAE_MNIST`, else
../shared/data/mnist beside the repository); a test that needs it is skipped, with the reason,
in a clone without it."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# XLA's CPU compiler at LLVM -O0 without its expensive passes (what JAX's
# jax_disable_most_optimizations sets) for the whole suite and every process it starts
# (examples, benchmarks, the CLI): most of a NumPyro test's time is compilation (75 of 95 s in
# the posterior_collapse smoke run at the default level, 61 programs; 36 s at -O0, 31 s with the
# passes off too), and the tests check values, never speed. The same programs, the same numbers
# (the smoke tables agree digit for digit). Set XLA_FLAGS yourself to test at another level.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", XLA_TEST_FLAGS)

# One JAX compilation cache for the whole run, shared by the pytest-xdist workers and every
# process they start: many tests and smoke runs compile the same programs (the digits VAE's
# step, its eval), and a program compiled once is read back by the others. A fresh folder per
# run (made here, in the first process, before the workers start; removed at the end), so a
# run never reads a previous run's executables. Set JAX_COMPILATION_CACHE_DIR yourself to keep
# one between runs.
_OWN_CACHE: Path | None = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = Path(tempfile.mkdtemp(prefix="ppl_vae-tests-xla-cache-"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_OWN_CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from ppl_vae.data import MNIST_FILES, _find_file  # noqa: E402 (after the environment above)
from ppl_vae.experiments import MNIST_ENV, default_mnist  # noqa: E402


def mnist_missing(train: bool = False) -> str | None:
    """Why the MNIST test files (and with `train` the training files) are not available (the
    skip reason), or None when they are."""
    folder = default_mnist()
    splits = ("test", "train") if train else ("test",)
    if folder.is_dir() and all(_find_file(folder, n) for s in splits for n in MNIST_FILES[s]):
        return None
    return (f"needs the MNIST IDX files ({'train-* and ' if train else ''}t10k-*) at {folder}: "
            f"set {MNIST_ENV} to a folder holding them (`ppl-vae data mnist DIR`)")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    reason = mnist_missing()
    if reason:
        pytest.skip(reason)
    return default_mnist().resolve()


#: Tests of 2 s or more (measured on 2 cores: `make test` with --durations), in files whose
#: owners have not marked them with ``@pytest.mark.slow`` themselves: marked here, so that
#: ``make test-fast`` (``pytest -m "not slow"``) leaves them out. A node id without its
#: parameters marks every parameter set. Move an entry to a decorator in its file at will.
SLOW = (
    'tests/numpyro/test_elbo.py::test_a_factor_outside_the_plate_counts_once_beside_an_enumerated_site',
    'tests/numpyro/test_elbo.py::test_autoguides_equal_the_stock_elbo',
    'tests/numpyro/test_elbo.py::test_enumerated_terms_match_the_pyro_twin',
    'tests/numpyro/test_elbo.py::test_aux_gradients_reach_the_encoder_only',
    'tests/numpyro/test_elbo.py::test_batchnorm_state_is_carried_through_svi_run',
    'tests/numpyro/test_elbo.py::test_model_and_guide_are_checked_as_the_stock_elbo_checks_them',
    'tests/numpyro/test_elbo.py::test_stock_svi_accepts_it',
    'tests/numpyro/test_train.py::test_a_numpyro_run_evaluates_with_pyro',
    'tests/numpyro/test_train.py::test_a_run_with_a_changing_beta_compiles_once_per_window_length',
    'tests/numpyro/test_train.py::test_conv_networks_on_a_cpu_take_one_step_per_call_with_the_same_result',
    'tests/numpyro/test_train.py::test_nan_stops_with_the_step',
    'tests/numpyro/test_train.py::test_resume_equals_straight_run',
    'tests/numpyro/test_train.py::test_window_and_eval_are_compiled_in_the_spec_precision',
    'tests/pyro/test_elbo.py::test_analytic_rate_matches_monte_carlo[normal]',
    'tests/pyro/test_elbo.py::test_beta_one_equals_trace_elbo[1]',
    'tests/pyro/test_train.py::test_a_learning_rate_of_ten_is_a_divergence_not_a_result[numpyro]',
    'tests/pyro/test_train.py::test_resume_refuses_another_spec',
    'tests/pyro/test_train.py::test_training_and_evaluation_run_on_train_threads_and_restore[2-2]',
    'tests/test_arviz_compat.py::test_psis_shapes_normalisation_and_sign',
    'tests/test_autoregressive.py::test_ancestral_draws_follow_the_scored_density',
    'tests/test_autoregressive.py::test_each_pixel_depends_on_earlier_pixels_and_z_only_in_both_backends',
    'tests/test_autoregressive.py::test_iaf_intermediates_and_inverse_agree_in_numpyro',
    'tests/test_autoregressive.py::test_the_decoder_refuses_to_run_without_the_image',
    'tests/test_backend_training.py::test_same_init_same_test_elbo',
    'tests/test_backends.py::test_each_backend_meets_the_model_and_trainer_protocols[numpyro]',
    'tests/test_backends.py::test_terms_are_for_reading_and_differentiable_terms_for_gradients',
    'tests/test_bench_peers.py::test_smoke_with_the_two_ppl_vae_backends',
    'tests/test_data_parallel.py::test_numpyro_asks_for_simulated_devices_when_there_are_too_few',
    'tests/test_data_parallel.py::test_numpyro_two_devices_equal_one_and_checkpoints_move_between_them',
    'tests/test_data_parallel.py::test_numpyro_two_processes_of_one_device_equal_one',
    'tests/test_data_parallel.py::test_pyro_two_processes_equal_one_and_checkpoints_move_between_them',
    'tests/test_diagnostics.py::test_iwae_with_wrong_proposal_climbs_to_the_evidence',
    'tests/test_docs.py::test_the_code_blocks_of_a_page_run_at_smoke_size',
    'tests/test_docs.py::test_the_math_renders_the_figures_load_and_the_search_finds_a_spec_key',
    'tests/test_latent_label.py::test_m2_trains_and_evaluates_with_the_label_summed_out',
    'tests/test_latent_label.py::test_the_label_summed_iwae_converges_to_ln_p_by_quadrature[numpyro]',
    'tests/test_linear_gaussian.py::test_exact_posterior_makes_every_bound_exact[numpyro]',
    'tests/test_linear_gaussian.py::test_iwae_climbs_to_the_evidence_with_a_wrong_encoder[numpyro]',
    'tests/test_linear_gaussian.py::test_two_layer_exact_posterior_makes_every_importance_weight_the_evidence[numpyro]',
    'tests/test_old_runs.py::test_an_old_run_evaluates_to_the_numbers_it_gave[one_site-numpyro]',
    'tests/test_old_runs.py::test_an_old_run_evaluates_to_the_numbers_it_gave[two_layer-numpyro]',
    'tests/test_old_runs.py::test_an_old_run_evaluates_to_the_numbers_it_gave[m2-numpyro]',
    'tests/test_old_runs.py::test_old_parameters_load_unchanged_in_either_backend[numpyro]',
    'tests/test_parity.py::test_both_backends_give_the_same_log_density_parts_and_ancestral_means',
    'tests/test_parity.py::test_objectives_agree_float32',
    'tests/test_parity.py::test_terms_and_gradients_agree_float32',
    'tests/test_parity.py::test_terms_and_gradients_agree_float64',
    'tests/test_program.py::test_the_ladder_posterior_is_the_precision_weighted_merge[numpyro]',
    'tests/test_program.py::test_the_vamp_prior_is_the_posterior_mixture_at_the_pseudo_inputs[numpyro]',
    'tests/test_streaming.py::test_numpyro_streams_a_data_set_over_the_limit_with_the_in_memory_result',
)


#: Run first (in this order; the rest keeps its order): the longest tests, so that the two
#: pytest-xdist workers do not end on them one beside an idle other (`make test` also lets an
#: idle worker take tests queued for the busy one: --dist worksteal). The float64 parity
#: children (≈ 30 s each) and the examples' smoke runs (one session-scoped fork server per
#: worker, so moving the module changes no fixture's life).
FIRST = ("tests/test_parity.py::test_terms_and_gradients_agree_float64",
         "tests/test_parity.py::test_objectives_agree_float64",
         "tests/test_examples.py::test_example_smoke")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW or item.nodeid.split("[")[0] in SLOW:
            item.add_marker(pytest.mark.slow)

    def rank(item) -> int:
        return next((i for i, p in enumerate(FIRST) if item.nodeid.startswith(p)), len(FIRST))

    items.sort(key=rank)  # (stable: the rest keeps the collection order)


def pytest_unconfigure(config):
    # (only the process that made the cache folder removes it: the first one, after its workers)
    if _OWN_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
