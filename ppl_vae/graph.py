"""The latent graph of a spec, backend-free: its sites, the orders in which the model and the
guide draw them, where a closed-form rate is valid, module names and input widths.

A spec declares latent sites (`Spec.sites`: `[[latents]]`, or the one site ``z``). Two graphs
connect them:

* the **prior graph**: p̂(z_s | parents(s)) (`prior.parents` of a `conditional` prior), drawn
  by the model in `model_order`, parents first, down to the decoder's sites, P̂_Φ(y | reads);
* the **posterior graph**: q(z_s | inputs(s)) (`posterior.inputs`: "y" and/or other sites),
  drawn by the guide in `guide_order`, inputs first. Bottom-up inference (Burda et al. 2016,
  q(z1|y) q(z2|z1)) runs against the prior graph's direction; top-down (ladder-style,
  q(z2|y) q(z1|y, z2)) along it.

Both backends build from these functions, so the two agree on every order, name and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ppl_vae.schema import (
        AuxSpec,
        PosteriorSpec,
        PriorSpec,
        SiteSpec,
        Spec,
        TemperatureSpec,
    )

#: The posterior input that stands for the data (through the `[encoder]` network).
DATA = "y"


class CycleError(ValueError):
    """The graph has a cycle; `cycle` lists its sites, the first one repeated at the end."""

    def __init__(self, cycle: list[str]):
        self.cycle = cycle
        super().__init__(" → ".join(cycle))


def topological_order(names: list[str], parents: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """`names` ordered parents first, ties kept in the given order; raises CycleError."""
    done: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(name: str, path: list[str]):
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise CycleError(path[path.index(name):] + [name])
        state[name] = 1
        for parent in parents.get(name, ()):
            if parent in parents:  # unknown names are the validator's to report
                visit(parent, [*path, name])
        state[name] = 2
        done.append(name)

    for name in names:
        visit(name, [])
    return tuple(done)


def site_names(spec: Spec) -> tuple[str, ...]:
    return tuple(s.name for s in spec.sites)


def site(spec: Spec, name: str) -> SiteSpec:
    for s in spec.sites:
        if s.name == name:
            return s
    raise KeyError(f"no latent site {name!r}; the sites are {', '.join(site_names(spec))}")


def prior_parents(s: SiteSpec) -> tuple[str, ...]:
    return s.prior.parents if s.prior.kind == "conditional" else ()


def posterior_sites(s: SiteSpec) -> tuple[str, ...]:
    """The latent sites (not "y") that the posterior of `s` reads."""
    return tuple(i for i in s.posterior.inputs if i != DATA)


def guide_parents(s: SiteSpec) -> tuple[str, ...]:
    """The sites the guide draws before `s`: those its posterior reads and, for a ladder
    posterior (top-down, Sønderby et al. 2016), its prior's parents, whose draws the
    precision-weighted merge evaluates the prior at."""
    extra = prior_parents(s) if s.posterior.kind == "ladder" else ()
    return posterior_sites(s) + tuple(p for p in extra if p not in posterior_sites(s))


def model_order(spec: Spec) -> tuple[str, ...]:
    """The order in which the model draws the sites: each after its prior's parents."""
    return topological_order(list(site_names(spec)),
                             {s.name: prior_parents(s) for s in spec.sites})


def guide_order(spec: Spec) -> tuple[str, ...]:
    """The order in which the guide draws the sites: each after its `guide_parents`."""
    return topological_order(list(site_names(spec)),
                             {s.name: guide_parents(s) for s in spec.sites})


def guide_descendants(spec: Spec, name: str) -> set[str]:
    """The sites the guide draws after `name` from it (`guide_parents`), directly or not."""
    children: dict[str, list[str]] = {s.name: [] for s in spec.sites}
    for s in spec.sites:
        for i in guide_parents(s):
            children.setdefault(i, []).append(s.name)
    out: set[str] = set()
    todo = list(children.get(name, ()))
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(children.get(n, ()))
    return out


