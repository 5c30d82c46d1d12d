"""Cross-field validation of a spec: the checks that need more than one field (a Bernoulli
likelihood on binarised data, a conv network on images, a latent graph without cycles, …).

Each check raises a `SpecError` naming the dotted key, the value given and what is allowed.
`ppl_vae.spec.load_spec` calls `validate` on every spec it returns; nothing else needs to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ppl_vae import graph
from ppl_vae.schema import (
    _SITE_NAME,
    _USER_FN,
    AUX_KINDS,
    DATA_SOURCES,
    DISCRETE_PRIOR_KINDS,
    LABEL_SITE,
    MAX_ENUMERATED,
    PATH_SOURCES,
    RESERVED_SITE_NAMES,
    SOURCE_IMAGE_SHAPES,
    SYNTHETIC_POPULATIONS,
    LatentSpec,
    PosteriorSpec,
    PriorSpec,
    SiteSpec,
    Spec,
    SpecError,
    TemperatureSpec,
    _to_dict,
    resolve_user_function,
)


class _Need:
    """``need(cond, key, given, allowed)``: a `SpecError` from `source` unless `cond`."""

    def __init__(self, source: str | None):
        self.source = source

    def __call__(self, cond: bool, key: str, given: Any, allowed: str) -> None:
        if not cond:
            raise SpecError(key, given, allowed, self.source)


def validate(spec: Spec) -> None:
    """Checks that need more than one field. Raises `SpecError`; returns None when valid."""
    need = _Need(spec.source or None)
    for check in (_data, _graph_tables, _site_names, _sites, _orders, _discrete_sites,
                  _decoder_reads, _label, _networks, _likelihood, _objective, _aux_terms,
                  _train):
        check(spec, need)


def _data(spec: Spec, need: _Need) -> None:
    d = spec.data
    population = d.source.split(":", 1)[1] if d.source.startswith("synthetic:") else None
    need(d.source in DATA_SOURCES or population in SYNTHETIC_POPULATIONS, "data.source",
         d.source, "one of " + ", ".join(repr(s) for s in DATA_SOURCES) + " or "
         + ", ".join(repr(f"synthetic:{p}") for p in SYNTHETIC_POPULATIONS))
    if d.source in PATH_SOURCES:
        need(bool(d.path), "data.path", d.path,
             f"a path (a folder of IDX files for mnist, an .npz file for npz, a folder of "
             f".npy files for npy) with source "
             f"{d.source!r}")
    else:
        need(not d.path, "data.path", d.path, f"empty for source {d.source!r}")
    generated = population is not None or d.source == "dsprites"
    need(d.size >= 0, "data.size", d.size, "an integer >= 0 (0 = the default, 20000)")
    need(generated or d.size == 0, "data.size", d.size,
         f"0 for source {d.source!r} (only generated sources, synthetic:* and dsprites, draw a "
         "number of examples)")
    need(d.labelled >= 0, "data.labelled", d.labelled, "an integer >= 0 (0 = keep every label)")
    need(not d.balanced_labels or d.labelled >= spec.label.classes, "data.balanced_labels",
         d.balanced_labels, f"false unless data.labelled keeps at least one label of each of "
         f"the label.classes ({spec.label.classes})")
    need(0.0 < d.test_fraction < 1.0, "data.test_fraction", d.test_fraction, "a number in (0, 1)")
    need(d.limit >= 0, "data.limit", d.limit, "an integer >= 0 (0 = all)")
    need(d.device_memory_mb > 0, "data.device_memory_mb", d.device_memory_mb,
         "a number of MiB > 0 (training data larger than this is streamed when data.stream = "
         "'auto')")


def _networks(spec: Spec, need: _Need) -> None:
    d = spec.data
    for part in ("encoder", "decoder"):
        net = getattr(spec, part)
        need(all(h >= 1 for h in net.hidden), f"{part}.hidden", list(net.hidden),
             "a list of positive widths ([] means linear)")
        need(all(c >= 1 for c in net.channels), f"{part}.channels", list(net.channels),
             "a list of positive channel counts")
        if net.kind == "conv":
            shape = SOURCE_IMAGE_SHAPES.get(d.source)
            need(d.source in ("mnist", "npz", "npy", "dsprites"), f"{part}.kind", "conv",
                 f"'mlp' for source {d.source!r} (conv needs 28x28 or 64x64 images: mnist, "
                 "dsprites, or an npz or npy of images)")
            need(len(net.channels) >= 1, f"{part}.channels", list(net.channels),
                 "at least one channel count for a conv network")
            if shape is not None:
                side = shape[0]
                need(side % 2 ** len(net.channels) == 0, f"{part}.channels", list(net.channels),
                     f"at most {_max_halvings(side)} entries: each halves the {side}x{side} image")


def _likelihood(spec: Spec, need: _Need) -> None:
    d, lik = spec.data, spec.likelihood
    if lik.kind == "gaussian":
        need(lik.scale == "learned" or (isinstance(lik.scale, float) and lik.scale > 0),
             "likelihood.scale", lik.scale, 'a positive number or "learned"')
    need(lik.total_count >= 1, "likelihood.total_count", lik.total_count, "an integer >= 1")
    need(lik.categories >= 2, "likelihood.categories", lik.categories, "an integer >= 2")
    if d.binarize != "none":
        need(lik.kind == "bernoulli", "data.binarize", d.binarize,
             f"'none' with a {lik.kind} likelihood (binarised data needs 'bernoulli')")
    need(d.source != "npy" or d.binarize != "static", "data.binarize", d.binarize,
         "'dynamic' or 'none' for source 'npy' (its arrays stay memory-mapped; binarising them "
         "statically would copy them: save binary values in x.npy instead)")


def _objective(spec: Spec, need: _Need) -> None:
    obj = spec.objective
    need(obj.beta >= 0, "objective.beta", obj.beta, "a number >= 0")
    need(obj.lam > 0, "objective.lam", obj.lam, "a number > 0")
    need(obj.num_particles >= 1, "objective.num_particles", obj.num_particles, "an integer >= 1")
    need(obj.gradient != "dreg" or obj.bound == "iwae", "objective.gradient", obj.gradient,
         "'reparam' or 'stl' with bound = 'elbo' (DReG is the IWAE bound's estimator: set "
         "objective.bound = 'iwae')")
    need(obj.gradient != "stl" or obj.bound == "elbo", "objective.gradient", obj.gradient,
         "'reparam' or 'dreg' with bound = 'iwae' (sticking the landing is biased for the IWAE "
         "bound; DReG is its unbiased counterpart)")
    _beta_schedule(spec, need)


def _beta_schedule(spec: Spec, need: _Need) -> None:
    """The β schedule is well formed and reaches β before the run ends (a warm-up longer than
    the run would silently train a β < 1 model)."""
    sch, steps = spec.objective.beta_schedule, spec.train.steps
    need(sch.start >= 0, "objective.beta_schedule.start", sch.start, "a number >= 0")
    need(sch.warmup >= 1, "objective.beta_schedule.warmup", sch.warmup, "an integer >= 1")
    if sch.kind == "cyclical":
        need(sch.period > sch.warmup, "objective.beta_schedule.period", sch.period,
             f"an integer > warmup ({sch.warmup}): each cycle ends at β")
        need((steps - 1) % sch.period >= sch.warmup, "objective.beta_schedule.period",
             sch.period, f"a period after whose last cycle's warm-up ({sch.warmup} steps) the "
             f"run still has steps: with train.steps = {steps} the run ends at β < "
             f"objective.beta, mid-ramp (make train.steps − 1 mod period >= warmup)")
    elif sch.kind == "linear":
        need(sch.warmup < steps, "objective.beta_schedule.warmup", sch.warmup,
             f"fewer steps than train.steps ({steps}): the warm-up must reach objective.beta "
             "before the run ends")


def _aux_terms(spec: Spec, need: _Need) -> None:
    obj, src = spec.objective, need.source
    site_names = [s.name for s in spec.sites]
    for i, aux in enumerate(obj.aux):
        key = f"objective.aux[{i}]"
        if aux.site == LABEL_SITE or spec.label.latent:
            need(spec.label.latent and aux.kind == "supervised" and aux.site == LABEL_SITE,
                 f"{key}.site", aux.site or "(none)",
                 "'label' with kind 'supervised' (the classifier q(label|y) of a model with "
                 "label.latent = true; that model takes no other aux term)")
            need(aux.weight >= 0, f"{key}.weight", aux.weight, "a number >= 0")
            continue
        if aux.site:
            need(aux.site in site_names, f"{key}.site", aux.site,
                 "one of the latent sites " + ", ".join(repr(n) for n in site_names))
        need(aux.kind.rsplit(":", 1)[-1] not in site_names, f"{key}.kind", aux.kind,
             "a term whose name (its kind, or the function's name) is not a latent site's "
             "(both are sites of the guide); rename the site")
        aux_site = next(s for s in spec.sites if s.name == (aux.site or site_names[0]))
        need(not aux_site.discrete, f"{key}.site", aux.site or aux_site.name,
             f"a Gaussian site (aux terms read its posterior's loc and scale; "
             f"{aux_site.name!r} is a {aux_site.kind} site)")
        need(aux_site.posterior.kind == "diagonal", f"{key}.site", aux.site or aux_site.name,
             f"a site with a diagonal posterior (aux terms read its loc and scale; "
             f"{aux_site.name!r} has posterior {aux_site.posterior.kind!r})")
        need(aux.kind in AUX_KINDS or bool(_USER_FN.match(aux.kind)), f"{key}.kind", aux.kind,
             "'infonce', 'supervised' or a user function 'package.module:function'")
        need(aux.weight >= 0, f"{key}.weight", aux.weight, "a number >= 0")
        need(aux.classes >= 2, f"{key}.classes", aux.classes, "an integer >= 2")
        if aux.kind not in AUX_KINDS:
            try:
                resolve_user_function(aux.kind)
            except (ImportError, AttributeError) as err:
                raise SpecError(f"{key}.kind", aux.kind,
                                f"an importable 'package.module:function' ({err})", src) from None


def _train(spec: Spec, need: _Need) -> None:
    tr = spec.train
    need(tr.steps >= 1, "train.steps", tr.steps, "an integer >= 1")
    need(tr.batch_size >= 1, "train.batch_size", tr.batch_size, "an integer >= 1")
    need(tr.devices == "all" or tr.devices >= 1, "train.devices", tr.devices,
         'an integer >= 1 or "all"')
    need(tr.devices == "all" or tr.batch_size % tr.devices == 0, "train.batch_size",
         tr.batch_size, f"a multiple of train.devices ({tr.devices}): each device takes an "
         "equal slice of the minibatch")
    need(tr.lr > 0, "train.lr", tr.lr, "a number > 0")
    need(tr.clip_norm >= 0, "train.clip_norm", tr.clip_norm, "a number >= 0 (0 = off)")
    need(tr.threads >= 0, "train.threads", tr.threads, "an integer >= 0 (0 = the default)")
    need(tr.skip_grad_norm >= 0, "train.skip_grad_norm", tr.skip_grad_norm,
         "a number >= 0 (0 = never skip)")
    need(tr.weight_init_std > 0, "train.weight_init_std", tr.weight_init_std, "a number > 0")
    _lr_schedule(spec, need)
    for name in ("log_every", "eval_every", "checkpoint_every", "eval_batch_size"):
        need(getattr(tr, name) >= 1, f"train.{name}", getattr(tr, name), "an integer >= 1")
    need(tr.eval_every % tr.log_every == 0, "train.eval_every", tr.eval_every,
         f"a multiple of train.log_every ({tr.log_every})")
    need(tr.checkpoint_every % tr.log_every == 0, "train.checkpoint_every", tr.checkpoint_every,
         f"a multiple of train.log_every ({tr.log_every})")


def _lr_schedule(spec: Spec, need: _Need) -> None:
    sch, steps = spec.train.lr_schedule, spec.train.steps
    key = "train.lr_schedule"
    need(0 <= sch.warmup < steps, f"{key}.warmup", sch.warmup,
         f"an integer >= 0 and below train.steps ({steps}): the warm-up must end before the run")
    need(0 < sch.decay <= 1, f"{key}.decay", sch.decay, "a number in (0, 1]")
    need(sch.every >= 1, f"{key}.every", sch.every, "an integer >= 1")
    need(0 <= sch.final <= 1, f"{key}.final", sch.final, "a number in [0, 1]")
    need(sch.epoch_steps >= 0, f"{key}.epoch_steps", sch.epoch_steps,
         "an integer >= 0 (0 = the training set's steps per epoch)")
    # a decay that never happens within the run is a constant schedule in disguise
    if sch.kind in ("exponential", "step"):
        need(sch.decay < 1, f"{key}.decay", sch.decay,
             f"a number in (0, 1) for kind {sch.kind!r} (1 never decays: use 'constant')")
    if sch.kind == "step":
        need(sch.every < steps, f"{key}.every", sch.every,
             f"fewer steps than train.steps ({steps}): a step schedule must decay at least once")
    if sch.kind == "burda" and sch.epoch_steps:
        need(sch.epoch_steps < steps, f"{key}.epoch_steps", sch.epoch_steps,
             f"fewer steps than train.steps ({steps}): the first stage is one epoch")


def _site_key(spec: Spec, i: int, part: str) -> str:
    """The dotted key of `part` of site i: ``latents[i].<part>`` in a graph, the one-site
    spec's own tables (``latent.dim``, ``prior.kind``, …) otherwise."""
    if spec.latents:
        return f"latents[{i}].{part}"
    if part.split(".")[0] in _LATENT_FIELDS:
        return f"latent.{part}"
    return {"name": "latent", "beta": "latent"}.get(part, part)


