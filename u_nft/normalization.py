"""Raw reward maps -> per-location optimality probabilities r_map (docs/contract.md §3, docs/theory.md §6).

For the K images of one prompt (gathered over ranks), raw maps R^k on the location grid:

    mu(u)      = mean_k R^k(u)
    r_map^k(u) = 1/2 + 1/2 clip((R^k(u) - mu(u)) / Z, -1, 1),    Z = adv_clip_max * scale

with ``scale`` by default upstream's global std: the population std (ddof 0) of all raw values
gathered in the epoch, + 1e-4. For constant maps this is exactly DiffusionNFT's per-prompt advantage
A = (R - mean_prompt R) / (std_global R + 1e-4) followed by r = clip(A, ±c) / c / 2 + 1/2 (docs/upstream_facts.md §E).

All functions are pure: tensors in, tensors out.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "SCALE_MODES",
    "pool_to_grid",
    "combine_rewards",
    "group_ids_from_keys",
    "normalize_reward_maps",
    "scalar_rewards_to_r",
    "validate_map_range",
]

SCALE_MODES = ("global", "group", "location", "fixed")
STD_EPS = 1e-4  # upstream PerPromptStatTracker adds 1e-4 to the std


def pool_to_grid(maps: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Area-average a map batch (B, h, w) onto the location grid (B, gh, gw).

    Exact block averages when (h, w) is a multiple of the grid (pixels -> latent cells -> tokens).
    A coarser map is expanded by nearest repetition when the grid is a multiple of it. Other shapes
    are rejected: area averaging would mix cells unevenly.
    """
    if maps.ndim != 3:
        raise ValueError(f"reward maps must be (B, h, w), got shape {tuple(maps.shape)}")
    h, w = maps.shape[-2:]
    gh, gw = grid_hw
    if (h, w) == (gh, gw):
        return maps.float()
    if h % gh == 0 and w % gw == 0:
        return F.avg_pool2d(maps.float().unsqueeze(1), (h // gh, w // gw)).squeeze(1)
    if gh % h == 0 and gw % w == 0:
        return maps.float().repeat_interleave(gh // h, dim=1).repeat_interleave(gw // w, dim=2)
    raise ValueError(
        f"reward map of size {h}x{w} cannot be pooled evenly onto the {gh}x{gw} location grid; "
        "make the map resolution a multiple (or divisor) of the grid"
    )


def combine_rewards(
    components: Mapping[str, torch.Tensor], weights: Mapping[str, float], grid_hw: tuple[int, int]
) -> torch.Tensor:
    """Weighted sum of several rewards on the location grid (upstream multi-reward ``avg``, docs/upstream_facts.md §D).

    components: name -> (B, h, w) map or (B,) scalar (a scalar is a constant map).
    weights:    name -> weight (a weighted SUM, as upstream).
    Returns (B, gh, gw) float32.
    """
    missing = set(weights) - set(components)
    if missing:
        raise ValueError(f"no reward values for {sorted(missing)}; got {sorted(components)}")
    total = None
    for name, weight in weights.items():
        value = components[name].float()
        if value.ndim == 1:
            value = value.view(-1, 1, 1).expand(-1, *grid_hw)
        else:
            try:
                value = pool_to_grid(value, grid_hw)
            except ValueError as err:
                raise ValueError(f"reward scorer {name!r}: {err} (grid = sample.resolution / 8 / train.cell_size; "
                                 f"or set the scorer's map size in config.reward_options)") from err
        if total is not None and value.shape[0] != total.shape[0]:
            raise ValueError(f"reward {name!r} has batch size {value.shape[0]}, expected {total.shape[0]}")
        total = weight * value if total is None else total + weight * value
    if total is None:
        raise ValueError("reward_fn is empty: configure at least one reward")
    return total


def group_ids_from_keys(keys: Sequence) -> torch.Tensor:
    """Integer group id per sample from hashable prompt keys (equal keys share a group). (N,) long."""
    index: dict = {}
    return torch.tensor([index.setdefault(k, len(index)) for k in keys], dtype=torch.long)


def _group_mean(values: torch.Tensor, group_ids: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per-group mean of (N, ...) values, broadcast back to (N, ...)."""
    flat = values.reshape(values.shape[0], -1)
    sums = torch.zeros(num_groups, flat.shape[1], dtype=flat.dtype).index_add_(0, group_ids, flat)
    counts = torch.bincount(group_ids, minlength=num_groups).to(flat.dtype).unsqueeze(1)
    return (sums / counts)[group_ids].reshape(values.shape)


def normalize_reward_maps(
    raw: torch.Tensor,
    group_ids: torch.Tensor,
    adv_clip_max: float = 5.0,
    scale: str = "global",
    sigma_min: float = 1e-2,
    fixed_scale: float = 1.0,
) -> torch.Tensor:
    """Group-wise elementwise normalization of raw maps into optimality probabilities.

    raw:       (N, gh, gw) raw maps of the whole epoch on the location grid (or (N,) scalars).
    group_ids: (N,) long, one id per prompt group.
    scale:     "global":   population std of all raw values + 1e-4 (upstream default);
               "group":    population std of the raw values of that group's maps + 1e-4
                           (upstream global_std=False);
               "location": per-location std over the group's K maps, floored at sigma_min;
               "fixed":    fixed_scale (e.g. a mask reward of known range).
    Returns r_map (N, gh, gw) float32 in [0, 1]:  1/2 + 1/2 clip((R - mu_group) / (adv_clip_max * scale), -1, 1).
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"train.map_scale must be one of {SCALE_MODES}, got {scale!r}")
    if raw.shape[0] != group_ids.shape[0]:
        raise ValueError(f"{raw.shape[0]} reward maps but {group_ids.shape[0]} group ids")
    if adv_clip_max <= 0:
        raise ValueError(f"train.adv_clip_max must be > 0, got {adv_clip_max}")
    # float64 statistics so the scalar path matches numpy's to float32 rounding.
    values = raw.double()
    group_ids = group_ids.long().cpu()
    values = values.cpu()
    num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    centred = values - _group_mean(values, group_ids, num_groups)
    if scale == "global":
        z = values.std(unbiased=False) + STD_EPS if values.numel() > 1 else torch.tensor(1.0 + STD_EPS)
    elif scale == "group":
        flat = values.reshape(values.shape[0], -1)
        mean_sq = _group_mean(flat.square().mean(dim=1), group_ids, num_groups)
        mean = _group_mean(flat.mean(dim=1), group_ids, num_groups)
        group_std = (mean_sq - mean.square()).clamp(min=0).sqrt()
        z = (group_std + STD_EPS).reshape(-1, *([1] * (values.ndim - 1)))
    elif scale == "location":
        z = _group_mean(centred.square(), group_ids, num_groups).sqrt().clamp(min=sigma_min)
    else:
        if fixed_scale <= 0:
            raise ValueError(f"train.map_fixed_scale must be > 0, got {fixed_scale}")
        z = torch.tensor(float(fixed_scale), dtype=torch.float64)
    r = 0.5 + 0.5 * (centred / (adv_clip_max * z)).clamp(-1.0, 1.0)
    return r.float().to(raw.device)


def scalar_rewards_to_r(
    rewards: torch.Tensor, group_ids: torch.Tensor, adv_clip_max: float = 5.0, global_std: bool = True
) -> torch.Tensor:
    """Upstream DiffusionNFT: per-prompt advantage -> optimality probability (docs/upstream_facts.md §E).

    A = (R - mean_prompt R) / (std R + 1e-4)  (std global or per prompt, ddof 0);
    r = clamp(clip(A, -c, c) / c / 2 + 1/2, 0, 1),  c = adv_clip_max.   rewards: (N,) -> r (N,).
    """
    if rewards.ndim != 1:
        raise ValueError(f"scalar rewards must be (N,), got {tuple(rewards.shape)}")
    return normalize_reward_maps(rewards, group_ids, adv_clip_max, "global" if global_std else "group")


def validate_map_range(name: str, maps: torch.Tensor, low: float = 0.0, high: float = 1.0) -> None:
    """Check that maps used directly as r (masks, no normalization) lie in [low, high]; name the sample."""
    flat = maps.reshape(maps.shape[0], -1)
    bad = ~torch.isfinite(flat).all(dim=1) | (flat.min(dim=1).values < low) | (flat.max(dim=1).values > high)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"reward {name!r}: map of sample {i} must lie in [{low}, {high}] to skip normalization "
            f"(got [{flat[i].min().item():.4g}, {flat[i].max().item():.4g}]); set train.map_normalization='group'"
        )
