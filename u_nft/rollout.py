"""Rollouts of an SD3 pipeline: prompt encoding, per-sample noise, sampling, VAE decoding.

Rollouts are what DiffusionNFT trains on: clean latents x0 (and their decoded images, for the
reward) from the *old* policy, CFG-free by default (docs/upstream_facts.md §F). Whatever adapter is active on the
transformer is what samples: the trainer selects the old-policy adapter before calling in here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from u_nft.solvers import Generators, sample, transformer_timestep


# Text

@torch.no_grad()
def encode_prompts(pipeline, prompts: Sequence[str], max_sequence_length: int = 128,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts with the pipeline's own ``encode_prompt`` (no CFG branch).

    Returns ``prompt_embeds`` (B, 77 + max_sequence_length, joint_attention_dim) — CLIP-L and
    CLIP-bigG penultimate states, zero-padded to the T5 width, then the T5 tokens (zeros without
    T5) — and ``pooled_prompt_embeds`` (B, pooled_projection_dim). Upstream uses
    max_sequence_length 128 (205 tokens).
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device,
        do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled


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
def sample_latents(transformer, prompt_embeds: torch.Tensor, pooled: torch.Tensor, noise_latents: torch.Tensor,
                   sigmas: torch.Tensor, solver: str = "dpm2", guidance_scale: float = 1.0,
                   negative_embeds: torch.Tensor | None = None, negative_pooled: torch.Tensor | None = None,
                   eta: float = 0.0, generator: Generators = None, timestep_mode: str = "long") -> torch.Tensor:
    """Sample clean latents x0 (B, C, h, w) from x_T = ``noise_latents`` with the SD3 transformer.

    Each step calls ``transformer(hidden_states, encoder_hidden_states, pooled_projections,
    timestep)`` with timestep = σ·1000 (``timestep_mode="long"``: truncated, as upstream's sampler;
    ``"float"``: as the diffusers pipeline). ``guidance_scale == 1`` (upstream's rollouts) is one
    forward per step; otherwise CFG v = v_uncond + g·(v_cond − v_uncond) with the negative
    embeddings (one doubled-batch forward). Solvers and ``eta``/``generator``: :func:`u_nft.solvers.sample`.
    Shapes: prompt_embeds (B, T, D), pooled (B, P), noise_latents (B, C, h, w), sigmas (N + 1,).
    """
    batch = noise_latents.shape[0]
    if prompt_embeds.shape[0] != batch or pooled.shape[0] != batch:
        raise ValueError(
            f"batch mismatch: noise_latents {batch}, prompt_embeds {prompt_embeds.shape[0]}, pooled {pooled.shape[0]}"
        )
    use_cfg = guidance_scale != 1.0
    if use_cfg:
        if negative_embeds is None or negative_pooled is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs negative_embeds and negative_pooled "
                "(see negative_embeddings); use guidance_scale=1.0 for CFG-free sampling"
            )
        encoder_states = torch.cat([negative_embeds, prompt_embeds])
        pooled_states = torch.cat([negative_pooled, pooled])
    else:
        encoder_states, pooled_states = prompt_embeds, pooled

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        hidden = torch.cat([x, x]) if use_cfg else x
        timestep = transformer_timestep(sigma, hidden.shape[0], timestep_mode, hidden.device)
        v = transformer(hidden_states=hidden, encoder_hidden_states=encoder_states,
                        pooled_projections=pooled_states, timestep=timestep, return_dict=False)[0]
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        return v

    return sample(velocity, noise_latents, sigmas.to(noise_latents.device), solver, eta, generator)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 8h, 8w) float32 in [0, 1] from SD3 latents (B, 16, h, w).

    x = z / scaling_factor + shift_factor (SD3.5: 1.5305, 0.0609); image = clamp(D(x)/2 + 1/2, 0, 1),
    as the diffusers pipeline's decode and postprocess.
    """
    shift = vae.config.shift_factor or 0.0
    z = latents / vae.config.scaling_factor + shift
    decoded = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def rollout(pipeline, prompt_embeds: torch.Tensor, pooled: torch.Tensor, seeds: Sequence[int], resolution: int,
            sigmas: torch.Tensor, solver: str = "dpm2", eta: float = 0.0, guidance_scale: float = 1.0,
            negative_embeds: torch.Tensor | None = None, negative_pooled: torch.Tensor | None = None,
            timestep_mode: str = "long") -> tuple[torch.Tensor, torch.Tensor]:
    """Noise from ``seeds`` → :func:`sample_latents` → :func:`decode_latents`: (x0 latents, images).

    ``resolution`` in pixels (square); latents (B, C, resolution/f, resolution/f) with f the VAE
    factor, images (B, 3, resolution, resolution) in [0, 1]. SDE noise (eta > 0) uses
    :func:`step_noise_generators` of the same seeds.
    """
    factor = pipeline.vae_scale_factor
    if resolution % (factor * pipeline.transformer.config.patch_size):
        raise ValueError(
            f"resolution {resolution} must be a multiple of {factor * pipeline.transformer.config.patch_size} "
            "(VAE factor x patch size)"
        )
    noise = initial_noise(seeds, pipeline.transformer.config.in_channels, resolution // factor,
                          resolution // factor, prompt_embeds.dtype, prompt_embeds.device)
    generator = step_noise_generators(seeds) if eta > 0 else None
    latents = sample_latents(pipeline.transformer, prompt_embeds, pooled, noise, sigmas, solver, guidance_scale,
                             negative_embeds, negative_pooled, eta, generator, timestep_mode)
    return latents, decode_latents(pipeline.vae, latents)