_LATENT_FIELDS = {f.name for f in dataclasses.fields(LatentSpec)}


def _names_of(names) -> str:
    return ", ".join(repr(n) for n in names) or "there are none"


def _graph_tables(spec: Spec, need: _Need) -> None:
    """A graph declares its sites in [[latents]] only."""
    if not spec.latents:
        return
    for name, default in (("latent", LatentSpec()), ("prior", PriorSpec()),
                          ("posterior", PosteriorSpec())):
        need(getattr(spec, name) == default, name, _to_dict(getattr(spec, name)),
             f"no [{name}] table with [[latents]]: a graph declares each site's dim, prior "
             "and posterior in its own [[latents]] table")


def _site_names(spec: Spec, need: _Need) -> None:
    """Names first: the other checks refer to them."""
    names = [s.name for s in spec.sites]
    for i, s in enumerate(spec.sites):
        need(bool(_SITE_NAME.match(s.name)) and s.name not in RESERVED_SITE_NAMES,
             _site_key(spec, i, "name"), s.name, "a name of letters, digits and _ (not "
             f"starting with a digit), other than {_names_of(RESERVED_SITE_NAMES)}")
        need(s.name not in names[:i], _site_key(spec, i, "name"), s.name,
             "a name no other site has")


def _sites(spec: Spec, need: _Need) -> None:
    """Each site's dimension, β, prior and posterior."""
    names = [s.name for s in spec.sites]
    for i, s in enumerate(spec.sites):
        key = lambda part, i=i: _site_key(spec, i, part)  # noqa: E731
        others = [n for n in names if n != s.name]
        need(s.dim >= 1, key("dim"), s.dim, "an integer >= 1")
        need(s.beta >= 0, key("beta"), s.beta, "a number >= 0")
        if s.discrete:
            _discrete_site(spec, s, others, key, need)
            continue
        _gaussian_only(spec, s, key, need)
        _prior(spec, s.prior, others, key, need)
        _posterior(spec, s.posterior, others, key, need)
        _recipes(spec, s, key, need)


