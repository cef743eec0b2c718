"""Collateral drift: how much a fine-tuned model changes an image outside vs inside the rewarded regions.

Two models sample from the same noise (the same prompts, seeds, solver and steps): the reference
(the starting model, LoRA off) gives images x_ref, the fine-tuned one images x. With ``inside`` the
union of the rewarded regions (1 inside, 0 in the neutral rest; r = 1/2 there, docs/contract.md
property 4), per image:

    pixel drift        D_in  = mean_{p in inside}  |x - x_ref|_c,   D_out likewise over the rest
                       (|.|_c = mean absolute difference over the 3 channels, pixel values in [0, 1])
    colour histogram   TV distance 1/2 sum_k |h_x(k) - h_ref(k)| of the joint RGB histograms (``bins``^3
                       bins) of the pixels of one part: 0 = same colour distribution, 1 = disjoint
    local contrast     mean over window x window blocks of |c(x) - c(ref)|, c = std of Rec. 601 luma in
                       the block (reward_maps.masks.local_contrast); a block belongs to the part holding
                       most of its pixels
    velocity locality  at the reference trajectory's states x_t (identical inputs for both models):
                       mean over latent cells of mean_c |v_theta(x_t) - v_ref(x_t)|, inside vs outside
                       (the mask pooled to the latent grid, a cell inside when most of it is)

The first three measure what a user sees (the sampling dynamics carry a local change everywhere);
the last separates the learned field itself (function-space locality) from those dynamics. A ratio
outside / inside of 1 means the change is not localized at all; 0 means perfectly local.
Shapes: images (B, 3, H, W) in [0, 1]; masks (B, H, W) in {0, 1}; velocities (B, C, h, w).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from reward_maps.masks import local_contrast, parse_layout, region_weights

__all__ = ["rewarded_mask", "pool_mask", "part_means", "pixel_drift", "color_histogram_distance",
           "local_contrast_drift", "velocity_drift", "record_trajectory", "DriftParts"]


@dataclasses.dataclass(frozen=True)
class DriftParts:
    """Per-image drift inside and outside the rewarded regions, (B,) each (nan where a part is empty)."""

    inside: torch.Tensor
    outside: torch.Tensor

    def means(self) -> tuple[float, float]:
        """Means over the images whose part is non-empty (nan if none)."""
        def m(x):
            x = x[torch.isfinite(x)]
            return float(x.mean()) if x.numel() else float("nan")
        return m(self.inside), m(self.outside)


def rewarded_mask(metadata: Sequence[dict], height: int, width: int, regions: Sequence[dict] | None = None,
                  metadata_key: str = "regions", target_key: str = "color",
                  name: str = "region_color_map") -> torch.Tensor:
    """(B, height, width) float {0, 1}: 1 where any region of sample i's layout lies (its
    ``metadata[metadata_key]``, else ``regions``), as the region scorers read them (reward_maps/masks.py)."""
    masks = []
    for i, meta in enumerate(metadata):
        layout = meta.get(metadata_key) if isinstance(meta, dict) else None
        layout = layout if layout is not None else regions
        if layout is None:
            raise ValueError(f"sample {i}: no layout (metadata[{metadata_key!r}] or regions=...) for the drift mask")
        weights = region_weights(parse_layout(name, layout, target_key), height, width, name=name)
        masks.append((weights.amax(dim=0) >= 0.5).float())
    return torch.stack(masks)


def pool_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) {0, 1} -> (B, h, w) {0, 1}: a coarse cell is inside when at least half of its pixels are."""
    pooled = F.adaptive_avg_pool2d(mask.float().unsqueeze(1), size).squeeze(1)
    return (pooled >= 0.5).float()


def part_means(values: torch.Tensor, inside: torch.Tensor) -> DriftParts:
    """Per-image means of ``values`` (B, h, w) over inside (mask 1) and outside (mask 0) cells."""
    if values.shape != inside.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(inside.shape)} must have the same shape")
    inside = inside.float()
    outside = 1.0 - inside

    def mean(weight):
        total = weight.sum(dim=(1, 2))
        out = (values * weight).sum(dim=(1, 2)) / total.clamp(min=1)
        return torch.where(total > 0, out, torch.full_like(out, float("nan")))

    return DriftParts(mean(inside), mean(outside))


