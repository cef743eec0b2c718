"""Study figures (u_nft.plotting): integer epoch ticks, bands, trade-off error bars, ablation bars, panels."""
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from u_nft.plotting import (Panel, bar_figure, bar_plot, line_figure, line_plot, offsets, panels_figure, panels_plot,
                            tradeoff_figure, tradeoff_plot)


def _curve(epochs, slope, spread=0.05):
    x = list(range(epochs))
    mean = [slope * e for e in x]
    return x, mean, [m - spread for m in mean], [m + spread for m in mean]


def _visible_xticks(figure):
    figure.canvas.draw()
    ax = figure.axes[0]
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


@pytest.mark.parametrize("epochs", [4, 10, 31])
def test_epoch_ticks_are_integers(epochs):
    ticks = _visible_xticks(line_figure({"dense": _curve(epochs, 0.1)}, xlabel="epoch"))
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
    # the old PIL plot put ticks at 2.25 / 4.5 / 6.75 for 10 epochs; without the integer locator a 4-epoch
    # axis gets half-epoch ticks
    assert not all(float(t).is_integer() for t in _visible_xticks(
        line_figure({"dense": _curve(4, 0.1)}, integer_x=False)))


def test_line_figure_draws_one_mean_line_and_band_per_series_and_reference_lines():
    series = {"dense": _curve(6, 0.1), "scalar": _curve(6, 0.05), "mc": _curve(6, 0.07)}
    ax = line_figure(series, hlines={"threshold": 0.3}).axes[0]
    means = [line for line in ax.lines if line.get_label() in series]
    assert [line.get_label() for line in means] == ["dense", "scalar", "mc"]
    np.testing.assert_allclose(means[0].get_ydata(), series["dense"][1])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 3
    band_y = bands[1].get_paths()[0].vertices[:, 1]
    assert band_y.min() == pytest.approx(min(series["scalar"][2]))
    assert band_y.max() == pytest.approx(max(series["scalar"][3]))
    (threshold,) = [line for line in ax.lines if line.get_label() == "threshold"]
    assert set(threshold.get_ydata()) == {0.3}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dense", "scalar", "mc", "threshold"]


def test_line_plot_writes_a_png_of_the_requested_size(tmp_path):
    path = line_plot({"dense": _curve(5, 0.1)}, tmp_path / "sub" / "curve.png", title="t", xlabel="epoch",
                     ylabel="reward", size=(600, 300))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (600, 300)
    with pytest.raises(ValueError, match="dense"):
        line_plot({"dense": ([0, 1], [0.1], [0.0], [0.2])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="nothing to draw"):
        line_plot({}, tmp_path / "empty.png")


def test_tradeoff_figure_has_one_errorbar_series_per_method_with_the_given_extents():
    points = {"dense": ([0.8, 0.6], [0.30, 0.40], [0.05, 0.02], ([0.01, 0.02], [0.03, 0.04])),
              "scalar": (0.95, 0.12, 0.03, None)}
    ax = tradeoff_figure(points, annotate={"dense": ["epoch 5", "epoch 10"]}).axes[0]
    containers = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in containers] == ["dense", "scalar"]
    line, _, (xbars, ybars) = containers[0]
    np.testing.assert_allclose(line.get_xdata(), [0.8, 0.6])
    np.testing.assert_allclose(line.get_ydata(), [0.30, 0.40])
    x_spans = [tuple(np.round(seg[:, 0], 6)) for seg in xbars.get_segments()]
    assert x_spans == [(0.75, 0.85), (0.58, 0.62)]
    y_spans = [tuple(np.round(seg[:, 1], 6)) for seg in ybars.get_segments()]
    assert y_spans == [(0.29, 0.33), (0.38, 0.44)]  # asymmetric (minus, plus) offsets
    scalar_bars = containers[1].lines[2]
    assert len(scalar_bars) == 1  # xerr only
    assert [t.get_text() for t in ax.texts] == ["epoch 5", "epoch 10"]


