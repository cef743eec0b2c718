"""Upstream DiffusionNFT formulas written out independently (docs/contract.md §1, docs/upstream_facts.md §E), for tests."""
import numpy as np
import torch


def upstream_scalar_loss(v_theta, v_old, v_ref, x0, noise, t, r, beta, kl_weight, adv_clip_max):
    """DiffusionNFT's per-image loss as docs/contract.md §1 states it (x0 space, per-sample adaptive weight)."""
    t4 = t.view(-1, 1, 1, 1)
    x_t = (1 - t4) * x0 + t4 * noise
    dims = (1, 2, 3)
    x0_pos = x_t - t4 * (beta * v_theta + (1 - beta) * v_old)
    x0_neg = x_t - t4 * ((1 + beta) * v_old - beta * v_theta)
    with torch.no_grad():
        w_pos = (x0_pos - x0).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        w_neg = (x0_neg - x0).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
    loss_pos = ((x0_pos - x0) ** 2 / w_pos).mean(dim=dims)
    loss_neg = ((x0_neg - x0) ** 2 / w_neg).mean(dim=dims)
    policy = (adv_clip_max * (r * loss_pos / beta + (1 - r) * loss_neg / beta)).mean()
    kl = ((v_theta - v_ref) ** 2).mean(dim=dims).mean()
    return policy + kl_weight * kl


def upstream_advantage_r(prompts, rewards, adv_clip_max=5.0, global_std=True):
    """DiffusionNFT's PerPromptStatTracker (docs/upstream_facts.md §E) then r = clamp(clip(A)/c/2 + 1/2, 0, 1), in numpy."""
    prompts = np.array(prompts)
    rewards = np.asarray(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards)
    for prompt in np.unique(prompts):
        group = rewards[prompts == prompt]
        std = (np.std(rewards) if global_std else np.std(group)) + 1e-4
        advantages[prompts == prompt] = (group - np.mean(group)) / std
    return np.clip(np.clip(advantages, -adv_clip_max, adv_clip_max) / adv_clip_max / 2 + 0.5, 0, 1)
