"""Study figures drawn with matplotlib on an Agg canvas (no display, no pyplot state): curves with shaded
bands, reward-vs-drift trade-offs with error bars, ablation bars with intervals, and multi-panel figures.

Every ``*_plot`` function writes a PNG (parent folders are created) and returns its path; its
``*_figure`` twin returns the :class:`matplotlib.figure.Figure` instead, so tests and callers can inspect
the artists. Sizes are in pixels at :data:`DPI`.

Conventions shared by all figures:

- ``Series = (x, mean, low, high)``: equal-length sequences; ``low`` / ``high`` are the absolute bounds of
  the shaded band (e.g. min-max over seeds, or a 95 % interval), not offsets from the mean.
- Interval triples ``(mean, low, high)`` (bar plots) are absolute bounds as well.
- Error bars of :func:`tradeoff_plot` follow matplotlib's ``errorbar`` convention (symmetric half-widths,
  or a ``(minus, plus)`` pair of offsets); :func:`offsets` converts absolute bounds.
- Colours: ``colors`` maps a label to any matplotlib colour; labels without one take the tab10 cycle in
  order of first appearance, so pass the same ``colors`` to keep a method's colour across figures.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["DPI", "Panel", "offsets", "save_figure", "line_figure", "line_plot", "tradeoff_figure", "tradeoff_plot",
           "bar_figure", "bar_plot", "panels_figure", "panels_plot"]

DPI = 100
Series = tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]
Interval = tuple[float, float, float]
PANEL_KINDS = ("line", "tradeoff", "bar")


@dataclasses.dataclass
class Panel:
    """One axes of :func:`panels_plot`.

    kind: "line" (data = {label: Series}), "tradeoff" (data = {label: (x, y, xerr, yerr)}) or "bar"
    (data = {group: {method: (mean, low, high)}}); options: keyword arguments of the matching
    single-panel function (``hlines``, ``vlines``, ``integer_x``, ``linestyles``, ``connect``, ``annotate``,
    ``value_labels``).
    """

    kind: str
    data: Mapping[str, Any]
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class _Palette:
    """label -> colour: explicit ``colors`` first, then tab10 in order of first request."""

    def __init__(self, colors: Mapping[str, Any] | None = None):
        self.explicit = dict(colors or {})
        self.assigned: dict[str, Any] = {}

    def __call__(self, label: str):
        if label in self.explicit:
            return self.explicit[label]
        if label not in self.assigned:
            self.assigned[label] = f"C{len(self.assigned) % 10}"
        return self.assigned[label]


def offsets(mean, low, high) -> np.ndarray:
    """Absolute bounds -> matplotlib error-bar offsets: array (2, N) of (mean - low, high - mean), >= 0."""
    mean, low, high = (np.atleast_1d(np.asarray(v, dtype=float)) for v in (mean, low, high))
    if (low > mean + 1e-12).any() or (high < mean - 1e-12).any():
        raise ValueError(f"offsets: need low <= mean <= high, got mean={mean.tolist()} low={low.tolist()} "
                         f"high={high.tolist()}")
    return np.stack([mean - low, high - mean]).clip(min=0)


def _new_figure(size: tuple[int, int]) -> Figure:
    width, height = size
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> str:
    """Write ``figure`` as a PNG at :data:`DPI` through the Agg canvas; returns the path (parents created)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=DPI, facecolor="white")
    return path


def _reference_lines(ax, hlines: Mapping[str, float] | None, vlines: Mapping[str, float] | None) -> None:
    """Dashed grey reference lines, each labelled in the legend."""
    styles = ("--", ":", "-.")
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(float(y), color="0.35", linestyle=styles[i % 3], linewidth=1.2, label=label)
    for i, (label, x) in enumerate((vlines or {}).items()):
        ax.axvline(float(x), color="0.55", linestyle=styles[i % 3], linewidth=1.2, label=label)


def _finish(ax, title: str, xlabel: str, ylabel: str, legend: bool = True) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