def test_tradeoff_plot_writes_png_and_rejects_bad_error_shapes(tmp_path):
    path = tradeoff_plot({"dense": (0.5, 0.2, 0.1, 0.1)}, tmp_path / "t.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (720, 440)
    with pytest.raises(ValueError, match="'dense' xerr shape"):
        tradeoff_plot({"dense": ([0.5, 0.6], [0.2, 0.3], [0.1, 0.1, 0.1], None)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="negative"):
        tradeoff_plot({"dense": (0.5, 0.2, -0.1, None)}, tmp_path / "bad.png")


def test_bar_figure_groups_methods_with_interval_error_bars_and_fixed_colours():
    groups = {"cell 1": {"dense": (0.9, 0.8, 1.0), "scalar": (0.5, 0.3, 0.6)},
              "cell 2": {"dense": (0.7, 0.65, 0.8), "scalar": (0.4, 0.35, 0.5)},
              "cell 4": {"dense": (0.6, 0.5, 0.7)}}
    ax = bar_figure(groups, ylabel="epochs to threshold", colors={"scalar": "black"}).axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [b.get_label() for b in bars] == ["dense", "scalar"]
    assert [p.get_height() for p in bars[0].patches] == pytest.approx([0.9, 0.7, 0.6])
    assert len(bars[1].patches) == 2  # "cell 4" has no scalar bar
    assert {p.get_facecolor() for p in bars[1].patches} == {to_rgba("black")}
    assert len({p.get_facecolor() for p in bars[0].patches}) == 1
    _, _, (err,) = bars[0].errorbar
    spans = [tuple(np.round(seg[:, 1], 6)) for seg in err.get_segments()]
    assert spans == [(0.8, 1.0), (0.65, 0.8), (0.5, 0.7)]  # the absolute [low, high] intervals
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cell 1", "cell 2", "cell 4"]


def test_bar_plot_writes_png_and_rejects_intervals_not_containing_the_mean(tmp_path):
    path = bar_plot({"beta 0.1": {"dense": (1.0, 0.9, 1.1)}}, tmp_path / "b.png", value_labels=True)
    with Image.open(path) as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="low <= mean <= high"):
        bar_plot({"g": {"dense": (1.0, 1.2, 1.5)}}, tmp_path / "bad.png")
    np.testing.assert_allclose(offsets([1.0, 2.0], [0.5, 2.0], [1.5, 3.0]), [[0.5, 0.0], [0.5, 1.0]])


def test_panels_share_one_palette_and_hide_unused_axes(tmp_path):
    panels = [Panel("line", {"dense": _curve(5, 0.1), "scalar": _curve(5, 0.05)}, "reward", "epoch", "reward",
                    options={"hlines": {"threshold": 0.2}}),
              Panel("line", {"scalar": _curve(5, 0.02), "dense": _curve(5, 0.03)}, "drift", "epoch", "drift"),
              Panel("tradeoff", {"dense": (0.5, 0.3, 0.1, 0.05)}, "trade-off"),
              Panel("bar", {"m 4": {"dense": (1.0, 0.9, 1.1)}}, "ablation")]
    figure = panels_figure(panels, ncols=3, panel_size=(300, 200), title="study")
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert len(visible) == 4 and len(figure.axes) == 6
    colour = {ax.get_title(): {line.get_label(): line.get_color() for line in ax.lines} for ax in visible[:2]}
    assert colour["reward"]["dense"] == colour["drift"]["dense"] != colour["drift"]["scalar"]
    path = panels_plot(panels, tmp_path / "p.png", ncols=2, panel_size=(300, 200))
    with Image.open(path) as image:
        assert image.size == (600, 400)
    with pytest.raises(ValueError, match="kind='pie'"):
        panels_figure([Panel("pie", {})])
    with pytest.raises(ValueError, match="unknown options"):
        panels_figure([Panel("bar", {"g": {"a": (1, 0, 2)}}, options={"integer_x": True})])


def test_line_styles_pair_outside_and_inside_curves_in_one_colour():
    series = {"dense (outside)": _curve(4, 0.1), "dense (inside)": _curve(4, 0.2)}
    ax = line_figure(series, colors={"dense (outside)": "C0", "dense (inside)": "C0"},
                     linestyles={"dense (inside)": "--"}).axes[0]
    styles = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in ax.lines}
    assert styles == {"dense (outside)": ("C0", "-"), "dense (inside)": ("C0", "--")}


def test_many_or_long_bar_groups_get_slanted_tick_labels():
    few = bar_figure({"g1": {"a": (1, 0, 2)}, "g2": {"a": (1, 0, 2)}}).axes[0]
    many = bar_figure({f"adaptive_location_{i}": {"a": (1, 0, 2)} for i in range(6)}).axes[0]
    assert {t.get_rotation() for t in few.get_xticklabels()} == {0.0}
    assert {t.get_rotation() for t in many.get_xticklabels()} == {30.0}