def _prior(spec: Spec, pr: PriorSpec, others: list[str], key, need: _Need) -> None:
    need(pr.kind not in DISCRETE_PRIOR_KINDS, key("prior.kind"), pr.kind,
         "a prior of a Gaussian site (normal, learned_normal, mixture, conditional, vamp); "
         f"{pr.kind!r} is for a discrete site (kind = 'bernoulli' or 'categorical')")
    need(pr.components >= 1, key("prior.components"), pr.components, "an integer >= 1")
    need(all(h >= 1 for h in pr.hidden), key("prior.hidden"), list(pr.hidden),
         "a list of positive widths ([] means linear)")
    if pr.kind != "conditional":
        need(not pr.parents, key("prior.parents"), list(pr.parents),
             f"[] for prior.kind {pr.kind!r} (only a 'conditional' prior reads parents)")
        return
    for p in pr.parents:
        need(p in others, key("prior.parents"), list(pr.parents),
             f"names of other latent sites ({_names_of(others)})")
    need(len(set(pr.parents)) == len(pr.parents), key("prior.parents"), list(pr.parents),
         "each parent once")
    need(bool(pr.parents) or spec.label.prior, key("prior.parents"), list(pr.parents),
         "at least one parent site, or label.prior = true (p(z|label))")


def _posterior(spec: Spec, post: PosteriorSpec, others: list[str], key, need: _Need) -> None:
    need(bool(post.inputs), key("posterior.inputs"), list(post.inputs),
         "at least one input: 'y' and/or latent sites")
    for inp in post.inputs:
        need(inp == graph.DATA or inp in others, key("posterior.inputs"), list(post.inputs),
             f"'y' (the data) and/or names of other latent sites ({_names_of(others)})")
    need(len(set(post.inputs)) == len(post.inputs), key("posterior.inputs"),
         list(post.inputs), "each input once")
    if not spec.latents:
        need(post.inputs == (graph.DATA,), "posterior.inputs", list(post.inputs),
             "['y'] in a one-site spec (declare [[latents]] for a graph of sites)")
        need(not post.hidden, "posterior.hidden", list(post.hidden),
             "[] in a one-site spec: its encoder's layers are encoder.hidden")
    need(all(h >= 1 for h in post.hidden), key("posterior.hidden"), list(post.hidden),
         "a list of positive widths ([] means linear)")
    need(post.flow_steps >= 1, key("posterior.flow_steps"), post.flow_steps, "an integer >= 1")
    need(all(h >= 1 for h in post.flow_hidden), key("posterior.flow_hidden"),
         list(post.flow_hidden), "a list of positive widths ([] means a linear MADE)")


