"""Rollouts of any model family: per-sample noise, sampling through the family seam, decoding.

Rollouts are what DiffusionNFT trains on: clean latents x0 (and their decoded images, for the
reward) from the *old* policy, CFG-free by default (docs/upstream_facts.md §F). Whatever adapter is active on the
transformer is what samples: the trainer selects the old-policy adapter before calling in here.
:func:`sample_conditioned` is the family-agnostic sampler (velocity from ``family.predict_velocity``);
:func:`encode_prompts`, :func:`negative_embeddings`, :func:`sample_latents`, :func:`decode_latents` and
:func:`rollout` are the SD3 shorthands (``u_nft.models.sd3``) with (prompt_embeds, pooled) tensors.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from u_nft.models.base import Conditioning, cat_conditioning, conditioning_batch_size, expand_conditioning
from u_nft.models.sd3 import FAMILY as SD3, decode_sd3_latents, encode_sd3_prompts
from u_nft.solvers import Generators, sample


# Text (SD3)

def encode_prompts(pipeline, prompts: Sequence[str], max_sequence_length: int = 128,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 prompts -> (prompt_embeds (B, 77 + max_sequence_length, D), pooled (B, P)); see
    :func:`u_nft.models.sd3.encode_sd3_prompts`. Upstream uses max_sequence_length 128 (205 tokens)."""
    return encode_sd3_prompts(pipeline, prompts, max_sequence_length, device)


