"""Reward maps drawn over their images, for logs and docs (PIL only; no matplotlib).

The colormap is a piecewise-linear diverging map in the spirit of Moreland's "cool to warm": blue at
the low end of ``value_range``, light grey at its middle (the neutral r = 1/2 of a normalised map) and
red at the high end, so "better than neutral" reads red and "worse" reads blue.
"""
from __future__ import annotations

import math
import os

import torch

from reward_maps.base import RewardMapError

__all__ = ["to_pil_image", "DIVERGING", "colorize", "overlay_heatmap", "save_grid"]

# (position in [0, 1], RGB in [0, 1]) control points; linear in between.
DIVERGING = (
    (0.0, (0.230, 0.299, 0.754)),
    (0.25, (0.552, 0.690, 0.996)),
    (0.5, (0.865, 0.865, 0.865)),
    (0.75, (0.958, 0.604, 0.482)),
    (1.0, (0.706, 0.016, 0.150)),
)


def colorize(values: torch.Tensor, value_range: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """(h, w) values -> (3, h, w) RGB in [0, 1] through :data:`DIVERGING`.

    t = (v - low) / (high - low), clipped to [0, 1]; value_range None uses the map's own min and max
    (a constant map then renders neutral grey). Non-finite values render black.
    """
    values = values.detach().float().cpu()
    finite = torch.isfinite(values)
    if value_range is None:
        low, high = (values[finite].min().item(), values[finite].max().item()) if finite.any() else (0.0, 1.0)
    else:
        low, high = value_range
    t = ((values - low) / (high - low) if high > low else torch.full_like(values, 0.5)).clamp(0, 1)
    t = torch.where(finite, t, torch.zeros_like(t))
    positions = torch.tensor([p for p, _ in DIVERGING])
    colors = torch.tensor([c for _, c in DIVERGING])  # (K, 3)
    segment = (torch.bucketize(t, positions, right=True) - 1).clamp(0, len(DIVERGING) - 2)
    fraction = (t - positions[segment]) / (positions[segment + 1] - positions[segment])
    rgb = colors[segment] * (1 - fraction[..., None]) + colors[segment + 1] * fraction[..., None]
    return torch.where(finite[..., None], rgb, torch.zeros_like(rgb)).permute(2, 0, 1)


def to_pil_image(image: torch.Tensor):
    """(3, H, W) float in [0, 1] -> PIL RGB image (values rounded to uint8)."""
    from PIL import Image

    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


def overlay_heatmap(
    image: torch.Tensor,
    reward_map: torch.Tensor,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    alpha: float = 0.5,
):
    """Blend the colorized map over the image: (1 - alpha) * image + alpha * colorize(map).

    image: (3, H, W) float in [0, 1]; reward_map: (h, w), upsampled to (H, W) by nearest neighbour so
    every map cell stays a visible square. Returns a PIL RGB image of size (W, H).
    """
    if image.ndim != 3 or image.shape[0] != 3 or reward_map.ndim != 2:
        raise RewardMapError(
            f"overlay_heatmap: image must be (3, H, W) and map (h, w), got {tuple(image.shape)} and {tuple(reward_map.shape)}"
        )
    if not 0 <= alpha <= 1:
        raise RewardMapError(f"overlay_heatmap: alpha={alpha!r}; accepted: a number in [0, 1]")
    colors = colorize(reward_map, value_range)
    colors = torch.nn.functional.interpolate(colors[None], size=tuple(image.shape[-2:]), mode="nearest")[0]
    return to_pil_image((1 - alpha) * image.detach().float().cpu().clamp(0, 1) + alpha * colors)


def save_grid(
    images: torch.Tensor,
    maps: torch.Tensor,
    path: str | os.PathLike,
    ncols: int = 4,
    value_range: tuple[float, float] | None = (0.0, 1.0),
    alpha: float = 0.5,
    pad: int = 2,
) -> str:
    """Write one PNG of ``image | overlay`` pairs, ``ncols`` pairs per row, ``pad`` white pixels apart.

    images: (B, 3, H, W) in [0, 1]; maps: (B, h, w). value_range None scales each map by its own
    min/max. Returns the path written (parent folders are created).
    """
    from PIL import Image

    if images.ndim != 4 or maps.ndim != 3 or images.shape[0] != maps.shape[0]:
        raise RewardMapError(
            f"save_grid: need images (B, 3, H, W) and maps (B, h, w), got {tuple(images.shape)} and {tuple(maps.shape)}"
        )
    if ncols < 1:
        raise RewardMapError(f"save_grid: ncols={ncols!r}; accepted: integers >= 1")
    count, _, height, width = images.shape
    ncols = min(ncols, max(count, 1))
    nrows = math.ceil(count / ncols)
    cell_w, cell_h = 2 * width + pad, height + pad
    canvas = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), (255, 255, 255))
    for i in range(count):
        x, y = pad + (i % ncols) * cell_w, pad + (i // ncols) * cell_h
        canvas.paste(to_pil_image(images[i]), (x, y))
        canvas.paste(overlay_heatmap(images[i], maps[i], value_range, alpha), (x + width, y))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="PNG")
    return path