#: The keys only a discrete site reads, with their defaults.
_DISCRETE_KEYS = ("categories", "estimator", "baseline", "baseline_hidden", "temperature")


def _gaussian_only(spec: Spec, s: SiteSpec, key, need: _Need) -> None:
    """A Gaussian site leaves the discrete sites' keys at their defaults."""
    default = SiteSpec()
    for name in _DISCRETE_KEYS:
        value = getattr(s, name)
        need(value == getattr(default, name), key(name),
             _to_dict(value) if isinstance(value, TemperatureSpec) else
             list(value) if isinstance(value, tuple) else value,
             f"its default for a Gaussian site: only a discrete site (kind = 'bernoulli' or "
             f"'categorical') reads {name}")


def _discrete_site(spec: Spec, s: SiteSpec, others: list[str], key, need: _Need) -> None:
    """A bernoulli or categorical site: its prior, posterior, estimator and what applies to it
    (checks that need only the site; `_discrete_sites` those that need the graph)."""
    pr, post, where = s.prior, s.posterior, _site_prefix(spec, key)
    need(pr.kind in ("normal", *DISCRETE_PRIOR_KINDS), key("prior.kind"), pr.kind,
         f"'uniform' (the default) or 'learned_probs' for a {s.kind} site (its prior is "
         "probabilities of its values: mixtures, conditional priors and VampPriors are of "
         "Gaussian sites)")
    need(pr == PriorSpec(kind=pr.kind), key("prior"), _to_dict(pr),
         f"only kind ('uniform' or 'learned_probs') for a {s.kind} site: components, parents, "
         "hidden and activation are Gaussian priors' keys")
    need(post.kind == "diagonal", key("posterior.kind"), post.kind,
         f"'diagonal' (the default) for a {s.kind} site: its posterior is {s.kind} with "
         "logits from its encoder (full, iaf and ladder posteriors are Gaussian)")
    _posterior(spec, post, others, key, need)
    need(s.kind == "categorical" or s.categories == SiteSpec().categories, key("categories"),
         s.categories, "its default for a bernoulli site: only a categorical site reads "
         "categories")
    need(s.categories >= 2, key("categories"), s.categories, "an integer >= 2")
    need(s.free_bits == 0, f"{where}.free_bits", s.free_bits,
         f"0 for a {s.kind} site: free bits are a floor on a Gaussian dimension's rate "
         "(its rate is a closed-form KL; use a capacity target, or β)")
    need(s.estimator != "score" or s.capacity.max == 0, f"{where}.capacity.max",
         s.capacity.max, "0 for a site trained by score-function terms (a capacity target's "
         "|rate − C| is not a sum over the draws): use estimator 'relaxed' or 'enumerate'")
    cap = s.capacity
    need(cap.max >= 0, f"{where}.capacity.max", cap.max, "a number of nats >= 0 (0 = off)")
    need(cap.weight > 0, f"{where}.capacity.weight", cap.weight, "a number > 0")
    need(cap.steps >= 1, f"{where}.capacity.steps", cap.steps, "an integer >= 1")
    if cap.max > 0:
        need(cap.steps <= spec.train.steps, f"{where}.capacity.steps", cap.steps,
             f"at most train.steps ({spec.train.steps}): the target must reach capacity.max "
             "before the run ends")
    # (a baseline and a temperature may stay in a spec whose estimator does not read them, so
    # that one --set switches the estimator)
    need(all(h >= 1 for h in s.baseline_hidden), key("baseline_hidden"),
         list(s.baseline_hidden), "a list of positive widths ([] means linear)")
    t = s.temperature
    need(t.start > 0, key("temperature.start"), t.start, "a number > 0")
    need(t.end > 0, key("temperature.end"), t.end, "a number > 0")
    need(0 <= t.steps <= spec.train.steps, key("temperature.steps"), t.steps,
         f"an integer from 0 (the whole run) to train.steps ({spec.train.steps}): the "
         "temperature must reach temperature.end before the run ends")
    if s.estimator == "enumerate":
        values = s.categories ** s.dim if s.kind == "categorical" else 2 ** s.dim
        need(values <= MAX_ENUMERATED, key("estimator"), s.estimator,
             f"'score' or 'relaxed' for site {s.name!r}: enumeration sums over its support, "
             f"{_support_size(s)} values, and at most {MAX_ENUMERATED} are enumerated")
    obj = spec.objective
    if s.estimator in ("score", "relaxed"):
        need(obj.bound == "elbo", "objective.bound", obj.bound,
             f"'elbo' with the {s.estimator} site {s.name!r}: "
             + ("the importance-weighted bound's score-function estimator (VIMCO) is not "
                "implemented" if s.estimator == "score" else
                "a relaxed site's rate is the discrete KL, which the importance weights do not "
                "have")
             + " (use estimator = 'enumerate' for a small site)")
        need(obj.gradient == "reparam", "objective.gradient", obj.gradient,
             f"'reparam' with the {s.estimator} site {s.name!r} (STL and DReG are path "
             "derivatives of ln q of a Gaussian draw)")