def closed_form_rate_valid(spec: Spec) -> dict[str, bool]:
    """Per site: may its rate E_q[ln q(z_s|·) − ln p̂(z_s|parents)] be replaced by the closed-form
    KL(q(z_s|·) ‖ p̂(z_s|parents)) at the guide's draw of the parents?

    Only when no parent of s in the prior graph is drawn by the guide *after* s, from s: then
    z_s given everything the KL conditions on is still distributed as q(z_s|·). With bottom-up
    inference (q(z2|z1), p̂(z1|z2)) the parent z2 is inferred from z1, the two are correlated
    under q, and the expected KL at the drawn z2 is not the rate (the test in
    tests/test_linear_gaussian.py measures the difference): that site's rate stays Monte
    Carlo. (Pyro's `TraceMeanField_ELBO` assumes the orders agree and only warns.)
    """
    return {s.name: not (set(prior_parents(s)) & guide_descendants(spec, s.name))
            for s in spec.sites}


def ancestors_in_prior(spec: Spec, names) -> set[str]:
    """`names` and every site their priors read, directly or not."""
    by_name = {s.name: s for s in spec.sites}
    out: set[str] = set()
    todo = [n for n in names if n in by_name]
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(p for p in prior_parents(by_name[n]) if p in by_name)
    return out


def sites_to_fill(spec: Spec, given) -> tuple[str, ...]:
    """The sites, in model order, that the decoder needs but `given` lacks: the decoder's sites
    and, for each of those missing, the parents its prior reads (e.g. a traversal of z2 in
    z2 → z1 → y needs z1 from p̂(z1|z2))."""
    by_name = {s.name: s for s in spec.sites}
    needed: set[str] = set()
    todo = [r for r in spec.decoder.reads if r not in given]
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(p for p in prior_parents(by_name[n]) if p not in given)
    return tuple(n for n in model_order(spec) if n in needed)


def is_gaussian_of_data(s: SiteSpec) -> bool:
    """Is q(z_s|y, label) a Gaussian in closed form: a diagonal or full posterior that reads the
    data (and the label) only?"""
    return not guide_parents(s) and s.posterior.kind != "iaf" and not s.discrete


def is_discrete_of_data(s: SiteSpec) -> bool:
    """Is q(z_s|y, label) a discrete site's posterior of the data (and the label) only, whose
    probabilities a `posterior_probs` hook can return?"""
    return s.discrete and not guide_parents(s)


def gaussian_data_site(spec: Spec, name: str | None = None) -> SiteSpec:
    """The site `name` (default: the first), checked to have a Gaussian posterior of the data
    alone, q(z|y, label), whose mean and standard deviations an `encode` hook can return."""
    s = site(spec, name or spec.sites[0].name)
    if s.discrete:
        raise ValueError(f"site {s.name!r} is a {s.kind} site, not a Gaussian: use "
                         "posterior_probs")
    if guide_parents(s):
        raise ValueError(f"site {s.name!r}: its posterior reads {', '.join(guide_parents(s))}, "
                         "so q(z|y) is a mixture, not a Gaussian: use posterior_draws")
    if s.posterior.kind == "iaf":
        raise ValueError(f"site {s.name!r}: an IAF posterior is not Gaussian: use "
                         "posterior_draws")
    return s


def discrete_data_site(spec: Spec, name: str | None = None) -> SiteSpec:
    """The site `name` (default: the first), checked to be a discrete site whose posterior
    reads the data (and the label) only, whose probabilities a `posterior_probs` hook returns."""
    s = site(spec, name or spec.sites[0].name)
    if not s.discrete:
        raise ValueError(f"site {s.name!r} is Gaussian, not discrete: use encode")
    if guide_parents(s):
        raise ValueError(f"site {s.name!r}: its posterior reads {', '.join(guide_parents(s))}, "
                         "so q(z|y) is a mixture: use posterior_draws")
    return s


def as_code(spec: Spec, code) -> dict:
    """A latent code as {site: (N, d)}: a dict as it is, an array as the value of the one site
    of a one-site spec."""
    if isinstance(code, dict):
        unknown = set(code) - set(site_names(spec))
        if unknown:
            raise ValueError(f"unknown latent sites {sorted(unknown)}; the sites are "
                             f"{', '.join(site_names(spec))}")
        return dict(code)
    if len(spec.sites) != 1:
        raise ValueError("this model has latent sites " + ", ".join(site_names(spec))
                         + ": pass the code as a dict {site: values}")
    return {spec.sites[0].name: code}


# ---- module names ---------------------------------------------------------------------------
def is_graph(spec: Spec) -> bool:
    """True when the spec declares `[[latents]]` (module names then carry the site)."""
    return bool(spec.latents)


def encoder_module(spec: Spec, name: str) -> str:
    """The module of the posterior of site `name`: ``encoder`` in a one-site spec (the data
    network and the posterior in one, as always), ``encoder_<site>`` in a graph."""
    return f"encoder_{name}" if is_graph(spec) else "encoder"


