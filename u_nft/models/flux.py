"""The FLUX.1 family adapter (``FluxPipeline``): what differs from SD3, behind the model-family seam.

Everything the loop sees stays SD3-shaped: spatial latents x (B, 16, h, w) with h = H / 8, the velocity
v = d x / d sigma in the same convention x_sigma = (1 - sigma) x0 + sigma eps, and a conditioning dict.
Inside this module (diffusers ``FluxPipeline``, 0.33-0.42, is the reference for every line):

- **Prompts**: the pipeline's own ``encode_prompt``: CLIP-L's pooled output (``pooled``, (B, 768) for
  FLUX.1) and T5-XXL's last hidden states (``prompt_embeds``, (B, max_sequence_length, 4096)), T5 padded
  to ``max_sequence_length`` tokens so every batch has the same length.
- **Packing**: each 2x2 latent patch becomes one 64-channel token, (B, 16, h, w) -> (B, h/2 * w/2, 64),
  row-major over the token grid (``FluxPipeline._pack_latents``), with image ids (0, row, col) per token
  (``_prepare_latent_image_ids``) and all-zero text ids; the transformer's output is unpacked back. One
  token is 2x2 latent cells, as for SD3, so ``train.cell_size = 2`` is one token for both.
- **Timestep**: the transformer gets sigma itself (``FluxPipeline`` passes ``t / 1000`` with
  t = sigma * 1000; the model multiplies by 1000 inside).
- **Distilled guidance** (FLUX.1-dev, ``transformer.config.guidance_embeds``): the guidance value
  (``config.sample.distilled_guidance``, default :data:`DEFAULT_GUIDANCE` = 3.5 as ``FluxPipeline``'s
  ``guidance_scale``) is an input of every forward, rollouts and training alike; there is no CFG
  (:attr:`FluxFamily.supports_cfg` is False: ``sample.guidance_scale`` must be 1).
- **Schedule**: the resolution-dependent shift, sigma' = e^mu / (e^mu + 1/sigma - 1) on
  sigma = linspace(1, 1/N, N), mu linear in the token count between (base_image_seq_len, base_shift) and
  (max_image_seq_len, max_shift) of the scheduler config (FLUX.1-dev: 256 -> 0.5, 4096 -> 1.15;
  ``FluxPipeline.calculate_shift`` and ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)``).
- **VAE**: decode x = z / scaling_factor + shift_factor (FLUX.1: 0.3611, 0.1159), from the VAE config.
- **LoRA targets**: :data:`DEFAULT_LORA_TARGETS`, Flow-GRPO's FLUX list (yifan123/flow_grpo
  scripts/train_flux.py; also X-GenGroup/Flow-Factory's ``flux1`` default): attention and both FFNs of
  the double-stream blocks; ``attn.to_q/k/v`` match the single-stream blocks' attention too.

Hyper-parameters of the FLUX configs and their sources: docs/flux.md.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from u_nft.lora import unwrap
from u_nft.models.base import Conditioning, ModelFamily

__all__ = [
    "FAMILY", "FluxFamily", "DEFAULT_GUIDANCE", "DEFAULT_LORA_TARGETS", "pack_latents", "unpack_latents",
    "latent_image_ids", "text_ids", "calculate_shift", "flux_sigmas", "transformer_timestep", "guidance_tensor",
    "encode_prompts", "predict_velocity", "decode_latents", "load_flux_pipeline",
]

PIPELINE_CLASS = "FluxPipeline"
DEFAULT_GUIDANCE = 3.5  # diffusers FluxPipeline.__call__(guidance_scale=3.5), Flow-GRPO / Flow-Factory FLUX configs
DEFAULT_HUB_ID = "black-forest-labs/FLUX.1-dev"

# Flow-GRPO scripts/train_flux.py (and Flow-Factory models/flux/flux1.py default_target_modules). peft matches a
# name by suffix, so the three attn.to_{q,k,v} entries adapt the single-stream blocks' attention as well.
DEFAULT_LORA_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)

# FLUX.1-dev scheduler/scheduler_config.json, in calculate_shift's argument order; used where a scheduler
# config lacks a key.
_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
_TIMESTEP_MODES = ("float", "long")


# ---- layout ---------------------------------------------------------------------------------------------

def _check_spatial(latents: torch.Tensor) -> tuple[int, int, int, int]:
    if latents.ndim != 4:
        raise ValueError(f"FLUX latents must be spatial (B, C, h, w), got shape {tuple(latents.shape)}")
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {height}x{width} "
                         "(config.sample.resolution must be a multiple of 16)")
    return batch, channels, height, width


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): token (i, j) holds patch rows 2i..2i+1, cols 2j..2j+1, channel-major
    (c, dy, dx), as ``FluxPipeline._pack_latents``."""
    batch, channels, height, width = _check_spatial(latents)
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w) for latent ``height`` x ``width``."""
    batch, count, features = tokens.shape
    if count != (height // 2) * (width // 2) or features % 4:
        raise ValueError(f"cannot unpack {tuple(tokens.shape)} FLUX tokens to a {height}x{width} latent")
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Positional ids (h/2 * w/2, 3) of the packed tokens of a ``height`` x ``width`` latent: (0, row, col),
    row-major, as ``FluxPipeline._prepare_latent_image_ids`` (the RoPE axes of ``axes_dims_rope``)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def text_ids(num_tokens: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All-zero positional ids (num_tokens, 3) of the T5 tokens (``FluxPipeline.encode_prompt``)."""
    return torch.zeros(num_tokens, 3, device=device, dtype=dtype)