def _support_size(s: SiteSpec) -> str:
    base = s.categories if s.kind == "categorical" else 2
    return f"{base}^{s.dim}" if base ** s.dim > 10 ** 6 else str(base ** s.dim)


def _discrete_sites(spec: Spec, need: _Need) -> None:
    """Discrete sites in the graph: enumerated sites sum out at most `MAX_ENUMERATED` joint
    values together; a site trained by score-function terms is not drawn inside an enumerated
    branch (its posterior reads no enumerated site, nor a latent label)."""
    sites = {s.name: s for s in spec.sites}
    enumerated = [s for s in spec.sites if s.discrete and s.estimator == "enumerate"]
    total = 1
    for s in enumerated:
        total *= s.categories ** s.dim if s.kind == "categorical" else 2 ** s.dim
    if len(enumerated) > 1:
        i = [x.name for x in spec.sites].index(enumerated[-1].name)
        need(total <= MAX_ENUMERATED, _site_key(spec, i, "estimator"), "enumerate",
             f"'score' or 'relaxed' for one of the enumerated sites "
             f"{_names_of(s.name for s in enumerated)}: together they have {total} joint "
             f"values, and at most {MAX_ENUMERATED} are enumerated")
    for i, s in enumerate(spec.sites):
        if not (s.discrete and s.estimator == "score"):
            continue
        need(not spec.label.latent, _site_key(spec, i, "estimator"), "score",
             f"'relaxed' or 'enumerate' for site {s.name!r} with label.latent = true: its "
             "posterior reads the label, which is summed out, and a score-function term needs "
             "one draw shared by every value of it")
        todo, seen = list(graph.guide_parents(s)), set()
        while todo:
            n = todo.pop()
            if n in seen or n not in sites:
                continue
            seen.add(n)
            up = sites[n]
            need(not (up.discrete and up.estimator == "enumerate"),
                 _site_key(spec, i, "posterior.inputs"), list(s.posterior.inputs),
                 f"inputs without the enumerated site {n!r} (a site trained by score-function "
                 "terms needs one draw shared by every enumerated value; enumerate it too, or "
                 "draw it first)")
            todo.extend(graph.guide_parents(up))