def _draw_lines(ax, series: Mapping[str, Series], palette: _Palette, hlines=None, vlines=None,
                integer_x: bool = True, linestyles: Mapping[str, str] | None = None) -> None:
    if not series:
        raise ValueError("line_plot: nothing to draw (series is empty)")
    for label, entry in series.items():
        if len(entry) != 4:
            raise ValueError(f"line_plot: series {label!r} must be (x, mean, low, high), got {len(entry)} parts")
        x, mean, low, high = (np.asarray(v, dtype=float) for v in entry)
        if not x.size or not (x.shape == mean.shape == low.shape == high.shape):
            raise ValueError(f"line_plot: series {label!r} needs equal, non-empty lengths; got x {x.shape}, "
                             f"mean {mean.shape}, low {low.shape}, high {high.shape}")
        color = palette(label)
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
        ax.plot(x, mean, color=color, linewidth=2, linestyle=(linestyles or {}).get(label, "-"),
                marker="o" if x.size <= 20 else None, markersize=3, label=label)
    _reference_lines(ax, hlines, vlines)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def line_figure(series: Mapping[str, Series], title: str = "", xlabel: str = "", ylabel: str = "",
                size: tuple[int, int] = (720, 440), hlines: Mapping[str, float] | None = None,
                vlines: Mapping[str, float] | None = None, integer_x: bool = True,
                colors: Mapping[str, Any] | None = None, linestyles: Mapping[str, str] | None = None) -> Figure:
    """Each series ``label -> (x, mean, low, high)`` as a line over a shaded [low, high] band.

    hlines / vlines: ``label -> y`` (``x``) dashed reference lines (e.g. a threshold). integer_x: x ticks
    only at integers (epochs), via ``MaxNLocator(integer=True)``. linestyles: ``label -> "--"`` etc.
    (default solid), e.g. to pair "dense (outside)" and "dense (inside)" in one colour.
    """
    figure = _new_figure(size)
    ax = figure.add_subplot()
    _draw_lines(ax, series, _Palette(colors), hlines, vlines, integer_x, linestyles)
    _finish(ax, title, xlabel, ylabel)
    return figure


def line_plot(series: Mapping[str, Series], path: str | os.PathLike, title: str = "", xlabel: str = "",
              ylabel: str = "", size: tuple[int, int] = (720, 440), hlines: Mapping[str, float] | None = None,
              vlines: Mapping[str, float] | None = None, integer_x: bool = True,
              colors: Mapping[str, Any] | None = None, linestyles: Mapping[str, str] | None = None) -> str:
    """:func:`line_figure` written to ``path`` (PNG). Returns the path written."""
    return save_figure(line_figure(series, title, xlabel, ylabel, size, hlines, vlines, integer_x, colors,
                                   linestyles), path)


def _error(err, count: int, label: str, axis: str):
    """None | number | N numbers (half-widths) | (minus, plus) pair of N-sequences -> errorbar argument."""
    if err is None:
        return None
    array = np.asarray(err, dtype=float)
    if array.ndim == 0:
        array = np.full(count, float(array))
    if array.shape == (count,) or array.shape == (2, count):
        if (array < 0).any():
            raise ValueError(f"tradeoff_plot: {label!r} {axis}err has negative entries; they are offsets "
                             f"(use u_nft.plotting.offsets(mean, low, high) for absolute bounds)")
        return array
    raise ValueError(f"tradeoff_plot: {label!r} {axis}err shape {array.shape}; accepted: a number, ({count},) "
                     f"half-widths or (2, {count}) (minus, plus) offsets")