def _check_images(images: torch.Tensor, reference: torch.Tensor, inside: torch.Tensor) -> None:
    if images.shape != reference.shape or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} must both be (B, 3, H, W)")
    if inside.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"mask {tuple(inside.shape)} must be (B, H, W) = {(images.shape[0], *images.shape[2:])}")


def pixel_drift(images: torch.Tensor, reference: torch.Tensor, inside: torch.Tensor) -> DriftParts:
    """Mean |x - x_ref| (channel mean, pixel units in [0, 1]) inside and outside, per image."""
    _check_images(images, reference, inside)
    return part_means((images.float() - reference.float()).abs().mean(dim=1), inside)


def _histogram(pixels: torch.Tensor, bins: int) -> torch.Tensor:
    """Normalized joint RGB histogram (bins^3,) of pixels (N, 3) in [0, 1]."""
    q = (pixels.clamp(0, 1) * bins).long().clamp(max=bins - 1)
    index = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    counts = torch.bincount(index, minlength=bins ** 3).float()
    return counts / counts.sum().clamp(min=1)


def color_histogram_distance(images: torch.Tensor, reference: torch.Tensor, inside: torch.Tensor,
                             bins: int = 8) -> DriftParts:
    """Total-variation distance between the joint RGB histograms of x and x_ref, per part and image."""
    _check_images(images, reference, inside)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    results = {True: [], False: []}
    for image, ref, mask in zip(images.float(), reference.float(), inside.bool()):
        for part in (True, False):
            select = mask if part else ~mask
            if not select.any():
                results[part].append(torch.tensor(float("nan")))
                continue
            a = _histogram(image[:, select].T, bins)
            b = _histogram(ref[:, select].T, bins)
            results[part].append(0.5 * (a - b).abs().sum())
    return DriftParts(torch.stack(results[True]), torch.stack(results[False]))


def local_contrast_drift(images: torch.Tensor, reference: torch.Tensor, inside: torch.Tensor,
                         window: int = 4) -> DriftParts:
    """Mean |c(x) - c(x_ref)| over window x window blocks (c = luma std), per part and image."""
    _check_images(images, reference, inside)
    height, width = images.shape[-2:]
    if height % window or width % window:
        raise ValueError(f"image {height}x{width} is not divisible by window={window}")
    change = torch.stack([(local_contrast(x.float(), window) - local_contrast(r.float(), window)).abs()
                          for x, r in zip(images, reference)])
    return part_means(change, pool_mask(inside, change.shape[-2:]))


def velocity_drift(v_theta: torch.Tensor, v_ref: torch.Tensor, inside: torch.Tensor) -> DriftParts:
    """Function-space locality: mean_c |v_theta - v_ref| per latent cell, inside vs outside.
    v_theta / v_ref (B, C, h, w) at the same x_t; ``inside`` (B, H, W) at any resolution (pooled to h x w)."""
    if v_theta.shape != v_ref.shape or v_theta.ndim != 4:
        raise ValueError(f"v_theta {tuple(v_theta.shape)} and v_ref {tuple(v_ref.shape)} must both be (B, C, h, w)")
    cells = (v_theta.float() - v_ref.float()).abs().mean(dim=1)
    return part_means(cells, pool_mask(inside, cells.shape[-2:]))


def record_trajectory(sample_fn: Callable, velocity_fn: Callable) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Run ``sample_fn(velocity)`` (e.g. ``lambda v: u_nft.solvers.sample(v, x_T, sigmas, "dpm2")``) with
    ``velocity_fn(x, sigma)`` and record every state it was called on. Returns (the sampler's result,
    [(x_t, sigma), ...] in call order): the inputs at which another model's velocity is compared."""
    states = []

    def velocity(x, sigma):
        states.append((x.detach().clone(), sigma.detach().clone() if torch.is_tensor(sigma) else torch.tensor(sigma)))
        return velocity_fn(x, sigma)

    return sample_fn(velocity), states
