"""Everything a training step takes from the spec that can change from step to step, backend-free.

`step_scalars(spec, steps, n_train)` gives, for each 0-based step index, the scalars a trainer
feeds its step without recompiling (NumPyro: scan inputs) or recapturing (Pyro: device tensors
filled in place):

* ``beta``: the global β (`objective.beta_schedule`; each site's β is `objective.site_betas`);
* ``lr``: Adam's learning rate, train.lr times `lr_factor` of `train.lr_schedule`;
* ``capacity/<site>``: the capacity target C_site(t) in nats per example of every site with
  one (`objective.capacity_schedule`; Burgess et al. 2018);
* ``temperature/<site>``: the temperature τ_site(t) of every relaxed discrete site
  (`temperature_schedule`), which the trainers hand the program (Pyro: device tensors filled
  in place, `Built.set_temperatures`; NumPyro: traced values, `Built.temperatures_at`).

Each is a pure function of the step index, so a run resumed at step k sees the values a straight
run sees. `elbo_options` is the constant half: the per-site settings `ScaledELBO` is built with.
"""

from __future__ import annotations

import math

import numpy as np

from ppl_vae.graph import relaxed_sites
from ppl_vae.objective import beta_schedule
from ppl_vae.spec import LRScheduleSpec, Spec, TemperatureSpec, TrainSpec

#: Burda et al. (2016, appendix C): stage i = 0, 1, … lasts 3^i epochs at 10^(−i/7) × lr.
BURDA_STAGE_BASE = 3
BURDA_DECAY_PER_STAGE = 10.0 ** (-1.0 / 7.0)


def capacity_sites(spec: Spec) -> tuple[str, ...]:
    """The latent sites with a capacity target (capacity.max > 0), in `Spec.sites` order."""
    return tuple(s.name for s in spec.sites if s.capacity.max > 0)


def scalar_keys(spec: Spec) -> tuple[str, ...]:
    """The keys of `step_scalars`: beta, lr, then capacity/<site> per `capacity_sites`, then
    temperature/<site> per relaxed site (`graph.relaxed_sites`)."""
    return ("beta", "lr", *(f"capacity/{name}" for name in capacity_sites(spec)),
            *(f"temperature/{name}" for name in relaxed_sites(spec)))


def temperature_schedule(temperature: TemperatureSpec, steps: np.ndarray,
                         total_steps: int) -> np.ndarray:
    """τ at each 0-based step t in `steps`, float64 (len(steps),): geometric from `start` to
    `end` over T = temperature.steps steps (T = 0: `total_steps`, the whole run),
    τ(t) = start · (end / start)^min(1, t / T), then `end` (Jang et al. 2017 anneal
    τ = max(τ_min, exp(−r t)): the same curve with exp(−r T) = end / start). A pure function
    of the step, so a resumed run sees the τ a straight run sees."""
    t = np.asarray(steps, dtype=np.float64)
    length = temperature.steps or total_steps
    progress = np.minimum(1.0, t / max(length, 1))
    return temperature.start * (temperature.end / temperature.start) ** progress


def steps_per_epoch(train: TrainSpec, n_train: int) -> int:
    """train.lr_schedule.epoch_steps, or ceil(n_train / batch_size) when it is 0 (an epoch of
    the training set; minibatches are drawn with replacement, so this is its expected length)."""
    if train.lr_schedule.epoch_steps > 0:
        return train.lr_schedule.epoch_steps
    return max(1, math.ceil(n_train / train.batch_size))


def burda_stage(epochs: np.ndarray) -> np.ndarray:
    """The stage i of each (0-based, whole) epoch count: stage i spans epochs
    [(3^i − 1)/2, (3^(i+1) − 1)/2), i.e. i = floor(log_3(2e + 1)), computed in integers."""
    epochs = np.asarray(epochs, dtype=np.int64)
    stage = np.zeros(epochs.shape, dtype=np.int64)
    start = 1  # the first epoch of stage 1: (3 - 1) / 2
    while (epochs >= start).any():
        stage += epochs >= start
        start = BURDA_STAGE_BASE * start + 1  # (3^(i+1) − 1)/2 = 3 (3^i − 1)/2 + 1
    return stage


