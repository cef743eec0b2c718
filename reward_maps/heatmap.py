"""Reward maps drawn over their images, with a colour bar, for logs and docs.

Colours come from matplotlib's "coolwarm" (Moreland's diverging cool-to-warm map), sampled at
:data:`COLORMAP_SAMPLES` (odd) points so the middle of the value range is exactly its neutral grey: blue
at the low end of the range, grey at its middle (r = 1/2 of a (0, 1) map), red at the high end, so
"better than neutral" reads red and "worse" reads blue.

Value ranges: a grid uses the scorer's declared ``RewardOutput.value_range`` when there is one (values
outside are clipped, never renormalized); for scorers that declare none (unbounded maps) ONE range, the
finite min and max over the whole grid, serves every panel. Either way the colour bar beside the panels
states the range, so one colour means one value across the grid.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from reward_maps.base import RewardMapError, RewardOutput

__all__ = ["COLORMAP", "COLORMAP_SAMPLES", "diverging_colormap", "colorize", "to_pil_image", "overlay_heatmap",
           "grid_value_range", "colorbar_image", "save_grid", "save_reward_grid", "save_map_image"]

COLORMAP = "coolwarm"
COLORMAP_SAMPLES = 257  # odd: entry 128 is the colormap at exactly 0.5, the neutral grey
COLORBAR_WIDTH = 104    # pixels added to the right of a grid for its colour bar
COLORBAR_MIN_HEIGHT = 160


def diverging_colormap():
    """The matplotlib colormap used for every heatmap (non-finite values render black)."""
    import matplotlib

    return matplotlib.colormaps[COLORMAP].resampled(COLORMAP_SAMPLES).with_extremes(bad="black")


def colorize(values: torch.Tensor, value_range: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """(h, w) values -> (3, h, w) RGB float32 in [0, 1] through :func:`diverging_colormap`.

    t = (v - low) / (high - low), clipped to [0, 1] (a value outside the range takes the end colour);
    value_range None uses this map's own finite min and max (:func:`grid_value_range` of the one map).
    Non-finite values render black.
    """
    values = values.detach().float().cpu()
    low, high = grid_value_range(values[None], value_range)
    t = ((values - low) / (high - low)).clamp(0, 1).numpy()
    rgba = diverging_colormap()(np.ma.masked_invalid(t))
    return torch.from_numpy(np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))).float()


def to_pil_image(image: torch.Tensor):
    """(3, H, W) float in [0, 1] -> PIL RGB image (values rounded to uint8)."""
    from PIL import Image

    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def _blend(image: torch.Tensor, reward_map: torch.Tensor, value_range: tuple[float, float], alpha: float):
    colors = colorize(reward_map, value_range)
    colors = torch.nn.functional.interpolate(colors[None], size=tuple(image.shape[-2:]), mode="nearest")[0]
    return to_pil_image((1 - alpha) * image.detach().float().cpu().clamp(0, 1) + alpha * colors)


def _check_overlay(image: torch.Tensor, reward_map: torch.Tensor, alpha: float, caller: str) -> None:
    if image.ndim != 3 or image.shape[0] != 3 or reward_map.ndim != 2:
        raise RewardMapError(
            f"{caller}: image must be (3, H, W) and map (h, w), got {tuple(image.shape)} and {tuple(reward_map.shape)}"
        )
    if not 0 <= alpha <= 1:
        raise RewardMapError(f"{caller}: alpha={alpha!r}; accepted: a number in [0, 1]")


def overlay_heatmap(
    image: torch.Tensor,
    reward_map: torch.Tensor,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    alpha: float = 0.5,
):
    """Blend the colorized map over the image: (1 - alpha) * image + alpha * colorize(map).

    image: (3, H, W) float in [0, 1]; reward_map: (h, w), upsampled to (H, W) by nearest neighbour so
    every map cell stays a visible square; value_range None: this map's own min / max. Returns a PIL RGB
    image of size (W, H), without a colour bar (:func:`save_grid` draws one).
    """
    _check_overlay(image, reward_map, alpha, "overlay_heatmap")
    return _blend(image, reward_map, grid_value_range(reward_map[None], value_range), alpha)


def grid_value_range(maps: torch.Tensor, value_range: tuple[float, float] | None) -> tuple[float, float]:
    """The (low, high) every panel of a grid is coloured with.

    A declared ``value_range`` is returned as is (it must have low < high). None (unbounded scorer): the
    finite min and max over ALL of ``maps`` (any shape); a constant grid gets (v - 1/2, v + 1/2), so it
    renders neutral grey; a grid without finite values gets (0, 1).
    """
    if value_range is not None:
        low, high = (float(v) for v in value_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise RewardMapError(f"value_range={tuple(value_range)!r}; accepted: finite (low, high) with low < high, "
                                 f"or None for the grid's own min / max")
        return low, high
    values = maps.detach().float().cpu()
    finite = values[torch.isfinite(values)]
    if not finite.numel():
        return 0.0, 1.0
    low, high = finite.min().item(), finite.max().item()
    return (low - 0.5, high + 0.5) if low == high else (low, high)


def colorbar_image(value_range: tuple[float, float], height: int, label: str = "", width: int = COLORBAR_WIDTH):
    """A vertical colour bar for ``value_range`` as a PIL RGB image of ``width`` x ``height`` pixels.

    Drawn by matplotlib on an Agg canvas (ticks at the range's round numbers, ``label`` along the bar).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from PIL import Image

    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    margin = min(0.08, 12 / height)
    axes = figure.add_axes((0.08, margin, 0.16, 1 - 2 * margin))
    bar = figure.colorbar(ScalarMappable(Normalize(*value_range), diverging_colormap()), cax=axes)
    bar.set_ticks(np.linspace(*value_range, 5))  # both ends and the middle: the range is stated exactly
    bar.ax.set_yticklabels([f"{v:.3g}" for v in np.linspace(*value_range, 5)])
    bar.ax.tick_params(labelsize=7, length=2, pad=1)
    if label:
        fits = max(8, int(height / 6.5))  # about 6.5 px per 7 pt character along the bar
        lines = [line if len(line) <= fits else line[:fits - 1] + "…" for line in label.split("\n")]
        bar.set_label("\n".join(lines), fontsize=7, labelpad=2)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    return Image.fromarray(np.ascontiguousarray(pixels)).resize((width, height))


def _range_label(label: str, declared: bool) -> str:
    """The bar's caption: the map's name over where its range comes from (the ticks state the range)."""
    source = "declared range" if declared else "grid min-max (undeclared)"
    return f"{label}\n{source}" if label else source


def _with_colorbar(canvas, value_range: tuple[float, float], label: str):
    """``canvas`` (PIL) with a colour bar pasted to its right; the result is at least COLORBAR_MIN_HEIGHT tall."""
    from PIL import Image

    height = max(canvas.height, COLORBAR_MIN_HEIGHT)
    result = Image.new("RGB", (canvas.width + COLORBAR_WIDTH, height), (255, 255, 255))
    result.paste(canvas, (0, 0))
    result.paste(colorbar_image(value_range, height, label), (canvas.width, 0))
    return result


def _save_png(image, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, format="PNG")
    return path


def save_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    path: str | os.PathLike,
    ncols: int = 4,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    alpha: float = 0.5,
    pad: int = 2,
    label: str = "",
    colorbar: bool = True,
) -> str:
    """Write one PNG of ``image | overlay`` pairs, ``ncols`` pairs per row, ``pad`` white pixels apart, and a
    colour bar (:data:`COLORBAR_WIDTH` px) on the right naming ``label`` and the range.

    images: (B, 3, H, W) in [0, 1]; maps: (B, h, w). value_range: the scorer's declared range (values
    outside are clipped to the end colours), or None for ONE range over the whole grid
    (:func:`grid_value_range`) — never a range per panel. The panels occupy the top-left
    ``ncols * (2W + pad) + pad`` x ``nrows * (H + pad) + pad`` pixels. Returns the path written (parent
    folders are created).
    """
    from PIL import Image

    if images.ndim != 4 or maps.ndim != 3 or images.shape[0] != maps.shape[0]:
        raise RewardMapError(
            f"save_grid: need images (B, 3, H, W) and maps (B, h, w), got {tuple(images.shape)} and {tuple(maps.shape)}"
        )
    if ncols < 1:
        raise RewardMapError(f"save_grid: ncols={ncols!r}; accepted: integers >= 1")
    if not 0 <= alpha <= 1:
        raise RewardMapError(f"save_grid: alpha={alpha!r}; accepted: a number in [0, 1]")
    low, high = grid_value_range(maps, value_range)
    count, _, height, width = images.shape
    ncols = min(ncols, max(count, 1))
    nrows = math.ceil(count / ncols)
    cell_w, cell_h = 2 * width + pad, height + pad
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    for i in range(count):
        x, y = pad + (i % ncols) * cell_w, pad + (i // ncols) * cell_h
        canvas.paste(to_pil_image(images[i]), (x, y))
        canvas.paste(_blend(images[i], maps[i], (low, high), alpha), (x + width, y))
    if colorbar:
        canvas = _with_colorbar(canvas, (low, high), _range_label(label, value_range is not None))
    return _save_png(canvas, path)


def save_reward_grid(images: torch.Tensor, output: RewardOutput, path: str | os.PathLike, ncols: int = 4,
                     label: str = "", alpha: float = 0.5, count: int | None = None) -> str:
    """:func:`save_grid` of a scorer's :class:`RewardOutput` in its declared ``value_range`` (one grid-wide
    range when it declares none). images: (B, 3, H, W); count: keep the first ``count`` samples."""
    count = images.shape[0] if count is None else count
    return save_grid(images[:count], output.maps[:count], path, ncols, output.value_range, alpha, label=label)


def save_map_image(reward_map: torch.Tensor, path: str | os.PathLike, value_range: tuple[float, float] | None,
                   size: int = 256, label: str = "", colorbar: bool = True) -> str:
    """One (h, w) map colorized at ``size`` x ``size`` px (nearest upsampling), with a colour bar; value_range
    None: the map's own min / max (stated on the bar). Returns the path written."""
    if reward_map.ndim != 2:
        raise RewardMapError(f"save_map_image: map must be (h, w), got {tuple(reward_map.shape)}")
    low, high = grid_value_range(reward_map[None], value_range)
    rgb = torch.nn.functional.interpolate(colorize(reward_map, (low, high))[None], size=(size, size), mode="nearest")[0]
    image = to_pil_image(rgb)
    if colorbar:
        image = _with_colorbar(image, (low, high), _range_label(label, value_range is not None))
    return _save_png(image, path)
