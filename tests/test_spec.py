"""Specs: loading, overrides, round trip, and every kind of mistake as a SpecError."""

import tomllib

import pytest

from ppl_vae.spec import (
    Spec,
    SpecError,
    list_models,
    load_spec,
    models_dir,
    spec_from_dict,
    spec_to_toml,
)


def test_bundled_models_load_and_describe_themselves():
    names = dict(list_models())
    assert {"vae_digits", "beta_vae_digits", "rda_digits", "vae_mnist"} <= set(names)
    for name, description in names.items():
        assert description, name
        assert load_spec(name).name == name


def test_spec_is_frozen():
    spec = load_spec("vae_digits")
    with pytest.raises(AttributeError):
        spec.latent.dim = 3  # type: ignore[misc]


def test_overrides_take_toml_values_and_bare_words():
    spec = load_spec("vae_digits", ["objective.beta=4", "latent.dim=16", "encoder.hidden=[]",
                                    "encoder.activation=tanh", "objective.analytic_kl=false"])
    assert spec.objective.beta == 4.0 and isinstance(spec.objective.beta, float)
    assert spec.latent.dim == 16 and spec.encoder.hidden == ()
    assert spec.encoder.activation == "tanh" and spec.objective.analytic_kl is False


def test_toml_round_trip_of_every_bundled_model():
    for name, _ in list_models():
        base = load_spec(name)
        # aux terms need a diagonal Gaussian posterior; an M2 model takes only its label's
        extra_aux = (base.sites[0].posterior.kind == "diagonal" and not base.label.latent
                     and not base.sites[0].discrete)
        spec = load_spec(name, ['objective.aux=[{kind="infonce", weight=0.5}]'] if extra_aux
                         else [])
        again = spec_from_dict(tomllib.loads(spec_to_toml(spec)))
        assert again == spec


def test_a_latent_graph_loads_round_trips_and_keeps_one_site_specs_as_they_were():
    spec = load_spec("vae_digits", [GRAPH, 'decoder.reads=["z1"]'])
    assert [s.name for s in spec.sites] == ["z1", "z2"]
    assert spec.sites[0].prior.parents == ("z2",) and spec.sites[1].posterior.inputs == ("z1",)
    text = spec_to_toml(spec)
    assert "[[latents]]" in text and "[latent]" not in text and "[posterior]" not in text
    assert spec_from_dict(tomllib.loads(text)) == spec
    one = load_spec("vae_digits")
    assert [(s.name, s.dim) for s in one.sites] == [("z", 8)]
    assert one.sites[0].posterior.kind == "diagonal" and one.decoder.reads == ("z",)
    assert "latents" not in spec_to_toml(one)


def test_learned_scale_and_number_scale():
    assert load_spec(Spec(), ['likelihood.kind="gaussian"',
                              'likelihood.scale="learned"']).likelihood.scale == "learned"
    assert load_spec(Spec(), ["likelihood.scale=1"]).likelihood.scale == 1.0


#: Burda et al.'s two-layer shape: p̂(z2) p̂(z1|z2) p̂(y|z1), bottom-up q(z1|y) q(z2|z1).
GRAPH = ('latents=[{name="z1", dim=3, prior={kind="conditional", parents=["z2"]}}, '
         '{name="z2", dim=2, posterior={inputs=["z1"]}}]')