def _site_prefix(spec: Spec, key) -> str:
    """Where a site's free_bits and capacity live: ``latent`` in a one-site spec."""
    return "latent" if not spec.latents else key("")[:-1]


def _recipes(spec: Spec, s, key, need: _Need) -> None:
    """A site's VampPrior, ladder posterior, free bits and capacity target, where they apply."""
    pr, post, where = s.prior, s.posterior, _site_prefix(spec, key)
    if pr.kind == "vamp":
        need(post.inputs == (graph.DATA,) and not spec.label.condition, key("prior.kind"),
             "vamp", "a prior of a site whose posterior reads the data alone, without a label "
             "(the VampPrior is the mixture of that posterior at learned pseudo-inputs; "
             "Tomczak & Welling 2018)")
        need(post.kind in ("diagonal", "full"), key("prior.kind"), "vamp",
             f"a prior of a site with a diagonal or full posterior (its mixture components; "
             f"this one is {post.kind!r})")
    if post.kind == "ladder":
        need(pr.kind == "conditional", key("posterior.kind"), "ladder",
             f"a posterior of a site with a conditional prior (the ladder merges the prior "
             f"p̂(z | parents) with a bottom-up estimate; this site's prior is {pr.kind!r})")
    need(s.free_bits >= 0, f"{where}.free_bits", s.free_bits, "a number of nats >= 0 (0 = off)")
    cap = s.capacity
    need(cap.max >= 0, f"{where}.capacity.max", cap.max, "a number of nats >= 0 (0 = off)")
    need(cap.weight > 0, f"{where}.capacity.weight", cap.weight, "a number > 0")
    need(cap.steps >= 1, f"{where}.capacity.steps", cap.steps, "an integer >= 1")
    if s.free_bits == 0 and cap.max == 0:
        return
    obj = spec.objective
    need(obj.bound == "elbo", "objective.bound", obj.bound,
         f"'elbo' with free bits or a capacity target (site {s.name!r}): they change the ELBO's "
         "rate term, which the IWAE bound does not have")
    need(s.free_bits == 0 or cap.max == 0, f"{where}.free_bits", s.free_bits,
         "0 when the site has a capacity target (one or the other)")
    if s.free_bits > 0:
        need(post.kind in ("diagonal", "ladder") and pr.kind in FACTORISED_PRIORS,
             f"{where}.free_bits", s.free_bits, f"0 for site {s.name!r}: free bits are per "
             "dimension, so its posterior must be diagonal (or ladder) and its prior one of "
             f"{', '.join(FACTORISED_PRIORS)} (here {post.kind!r} and {pr.kind!r})")
    if cap.max > 0:
        need(cap.steps <= spec.train.steps, f"{where}.capacity.steps", cap.steps,
             f"at most train.steps ({spec.train.steps}): the target must reach capacity.max "
             "before the run ends")