# ---- schedule -------------------------------------------------------------------------------------------

def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu of the resolution-dependent shift: linear in the image token count through (base_seq_len,
    base_shift) and (max_seq_len, max_shift) (diffusers ``pipeline_flux.calculate_shift``). 512 px on FLUX.1:
    1024 tokens, mu = 0.63; 1024 px: 4096 tokens, mu = 1.15."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return image_seq_len * slope + intercept


def _config_value(config, key: str, default):
    """``config[key]`` of a scheduler config (a FrozenDict, a dict or an attribute namespace), else ``default``."""
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def flux_sigmas(num_steps: int, image_seq_len: int, scheduler_config=None) -> torch.Tensor:
    """FLUX's sampling schedule (num_steps + 1,) float32, 1 -> 0: ``FluxPipeline``'s
    sigma = linspace(1, 1/N, N), shifted by ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas, mu)``
    with dynamic shifting (sigma' = e^mu / (e^mu + 1/sigma - 1), mu = :func:`calculate_shift` of
    ``image_seq_len`` with the scheduler config's base/max seq len and shift), then 0 appended; the same
    float32 roundings, so the values equal the scheduler's. ``scheduler_config`` None: FLUX.1-dev's.
    A config without dynamic shifting (``use_dynamic_shifting`` False) uses its static ``shift`` instead.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    config = scheduler_config if scheduler_config is not None else {"use_dynamic_shifting": True}
    if _config_value(config, "use_dynamic_shifting", False):
        mu = calculate_shift(image_seq_len, *(_config_value(config, key, default)
                                              for key, default in _SHIFT_DEFAULTS.items()))
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    else:
        shift = _config_value(config, "shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


# ---- the transformer call ------------------------------------------------------------------------------

def transformer_timestep(sigma: torch.Tensor, batch_size: int, mode: str = "float",
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``timestep`` FLUX's transformer gets (B,): sigma itself (``FluxPipeline`` passes t / 1000 with
    t = 1000 sigma; the model scales by 1000 inside). FLUX has no integer timesteps, so ``mode="long"`` (the
    seam's rollout mode, SD3's truncated timesteps) is the same float value."""
    if mode not in _TIMESTEP_MODES:
        raise ValueError(f"timestep mode {mode!r} is not one of {_TIMESTEP_MODES}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch_size)
    if sigma.shape != (batch_size,):
        raise ValueError(f"sigma must be a scalar or shape ({batch_size},), got {tuple(sigma.shape)}")
    return sigma.to(dtype)


def guidance_tensor(model, guidance: float | None, batch_size: int, device) -> torch.Tensor | None:
    """The distilled-guidance input (B,) float32 for a transformer with ``guidance_embeds`` (FLUX.1-dev):
    ``guidance`` (None: :data:`DEFAULT_GUIDANCE`), as ``FluxPipeline``; None for one without (FLUX.1-schnell)."""
    if not getattr(unwrap(model).config, "guidance_embeds", False):
        return None
    value = DEFAULT_GUIDANCE if guidance is None else float(guidance)
    return torch.full((batch_size,), value, device=device, dtype=torch.float32)


def predict_velocity(model, x_t: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, guidance: float | None = None,
                     timestep_mode: str = "float") -> torch.Tensor:
    """v (B, C, h, w) of ``model`` at spatial latents ``x_t`` (B, C, h, w) and noise level ``sigma`` (B,) or scalar.

    ``model``: the FLUX transformer (any active LoRA adapter, DDP / compile wrappers allowed) or a
    :class:`u_nft.fast_policy.MergedOldPolicy` of it. ``cond``: ``{"prompt_embeds": (B, T, D), "pooled":
    (B, P)}`` (:func:`encode_prompts`). The call is ``FluxPipeline``'s: packed tokens, timestep sigma,
    the guidance tensor (:func:`guidance_tensor`), text / image ids; the output is unpacked to (B, C, h, w)
    in the transformer's dtype. v = d x / d sigma (= eps - x0 for the true flow), as SD3.
    """
    batch, _, height, width = _check_spatial(x_t)
    embeds, pooled = cond["prompt_embeds"], cond["pooled"]
    if embeds.shape[0] != batch or pooled.shape[0] != batch:
        raise ValueError(f"batch mismatch: x_t {batch}, prompt_embeds {embeds.shape[0]}, pooled {pooled.shape[0]}")
    device = x_t.device
    output = model(
        hidden_states=pack_latents(x_t),
        timestep=transformer_timestep(sigma, batch, timestep_mode, x_t.dtype).to(device),
        guidance=guidance_tensor(model, guidance, batch, device),
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids(embeds.shape[1], device),
        img_ids=latent_image_ids(height, width, device),
        return_dict=False,
    )[0]
    return unpack_latents(output, height, width)


# ---- text and VAE --------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(pipeline, prompts: Sequence[str], max_sequence_length: int = 512, device=None) -> Conditioning:
    """``{"prompt_embeds": (B, max_sequence_length, D_T5), "pooled": (B, D_CLIP)}`` from the pipeline's own
    ``encode_prompt`` (CLIP-L pooled output, T5 last hidden states padded to ``max_sequence_length``)."""
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    embeds, pooled, _ = pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                               max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "pooled": pooled}


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, 8h, 8w) float32 in [0, 1] from FLUX latents (B, 16, h, w): x = z / scaling_factor +
    shift_factor (FLUX.1: 0.3611, 0.1159), image = clamp(D(x) / 2 + 1/2, 0, 1), as ``FluxPipeline``."""
    z = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    decoded = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def load_flux_pipeline(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"):
    """``FluxPipeline.from_pretrained(model)`` (a hub id such as ``black-forest-labs/FLUX.1-dev`` or a local
    pipeline directory) in ``dtype`` with the VAE in float32, every component frozen, on ``device``."""
    from diffusers import FluxPipeline

    from u_nft.tiny_sd3 import HUB_ID, _dtype_keyword

    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"config.pretrained.model={text!r} is a local path but not a diffusers pipeline directory "
                f"(no model_index.json); give a hub id such as {DEFAULT_HUB_ID!r} or a FluxPipeline folder "
                "written by save_pretrained (u_nft.tiny_flux.build_tiny_flux_pipeline builds a tiny one)")
        source = str(path)
    elif HUB_ID.match(text):
        source = text
    else:
        raise FileNotFoundError(f"config.pretrained.model={text!r} looks like a local path but does not exist; give "
                                f"an existing pipeline directory or a hub id such as {DEFAULT_HUB_ID!r}")
    pipeline = FluxPipeline.from_pretrained(source, **{_dtype_keyword(): dtype})
    pipeline.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        component = getattr(pipeline, name, None)
        if component is not None:
            component.requires_grad_(False)
    pipeline.vae.to(dtype=torch.float32)
    return pipeline.to(device)


# ---- the family object ---------------------------------------------------------------------------------

class FluxFamily(ModelFamily):
    """FLUX.1 behind the model-family seam (u_nft/models/base.py); one instance, :data:`FAMILY`."""

    name = "flux"
    pipeline_class = PIPELINE_CLASS
    default_lora_targets = DEFAULT_LORA_TARGETS
    supports_cfg = False  # FLUX.1-dev is guidance-distilled: the guidance value is an input, CFG is not used
    default_guidance = DEFAULT_GUIDANCE

    def load_pipeline(self, model, dtype=torch.float32, device="cpu"):
        return load_flux_pipeline(model, dtype, device)

    def build_tiny(self, directory, seed: int = 0, overwrite: bool = False) -> Path:
        from u_nft.tiny_flux import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline(directory, seed=seed, overwrite=overwrite)

    def encode_prompts(self, pipeline, prompts, max_sequence_length: int, device=None) -> Conditioning:
        return encode_prompts(pipeline, prompts, max_sequence_length, device)

    def negative_conditioning(self, pipeline, max_sequence_length: int, device=None) -> Conditioning:
        """The empty prompt's conditioning, batch 1 (FLUX.1-dev trains and samples without CFG; kept for the seam)."""
        return encode_prompts(pipeline, [""], max_sequence_length, device)

    def latent_shape(self, pipeline, resolution: int) -> tuple[int, int, int]:
        """(16, H/8, H/8) for a square ``resolution`` H, a multiple of 16 (VAE factor 8 x 2x2 packing)."""
        factor = pipeline.vae_scale_factor * 2
        if resolution < factor or resolution % factor:
            raise ValueError(f"config.sample.resolution={resolution} must be a multiple of {factor} for FLUX "
                             f"(VAE factor {pipeline.vae_scale_factor} x 2x2 token packing)")
        side = resolution // pipeline.vae_scale_factor
        return unwrap(pipeline.transformer).config.in_channels // 4, side, side

    def sigmas(self, pipeline, num_steps: int, resolution: int) -> torch.Tensor:
        """:func:`flux_sigmas` for the token count (H/16)^2 of a square ``resolution`` H, with the pipeline
        scheduler's shift settings."""
        _, height, width = self.latent_shape(pipeline, resolution)
        return flux_sigmas(num_steps, (height // 2) * (width // 2), pipeline.scheduler.config)

    def predict_velocity(self, model, x_t, sigma, cond, guidance=None, timestep_mode="float"):
        return predict_velocity(model, x_t, sigma, cond, guidance, timestep_mode)

    def decode(self, vae, latents):
        return decode_latents(vae, latents)


FAMILY = FluxFamily()