MISTAKES = [
    # (overrides, key named in the error, a word of what is allowed)
    (["latent.dimm=3"], "latent.dimm", "known key"),
    (["nosuch.key=3"], "nosuch", "known key"),
    (["latent.dim=2.5"], "latent.dim", "integer"),
    (['latent.dim="8"'], "latent.dim", "integer"),
    (["latent.dim=0"], "latent.dim", ">= 1"),
    (['train.matmul_precision="medium"'], "train.matmul_precision", "highest"),
    (['train.cuda_graphs="on"'], "train.cuda_graphs", "auto"),
    (["train.threads=-1"], "train.threads", "0 = the default"),
    (["label.latent=true"], "label.latent", "label.condition = true"),
    (['objective.aux=[{kind="supervised", site="label"}]'], "objective.aux[0].site",
     "label.latent = true"),
    (["label.condition=true", "label.latent=true", 'objective.aux=[{kind="infonce"}]'],
     "objective.aux[0].site", "no other aux term"),
    (["label.condition=true", "label.latent=true", "label.hidden=[0]"], "label.hidden",
     "positive widths"),
    (["label.condition=true", "data.labelled=10"], "data.labelled", "label.latent = true"),
    (["objective.beta=true"], "objective.beta", "number"),
    (["objective.beta=-1"], "objective.beta", ">= 0"),
    (["objective.lam=0"], "objective.lam", "> 0"),
    (["prior.kind=hyperbolic"], "prior.kind", "'vamp'"),
    (["encoder.kind=resnet"], "encoder.kind", "'conv'"),
    (["likelihood.kind=poisson"], "likelihood.kind", "'categorical'"),
    (["objective.distortion=ssim"], "objective.distortion", "'l1'"),
    (["data.source=cifar"], "data.source", "'npz'"),
    (["data.binarize=yes"], "data.binarize", "'dynamic'"),
    (["encoder.hidden=[64, -1]"], "encoder.hidden", "positive"),
    (["encoder.hidden=64"], "encoder.hidden", "list"),
    (["encoder.kind=conv"], "encoder.kind", "28x28"),
    (['data.source="mnist"', 'data.path="x"', "encoder.kind=conv", "encoder.channels=[8,8,8]"],
     "encoder.channels", "at most 2"),
    (['likelihood.kind="gaussian"', "likelihood.scale=-1"], "likelihood.scale", "positive"),
    (['likelihood.kind="gaussian"', 'likelihood.scale="big"'], "likelihood.scale", "learned"),
    (['likelihood.kind="gaussian"', 'data.binarize="static"'], "data.binarize", "bernoulli"),
    (['data.source="mnist"'], "data.path", "IDX"),
    (['data.path="/tmp/x"'], "data.path", "empty"),
    (['data.source="npy"'], "data.path", ".npy files"),
    (['data.source="npy"', 'data.path="x"', 'data.binarize="static"'], "data.binarize",
     "memory-mapped"),
    (["data.stream=yes"], "data.stream", "'auto'"),
    (["data.device_memory_mb=0"], "data.device_memory_mb", "> 0"),
    (['data.device_memory_mb="big"'], "data.device_memory_mb", "a number"),
    (["objective.aux=[{kind='magic'}]"], "objective.aux[0].kind", "package.module:function"),
    (["objective.aux=[{kind='nosuchpkg.mod:fn'}]"], "objective.aux[0].kind", "importable"),
    (["objective.aux=[{kind='infonce', wieght=1}]"], "objective.aux[0].wieght", "known key"),
    (["objective.beta_schedule.kind=cosine"], "objective.beta_schedule.kind", "'cyclical'"),
    (['objective.beta_schedule={kind="cyclical", warmup=10, period=5}'],
     "objective.beta_schedule.period", "> warmup"),
    # schedules that cannot reach their target before the run ends (issue 22)
    (["train.steps=100", 'objective.beta_schedule={kind="linear", warmup=1000}'],
     "objective.beta_schedule.warmup", "fewer steps than train.steps (100)"),
    (["train.steps=110", 'objective.beta_schedule={kind="cyclical", warmup=20, period=50}',
      "objective.beta=2"], "objective.beta_schedule.period", "mid-ramp"),
    (["train.steps=100", "latent.capacity={max=25.0, steps=1000}"], "latent.capacity.steps",
     "at most train.steps (100)"),
    (["train.steps=100", "train.lr_schedule={warmup=100}"], "train.lr_schedule.warmup",
     "below train.steps (100)"),
    (["train.lr_schedule={kind='exponential', decay=1.5}"], "train.lr_schedule.decay",
     "(0, 1]"),
    (["train.lr_schedule={kind='step', decay=1.0}"], "train.lr_schedule.decay",
     "never decays"),
    (["train.steps=100", "train.lr_schedule={kind='step', every=100}"],
     "train.lr_schedule.every", "decay at least once"),
    (["train.steps=100", "train.lr_schedule={kind='burda', epoch_steps=200}"],
     "train.lr_schedule.epoch_steps", "the first stage is one epoch"),
    # recipes where they cannot apply
    (['objective.gradient="dreg"'], "objective.gradient", "set objective.bound = 'iwae'"),
    (['objective.gradient="stl"', 'objective.bound="iwae"', "objective.num_particles=5"],
     "objective.gradient", "'dreg' with bound = 'iwae'"),
    (['posterior.kind="ladder"'], "posterior.kind", "a conditional prior"),
    (['posterior.kind="full"', "latent.free_bits=0.5"], "latent.free_bits",
     "diagonal (or ladder)"),
    (['prior.kind="mixture"', "latent.free_bits=0.5"], "latent.free_bits", "here 'diagonal' "
     "and 'mixture'"),
    (["latent.free_bits=0.5", 'objective.bound="iwae"'], "objective.bound", "rate term"),
    (["latent.free_bits=0.5", "latent.capacity={max=5.0, steps=10}"], "latent.free_bits",
     "one or the other"),
    (["latent.capacity={max=5.0, weight=0.0}"], "latent.capacity.weight", "> 0"),
    (["train.skip_grad_norm=-1"], "train.skip_grad_norm", ">= 0"),
    (['prior.kind="vamp"', 'posterior.kind="iaf"'], "prior.kind", "diagonal or full"),
    (['prior.kind="vamp"', "label.condition=true"], "prior.kind", "without a label"),
    (["train.eval_every=75"], "train.eval_every", "multiple of train.log_every"),
    (["train.device=tpu"], "train.device", "'cuda'"),
    (["objective.num_particles=0"], "objective.num_particles", ">= 1"),
    # the one-site spec's posterior and prior
    (['posterior.kind="normalizing"'], "posterior.kind", "'iaf'"),
    (["posterior.flow_steps=0"], "posterior.flow_steps", ">= 1"),
    (['posterior.inputs=["y", "z"]'], "posterior.inputs", "other latent sites"),
    (["posterior.hidden=[8]"], "posterior.hidden", "encoder.hidden"),
    (['prior.kind="conditional"'], "prior.parents", "label.prior"),
    (['prior.parents=["z"]'], "prior.parents", "only a 'conditional' prior"),
    (['decoder.reads=["w"]'], "decoder.reads", "'z'"),
    (["decoder.reads=[]"], "decoder.reads", "reads nothing"),
    # labels
    (["label.prior=true"], "label.prior", "label.condition"),
    (["label.condition=true", "label.prior=true"], "label.prior", "'conditional'"),
    (["label.condition=true", "data.labelled=100"], "data.labelled", "every example's label"),
    (["label.classes=1"], "label.classes", ">= 2"),
    # latent graphs
    ([GRAPH, "latent.dim=4"], "latent", "[[latents]]"),
    (['latents=[{name="z1", prior={kind="conditional", parents=["z2"]}}, {name="z2", '
      'prior={kind="conditional", parents=["z1"]}}]', 'decoder.reads=["z1"]'],
     "latents[0].prior.parents", "cycle"),
    (['latents=[{name="z1", posterior={inputs=["z2"]}}, {name="z2", posterior={inputs='
      '["z1"]}}]', 'decoder.reads=["z1", "z2"]'], "latents[0].posterior.inputs", "cycle"),
    ([GRAPH.replace('parents=["z2"]', 'parents=["z3"]')], "latents[0].prior.parents",
     "'z2'"),
    ([GRAPH.replace('inputs=["z1"]', 'inputs=["x"]')], "latents[1].posterior.inputs",
     "'y' (the data)"),
    ([GRAPH.replace('{name="z2"', '{name="z1"')], "latents[1].name", "no other site"),
    ([GRAPH.replace('{name="z2"', '{name="y"')], "latents[1].name", "other than"),
    ([GRAPH.replace('dim=3', 'dim=0')], "latents[0].dim", ">= 1"),
    ([GRAPH.replace('{kind="conditional", parents=["z2"]}', '{kind="normal"}')],
     "latents[1].name", "carries no information"),
    ([GRAPH, 'decoder.reads=["z1"]', 'objective.aux=[{kind="infonce", site="z9"}]'],
     "objective.aux[0].site", "'z1', 'z2'"),
    ([GRAPH.replace('"z2"', '"infonce"'), 'objective.aux=[{kind="infonce"}]'],
     "objective.aux[0].kind", "rename the site"),
    ([GRAPH.replace('inputs=["z1"]', 'kind="iaf", inputs=["z1"]'),
      'objective.aux=[{kind="infonce", site="z2"}]'], "objective.aux[0].site", "diagonal"),
    ([GRAPH.replace('name="z1", dim=3,', 'name="z1", dim=3, free_bits=-1.0,')],
     "latents[0].free_bits", ">= 0"),
]


@pytest.mark.parametrize("overrides, key, allowed", MISTAKES)
def test_each_mistake_is_a_spec_error_naming_key_value_and_allowed(overrides, key, allowed):
    if any(o.startswith("latents=") for o in overrides) and not any(
            o.startswith("decoder.reads") for o in overrides):
        overrides = [*overrides, 'decoder.reads=["z1"]']
    with pytest.raises(SpecError) as err:
        load_spec("vae_digits", overrides)
    msg = str(err.value)
    assert err.value.key == key
    assert key in msg and allowed in msg
    assert "vae_digits.toml" in msg  # the file


def test_mistake_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[latent]\ndim = "eight"\n')
    with pytest.raises(SpecError, match=r"bad\.toml: latent\.dim = 'eight'.*integer"):
        load_spec(path)
    path.write_text("name = \n")
    with pytest.raises(SpecError, match="valid TOML"):
        load_spec(path)


def test_unknown_spec_name_lists_the_bundled_models():
    with pytest.raises(FileNotFoundError, match="vae_digits"):
        load_spec("no_such_model")


def test_models_dir_is_the_repository_folder():
    assert (models_dir() / "vae_digits.toml").is_file()