def baseline_module(spec: Spec, name: str) -> str:
    """The module of the NVIL baseline network of a score-function site `name`: ``baseline`` or
    ``baseline_<site>``."""
    return f"baseline_{name}" if is_graph(spec) else "baseline"


def prior_module(spec: Spec, name: str) -> str:
    """The module (or parameter prefix) of the prior of site `name`: ``prior`` or
    ``prior_<site>``."""
    return f"prior_{name}" if is_graph(spec) else "prior"


def has_feature_network(spec: Spec) -> bool:
    """A graph's shared data network ``encoder`` (y → features read as "y" by the posteriors)
    exists when it has layers; an MLP with ``hidden = []`` is the identity and has none."""
    return is_graph(spec) and (spec.encoder.kind == "conv" or bool(spec.encoder.hidden))


# ---- widths ---------------------------------------------------------------------------------
def label_width(spec: Spec) -> int:
    """Width of the one-hot label that posteriors and decoder read (0 without conditioning)."""
    return spec.label.classes if spec.label.condition else 0


def conv_width(channels: tuple[int, ...], image_shape) -> int:
    """Features after one stride-2 convolution per channel count, flattened."""
    h, w = (s // 2 ** len(channels) for s in image_shape)
    return channels[-1] * h * w


def data_feature_width(spec: Spec, data_dim: int, image_shape) -> int:
    """Width of the data's features that a posterior reading "y" gets: the `[encoder]` network's
    output (its last hidden width, else its input) in a graph, or the raw data when that
    network is the identity. (In a one-site spec the encoder module reads y itself.)"""
    enc = spec.encoder
    if enc.hidden:
        return enc.hidden[-1]
    return conv_width(enc.channels, image_shape) if enc.kind == "conv" else data_dim


def posterior_extra_width(spec: Spec, s: SiteSpec, data_dim: int, image_shape) -> int:
    """Width of what the posterior of `s` reads besides the raw data: in a graph, the data's
    features (if it reads "y"), the sites it reads and the label; in a one-site spec the label
    only (it is appended to the data's features)."""
    label = label_width(spec)
    if not is_graph(spec):
        return label
    dims = {x.name: x.width for x in spec.sites}
    width = sum(dims[i] for i in posterior_sites(s)) + label
    if DATA in s.posterior.inputs:
        width += data_feature_width(spec, data_dim, image_shape)
    return width


def prior_input_width(spec: Spec, s: SiteSpec) -> int:
    """Width of what a `conditional` prior reads: its parents' values and the label."""
    dims = {x.name: x.width for x in spec.sites}
    return (sum(dims[p] for p in prior_parents(s))
            + (spec.label.classes if spec.label.prior else 0))


def decoder_input_width(spec: Spec) -> int:
    """Width of the code the decoder reads: its sites' values (a categorical site's one-hot
    values flattened), then the one-hot label."""
    dims = {x.name: x.width for x in spec.sites}
    return sum(dims[r] for r in spec.decoder.reads) + label_width(spec)


def total_dim(spec: Spec) -> int:
    """The latent dimensions of every site (a categorical variable counts once)."""
    return sum(s.dim for s in spec.sites)


def aux_site(spec: Spec, aux) -> str:
    """The site an aux term reads: its `site`, or the first site."""
    return aux.site or spec.sites[0].name


# ---- metric names ---------------------------------------------------------------------------
def rate_dim_key(spec: Spec, name: str, i: int) -> str:
    """The metric name of the rate of dimension i of site `name`: ``rate/dim_<i>`` in a
    one-site spec (as always), ``rate/<site>/dim_<i>`` in a graph."""
    return f"rate/{name}/dim_{i}" if is_graph(spec) else f"rate/dim_{i}"


# ---- the plan: everything the program and the networks read, computed once -----------------
#: The site of a latent label (``label.latent``): p(label) in the model, q(label|y) in the
#: guide. (The same string as `ppl_vae.spec.LABEL_SITE`, which reserves the name.)
LABEL = "label"


@dataclass(frozen=True)
class SitePlan:
    """One latent site as the model and the guide draw it.

    `prior_width` is the width of what a `conditional` prior reads (its parents' values, then
    the one-hot label when ``label.prior``); `posterior_width` the width of what the posterior
    reads besides the raw data (in a graph: the data's features if it reads "y", the sites it
    reads, then the label; in a one-site spec: the label, appended to the encoder's features).
    `closed_form`: whether its rate may be the closed-form KL (`closed_form_rate_valid`).

    A discrete site (`kind` bernoulli or categorical) also has its `categories` (K, or None for
    bernoulli), `estimator`, the module of its NVIL baseline network (`baseline_module`, or
    None without one), that network's hidden widths and its `temperature` schedule; `width` is
    the number of values its draw has (dim, or dim × K one-hot)."""

    name: str
    dim: int
    beta: float
    prior: PriorSpec
    posterior: PosteriorSpec
    parents: tuple[str, ...]
    inputs: tuple[str, ...]
    prior_module: str
    encoder_module: str
    prior_width: int
    posterior_width: int
    closed_form: bool
    kind: str = "gaussian"
    categories: int | None = None
    estimator: str | None = None
    baseline_module: str | None = None
    baseline_hidden: tuple[int, ...] = ()
    temperature: TemperatureSpec | None = None

    @property
    def discrete(self) -> bool:
        return self.kind != "gaussian"

    @property
    def width(self) -> int:
        return self.dim * (self.categories or 1)

    @property
    def relaxed(self) -> bool:
        return self.estimator == "relaxed"


@dataclass(frozen=True)
class AuxPlan:
    """An encoder-only term: its guide factor-site `name`, its spec and the `site` it reads."""

    name: str
    spec: AuxSpec
    site: str


@dataclass(frozen=True)
class Plan:
    """The latent graph of a spec on data of `data_dim` features (images of `image_shape`),
    resolved once: the sites, the orders in which model and guide draw them, module names and
    every input width. The one program (`ppl_vae.program`) and both backends' networks read it
    instead of re-deriving widths from the spec."""

    spec: Spec
    sites: tuple[SitePlan, ...]
    model_order: tuple[str, ...]
    guide_order: tuple[str, ...]
    data_dim: int
    image_shape: tuple[int, int] | None
    one_site: bool
    feature_network: bool
    feature_width: int
    label_width: int
    code_width: int
    aux: tuple[AuxPlan, ...]

    def site(self, name: str) -> SitePlan:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no latent site {name!r}; the sites are "
                       + ", ".join(s.name for s in self.sites))