def lr_factor(schedule: LRScheduleSpec, steps: np.ndarray, total_steps: int,
              epoch_steps: int) -> np.ndarray:
    """The factor on train.lr at each 0-based step index t in `steps`, float64 (len(steps),):

    * constant: 1;
    * exponential: decay^(t / every);  step: decay^floor(t / every);
    * cosine: final + (1 − final) · (1 + cos(π t / T)) / 2 with T = `total_steps`
      (train.steps): 1 at t = 0, `final` at t = T, the end of the run (as optax's
      ``cosine_decay_schedule`` and PyTorch's ``CosineAnnealingLR`` count);
    * burda: 10^(−i/7) in stage i of 3^i epochs (epochs of `epoch_steps` steps; Burda et al.
      2016: stages 0…7 are 3280 epochs; later stages follow the same rule);

    each times the warm-up min(1, t / warmup) when warmup > 0 (0 at the first step: the step
    updates Adam's moments, not the parameters; the schedule's own value from t = warmup).
    """
    t = np.asarray(steps, dtype=np.float64)
    kind = schedule.kind
    if kind == "constant":
        factor = np.ones_like(t)
    elif kind == "exponential":
        factor = schedule.decay ** (t / schedule.every)
    elif kind == "step":
        factor = schedule.decay ** np.floor(t / schedule.every)
    elif kind == "cosine":
        factor = schedule.final + (1.0 - schedule.final) * 0.5 * (
            1.0 + np.cos(np.pi * t / total_steps))
    elif kind == "burda":
        epochs = np.asarray(steps, dtype=np.int64) // epoch_steps
        factor = BURDA_DECAY_PER_STAGE ** burda_stage(epochs)
    else:  # the spec's validation refuses it first; a hand-built spec gets the same words
        raise ValueError(f"train.lr_schedule.kind = {kind!r}; use one of constant, "
                         "exponential, step, cosine, burda")
    if schedule.warmup > 0:
        factor = factor * np.minimum(1.0, t / schedule.warmup)
    return factor


def lr_schedule(train: TrainSpec, steps: np.ndarray, n_train: int) -> np.ndarray:
    """Adam's learning rate at each 0-based step in `steps`: train.lr · `lr_factor`, float64."""
    return train.lr * lr_factor(train.lr_schedule, steps, train.steps,
                                steps_per_epoch(train, n_train))


def step_scalars(spec: Spec, steps: np.ndarray, n_train: int) -> dict[str, np.ndarray]:
    """{`scalar_keys`: float64 (len(steps),)}: β, lr and each capacity target at each 0-based
    step index in `steps`; `n_train` (training examples) sets the length of an epoch."""
    steps = np.asarray(steps)
    out = {"beta": beta_schedule(spec.objective, steps),
           "lr": lr_schedule(spec.train, steps, n_train)}
    sites = [s for s in spec.sites if s.capacity.max > 0]
    if sites:
        # imported here while objective.capacity_schedule lands with the ELBO's capacity
        # targets (issue 22): a spec without one never needs it
        from ppl_vae.objective import capacity_schedule

        for s in sites:
            out[f"capacity/{s.name}"] = capacity_schedule(s.capacity, steps)
    for s in spec.sites:
        if s.discrete and s.estimator == "relaxed":
            out[f"temperature/{s.name}"] = temperature_schedule(s.temperature, steps,
                                                                spec.train.steps)
    return out


def step_temperatures(scalars: dict) -> dict:
    """{site: τ} from one step's scalars (`step_scalars` at one step: numbers or traced
    values): what a trainer hands `Built.set_temperatures` / `Built.temperatures_at`."""
    prefix = "temperature/"
    return {k[len(prefix):]: v for k, v in scalars.items() if k.startswith(prefix)}


def check_scalars(spec: Spec, scalars: dict[str, np.ndarray]) -> int:
    """The number of steps in `scalars` (a trainer's `run_steps` argument), after checking that
    it holds exactly the `scalar_keys` of `spec`, each one value per step."""
    want = scalar_keys(spec)
    if set(scalars) != set(want):
        raise ValueError(f"run_steps: per-step scalars {sorted(scalars)}; this spec's steps take "
                         f"{list(want)} (ppl_vae.schedules.step_scalars computes them)")
    lengths = {len(np.atleast_1d(v)) for v in scalars.values()}
    if len(lengths) != 1:
        raise ValueError(f"run_steps: per-step scalars of different lengths {sorted(lengths)}")
    return lengths.pop()


def elbo_options(spec: Spec) -> dict:
    """The keyword arguments both trainers add to `ScaledELBO(beta, lam, num_particles,
    analytic_kl, …)`: bound and gradient where not the default, ``free_bits`` {site: nats per
    dimension} for sites with free bits, ``capacity_weight`` {site: γ} for sites with a capacity
    target. Only what a spec uses is passed, so a plain spec builds the plain ELBO."""
    obj, out = spec.objective, {}
    if obj.bound != "elbo":
        out["bound"] = obj.bound
    if obj.gradient != "reparam":
        out["gradient"] = obj.gradient
    free_bits = {s.name: s.free_bits for s in spec.sites if s.free_bits > 0}
    if free_bits:
        out["free_bits"] = free_bits
    weights = {s.name: s.capacity.weight for s in spec.sites if s.capacity.max > 0}
    if weights:
        out["capacity_weight"] = weights
    return out