#: Priors whose density factorises over the dimensions (per-dimension rates exist).
FACTORISED_PRIORS = ("normal", "learned_normal", "conditional")


def _orders(spec: Spec, need: _Need) -> None:
    """Neither the priors nor the posteriors read each other in a circle; some posterior
    reads the data."""
    names = [s.name for s in spec.sites]
    for order, part, what in ((graph.model_order, "prior.parents", "prior"),
                              (graph.guide_order, "posterior.inputs", "posterior")):
        try:
            order(spec)
        except graph.CycleError as err:
            i = names.index(err.cycle[0])
            field_value = getattr(getattr(spec.sites[i], what), part.split(".")[1])
            need(False, _site_key(spec, i, part), list(field_value),
                 f"no cycle; the {what}s read each other in a circle: {err}")
    need(any(graph.DATA in s.posterior.inputs for s in spec.sites),
         "latents" if spec.latents else "posterior.inputs", names,
         "at least one site whose posterior reads 'y' (else the encoder never sees the data)")


def _decoder_reads(spec: Spec, need: _Need) -> None:
    """The decoder reads existing sites, each once, and every site leads to it."""
    names, reads = [s.name for s in spec.sites], spec.decoder.reads
    need(bool(reads), "decoder.reads", list(reads), f"at least one latent site "
         f"({_names_of(names)}): a decoder that reads nothing ignores z")
    for r in reads:
        need(r in names, "decoder.reads", list(reads),
             f"names of latent sites ({_names_of(names)})")
    need(len(set(reads)) == len(reads), "decoder.reads", list(reads), "each site once")
    used = graph.ancestors_in_prior(spec, reads)
    for i, s in enumerate(spec.sites):
        need(s.name in used, _site_key(spec, i, "name"), s.name,
             "a site the decoder reads (decoder.reads) or that a prior on the way to it reads "
             "(prior.parents): otherwise it carries no information about y")


def _label(spec: Spec, need: _Need) -> None:
    """The label switches: conditioning, a label-conditional prior, a latent label (M2)."""
    lab = spec.label
    need(lab.classes >= 2, "label.classes", lab.classes, "an integer >= 2")
    need(not lab.prior or lab.condition, "label.prior", lab.prior,
         "false unless label.condition = true (a label-conditional prior needs the label)")
    if lab.prior:
        need(any(s.prior.kind == "conditional" for s in spec.sites), "label.prior", lab.prior,
             "false, or a site with prior.kind = 'conditional' (parents may be [] for "
             "p(z|label))")
    need(not lab.latent or lab.condition, "label.latent", lab.latent,
         "false unless label.condition = true (the decoder and posteriors read the label)")
    need(all(h >= 1 for h in lab.hidden), "label.hidden", list(lab.hidden),
         "positive widths of the classifier's hidden layers")
    if lab.condition and not lab.latent:
        need(spec.data.labelled == 0, "data.labelled", spec.data.labelled,
             "0 with label.condition = true (a conditional VAE reads every example's label); "
             "set label.latent = true to infer the missing ones (M2)")


def _max_halvings(side: int) -> int:
    n = 0
    while side % 2 == 0:
        side //= 2
        n += 1
    return n

