"""Stable Diffusion 3 / 3.5 (diffusers ``StableDiffusion3Pipeline``) behind the model-family seam.

Prompt encoding with the pipeline's own ``encode_prompt`` (CLIP-L + CLIP-bigG penultimate states and
T5 tokens, pooled CLIP projections), the shift-3 flow-matching schedule of SD3's scheduler, the
transformer fed timestep = sigma * 1000 (truncated to an integer in upstream DiffusionNFT's sampler,
NVlabs/DiffusionNFT flow_grpo/diffusers_patch), and the VAE's scale / shift. Latents are SD3's own
(B, 16, H/8, W/8); the transformer patchifies them itself.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from u_nft.models.base import Conditioning, ModelFamily
from u_nft.solvers import TIMESTEP_MODES, sd3_sigmas

# The attention projections of SD3's joint blocks (image and context streams); upstream DiffusionNFT's targets.
SD3_LORA_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)
SD3_SHIFT = 3.0  # SD3.5-Medium's FlowMatchEulerDiscreteScheduler shift (upstream samples with it)


@torch.no_grad()
def encode_sd3_prompts(pipeline, prompts: Sequence[str], max_sequence_length: int = 128,
                       device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``pipeline.encode_prompt`` without the CFG branch: (prompt_embeds, pooled).

    prompt_embeds (B, 77 + max_sequence_length, joint_attention_dim): CLIP-L and CLIP-bigG penultimate
    states, zero-padded to the T5 width, then the T5 tokens (zeros without T5); pooled
    (B, pooled_projection_dim). Upstream uses max_sequence_length 128 (205 tokens).
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device,
        do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
    )
    return prompt_embeds, pooled


def sd3_timestep(sigma: torch.Tensor, mode: str = "float") -> torch.Tensor:
    """The SD3 transformer's ``timestep`` (B,) at noise levels sigma (B,): sigma * 1000 in float32;
    ``mode="long"`` truncates it to an integer, as upstream's sampler (1000, 960, 913, ... for N = 10)."""
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"timestep mode {mode!r} is not one of {TIMESTEP_MODES}")
    value = sigma.to(torch.float32) * 1000
    return value.long() if mode == "long" else value


@torch.no_grad()
def decode_sd3_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 8h, 8w) float32 in [0, 1] from SD3 latents (B, 16, h, w).

    x = z / scaling_factor + shift_factor (SD3.5: 1.5305, 0.0609); image = clamp(D(x)/2 + 1/2, 0, 1),
    as the diffusers pipeline's decode and postprocess.
    """
    shift = vae.config.shift_factor or 0.0
    z = latents / vae.config.scaling_factor + shift
    decoded = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


class SD3Family(ModelFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    default_lora_targets = SD3_LORA_TARGETS
    supports_cfg = True

    def load_pipeline(self, model, dtype=torch.float32, device="cpu"):
        from u_nft.tiny_sd3 import load_sd3_pipeline

        pipeline = load_sd3_pipeline(model, dtype=dtype, device=device)
        for module in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3):
            if module is not None:
                module.requires_grad_(False)
        pipeline.vae.to(torch.float32)  # decode in fp32, as upstream
        return pipeline

    def build_tiny(self, directory: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
        from u_nft.tiny_sd3 import build_tiny_sd3_pipeline

        return build_tiny_sd3_pipeline(directory, seed=seed, overwrite=overwrite)

    def encode_prompts(self, pipeline, prompts, max_sequence_length=128, device=None) -> Conditioning:
        embeds, pooled = encode_sd3_prompts(pipeline, prompts, max_sequence_length, device)
        return {"prompt_embeds": embeds, "pooled": pooled}

    def negative_conditioning(self, pipeline, max_sequence_length=128, device=None) -> Conditioning:
        return self.encode_prompts(pipeline, [""], max_sequence_length, device)  # upstream encodes [""] once

    def latent_shape(self, pipeline, resolution: int) -> tuple[int, int, int]:
        factor = pipeline.vae_scale_factor
        multiple = factor * pipeline.transformer.config.patch_size
        if resolution < multiple or resolution % multiple:
            raise ValueError(f"resolution {resolution} must be a multiple of {multiple} (VAE factor x patch size)")
        return pipeline.transformer.config.in_channels, resolution // factor, resolution // factor

    def sigmas(self, pipeline, num_steps: int, resolution: int) -> torch.Tensor:
        return sd3_sigmas(num_steps, SD3_SHIFT)

    def predict_velocity(self, model, x_t, sigma, cond, guidance=None, timestep_mode="float"):
        return model(hidden_states=x_t, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled"], timestep=sd3_timestep(sigma, timestep_mode),
                     return_dict=False)[0]

    def decode(self, vae, latents):
        return decode_sd3_latents(vae, latents)


FAMILY = SD3Family()