def _draw_tradeoff(ax, points: Mapping[str, tuple], palette: _Palette, connect: bool = True,
                   annotate: Mapping[str, Sequence[str]] | None = None, hlines=None, vlines=None) -> None:
    if not points:
        raise ValueError("tradeoff_plot: nothing to draw (points is empty)")
    for label, entry in points.items():
        if len(entry) != 4:
            raise ValueError(f"tradeoff_plot: {label!r} must be (x, y, xerr, yerr), got {len(entry)} parts")
        x, y = np.atleast_1d(np.asarray(entry[0], dtype=float)), np.atleast_1d(np.asarray(entry[1], dtype=float))
        if x.shape != y.shape or x.ndim != 1 or not x.size:
            raise ValueError(f"tradeoff_plot: {label!r} x and y need the same non-empty length, "
                             f"got {x.shape}, {y.shape}")
        color = palette(label)
        ax.errorbar(x, y, xerr=_error(entry[2], x.size, label, "x"), yerr=_error(entry[3], x.size, label, "y"),
                    fmt="o-" if connect and x.size > 1 else "o", color=color, linewidth=1, markersize=6,
                    elinewidth=1, capsize=3, label=label)
        for text, px, py in zip((annotate or {}).get(label, ()), x, y):
            ax.annotate(str(text), (px, py), textcoords="offset points", xytext=(5, 5), fontsize=7, color=color)
    _reference_lines(ax, hlines, vlines)


def tradeoff_figure(points: Mapping[str, tuple], title: str = "", xlabel: str = "collateral drift",
                    ylabel: str = "reward gain", size: tuple[int, int] = (720, 440), connect: bool = True,
                    annotate: Mapping[str, Sequence[str]] | None = None, hlines: Mapping[str, float] | None = None,
                    vlines: Mapping[str, float] | None = None, colors: Mapping[str, Any] | None = None) -> Figure:
    """Reward gained against collateral change: ``label -> (x, y, xerr, yerr)``, one error-bar series each.

    x, y: a number or N numbers (e.g. one point per epoch or per lever; joined by a thin line when
    ``connect``); xerr / yerr: None, a number, N half-widths or a (minus, plus) pair of N offsets.
    annotate: ``label -> N texts`` written next to the points (e.g. epochs or lever names).
    """
    figure = _new_figure(size)
    ax = figure.add_subplot()
    _draw_tradeoff(ax, points, _Palette(colors), connect, annotate, hlines, vlines)
    _finish(ax, title, xlabel, ylabel)
    return figure


def tradeoff_plot(points: Mapping[str, tuple], path: str | os.PathLike, title: str = "",
                  xlabel: str = "collateral drift", ylabel: str = "reward gain", size: tuple[int, int] = (720, 440),
                  connect: bool = True, annotate: Mapping[str, Sequence[str]] | None = None,
                  hlines: Mapping[str, float] | None = None, vlines: Mapping[str, float] | None = None,
                  colors: Mapping[str, Any] | None = None) -> str:
    """:func:`tradeoff_figure` written to ``path`` (PNG). Returns the path written."""
    return save_figure(tradeoff_figure(points, title, xlabel, ylabel, size, connect, annotate, hlines, vlines,
                                       colors), path)


def _draw_bars(ax, groups: Mapping[str, Mapping[str, Interval]], palette: _Palette, hlines=None,
               value_labels: bool = False) -> None:
    if not groups or not any(groups.values()):
        raise ValueError("bar_plot: nothing to draw (groups is empty)")
    methods = list(dict.fromkeys(m for bars in groups.values() for m in bars))
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        xs, means, low, high = [], [], [], []
        for i, bars in enumerate(groups.values()):
            if method in bars:
                entry = bars[method]
                if len(entry) != 3:
                    raise ValueError(f"bar_plot: {method!r} must be (mean, low, high), got {len(entry)} parts")
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                means.append(float(entry[0]))
                low.append(float(entry[1]))
                high.append(float(entry[2]))
        container = ax.bar(xs, means, width=width * 0.95, yerr=offsets(means, low, high), capsize=3,
                           color=palette(method), label=method, error_kw={"elinewidth": 1, "ecolor": "0.2"})
        if value_labels:
            ax.bar_label(container, fmt="%.3g", fontsize=7, padding=2)
    names = [str(g) for g in groups]
    crowded = len(names) > 4 or max(map(len, names)) > 10  # long variant names would overlap when level
    ax.set_xticks(range(len(groups)), names, rotation=30 if crowded else 0, ha="right" if crowded else "center",
                  fontsize=8 if crowded else None)
    _reference_lines(ax, hlines, None)


