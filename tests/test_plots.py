"""The figures say what they show: traversal rows name their dimension and its rate, the
rate–distortion plane holds every point whole with its label clear of the title, the objective
stays visible where it equals −ELBO, and the curves' tick labels are plain numbers."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ppl_vae import plots

ROOT = Path(__file__).parents[1]


@pytest.fixture
def drawn(monkeypatch):
    """The figures written while the test runs, {file name: Figure}, drawn (text laid out).
    A figure is written to a temporary name (".t.png.<pid>.<hex>.tmp") and renamed: it is
    recorded under its final name."""
    from matplotlib.figure import Figure  # here, not at collection: matplotlib is slow to load

    figures = {}
    savefig = Figure.savefig

    def record(fig, path, *args, **kwargs):
        savefig(fig, path, *args, **kwargs)  # also lays out the text: extents are final
        name = Path(path).name
        figures[name[1:].rsplit(".", 3)[0] if name.endswith(".tmp") else name] = fig

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _inside(inner, outer) -> bool:
    return (inner.x0 >= outer.x0 and inner.x1 <= outer.x1 and inner.y0 >= outer.y0
            and inner.y1 <= outer.y1)


def _assert_points_whole_and_labels_clear(fig, ax, xs, ys):
    """Each marker lies inside the axes by more than its radius; each label inside the axes,
    clear of the title and of every other label."""
    box = ax.get_window_extent()
    radius = 6 / 2 * fig.dpi / 72  # the default marker, 6 points across
    for x, y in zip(xs, ys):
        px, py = ax.transData.transform((x, y))
        assert box.x0 + radius < px < box.x1 - radius and box.y0 + radius < py < box.y1 - radius
    renderer = fig.canvas.get_renderer()
    labels = [t.get_window_extent(renderer) for t in ax.texts]
    title = ax.title.get_window_extent(renderer)
    for i, label in enumerate(labels):
        assert _inside(label, box) and not _overlap(label, title)
        assert not any(_overlap(label, other) for other in labels[i + 1:])


def test_traversal_rows_name_the_dimension_and_its_rate(tmp_path, drawn):
    rates = np.array([0.5, 1.25, 0.0])

    def decode(z):  # (n, 3) -> (n, 4): a 2x2 image of the code
        return np.clip(np.abs(np.concatenate([z, z[:, :1]], 1)) / 3, 0, 1)

    plots.latent_traversals(decode, np.argsort(rates)[::-1], 3, (2, 2), tmp_path / "t.png",
                            rates=rates)
    ax = drawn["t.png"].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "dim 1\n1.25 nats", "dim 0\n0.50 nats", "dim 2\n0.00 nats"]
    assert "rows: dimension and its rate" in ax.get_title()
    plots.latent_traversals(decode, [2, 0], 3, (2, 2), tmp_path / "u.png")
    assert [t.get_text() for t in drawn["u.png"].axes[0].get_yticklabels()] == ["dim 2", "dim 0"]


def test_rate_distortion_plane_holds_a_point_at_rate_zero_with_its_label_inside(tmp_path,
                                                                               drawn):
    # two collapsed runs at the same point at rate 0 (one label for both), one at the top
    points = [("beta4", 0.002, 27.071), ("beta20", 0.0, 27.089), ("run", 3.977, 19.182)]
    plots.rate_distortion_plane(points, tmp_path / "rd.png")
    fig = drawn["rd.png"]
    ax = fig.axes[0]
    _assert_points_whole_and_labels_clear(fig, ax, [p[1] for p in points], [p[2] for p in points])
    assert sorted(t.get_text() for t in ax.texts) == ["beta4, beta20", "run"]
    # with H(y) known the line and the origin are in view too
    plots.rate_distortion_plane(points, tmp_path / "rd_h.png", entropy=20.0)
    (x0, x1), (y0, y1) = drawn["rd_h.png"].axes[0].get_xlim(), drawn["rd_h.png"].axes[0].get_ylim()
    assert x0 < 0 < 20 < x1 and y0 < 0 < 27.089 < y1


def test_rate_distortion_plane_holds_a_negative_distortion(tmp_path, drawn):
    """−ln p(y|z) of a density on continuous data (an RDA's Gaussian) is below 0."""
    points = [("rda", 16.97, -50.40), ("run", 3.98, 19.18)]
    plots.rate_distortion_plane(points, tmp_path / "rd.png")
    fig = drawn["rd.png"]
    y0, y1 = fig.axes[0].get_ylim()
    assert y0 < -50.40 < 19.18 < y1
    _assert_points_whole_and_labels_clear(fig, fig.axes[0], [16.97, 3.98], [-50.40, 19.18])


def _metrics(beta: float, neg_elbo: list[float], distortion: list[float], rate: list[float]):
    train = [{"step": 100 * (i + 1), "split": "train", "rate": r, "distortion": d,
              "objective": beta * r + d} for i, (r, d) in enumerate(zip(rate, distortion))]
    test = [{"step": 100 * (i + 1), "split": "test", "rate": r, "distortion": d,
             "objective": beta * r + d, "elbo": -e}
            for i, (r, d, e) in enumerate(zip(rate, distortion, neg_elbo))]
    return train + test


def _line(ax, label_start: str):
    return next(line for line in ax.get_lines() if line.get_label().startswith(label_start))


def test_objective_points_stay_visible_where_they_equal_neg_elbo(tmp_path, drawn):
    rate, distortion = [0.2, 2.0, 4.0], [27.0, 21.0, 19.0]
    plots.training_curves(_metrics(1.0, [r + d for r, d in zip(rate, distortion)], distortion,
                                   rate), tmp_path / "c.png")
    ax = drawn["c.png"].axes[0]
    objective, neg_elbo = _line(ax, "objective (test)"), _line(ax, "−ELBO")
    np.testing.assert_allclose(objective.get_ydata(), neg_elbo.get_ydata())
    # a hollow, larger square under a smaller dot: both show
    assert objective.get_zorder() > neg_elbo.get_zorder()
    assert objective.get_marker() != neg_elbo.get_marker()
    assert neg_elbo.get_markerfacecolor() == "none"
    assert neg_elbo.get_markersize() > objective.get_markersize()
    assert "= objective" in neg_elbo.get_label()
    # the objective's line dashed over the distortion's, which it nearly equals at a low rate
    assert _line(ax, "objective (train)").get_linestyle() != _line(
        ax, "distortion (train)").get_linestyle()
    # with β = 4 they differ, and the legend does not say they coincide
    plots.training_curves(_metrics(4.0, [r + d for r, d in zip(rate, distortion)], distortion,
                                   rate), tmp_path / "c4.png")
    assert "= objective" not in _line(drawn["c4.png"].axes[0], "−ELBO").get_label()


def test_curve_ticks_are_plain_numbers_and_small_rates_off_zero(tmp_path, drawn):
    # an RDA: −ELBO of a Gaussian on grey values is negative, the rate starts at 0.03 nats
    plots.training_curves(_metrics(1.0, [-30.0, -33.0, -33.4], [5.8, 0.9, 0.76],
                                   [0.03, 10.0, 17.0]), tmp_path / "rda.png", distortion="mse")
    ax = drawn["rda.png"].axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert ax.get_yscale() == "symlog" and ax.yaxis.get_transform().linthresh <= 0.03
    assert "0" in ticks and "−10" in ticks and "10" in ticks
    assert not any("$" in t or "^" in t for t in ticks), ticks  # no mathtext −10⁰
    assert "mse" in ax.get_ylabel() and "distortion (mse) (train)" in [
        line.get_label() for line in ax.get_lines()]
    # all positive: a log axis, labelled 0.5, 1, 2, …, not 10⁰
    plots.training_curves(_metrics(1.0, [27.2, 23.0, 23.0], [27.0, 21.0, 19.0],
                                   [0.2, 2.0, 4.0]), tmp_path / "vae.png")
    ax = drawn["vae.png"].axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert ax.get_yscale() == "log" and {"1", "10"} <= set(ticks)
    assert not any("$" in t for t in ticks) and ax.get_ylabel() == "nats per example"


def test_rate_per_dimension_bars_carry_their_values(tmp_path, drawn):
    plots.rate_per_dim_bars([0.72, 0.0, 0.013], tmp_path / "r.png")
    assert [t.get_text() for t in drawn["r.png"].axes[0].texts] == ["0.72", "0.00", "0.01"]


def test_rate_distortion_example_shows_collapsed_points_whole(tmp_path, drawn):
    rd = _load_example("rate_distortion")
    table = ((0.3, 6.44, 1.26, 4.48, 5.17), (1.0, 2.85, 3.47, 2.26, 2.67),
             (3.0, 0.0, 9.223, -3.49, 0.0), (5.0, 0.0, 9.223, -3.49, 0.0))
    rows = [{"beta": b, "rate": r, "nll_distortion": d, "mutual_information_lower": lo,
             "mutual_information": iq, "rate_stderr": 0.01 * (r > 0), "nll_distortion_stderr": 0.03}
            for b, r, d, lo, iq in table]
    rd.plot(rows, 5.734, tmp_path / "rate_distortion.png")
    fig = drawn["rate_distortion.png"]
    plane, bounds = fig.axes[0], fig.axes[1]
    _assert_points_whole_and_labels_clear(fig, plane, [r[1] for r in table], [r[2] for r in table])
    assert sorted(t.get_text() for t in plane.texts) == ["β=0.3", "β=1", "β=3, β=5"]
    assert [t.get_text() for t in bounds.get_xticklabels()] == ["0.3", "1", "3", "5"]


def test_labels_of_neighbouring_points_do_not_cover_each_other(tmp_path, drawn):
    """The small-β end of a β sweep: (7.28, 1.07) and (8.32, 1.00) are close on the figure, and
    written the same way their labels ran into each other ("β=0.2β=0.1"). The I_q points eval
    flags as limited by ln M are ringed."""
    rd = _load_example("rate_distortion")
    table = ((0.1, 8.32, 1.00, 4.73, 5.58, True), (0.2, 7.28, 1.07, 4.67, 5.49, True),
             (0.3, 6.31, 1.30, 4.44, 5.26, False), (1.0, 2.83, 3.47, 2.27, 2.67, False),
             (3.0, 0.0, 9.223, -3.49, 0.0, False))
    rows = [{"beta": b, "rate": r, "nll_distortion": d, "mutual_information_lower": lo,
             "mutual_information": iq, "mutual_information_limited": limited,
             "rate_stderr": 0.05, "nll_distortion_stderr": 0.03}
            for b, r, d, lo, iq, limited in table]
    rd.plot(rows, 5.734, tmp_path / "rate_distortion.png")
    fig = drawn["rate_distortion.png"]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert len(boxes) == 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    ringed = [line for line in fig.axes[1].get_lines() if "limited" in line.get_label()]
    assert len(ringed) == 1 and list(ringed[0].get_xdata()) == [0.1, 0.2]


def test_encoder_autonomy_example_draws_no_bars_on_cut_axes(tmp_path, drawn):
    ea = _load_example("encoder_autonomy")
    rng = np.random.default_rng(0)
    keys = ("neg_elbo", "neg_log_likelihood", "probe_accuracy", "probe_accuracy_100",
            "mutual_information")
    rows = [{"variant": v, **{k: 20.0 * (k.startswith("neg")) + rng.uniform(0.5, 0.9)
                              for k in keys}} for v in ea.VARIANTS for _ in range(2)]
    ea.plot(rows, tmp_path / "encoder_autonomy.png")
    for ax in drawn["encoder_autonomy.png"].axes:
        assert not ax.patches  # a bar's length from a cut axis would overstate the differences
    assert drawn["encoder_autonomy.png"].axes[-1].get_ylim()[0] == 0


def test_semi_supervised_example_keeps_the_legend_off_the_bars(tmp_path, drawn, monkeypatch):
    ss = _load_example("semi_supervised")
    model = SimpleNamespace(data_dim=4,
                            sample_prior=lambda n, seed, labels: {"z": np.zeros((n, 2))},
                            decode_mean=lambda z, labels: np.full((len(labels), 4), 0.5))
    run = SimpleNamespace(spec=SimpleNamespace(label=SimpleNamespace(classes=10)),
                          model=lambda backend: model)
    monkeypatch.setattr(ss.runs, "load_run", lambda folder: run)
    rows = [{"labelled": n, "aux_weight": a, "accuracy": acc}
            for n, a, acc in ((100, 1, .76), (100, 0, .17), (1000, 1, .88), (1000, 0, .69))]
    peer = {"100-aux": {"accuracy": .69}, "100-noaux": {"accuracy": .41},
            "1000-aux": {"accuracy": .88}, "1000-noaux": {"accuracy": .75}}
    ss.plot(rows, peer, {"folder": "x", "labelled": 100}, SimpleNamespace(backend="numpyro"),
            tmp_path / "semi_supervised.png")
    fig = drawn["semi_supervised.png"]
    bars, images = fig.axes
    renderer = fig.canvas.get_renderer()
    legend = bars.get_legend().get_window_extent(renderer)
    assert not any(_overlap(legend, bar.get_window_extent(renderer)) for bar in bars.patches)
    assert [t.get_text() for t in images.get_yticklabels()] == [f"label {k}" for k in range(10)]


def test_plot_run_labels_traversals_with_the_runs_rates(tmp_path, drawn):
    """`ppl-vae plot` on a rate–distortion autoencoder: traversal rows carry the rates of the
    run's last test evaluation, the curves say the distortion is the mse."""
    pytest.importorskip("torch")
    from ppl_vae import runs
    from ppl_vae.cli import main

    out = tmp_path / "rda"
    assert main(["train", "rda_digits", "--out", str(out), "--no-progress", "--set",
                 "train.steps=30", "--set", "train.log_every=10", "--set", "train.eval_every=30",
                 "--set", "train.checkpoint_every=30", "--set", "data.limit=400"]) == 0
    assert main(["plot", str(out)]) == 0
    test = runs.load_run(out).final_test
    rates = [test[f"rate/dim_{i}"] for i in range(8)]
    labels = [t.get_text() for t in drawn["traversals.png"].axes[0].get_yticklabels()]
    assert labels == [f"dim {i}\n{rates[i]:.2f} nats" for i in np.argsort(rates)[::-1]]
    assert "mse" in drawn["curves.png"].axes[0].get_ylabel()


def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Figures were written in place: a savefig that failed half-way left half a PNG where the
    previous figure was. Now the old file stays, and no temporary file is left."""
    from matplotlib.figure import Figure

    path = tmp_path / "s.png"
    plots.save_image_grid(np.zeros((4, 3, 3)), path)
    old = path.read_bytes()
    savefig = Figure.savefig

    def fails_half_way(fig, target, *args, **kwargs):
        savefig(fig, target, *args, **kwargs)
        with open(target, "r+b") as fh:
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fails_half_way)
    with pytest.raises(OSError, match="disk full"):
        plots.save_image_grid(np.ones((4, 3, 3)), path)
    assert path.read_bytes() == old and sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_every_figure_goes_through_the_atomic_save():
    """No savefig (or imsave) outside `plots.save`, in the package, the examples and the
    benchmarks: each figure they write is then written atomically."""
    calls = []
    for folder in ("ppl_vae", "examples", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if ".savefig(" in line or "imsave(" in line:
                    calls.append(f"{path.relative_to(ROOT)}:{i}")
    assert len(calls) == 1 and calls[0].startswith("ppl_vae/plots.py:"), calls
