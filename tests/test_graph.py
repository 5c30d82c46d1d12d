"""The latent graph, backend-free: orders, where a closed-form rate is valid, names, widths."""

import pytest

from ppl_vae import graph
from ppl_vae.spec import Spec, load_spec

BOTTOM_UP = ['latents=[{name="z1", dim=3, prior={kind="conditional", parents=["z2"]}}, '
             '{name="z2", dim=2, posterior={inputs=["z1"]}}]', 'decoder.reads=["z1"]']
TOP_DOWN = ['latents=[{name="z1", dim=3, prior={kind="conditional", parents=["z2"]}, '
            'posterior={inputs=["y", "z2"]}}, {name="z2", dim=2}]', 'decoder.reads=["z1"]']


def test_orders_follow_the_prior_and_the_posterior_graphs():
    spec = load_spec(Spec(), BOTTOM_UP)
    assert graph.model_order(spec) == ("z2", "z1")  # parents first
    assert graph.guide_order(spec) == ("z1", "z2")  # inputs first: bottom-up inference
    spec = load_spec(Spec(), TOP_DOWN)
    assert graph.model_order(spec) == graph.guide_order(spec) == ("z2", "z1")


def test_topological_order_keeps_ties_and_names_a_cycle():
    assert graph.topological_order(["a", "b", "c"], {"a": ("c",), "b": (), "c": ()}) == (
        "c", "a", "b")
    with pytest.raises(graph.CycleError) as err:
        graph.topological_order(["a", "b", "c"], {"a": ("b",), "b": ("c",), "c": ("a",)})
    assert err.value.cycle == ["a", "b", "c", "a"]


def test_closed_form_rate_is_refused_where_the_parent_is_inferred_from_the_site():
    # bottom-up: z2 is drawn from q(z2|z1), so KL(q(z1|y) ‖ p̂(z1|z2)) at that z2 is biased
    assert graph.closed_form_rate_valid(load_spec(Spec(), BOTTOM_UP)) == {"z1": False,
                                                                          "z2": True}
    # top-down: z2 is drawn first and z1 given it: both closed forms are valid
    assert graph.closed_form_rate_valid(load_spec(Spec(), TOP_DOWN)) == {"z1": True, "z2": True}
    assert graph.closed_form_rate_valid(Spec()) == {"z": True}


def test_module_names_and_widths():
    one = load_spec(Spec(), ["label.condition=true", "encoder.hidden=[7]"])
    assert graph.encoder_module(one, "z") == "encoder" and graph.prior_module(one, "z") == "prior"
    assert graph.decoder_input_width(one) == 8 + 10  # z, then the one-hot label
    assert graph.posterior_extra_width(one, one.sites[0], 64, None) == 10  # the label only
    spec = load_spec(Spec(), [*TOP_DOWN, "encoder.hidden=[7]"])
    assert graph.encoder_module(spec, "z1") == "encoder_z1"
    assert graph.prior_module(spec, "z2") == "prior_z2"
    assert graph.has_feature_network(spec)
    z1 = graph.site(spec, "z1")
    assert graph.posterior_extra_width(spec, z1, 64, None) == 7 + 2  # features of y, then z2
    assert graph.prior_input_width(spec, z1) == 2 and graph.total_dim(spec) == 5
    flat = load_spec(Spec(), [*TOP_DOWN, "encoder.hidden=[]"])
    assert not graph.has_feature_network(flat)  # the identity: posteriors read y itself
    assert graph.posterior_extra_width(flat, graph.site(flat, "z1"), 64, None) == 64 + 2
    assert graph.rate_dim_key(spec, "z1", 2) == "rate/z1/dim_2"
    assert graph.rate_dim_key(one, "z", 2) == "rate/dim_2"


def test_sites_to_fill_walks_down_from_the_decoder():
    spec = load_spec(Spec(), BOTTOM_UP)
    assert graph.sites_to_fill(spec, {"z2": 0}) == ("z1",)  # z1 from p̂(z1|z2)
    assert graph.sites_to_fill(spec, {"z1": 0}) == ()  # the decoder reads z1 only
    assert graph.sites_to_fill(spec, {}) == ("z2", "z1")


def test_codes_and_gaussian_sites():
    spec = load_spec(Spec(), BOTTOM_UP)
    assert graph.as_code(spec, {"z1": 1}) == {"z1": 1}
    with pytest.raises(ValueError, match="pass the code as a dict"):
        graph.as_code(spec, [[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="unknown latent sites"):
        graph.as_code(spec, {"w": 1})
    assert graph.gaussian_data_site(spec).name == "z1"
    with pytest.raises(ValueError, match="reads z1"):
        graph.gaussian_data_site(spec, "z2")
    with pytest.raises(ValueError, match="IAF"):
        graph.gaussian_data_site(load_spec(Spec(), ['posterior.kind="iaf"']))