def bar_figure(groups: Mapping[str, Mapping[str, Interval]], title: str = "", xlabel: str = "", ylabel: str = "",
               size: tuple[int, int] = (720, 440), hlines: Mapping[str, float] | None = None,
               colors: Mapping[str, Any] | None = None, value_labels: bool = False) -> Figure:
    """Grouped bars: ``group -> {method -> (mean, low, high)}``, error bars spanning the absolute [low, high]
    (e.g. a 95 % interval over seeds). A method keeps one colour in every group; absent ones are skipped.
    value_labels: write each mean above its bar."""
    figure = _new_figure(size)
    ax = figure.add_subplot()
    _draw_bars(ax, groups, _Palette(colors), hlines, value_labels)
    _finish(ax, title, xlabel, ylabel)
    return figure


def bar_plot(groups: Mapping[str, Mapping[str, Interval]], path: str | os.PathLike, title: str = "",
             xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (720, 440),
             hlines: Mapping[str, float] | None = None, colors: Mapping[str, Any] | None = None,
             value_labels: bool = False) -> str:
    """:func:`bar_figure` written to ``path`` (PNG). Returns the path written."""
    return save_figure(bar_figure(groups, title, xlabel, ylabel, size, hlines, colors, value_labels), path)


_PANEL_OPTIONS = {"line": {"hlines", "vlines", "integer_x", "linestyles"},
                  "tradeoff": {"connect", "annotate", "hlines", "vlines"},
                  "bar": {"hlines", "value_labels"}}


def panels_figure(panels: Sequence[Panel], ncols: int = 1, panel_size: tuple[int, int] = (720, 440),
                  title: str = "", colors: Mapping[str, Any] | None = None) -> Figure:
    """Several :class:`Panel` axes in a grid of ``ncols`` columns (row-major), each ``panel_size`` pixels.

    One palette serves every panel, so a label (method) has the same colour in all of them.
    """
    if not panels:
        raise ValueError("panels_plot: no panels")
    if ncols < 1:
        raise ValueError(f"panels_plot: ncols={ncols!r}; accepted: integers >= 1")
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    figure = _new_figure((panel_size[0] * ncols, panel_size[1] * nrows))
    axes = figure.subplots(nrows, ncols, squeeze=False)
    palette = _Palette(colors)
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
            continue
        panel = panels[index]
        if panel.kind not in PANEL_KINDS:
            raise ValueError(f"panels_plot: panel {index} kind={panel.kind!r}; accepted: {', '.join(PANEL_KINDS)}")
        unknown = set(panel.options) - _PANEL_OPTIONS[panel.kind]
        if unknown:
            raise ValueError(f"panels_plot: panel {index} ({panel.kind}) has unknown options {sorted(unknown)}; "
                             f"accepted: {sorted(_PANEL_OPTIONS[panel.kind])}")
        draw = {"line": _draw_lines, "tradeoff": _draw_tradeoff, "bar": _draw_bars}[panel.kind]
        draw(ax, panel.data, palette, **panel.options)
        _finish(ax, panel.title, panel.xlabel, panel.ylabel)
    if title:
        figure.suptitle(title)
    return figure


def panels_plot(panels: Sequence[Panel], path: str | os.PathLike, ncols: int = 1,
                panel_size: tuple[int, int] = (720, 440), title: str = "",
                colors: Mapping[str, Any] | None = None) -> str:
    """:func:`panels_figure` written to ``path`` (PNG). Returns the path written."""
    return save_figure(panels_figure(panels, ncols, panel_size, title, colors), path)
