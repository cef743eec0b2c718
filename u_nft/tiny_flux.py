"""A tiny random-weight ``FluxPipeline`` built offline, shaped like FLUX.1-dev at toy sizes.

Built like the tiny SD3 pipeline (:mod:`u_nft.tiny_sd3`: the same atomic, idempotent build folder with a
completion marker, the same transparent VAE decoder and the same short flow-matching pretraining on
quadrant images, so a reward can rise), with FLUX.1-dev's structure so every code path is diffusers' own
(``FluxPipeline.from_pretrained``, ``encode_prompt``, PEFT LoRA, ``load_lora_weights``, VAE decode):

- ``CLIPTextModel`` (hidden 32; its pooled output is the 768-wide ``pooled_projections`` role of CLIP-L)
  with the real CLIP BPE tokenizer (:func:`u_nft.tiny_models.write_clip_tokenizer`);
- ``T5EncoderModel`` (d_model 64 = ``joint_attention_dim``, the T5-XXL 4096 role; 2 blocks, gated GELU as
  T5 v1.1) with an offline Unigram ``T5TokenizerFast`` (:func:`u_nft.tiny_models.write_t5_tokenizer`);
- ``FluxTransformer2DModel``: 2 double-stream + 2 single-stream blocks, 2 heads of dim 16 (inner 32),
  ``axes_dims_rope=(4, 6, 6)`` (sums to the head dim, FLUX.1's 16 : 56 : 56 proportions rounded to even
  sizes), 64 input channels (16 latent channels x 2x2 packing), ``guidance_embeds=True`` as FLUX.1-dev;
- ``AutoencoderKL``: 16 latent channels, x8 downsampling, no quant convs, scaling_factor 0.3611 /
  shift_factor 0.1159 as FLUX.1;
- ``FlowMatchEulerDiscreteScheduler`` with FLUX.1-dev's dynamic shift (shift 3, base/max image seq len
  256 / 4096, base/max shift 0.5 / 1.15).

The pretraining runs through :mod:`u_nft.models.flux` (2x2 packing, timestep sigma, guidance 3.5), the
same calls the trainer makes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from u_nft.tiny_sd3 import VAE_SCALING_FACTOR as SD3_VAE_SCALING_FACTOR
from u_nft.tiny_sd3 import (build_pipeline_directory, make_decoder_transparent, matches_build, offline_tokenizers,
                            pretrain_on_quadrants, t5_encoder_config, tiny_autoencoder_kl)
from u_nft.tiny_models import tiny_clip_text_config

KIND = "tiny_flux"
PRETRAIN_SEQUENCE_LENGTH = 32  # T5 tokens of the pretraining prompts

# FLUX.1-dev vae/config.json and scheduler/scheduler_config.json (docs/flux.md).
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)

__all__ = ["build_tiny_flux_pipeline", "tiny_flux_components", "matches_tiny_flux_build", "KIND"]


def tiny_flux_components(seed: int) -> dict:
    """Every ``FluxPipeline`` component at toy size, weights drawn from ``seed`` (global RNG untouched)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    tokenizers = offline_tokenizers(t5=True)
    tokenizer, tokenizer_2 = tokenizers["tokenizer"], tokenizers["tokenizer_3"]
    clip_hidden, t5_width = 32, 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            tiny_clip_text_config(len(tokenizer), tokenizer.eos_token_id, clip_hidden, clip_hidden)).eval()
        text_encoder_2 = T5EncoderModel(t5_encoder_config(
            len(tokenizer_2), d_model=t5_width, d_ff=2 * t5_width, num_heads=4, d_kv=16, num_layers=2)).eval()
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_width,
            pooled_projection_dim=clip_hidden,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).eval()
        vae = tiny_autoencoder_kl(VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                image_encoder=None, feature_extractor=None)


def _pretrain_encode(pipeline, prompts):
    from u_nft.models import flux

    return flux.encode_prompts(pipeline, prompts, max_sequence_length=PRETRAIN_SEQUENCE_LENGTH)


def _pretrain_velocity(transformer, x_t, sigma, conditioning):
    from u_nft.models import flux

    return flux.predict_velocity(transformer, x_t, sigma, conditioning, guidance=flux.DEFAULT_GUIDANCE)


def build_tiny_flux_pipeline(directory: str | os.PathLike, seed: int = 0, overwrite: bool = False,
                             pretrain_steps: int = 400) -> Path:
    """Build the tiny FLUX pipeline (random weights, transparent decoder, ``pretrain_steps`` of flow-matching
    pretraining through :mod:`u_nft.models.flux`) and ``save_pretrained`` it; return the path.

    Idempotent and atomic (:func:`u_nft.tiny_sd3.build_pipeline_directory`, marker kind ``"tiny_flux"``).
    Load it with ``FluxPipeline.from_pretrained(directory)`` or :func:`u_nft.models.flux.load_flux_pipeline`.
    """
    from diffusers import FluxPipeline

    def make():
        pipeline = FluxPipeline(**tiny_flux_components(seed))
        pipeline.set_progress_bar_config(disable=True)
        make_decoder_transparent(pipeline.vae)
        with torch.random.fork_rng(devices=[]):
            pretrain_on_quadrants(pipeline, pretrain_steps, seed, encode=_pretrain_encode,
                                  velocity=_pretrain_velocity, spread=SD3_VAE_SCALING_FACTOR / VAE_SCALING_FACTOR)
        return pipeline

    marker = {"kind": KIND, "seed": seed, "pretrain_steps": pretrain_steps}
    return build_pipeline_directory(directory, make, marker, overwrite)


def matches_tiny_flux_build(directory: str | os.PathLike, seed: int = 0, pretrain_steps: int = 400) -> bool:
    """Whether ``directory`` already holds this build (then :func:`build_tiny_flux_pipeline` reuses it)."""
    return matches_build(directory, KIND, seed=seed, pretrain_steps=pretrain_steps)
