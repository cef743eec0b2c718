"""The pieces of one DiffusionNFT epoch with reward maps: rollouts, reward maps -> r, forward passes, a step.

The train script calls these in order (sample -> score -> normalize -> train -> update old policy).
Each takes the values it needs, not the config.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import torch

from u_nft import distributed as dist
from u_nft.lora import OLD, adapters_disabled, use_adapter
from u_nft.loss import DenseLossOptions, u_nft_loss
from u_nft.normalization import (
    combine_rewards,
    group_ids_from_keys,
    normalize_reward_maps,
    validate_map_range,
)
from u_nft.models.base import Conditioning
from u_nft.rollout import initial_noise, sample_conditioned, step_noise_generators

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- setup -----------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> this rank's CUDA device if available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def resolve_dtypes(mixed_precision: str, base_dtype: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(frozen weight dtype, autocast dtype or None).

    ``base_dtype="auto"``: on GPU with autocast, frozen weights in the autocast dtype (half the memory of
    upstream's fp32 base, docs/benchmarks.md reference point, and no per-op weight casts); fp32 otherwise. Half-precision
    frozen weights need autocast.
    """
    autocast = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    if base_dtype == "auto":
        base = autocast if device.type == "cuda" and autocast is not None else torch.float32
    else:
        base = _DTYPES[base_dtype]
    if base != torch.float32 and autocast is None:
        raise ValueError(f"config.base_dtype={base_dtype!r} needs config.mixed_precision 'fp16' or 'bf16'")
    return base, autocast


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def sample_seeds(seed: int, epoch: int, sample_indices: Sequence[int]) -> list[int]:
    """One noise seed per sample from (run seed, epoch, index of the sample in the epoch's global order),
    so a rollout does not depend on world size, batch composition or resumption."""
    return [(int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + int(i) for i in sample_indices]


# ---- sampling ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Rollout:
    """One sampling batch of this rank. cond: the family's conditioning (batch B); latents (B, C, h, w);
    images (B, 3, H, W) in [0, 1]."""

    prompt_indices: list[int]
    prompts: list[str]
    metadata: list[dict]
    cond: Conditioning
    latents: torch.Tensor
    images: torch.Tensor


@torch.no_grad()
def rollout_batch(family, pipeline, encode, prompt_indices: Sequence[int], prompts: Sequence[str],
                  metadata: Sequence[dict], seeds: Sequence[int], resolution: int, sigmas: torch.Tensor, solver: str,
                  eta: float, guidance_scale: float, autocast_dtype: torch.dtype | None,
                  negative: Conditioning | None = None, adapter: str | None = OLD, old_policy=None,
                  guidance: float | None = None) -> Rollout:
    """Sample clean latents with the ``adapter`` policy (the old one for training rollouts; None = as is),
    or with ``old_policy`` (a merged copy) when given, and decode them, for any model ``family``.
    ``encode(prompts) -> Conditioning``; ``negative``: the empty prompt's conditioning, batch 1, for CFG;
    ``guidance``: the distilled guidance value (guidance-distilled families). Noise (B, C, h, w) of
    ``family.latent_shape`` from ``seeds``; the sampler's timesteps as upstream (``timestep_mode="long"``)."""
    transformer = pipeline.transformer
    device = pipeline.vae.device
    cond = encode(list(prompts))
    noise = initial_noise(seeds, *family.latent_shape(pipeline, resolution), torch.float32, device)
    generator = step_noise_generators(seeds) if eta > 0 else None
    sampler_model = old_policy if old_policy is not None else transformer
    use_context = adapter is not None and old_policy is None
    context = use_adapter(transformer, adapter) if use_context else contextlib.nullcontext()
    with context, autocast_context(device, autocast_dtype):
        latents = sample_conditioned(family, sampler_model, cond, noise, sigmas, solver, guidance_scale, negative,
                                     eta, generator, timestep_mode="long", guidance=guidance)
    latents = latents.float()
    images = family.decode(pipeline.vae, latents)
    return Rollout(list(prompt_indices), list(prompts), list(metadata), cond, latents, images)


# ---- rewards -> r ------------------------------------------------------------------------------

def raw_reward_grid(outputs: dict[str, Any], weights: dict[str, float], grid_hw: tuple[int, int],
                    scalar_mode: bool) -> torch.Tensor:
    """Weighted sum of the rewards on the location grid, (B, gh, gw).

    outputs: name -> RewardOutput. Scalar mode uses each scorer's upstream scalar (a constant map),
    which makes the whole pipeline upstream DiffusionNFT (docs/contract.md property 5).
    """
    components = {name: (out.scores if scalar_mode else out.maps) for name, out in outputs.items()}
    return combine_rewards(components, weights, grid_hw)


def rewards_to_r(raw_grid: torch.Tensor, prompts: Sequence[str], normalization: str, adv_clip_max: float,
                 scale: str, sigma_min: float, fixed_scale: float, reward_name: str = "reward_fn") -> torch.Tensor:
    """This rank's raw grids (B, gh, gw) -> this rank's r (B, gh, gw), normalized over the prompt groups
    of all ranks (gathered; every rank must pass the same B)."""
    if normalization == "none":
        validate_map_range(reward_name, raw_grid)
        return raw_grid.float()
    all_raw = dist.all_gather_tensor(raw_grid.float().contiguous())
    all_prompts = [p for chunk in dist.all_gather_object(list(prompts)) for p in chunk]
    r_all = normalize_reward_maps(all_raw, group_ids_from_keys(all_prompts), adv_clip_max, scale, sigma_min,
                                  fixed_scale)
    b = raw_grid.shape[0]
    start = dist.rank() * b
    return r_all[start:start + b].to(raw_grid.device)


# ---- training --------------------------------------------------------------------------------------

def timestep_permutations(batch_size: int, num_steps: int, num_train_timesteps: int,
                          generator: torch.Generator) -> torch.Tensor:
    """(B, num_train_timesteps) indices into the sampler's timesteps: a random permutation per sample,
    first ``num_train_timesteps`` kept (upstream DiffusionNFT)."""
    return torch.stack([torch.randperm(num_steps, generator=generator)[:num_train_timesteps]
                        for _ in range(batch_size)])


def policy_predictions(family, transformer, x_t, t, cond: Conditioning, need_ref: bool, old_policy=None,
                       guidance: float | None = None):
    """(v_theta with grad, v_old, v_ref or None) from ``family.predict_velocity``: trained adapter; the old
    policy (the "old" adapter, or ``old_policy``, a :class:`u_nft.fast_policy.MergedOldPolicy`); adapters
    disabled. x_t (B, C, h, w), t (B,) noise levels in [0, 1], timestep as in training ("float")."""
    def velocity(model):
        return family.predict_velocity(model, x_t, t, cond, guidance=guidance, timestep_mode="float")

    with torch.no_grad():
        if old_policy is not None:
            v_old = velocity(old_policy)
        else:
            with use_adapter(transformer, OLD):
                v_old = velocity(transformer)
        v_ref = None
        if need_ref:
            with adapters_disabled(transformer):
                v_ref = velocity(transformer)
    v_theta = velocity(transformer)
    return v_theta, v_old, v_ref


def micro_step_loss(family, transformer, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                    cond: Conditioning, options: DenseLossOptions, autocast_dtype: torch.dtype | None,
                    generator: torch.Generator | None = None, old_policy=None, locations: torch.Tensor | None = None,
                    guidance: float | None = None):
    """Forward passes on x_t = (1 - t) x0 + t eps and the dense loss. Returns (loss, diagnostics).
    x0, noise (B, C, h, w); t (B,); r (B, gh, gw); cond: the family's conditioning (batch B).
    ``locations``: (B, m) cells drawn before scoring (``u_nft.sampled_cells``), passed to the loss."""
    t4 = t.view(-1, 1, 1, 1)
    x_t = (1 - t4) * x0 + t4 * noise
    with autocast_context(x0.device, autocast_dtype):
        v_theta, v_old, v_ref = policy_predictions(family, transformer, x_t, t, cond,
                                                   need_ref=options.needs_v_ref, old_policy=old_policy,
                                                   guidance=guidance)
    return u_nft_loss(v_theta, v_old, x0, t, r, options, x_t=x_t, v_ref=v_ref, generator=generator,
                      locations=locations)


def mean_diagnostics(history: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Average a list of diagnostics dicts into floats (and over ranks)."""
    if not history:
        return {}
    keys = sorted(history[0])
    local = torch.stack([torch.stack([h[k].float().cpu() for h in history]).mean() for k in keys])
    gathered = dist.all_gather_tensor(local.unsqueeze(0)).mean(dim=0)
    return {k: float(v) for k, v in zip(keys, gathered)}
