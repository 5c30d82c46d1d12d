"""Sweeps: a grid of ordinary runs as one command, backend-free.

A sweep is the Cartesian product of dotted overrides (``--grid objective.beta=0.5,1,2``, any
number of them) and seeds (``--seeds 5``: train.seed = the spec's seed + 0 … 4), each point an
ordinary run folder ``OUT/<index>-<short name>/`` with its resolved spec, so any point can be
resumed, evaluated or plotted alone (``ppl-vae eval OUT/03-beta2-seed1``). ``OUT/sweep.json``
records the definition (the base spec, the grid, the seeds, the backend) and each point's status
(pending, running, done, failed with its one-line error, interrupted), written by the driver
alone, atomically. A spec file may carry the sweep in a ``[sweep]`` table (`load_sweep`), which
`ppl_vae.spec.load_spec` leaves out, so the same file trains alone with ``ppl-vae train``::

    [sweep]
    grid = { "objective.beta" = [0.25, 1, 4], "latent.dim" = [4, 8] }
    seeds = 3                  # or a list: [0, 7, 9]
    engine = "vmap"            # local | vmap | ray (the command line's flags win)

Where the points run (`run_sweep`, `ENGINES`): a local pool of fresh processes, one per point;
NumPyro points of the same shapes vmapped together in one process (``vmap``); one after another
in this process (``serial``); or Ray tasks (``ray``).

Robustness: a point that fails or diverges is recorded as failed with its error and the others
go on; the same command again skips finished points, resumes interrupted ones from their
checkpoints (exactly, as ``train --resume``) and leaves failed ones alone unless
``--retry-failed``; Ctrl-C asks every running point to stop at the end of its window and save
(a ``.stop`` file in OUT, which each point polls, also across machines), then prints the command
that continues; a second Ctrl-C stops at once (the last checkpoints stay).

`sweep_report` evaluates every finished point (`ppl_vae.report.evaluate_run`, cached in its
report.json) and aggregates one row per grid setting: mean ± standard error over seeds.

One module per concept, each importing only those above it:

* `grid`: declaring a sweep: the grid and seeds, the ``[sweep]`` table, points and their names;
* `record`: the sweep folder: sweep.json, statuses, a point's state for resuming, tracking;
* `worker`: what a worker runs: one point's training, or a vmapped group of points;
* `engines`: the driver `run_sweep`, the plan (which points are vmapped together) and the
  engines (local process pool, serial, Ray);
* `report`: ``ppl-vae sweep-report``: evaluation, aggregation over seeds, tables and figures;
* `experiment`: the sweep behind an example script (its flags, run then report).

The NumPyro side of ``vmap`` (the points' windows under `jax.vmap`) is `ppl_vae.numpyro.sweep`.
"""

from ppl_vae.sweep.engines import (
    ENGINES,
    VMAPPABLE_KEYS,
    Task,
    continue_command,
    plan,
    run_sweep,
    vmap_key,
    vmap_refusal,
)
from ppl_vae.sweep.experiment import add_experiment_arguments, experiment_sweep
from ppl_vae.sweep.grid import (
    SWEEP_KEYS,
    Point,
    Sweep,
    SweepError,
    expand,
    load_sweep,
    parse_grid,
    parse_seeds,
    short_names,
)
from ppl_vae.sweep.record import STATUSES, STOP_FILE, SWEEP_FILE, point_state, read_sweep
from ppl_vae.sweep.report import (
    DISENTANGLEMENT_FILE,
    DISENTANGLEMENT_SIZES,
    REPORT_METRICS,
    aggregate,
    disentanglement_scores,
    rate_distortion_figure,
    scores_figure,
    sweep_report,
)
from ppl_vae.sweep.worker import THREAD_ENV, point_task, run_group, run_point, set_thread_env

__all__ = [
    "DISENTANGLEMENT_FILE", "DISENTANGLEMENT_SIZES", "ENGINES", "REPORT_METRICS", "STATUSES",
    "STOP_FILE", "SWEEP_FILE", "SWEEP_KEYS", "THREAD_ENV", "VMAPPABLE_KEYS", "Point", "Sweep",
    "SweepError", "Task", "add_experiment_arguments", "aggregate", "continue_command",
    "disentanglement_scores", "expand", "experiment_sweep", "load_sweep", "parse_grid",
    "parse_seeds", "plan", "point_state", "point_task", "rate_distortion_figure", "read_sweep",
    "run_group", "run_point", "run_sweep", "scores_figure", "set_thread_env", "short_names",
    "sweep_report", "vmap_key", "vmap_refusal",
]