def _discrete_plan(spec: Spec, s: SiteSpec) -> dict:
    """The `SitePlan` fields of a discrete site."""
    network = s.estimator == "score" and s.baseline == "network"
    return dict(kind=s.kind, categories=s.categories if s.kind == "categorical" else None,
                estimator=s.estimator,
                baseline_module=baseline_module(spec, s.name) if network else None,
                baseline_hidden=tuple(s.baseline_hidden) if network else (),
                temperature=s.temperature if s.estimator == "relaxed" else None)


def relaxed_sites(spec: Spec) -> tuple[str, ...]:
    """The discrete sites trained through a relaxation (estimator = "relaxed"), in `Spec.sites`
    order: each has a temperature that changes with the step."""
    return tuple(s.name for s in spec.sites if s.discrete and s.estimator == "relaxed")


def aux_names(spec: Spec) -> tuple[str, ...]:
    """Guide factor-site names of the aux terms: the kind (or function name), made unique."""
    names: list[str] = []
    for aux in spec.objective.aux:
        base = aux.kind.rsplit(":", 1)[-1]
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}_{i}"
        names.append(name)
    return tuple(names)


def plan(spec: Spec, data_dim: int, image_shape=None) -> Plan:
    """The `Plan` of `spec` on data with `data_dim` features."""
    closed_form = closed_form_rate_valid(spec)
    sites = tuple(
        SitePlan(s.name, s.dim, s.beta, s.prior, s.posterior, prior_parents(s),
                 s.posterior.inputs, prior_module(spec, s.name), encoder_module(spec, s.name),
                 prior_input_width(spec, s),
                 posterior_extra_width(spec, s, data_dim, image_shape), closed_form[s.name],
                 **(_discrete_plan(spec, s) if s.discrete else {}))
        for s in spec.sites)
    aux = tuple(AuxPlan(name, a, aux_site(spec, a))
                for name, a in zip(aux_names(spec), spec.objective.aux))
    return Plan(spec, sites, model_order(spec), guide_order(spec), data_dim,
                None if image_shape is None else tuple(image_shape), not is_graph(spec),
                has_feature_network(spec), data_feature_width(spec, data_dim, image_shape),
                label_width(spec), decoder_input_width(spec), aux)
