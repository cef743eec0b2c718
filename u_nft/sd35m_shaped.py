"""An SD3.5-Medium-shaped random-weight ``StableDiffusion3Pipeline`` built offline: real widths, cut depth.

Every component has stabilityai/stable-diffusion-3.5-medium's configuration (its ``model_index.json``
and component ``config.json`` files; diffusers ``SD3Transformer2DModel``, ``AutoencoderKL``) except
the number of layers, so every tensor the trainer handles has the real model's shape:

- transformer: 24 heads x 64 (inner 1536), caption_projection_dim 1536, joint_attention_dim 4096,
  pooled_projection_dim 2048, patch 2, 16 latent channels, sample_size 128, pos_embed_max_size 384,
  qk_norm rms_norm; **2 blocks** instead of 24: block 0 with dual attention (SD3.5-M has it in blocks
  0-12), block 1 plain (the last block, context_pre_only, as in the real model);
- VAE: the full SD3 VAE (block_out_channels 128/256/512/512, 2 layers per block, 32 groups, 16 latent
  channels, x8, no quant convs, scaling 1.5305, shift 0.0609), depth included;
- text_encoder: CLIP-L text tower (hidden 768, 12 heads, MLP 3072, quick_gelu, projection 768);
- text_encoder_2: OpenCLIP bigG text tower (hidden 1280, 20 heads, MLP 5120, gelu, projection 1280);
  **1 layer** each instead of 12 / 32; the real CLIP BPE tokenizer (49,408 tokens);
- text_encoder_3: T5-XXL encoder widths (d_model 4096, d_ff 10240, 64 heads x d_kv 64, gated GELU);
  **1 block** instead of 24, and a small offline Unigram vocabulary instead of T5's 32,128 pieces
  (the vocabulary only sizes the embedding table: 32,128 x 4096 fp32 would add 0.5 GB and nothing else);
- ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

The pipeline then yields SD3.5-M's conditioning: 77 CLIP tokens (768 + 1280 = 2048 channels,
zero-padded to 4096) followed by ``max_sequence_length`` T5 tokens (205 at upstream NFT's 128), pooled
768 + 1280 = 2048; a 512 px image is 64 x 64 latents = 1024 patch tokens. Weights are random
(``seed``): it is for shape, memory and code-path checks, not for learning. About 3.2 GB in fp32
(the 384 x 384 x 1536 positional table alone is 0.9 GB, as in the real checkpoint).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from u_nft.tiny_sd3 import (
    VAE_SCALING_FACTOR, VAE_SHIFT_FACTOR, build_pipeline_directory, offline_tokenizers, t5_encoder_config,
)

# SD3.5-Medium's widths (transformer/config.json, text_encoder*/config.json of the hub repository).
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
    pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
)
SD35M_NUM_LAYERS = 24
SD35M_DUAL_ATTENTION_LAYERS = tuple(range(13))
SD35M_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
    scaling_factor=VAE_SCALING_FACTOR, shift_factor=VAE_SHIFT_FACTOR, use_quant_conv=False,
    use_post_quant_conv=False, force_upcast=True, mid_block_add_attention=True,
)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, hidden_act="quick_gelu",
                   projection_dim=768)
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, hidden_act="gelu",
                      projection_dim=1280)
T5_XXL_ENCODER = dict(d_model=4096, d_ff=10240, num_heads=64, d_kv=64)

# Shapes the transformer sees at upstream NFT's settings (512 px, max_sequence_length 128).
SD35M_IMAGE_TOKENS_512PX = (512 // 8 // 2) ** 2  # 1024
SD35M_TEXT_TOKENS = 77 + 128  # 205


def _clip_text_config(vocab_size: int, eos_token_id: int, widths: dict, num_layers: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, num_hidden_layers=num_layers, max_position_embeddings=77,
                          eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1, pad_token_id=eos_token_id,
                          **widths)


def sd35m_shaped_components(seed: int = 0, num_layers: int = 2, text_layers: int = 1, t5_layers: int = 1) -> dict:
    """Every ``StableDiffusion3Pipeline`` component at SD3.5-M's widths, weights drawn from ``seed``
    (global RNG untouched). ``num_layers`` transformer blocks: the first ``min(num_layers - 1, 13)``
    with dual attention, as SD3.5-M's first 13; ``text_layers`` per CLIP tower; ``t5_layers`` T5 blocks."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    if num_layers < 2:
        raise ValueError(f"num_layers={num_layers} must be >= 2 (one dual-attention block and a plain last block)")
    tokenizers = offline_tokenizers(t5=True)
    dual = tuple(i for i in SD35M_DUAL_ATTENTION_LAYERS if i < num_layers - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(
            len(tokenizers["tokenizer"]), tokenizers["tokenizer"].eos_token_id, CLIP_L_TEXT, text_layers)).eval()
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(
            len(tokenizers["tokenizer_2"]), tokenizers["tokenizer_2"].eos_token_id, CLIP_BIGG_TEXT, text_layers)).eval()
        text_encoder_3 = T5EncoderModel(t5_encoder_config(
            len(tokenizers["tokenizer_3"]), num_layers=t5_layers, **T5_XXL_ENCODER)).eval()
        transformer = SD3Transformer2DModel(num_layers=num_layers, dual_attention_layers=dual,
                                            **SD35M_TRANSFORMER).eval()
        vae = AutoencoderKL(**SD35M_VAE).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return dict(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                text_encoder_2=text_encoder_2, text_encoder_3=text_encoder_3, **tokenizers)


def build_sd35m_shaped_pipeline(directory: str | os.PathLike, seed: int = 0, overwrite: bool = False,
                                num_layers: int = 2) -> Path:
    """Build the SD3.5-Medium-shaped pipeline (module doc) and ``save_pretrained`` it; return the path.

    Idempotent and atomic (:func:`u_nft.tiny_sd3.build_pipeline_directory`); about 3.2 GB on disk.
    Load it as users load SD3.5-M: :func:`u_nft.tiny_sd3.load_sd3_pipeline` or
    ``StableDiffusion3Pipeline.from_pretrained(directory)``; train on it with
    ``--config.pretrained.model=DIRECTORY``.
    """
    from diffusers import StableDiffusion3Pipeline

    def make():
        return StableDiffusion3Pipeline(**sd35m_shaped_components(seed, num_layers=num_layers))

    marker = {"kind": "sd35m_shaped", "seed": seed, "num_layers": num_layers}
    return build_pipeline_directory(directory, make, marker, overwrite)
