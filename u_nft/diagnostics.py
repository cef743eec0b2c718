"""Per-epoch diagnostics users of DiffusionNFT watch for collapse and reward hacking, plus dense ones.

Scalar (as NVlabs/DiffusionNFT scripts/train_nft_sd3.py and flow_grpo/stat_tracking.py log them):
  zero_std_ratio      share of prompt groups whose K scalar rewards are all equal (no learning signal)
  reward_std_mean     mean over groups of the within-group population std of the scalar reward
  reward_top{k}_mean  mean over groups of the mean of the group's top k% rewards (threshold: the
                      (100 − k)th percentile, linear interpolation, rewards >= it), k = 100, 75, 50, 25, 10
Policy (per training micro-step, averaged over the epoch; all over the batch and every element):
  old_deviate(_max)   mean (max) of (v_θ − v_old)²: how far the trained policy moved from the old one
  kl_div              mean (v_θ − v_ref)²;  old_kl_div  mean (v_old − v_ref)²
  x0_norm(_max)       mean (max) of x0² of the clean rollout latents
Dense (on the epoch's r and raw maps):
  r_positive_area / r_negative_area / r_neutral_area   share of locations with r > 1/2 + tol,
                      r < 1/2 − tol, |r − 1/2| <= tol (they sum to 1)
  map_mean/{name}     mean of each scorer's raw reward map over the epoch's images

The ``*_statistics`` functions are pure (tensors / lists in, floats out); :func:`epoch_reward_diagnostics`
gathers this rank's values over all ranks first (every rank calls it).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from u_nft import distributed as dist

TOP_PERCENTAGES = (100, 75, 50, 25, 10)


def _groups(scores: np.ndarray, prompts: Sequence[str]) -> list[np.ndarray]:
    if len(prompts) != len(scores):
        raise ValueError(f"{len(scores)} rewards but {len(prompts)} prompts")
    keys = np.asarray(list(prompts), dtype=object)
    return [scores[keys == key] for key in dict.fromkeys(prompts)]


def group_reward_statistics(scores: torch.Tensor | np.ndarray, prompts: Sequence[str],
                            top_percentages: Sequence[int] = TOP_PERCENTAGES) -> dict[str, float]:
    """Scalar rewards (N,) of one epoch (all ranks) grouped by prompt -> zero_std_ratio, reward_std_mean
    and reward_top{k}_mean (see the module docstring; upstream's calculate_zero_std_ratio and
    get_mean_of_top_rewards)."""
    values = np.asarray(torch.as_tensor(scores).detach().double().cpu().numpy()).reshape(-1)
    groups = _groups(values, prompts)
    if not groups:
        return {}
    stds = np.array([np.std(g) for g in groups])
    out = {"zero_std_ratio": float(np.mean(stds == 0)), "reward_std_mean": float(stds.mean())}
    for k in top_percentages:
        if not 0 < k <= 100:
            raise ValueError(f"top percentage must be in (0, 100], got {k}")
        tops = [g.mean() if k == 100 else g[g >= np.percentile(g, 100 - k)].mean() for g in groups]
        out[f"reward_top{k}_mean"] = float(np.mean(tops))
    return out


def r_area_statistics(r: torch.Tensor, tol: float = 1e-3) -> dict[str, float]:
    """Shares of locations of r (any shape, values in [0, 1]) that push towards (r > 1/2 + tol), away from
    (r < 1/2 − tol) the sample, or are neutral (|r − 1/2| <= tol)."""
    d = r.detach().float().reshape(-1) - 0.5
    if d.numel() == 0:
        return {}
    positive, negative = float((d > tol).float().mean()), float((d < -tol).float().mean())
    return {"r_positive_area": positive, "r_negative_area": negative, "r_neutral_area": 1.0 - positive - negative}


@torch.no_grad()
def policy_statistics(v_theta: torch.Tensor, v_old: torch.Tensor, x0: torch.Tensor,
                      v_ref: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Detached 0-d float32 tensors for one micro-step (upstream's loss_terms of the same names):
    old_deviate(_max), x0_norm(_max), and with ``v_ref`` kl_div and old_kl_div. Shapes (B, C, H, W)."""
    deviation = (v_theta.detach().float() - v_old.detach().float()).square()
    x0_sq = x0.detach().float().square()
    out = {"old_deviate": deviation.mean(), "old_deviate_max": deviation.max(),
           "x0_norm": x0_sq.mean(), "x0_norm_max": x0_sq.max()}
    if v_ref is not None:
        ref = v_ref.detach().float()
        out["kl_div"] = (v_theta.detach().float() - ref).square().mean()
        out["old_kl_div"] = (v_old.detach().float() - ref).square().mean()
    return out


def epoch_reward_diagnostics(scores: Mapping[str, torch.Tensor], maps: Mapping[str, torch.Tensor],
                             weights: Mapping[str, float], prompts: Sequence[str], r: torch.Tensor,
                             tol: float = 1e-3) -> dict[str, float]:
    """This rank's epoch -> the scalar-group, dense-area and map-mean diagnostics over all ranks.

    scores: name -> (B,) scalar rewards; maps: name -> (B, h, w) raw maps; weights: name -> weight (the
    grouped scalar is the weighted sum, upstream's "avg"); prompts: B strings; r: (B, gh, gw).
    Collective: every rank calls it with the same names.
    """
    names = list(weights)
    total = sum(float(weights[n]) * scores[n].detach().double().cpu() for n in names)
    all_total = dist.all_gather_tensor(total.contiguous())
    all_prompts = [p for chunk in dist.all_gather_object(list(prompts)) for p in chunk]
    out = group_reward_statistics(all_total, all_prompts)
    sums = torch.stack([r.detach().double().gt(0.5 + tol).sum().cpu(), r.detach().double().lt(0.5 - tol).sum().cpu(),
                        torch.tensor(r.numel(), dtype=torch.float64)]
                       + [maps[n].detach().double().sum().cpu() for n in names]
                       + [torch.tensor(maps[n].numel(), dtype=torch.float64) for n in names]).double()
    sums = dist.all_gather_tensor(sums.unsqueeze(0)).sum(dim=0)
    count = max(float(sums[2]), 1.0)
    out["r_positive_area"], out["r_negative_area"] = float(sums[0]) / count, float(sums[1]) / count
    out["r_neutral_area"] = 1.0 - out["r_positive_area"] - out["r_negative_area"]
    for i, name in enumerate(names):
        out[f"map_mean/{name}"] = float(sums[3 + i]) / max(float(sums[3 + len(names) + i]), 1.0)
    return out
