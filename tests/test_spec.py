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
        spec = load_spec(name, ['objective.aux=[{kind="infonce", weight=0.5}]'])
        again = spec_from_dict(tomllib.loads(spec_to_toml(spec)))
        assert again == spec


def test_learned_scale_and_number_scale():
    assert load_spec(Spec(), ['likelihood.kind="gaussian"',
                              'likelihood.scale="learned"']).likelihood.scale == "learned"
    assert load_spec(Spec(), ["likelihood.scale=1"]).likelihood.scale == 1.0


MISTAKES = [
    # (overrides, key named in the error, a word of what is allowed)
    (["latent.dimm=3"], "latent.dimm", "known key"),
    (["nosuch.key=3"], "nosuch", "known key"),
    (["latent.dim=2.5"], "latent.dim", "integer"),
    (['latent.dim="8"'], "latent.dim", "integer"),
    (["latent.dim=0"], "latent.dim", ">= 1"),
    (["objective.beta=true"], "objective.beta", "number"),
    (["objective.beta=-1"], "objective.beta", ">= 0"),
    (["objective.lam=0"], "objective.lam", "> 0"),
    (["prior.kind=vamp"], "prior.kind", "'mixture'"),
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
    (["objective.aux=[{kind='magic'}]"], "objective.aux[0].kind", "package.module:function"),
    (["objective.aux=[{kind='nosuchpkg.mod:fn'}]"], "objective.aux[0].kind", "importable"),
    (["objective.aux=[{kind='infonce', wieght=1}]"], "objective.aux[0].wieght", "known key"),
    (["objective.beta_schedule.kind=cosine"], "objective.beta_schedule.kind", "'cyclical'"),
    (['objective.beta_schedule={kind="cyclical", warmup=10, period=5}'],
     "objective.beta_schedule.period", ">= warmup"),
    (["train.eval_every=75"], "train.eval_every", "multiple of train.log_every"),
    (["train.device=tpu"], "train.device", "'cuda'"),
    (["objective.num_particles=0"], "objective.num_particles", ">= 1"),
]


@pytest.mark.parametrize("overrides, key, allowed", MISTAKES)
def test_each_mistake_is_a_spec_error_naming_key_value_and_allowed(overrides, key, allowed):
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