def negative_embeddings(pipeline, batch_size: int, max_sequence_length: int = 128,
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty-prompt embeddings repeated to ``batch_size``, for CFG (upstream encodes ``[""]`` once).

    Shapes as :func:`encode_prompts`, batch ``batch_size``.
    """
    embeds, pooled = encode_prompts(pipeline, [""], max_sequence_length, device)
    return embeds.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)


# Noise

def _seed_for_stream(seed: int, stream: int) -> int:
    """A 63-bit seed derived from (seed, stream), so different streams of one sample never coincide."""
    # int() first: numpy 1.26 has no uint64 >> Python-int ufunc loop
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, dtype=np.uint64)[0]) >> 1


def initial_noise(seeds: Sequence[int], channels: int, height: int, width: int,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T ~ N(0, I) of shape (B, channels, height, width), row i drawn from ``seeds[i]`` alone.

    ``height``/``width`` are *latent* sizes (pixels / 8 for SD3). Each row comes from its own CPU
    generator, so a sample's noise is the same whatever batch it is in and on whatever device it
    runs; it is drawn in float32, then cast to ``dtype``.
    """
    rows = [
        torch.randn((1, channels, height, width), generator=torch.Generator().manual_seed(_seed_for_stream(s, 0)))
        for s in seeds
    ]
    if not rows:
        raise ValueError("seeds must hold at least one seed")
    return torch.cat(rows).to(device=device, dtype=dtype)


def step_noise_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample for the SDE noise of ``solver="flow"`` with eta > 0.

    Seeded from a stream distinct from :func:`initial_noise`'s, so that noise is independent of x_T.
    """
    return [torch.Generator().manual_seed(_seed_for_stream(s, 1)) for s in seeds]


# Sampling

@torch.no_grad()
def sample_conditioned(family, model, cond: Conditioning, noise_latents: torch.Tensor, sigmas: torch.Tensor,
                       solver: str = "dpm2", guidance_scale: float = 1.0, negative: Conditioning | None = None,
                       eta: float = 0.0, generator: Generators = None, timestep_mode: str = "long",
                       guidance: float | None = None) -> torch.Tensor:
    """Sample clean latents x0 (B, C, h, w) from x_T = ``noise_latents`` with ``model`` (a transformer of
    ``family``, or a merged old-policy copy), velocity from ``family.predict_velocity``.

    ``guidance_scale == 1`` (upstream's rollouts) is one forward per step; otherwise CFG
    (``family.combine_guidance``, by default v = v_uncond + g·(v_cond − v_uncond)) with ``negative``
    (the empty prompt's conditioning, batch 1 or B; one doubled-batch forward). ``guidance``: the distilled guidance value (guidance-distilled families).
    ``timestep_mode``: "long" (the sampler's timesteps, as upstream) or "float". Solvers and
    ``eta``/``generator``: :func:`u_nft.solvers.sample`. Shapes: cond batch B, sigmas (N + 1,).
    """
    batch = noise_latents.shape[0]
    if conditioning_batch_size(cond) != batch:
        raise ValueError(f"batch mismatch: noise_latents {batch}, conditioning {conditioning_batch_size(cond)}")
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        if negative is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs the negative (empty-prompt) conditioning; "
                             "use guidance_scale=1.0 for CFG-free sampling")
        if conditioning_batch_size(negative) == 1:
            negative = expand_conditioning(negative, batch)
        states = cat_conditioning([{k: v.to(cond[k].dtype) for k, v in negative.items()}, cond])
    else:
        states = cond

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([x, x]) if use_cfg else x
        sigma_b = sigma.to(device=hidden.device, dtype=torch.float32).expand(hidden.shape[0])
        v = family.predict_velocity(model, hidden, sigma_b, states, guidance=guidance, timestep_mode=timestep_mode)
        if use_cfg:
            v = family.combine_guidance(*v.chunk(2), guidance_scale)
        return v

    return sample(velocity, noise_latents, sigmas.to(noise_latents.device), solver, eta, generator)


def sample_latents(transformer, prompt_embeds: torch.Tensor, pooled: torch.Tensor, noise_latents: torch.Tensor,
                   sigmas: torch.Tensor, solver: str = "dpm2", guidance_scale: float = 1.0,
                   negative_embeds: torch.Tensor | None = None, negative_pooled: torch.Tensor | None = None,
                   eta: float = 0.0, generator: Generators = None, timestep_mode: str = "long") -> torch.Tensor:
    """SD3 shorthand of :func:`sample_conditioned`: x0 (B, C, h, w) from prompt_embeds (B, T, D) and
    pooled (B, P); timestep = σ·1000 (``timestep_mode="long"``: truncated, as upstream's sampler;
    ``"float"``: as the diffusers pipeline). CFG with ``negative_embeds`` / ``negative_pooled`` (batch B)."""
    batch = noise_latents.shape[0]
    if prompt_embeds.shape[0] != batch or pooled.shape[0] != batch:
        raise ValueError(
            f"batch mismatch: noise_latents {batch}, prompt_embeds {prompt_embeds.shape[0]}, pooled {pooled.shape[0]}"
        )
    negative = None
    if guidance_scale != 1.0:
        if negative_embeds is None or negative_pooled is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs negative_embeds and negative_pooled "
                "(see negative_embeddings); use guidance_scale=1.0 for CFG-free sampling"
            )
        negative = {"prompt_embeds": negative_embeds, "pooled": negative_pooled}
    return sample_conditioned(SD3, transformer, {"prompt_embeds": prompt_embeds, "pooled": pooled}, noise_latents,
                              sigmas, solver, guidance_scale, negative, eta, generator, timestep_mode)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD3 latents (B, 16, h, w) -> images (B, 3, 8h, 8w) in [0, 1]; :func:`u_nft.models.sd3.decode_sd3_latents`."""
    return decode_sd3_latents(vae, latents)


def rollout(pipeline, prompt_embeds: torch.Tensor, pooled: torch.Tensor, seeds: Sequence[int], resolution: int,
            sigmas: torch.Tensor, solver: str = "dpm2", eta: float = 0.0, guidance_scale: float = 1.0,
            negative_embeds: torch.Tensor | None = None, negative_pooled: torch.Tensor | None = None,
            timestep_mode: str = "long") -> tuple[torch.Tensor, torch.Tensor]:
    """SD3: noise from ``seeds`` → :func:`sample_latents` → :func:`decode_latents`: (x0 latents, images).

    ``resolution`` in pixels (square); latents (B, C, resolution/f, resolution/f) with f the VAE
    factor, images (B, 3, resolution, resolution) in [0, 1]. SDE noise (eta > 0) uses
    :func:`step_noise_generators` of the same seeds.
    """
    channels, height, width = SD3.latent_shape(pipeline, resolution)
    noise = initial_noise(seeds, channels, height, width, prompt_embeds.dtype, prompt_embeds.device)
    generator = step_noise_generators(seeds) if eta > 0 else None
    latents = sample_latents(pipeline.transformer, prompt_embeds, pooled, noise, sigmas, solver, guidance_scale,
                             negative_embeds, negative_pooled, eta, generator, timestep_mode)
    return latents, decode_latents(pipeline.vae, latents)
