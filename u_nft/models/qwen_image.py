"""Qwen-Image (diffusers ``QwenImagePipeline``, diffusers >= 0.35) behind the model-family seam.

The loop sees what it sees for SD3: spatial latents x (B, 16, h, w) with h = H / 8, the velocity
v = d x / d sigma in the convention x_sigma = (1 - sigma) x0 + sigma eps, and a conditioning dict.
Inside this module (diffusers ``pipelines/qwenimage/pipeline_qwenimage.py`` is the reference for every line):

- **Prompts**: the pipeline's own ``encode_prompt``: each prompt is wrapped in the pipeline's chat template
  (``prompt_template_encode``: a system message asking to describe the image, then the prompt as the user
  turn), run through the Qwen2.5-VL language model, and its last hidden states are kept *without* the
  template's first ``prompt_template_encode_start_idx`` (34) tokens, i.e. without the system message
  and the user-turn header. The batch is then padded to ``max_sequence_length`` tokens (config
  ``sample.max_sequence_length``, at most 1024 as the pipeline allows) with a mask, so every batch has the
  same shape: ``{"prompt_embeds": (B, T, D), "prompt_mask": (B, T) long}``. The transformer call trims the
  padding shared by the whole batch again (masked keys never reach the image tokens, so this changes no
  value, only the cost).
- **Packing**: each 2x2 latent patch becomes one 64-channel token, (B, 16, h, w) -> (B, h/2 * w/2, 64),
  row-major (``QwenImagePipeline._pack_latents``), with ``img_shapes = [[(1, h/2, w/2)]] * B`` for the
  transformer's 3-D RoPE; the output is unpacked back. One token = 2x2 latent cells, as SD3 and FLUX.
- **Timestep**: the transformer gets sigma itself (the pipeline passes ``t / 1000`` with t = sigma * 1000;
  the model's timestep projection scales by 1000 inside). There are no integer timesteps:
  ``timestep_mode="long"`` is treated as ``"float"``. ``guidance`` is ignored (Qwen-Image is not
  guidance-distilled).
- **True CFG**: off by default (NFT rollouts are CFG-free). With ``sample.guidance_scale > 1`` the
  negative prompt is ``" "`` (the pipeline's documented empty negative, as Flow-GRPO's
  scripts/train_qwenimage.py) and :func:`combine_true_cfg` is the pipeline's rule: the CFG combination is
  rescaled per token to the norm of the conditional prediction.
- **Schedule**: sigma = linspace(1, 1/N, N), shifted by the scheduler with its own config:
  mu = calculate_shift(image tokens, base_image_seq_len, max_image_seq_len, base_shift, max_shift)
  (Qwen/Qwen-Image: 256 -> 0.5, 8192 -> 0.9), exponential time shift, stretched so the last nonzero sigma is
  ``shift_terminal`` (0.02), then 0 appended; the scheduler computes it, so this is the pipeline's schedule
  exactly.
- **VAE**: Qwen-Image's VAE is a causal video VAE with 5-D latents (B, 16, frames, h, w); an image is one
  frame. Decoding de-normalises per channel, x = z * latents_std + latents_mean (its config; Qwen-Image's
  16 values), decodes frame 0 and maps [-1, 1] to [0, 1], as ``QwenImagePipeline.__call__``.
- **LoRA targets**: :data:`DEFAULT_LORA_TARGETS`, Flow-GRPO's Qwen-Image list (yifan123/flow_grpo
  scripts/train_qwenimage.py; also verl's Flow-GRPO Qwen-Image example): the image-stream and text-stream
  attention projections and both MLPs of every block.

Hyper-parameters of the Qwen-Image configs and their sources: docs/qwen_image.md.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from u_nft.models.base import Conditioning, ModelFamily

__all__ = [
    "FAMILY", "QwenImageFamily", "DEFAULT_LORA_TARGETS", "MIN_DIFFUSERS", "NEGATIVE_PROMPT",
    "require_qwen_image", "template_drop_length", "check_prompt_template", "encode_prompts",
    "pack_latents", "unpack_latents", "image_shapes", "qwen_image_sigmas", "predict_velocity",
    "combine_true_cfg", "denormalize_latents", "decode_latents", "load_qwen_image_pipeline", "passes_text_lengths",
    "honours_text_mask",
]

PIPELINE_CLASS = "QwenImagePipeline"
DEFAULT_HUB_ID = "Qwen/Qwen-Image"
MIN_DIFFUSERS = "0.35.0"  # the first diffusers release with QwenImagePipeline
MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline.check_inputs refuses more
NEGATIVE_PROMPT = " "  # diffusers' Qwen-Image docs and Flow-GRPO scripts/train_qwenimage.py

# Flow-GRPO scripts/train_qwenimage.py (r 64, alpha 128); verl examples/flowgrpo_trainer/run_flowgrpo.sh uses the
# same twelve. Image stream: to_q/k/v/out.0 and img_mlp; text stream: add_q/k/v_proj, to_add_out and txt_mlp.
DEFAULT_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)


def require_qwen_image() -> None:
    """ImportError naming the minimum diffusers when the installed one has no Qwen-Image classes."""
    import diffusers

    if not all(hasattr(diffusers, name) for name in
               ("QwenImagePipeline", "QwenImageTransformer2DModel", "AutoencoderKLQwenImage")):
        raise ImportError(
            f"Qwen-Image needs diffusers >= {MIN_DIFFUSERS} (QwenImagePipeline); this is diffusers "
            f"{diffusers.__version__}: pip install 'diffusers>={MIN_DIFFUSERS}'"
        )


# ---- text --------------------------------------------------------------------------------------------

def template_drop_length(pipeline) -> int:
    """How many tokens the pipeline's tokenizer makes of the template's part before the prompt (its system
    message and user-turn header); the pipeline drops ``prompt_template_encode_start_idx`` tokens."""
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    return len(pipeline.tokenizer(prefix)["input_ids"])


def check_prompt_template(pipeline) -> None:
    """ValueError when the tokenizer's template prefix is not exactly the ``prompt_template_encode_start_idx``
    tokens the pipeline drops (a tokenizer other than Qwen2.5-VL's would keep part of the system message or
    lose part of the prompt)."""
    dropped = pipeline.prompt_template_encode_start_idx
    prefix = template_drop_length(pipeline)
    if prefix != dropped:
        raise ValueError(
            f"the Qwen-Image tokenizer ({type(pipeline.tokenizer).__name__}) makes {prefix} tokens of the prompt "
            f"template's system part, but QwenImagePipeline drops prompt_template_encode_start_idx={dropped}: "
            "use the pipeline's own Qwen2.5-VL tokenizer"
        )


@torch.no_grad()
def encode_prompts(pipeline, prompts: Sequence[str], max_sequence_length: int = 512,
                   device: torch.device | str | None = None) -> Conditioning:
    """The pipeline's ``encode_prompt`` padded to ``max_sequence_length`` tokens, no CFG branch.

    Returns ``prompt_embeds`` (B, max_sequence_length, D): the text encoder's last hidden states of the
    templated prompts without the template's first ``prompt_template_encode_start_idx`` tokens, zero after
    each prompt's end; and ``prompt_mask`` (B, max_sequence_length) long, 1 on a prompt's tokens. Prompts
    longer than ``max_sequence_length`` tokens are cut there, as the pipeline does.
    """
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"sample.max_sequence_length={max_sequence_length}: Qwen-Image accepts 1 to "
                         f"{MAX_SEQUENCE_LENGTH} text tokens (QwenImagePipeline.check_inputs)")
    embeds, mask = pipeline.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                          max_sequence_length=max_sequence_length)
    batch, length, width = embeds.shape
    if mask is None:  # the pipeline returns None when no prompt is padded
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    padded = embeds.new_zeros(batch, max_sequence_length, width)
    padded[:, :length] = embeds
    padded_mask = mask.new_zeros(batch, max_sequence_length, dtype=torch.long)
    padded_mask[:, :length] = mask.long()
    return {"prompt_embeds": padded, "prompt_mask": padded_mask}


# ---- latents -----------------------------------------------------------------------------------------

def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): one token per 2x2 patch, row-major, channels ordered
    (c, dy, dx), as ``QwenImagePipeline._pack_latents``."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"Qwen-Image latents need even sides to pack 2x2 patches, got {height}x{width}")
    tokens = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return tokens.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), the inverse of :func:`pack_latents` (``_unpack_latents`` without
    its frame axis)."""
    batch, count, packed = tokens.shape
    if count != (height // 2) * (width // 2) or packed % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} tokens to a {height}x{width} latent")
    grid = tokens.reshape(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, packed // 4, height, width)


def image_shapes(batch: int, height: int, width: int) -> list[list[tuple[int, int, int]]]:
    """The transformer's ``img_shapes``: one (frames 1, token rows, token cols) per sample."""
    return [[(1, height // 2, width // 2)]] * batch


def qwen_image_sigmas(scheduler_config, num_steps: int, image_tokens: int) -> torch.Tensor:
    """The pipeline's sampling schedule, float32 (num_steps + 1,), from 1 to 0.

    sigmas = linspace(1, 1/N, N) handed to a ``FlowMatchEulerDiscreteScheduler`` built from
    ``scheduler_config`` with mu = calculate_shift(image_tokens, ...) of the same config (used when the
    config has ``use_dynamic_shifting``), exactly as ``QwenImagePipeline.__call__`` / ``retrieve_timesteps``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = calculate_shift(image_tokens, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    kwargs = {"mu": mu} if scheduler.config.get("use_dynamic_shifting", False) else {}
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", **kwargs)
    return scheduler.sigmas.to(torch.float32).clone()


def _diffusers_release() -> tuple[int, ...]:
    import diffusers
    from packaging.version import Version

    return Version(diffusers.__version__).release


def passes_text_lengths() -> bool:
    """Whether this diffusers' pipeline hands the transformer ``txt_seq_lens`` (diffusers 0.35-0.36 need it;
    0.37-0.38 deprecate it, later releases derive the lengths from the mask)."""
    return _diffusers_release() < (0, 37)


def honours_text_mask() -> bool:
    """Whether this diffusers' Qwen-Image attention masks padded text tokens. diffusers 0.35-0.36 accept the mask
    but attend to every text token, so there a prompt's velocity depends on the longest prompt of its batch (in
    the pipeline as here); from 0.37 it does not."""
    return _diffusers_release() >= (0, 37)


def predict_velocity(model, x_t: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """v (B, C, h, w) float from the Qwen-Image transformer at x_t (B, C, h, w), sigma (B,) in [0, 1].

    Packs x_t to 2x2 tokens, trims the text padding common to the batch (mask kept; ``None`` when no prompt
    is padded, as the pipeline), calls ``model(hidden_states, timestep=sigma, encoder_hidden_states,
    encoder_hidden_states_mask, img_shapes)`` and unpacks the output.
    """
    batch, _, height, width = x_t.shape
    embeds, mask = cond["prompt_embeds"], cond["prompt_mask"]
    if embeds.shape[0] != batch or sigma.shape != (batch,):
        raise ValueError(f"batch mismatch: x_t {tuple(x_t.shape)}, sigma {tuple(sigma.shape)}, "
                         f"prompt_embeds {tuple(embeds.shape)}")
    length = int(mask.sum(dim=1).max())
    embeds, mask = embeds[:, :length], mask[:, :length]
    kwargs = {}
    if passes_text_lengths():
        kwargs["txt_seq_lens"] = mask.sum(dim=1).tolist()
    if bool(mask.all()):
        mask = None
    dtype = embeds.dtype
    tokens = model(hidden_states=pack_latents(x_t.to(dtype)), timestep=sigma.to(dtype), encoder_hidden_states=embeds,
                   encoder_hidden_states_mask=mask, img_shapes=image_shapes(batch, height, width),
                   return_dict=False, **kwargs)[0]
    return unpack_latents(tokens, height, width).float()


def combine_true_cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG on spatial velocities (B, C, h, w): v = v_u + g (v_c - v_u), rescaled per
    token (2x2 patch, all channels) to the norm of v_c (``QwenImagePipeline.__call__``)."""
    height, width = v_cond.shape[-2:]
    cond, uncond = pack_latents(v_cond), pack_latents(v_uncond)
    combined = uncond + guidance_scale * (cond - uncond)
    combined = combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return unpack_latents(combined, height, width)


# ---- VAE ---------------------------------------------------------------------------------------------

def denormalize_latents(vae_config, latents: torch.Tensor) -> torch.Tensor:
    """x = z * latents_std + latents_mean per channel (B, C, h, w) -> the VAE's 5-D input (B, C, 1, h, w)."""
    channels = latents.shape[1]
    if channels != vae_config.z_dim:
        raise ValueError(f"latents have {channels} channels, the Qwen-Image VAE {vae_config.z_dim}")
    mean = torch.tensor(vae_config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
    std = torch.tensor(vae_config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
    return (latents * std + mean).unsqueeze(2)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 8h, 8w) float32 in [0, 1] from Qwen-Image latents (B, 16, h, w): per-channel
    de-normalisation, the video VAE on one frame, clamp(D(x) / 2 + 1 / 2, 0, 1)."""
    decoded = vae.decode(denormalize_latents(vae.config, latents.to(vae.dtype)), return_dict=False)[0][:, :, 0]
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


# ---- loading -----------------------------------------------------------------------------------------

def load_qwen_image_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu"):
    """``QwenImagePipeline.from_pretrained(model)`` (hub id such as ``"Qwen/Qwen-Image"`` or a local folder)
    on ``device``: transformer and text encoder in ``dtype``, the VAE in float32, VAE and text encoder frozen.
    The prompt template's dropped prefix is checked against the tokenizer (:func:`check_prompt_template`)."""
    from u_nft.shape_log import attach_shape_log_from_env
    from u_nft.tiny_sd3 import HUB_ID, _dtype_keyword

    require_qwen_image()
    from diffusers import QwenImagePipeline

    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"config.pretrained.model={text!r} is a local path but not a diffusers pipeline folder (no "
                f"model_index.json); give a hub id such as {DEFAULT_HUB_ID!r} or a folder written by save_pretrained"
            )
        source = str(path)
    elif HUB_ID.match(text):
        source = text
    else:
        raise FileNotFoundError(f"config.pretrained.model={text!r} is neither an existing pipeline folder nor a hub "
                                f"id 'owner/name' (e.g. {DEFAULT_HUB_ID!r})")
    pipeline = QwenImagePipeline.from_pretrained(source, **{_dtype_keyword(): dtype})
    pipeline.set_progress_bar_config(disable=True)
    check_prompt_template(pipeline)
    pipeline.vae.requires_grad_(False)
    if pipeline.vae.dtype != torch.float32:
        pipeline.vae.to(torch.float32)  # decode in fp32, as upstream
    pipeline.text_encoder.requires_grad_(False)
    attach_shape_log_from_env(pipeline.transformer)  # only with U_NFT_SHAPE_LOG set (u_nft/shape_log.py)
    return pipeline.to(device)


# ---- the family --------------------------------------------------------------------------------------

class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    pipeline_class = PIPELINE_CLASS
    default_lora_targets = DEFAULT_LORA_TARGETS
    supports_cfg = True  # true CFG (off unless sample.guidance_scale > 1); see combine_true_cfg

    def load_pipeline(self, model, dtype=torch.float32, device="cpu"):
        return load_qwen_image_pipeline(model, dtype=dtype, device=device)

    def build_tiny(self, directory: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
        from u_nft.tiny_qwen_image import build_tiny_qwen_image_pipeline

        return build_tiny_qwen_image_pipeline(directory, seed=seed, overwrite=overwrite)

    def encode_prompts(self, pipeline, prompts, max_sequence_length=512, device=None) -> Conditioning:
        return encode_prompts(pipeline, prompts, max_sequence_length, device)

    def negative_conditioning(self, pipeline, max_sequence_length=512, device=None) -> Conditioning:
        return encode_prompts(pipeline, [NEGATIVE_PROMPT], max_sequence_length, device)

    def latent_shape(self, pipeline, resolution: int) -> tuple[int, int, int]:
        factor = pipeline.vae_scale_factor
        multiple = factor * 2  # VAE factor x the 2x2 packing
        if resolution < multiple or resolution % multiple:
            raise ValueError(f"sample.resolution={resolution}: Qwen-Image needs a multiple of {multiple} "
                             "(VAE factor x 2x2 packing)")
        return pipeline.transformer.config.in_channels // 4, resolution // factor, resolution // factor

    def sigmas(self, pipeline, num_steps: int, resolution: int) -> torch.Tensor:
        _, height, width = self.latent_shape(pipeline, resolution)
        return qwen_image_sigmas(pipeline.scheduler.config, num_steps, (height // 2) * (width // 2))

    def predict_velocity(self, model, x_t, sigma, cond, guidance=None, timestep_mode="float"):
        # Qwen-Image has no integer timesteps ("long" = "float") and no distilled guidance (ignored).
        return predict_velocity(model, x_t, sigma, cond)

    def combine_guidance(self, v_uncond, v_cond, guidance_scale: float):
        return combine_true_cfg(v_uncond, v_cond, guidance_scale)

    def decode(self, vae, latents):
        return decode_latents(vae, latents)


FAMILY = QwenImageFamily()
