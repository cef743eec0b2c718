"""The model-family seam: what differs between text-to-image flow families, behind one small interface.

The training loop (rollouts, the dense loss, normalization, solvers, scorers, EMA / old policy, LoRA
export, checkpointing) is family-agnostic. It sees

* latents in one canonical SPATIAL layout, x0 / x_t / v of shape (B, C, h, w), with
  x_t = (1 - sigma) x0 + sigma eps and v = d x_t / d sigma = eps - x0 for every family (any packing into
  tokens, positional ids and 5-D video-VAE layouts live inside the family's adapter);
* prompt conditioning as a :data:`Conditioning`: a dict of batch-first tensors whose keys are the
  family's own (SD3: ``prompt_embeds`` (B, T, D), ``pooled`` (B, P)), so the loop concatenates,
  indexes and casts it with :func:`cat_conditioning`, :func:`index_conditioning` and
  :func:`conditioning_to` without knowing the keys.

A family is one :class:`ModelFamily` instance per module (``u_nft/models/sd3.py`` ...), found from the
pipeline folder's ``model_index.json`` by :func:`u_nft.models.family_for`.
"""
from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Sequence

import torch

Conditioning = dict[str, torch.Tensor]  # family-specific keys; every tensor batch-first (B, ...)


# ---- Conditioning: generic batch operations ------------------------------------------------------------

def conditioning_batch_size(cond: Conditioning) -> int:
    """The common batch size B of every tensor of ``cond``; ValueError naming the keys if they disagree."""
    if not cond:
        raise ValueError("empty conditioning: a family's encode_prompts must return at least one tensor")
    sizes = {key: int(value.shape[0]) for key, value in cond.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"conditioning tensors disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def cat_conditioning(conds: Sequence[Conditioning]) -> Conditioning:
    """Concatenate along the batch: key -> torch.cat([c[key] for c in conds]). All must have the same keys."""
    conds = list(conds)
    if not conds:
        raise ValueError("cat_conditioning needs at least one conditioning")
    keys = list(conds[0])
    for i, cond in enumerate(conds[1:], 1):
        if list(cond) != keys:
            raise ValueError(f"conditioning {i} has keys {sorted(cond)}, conditioning 0 has {sorted(keys)}")
    return {key: torch.cat([cond[key] for cond in conds]) for key in keys}


def index_conditioning(cond: Conditioning, index) -> Conditioning:
    """Rows ``index`` (an int list / tensor / slice) of every tensor: key -> cond[key][index]."""
    if isinstance(index, torch.Tensor):
        index = index.to(next(iter(cond.values())).device) if cond else index
    return {key: value[index] for key, value in cond.items()}


def conditioning_to(cond: Conditioning, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Conditioning:
    """Move to ``device`` and cast the FLOATING tensors to ``dtype`` (masks and ids keep their dtype)."""
    out = {}
    for key, value in cond.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.to(device) if device is not None else value
    return out


def expand_conditioning(cond: Conditioning, batch_size: int) -> Conditioning:
    """A batch-1 conditioning (e.g. the empty prompt for CFG) broadcast to ``batch_size`` rows (a view)."""
    if conditioning_batch_size(cond) != 1:
        raise ValueError(f"expand_conditioning needs batch 1, got {conditioning_batch_size(cond)}")
    return {key: value.expand(batch_size, *value.shape[1:]) for key, value in cond.items()}


# ---- the interface ------------------------------------------------------------------------------------

class ModelFamily(abc.ABC):
    """One text-to-image flow family (SD3 / FLUX.1 / Qwen-Image): everything the loop must not know.

    Attributes: ``name`` (``"sd3"``...), ``pipeline_class`` (the ``_class_name`` in ``model_index.json``),
    ``default_lora_targets`` (used when ``config.lora.target_modules`` is empty), ``supports_cfg``
    (False for guidance-distilled models: classifier-free guidance scales must be 1).
    """

    name: str
    pipeline_class: str
    default_lora_targets: tuple[str, ...]
    supports_cfg: bool = True

    def __repr__(self) -> str:
        return f"<model family {self.name!r} ({self.pipeline_class})>"

    # setup
    @abc.abstractmethod
    def load_pipeline(self, model: str | os.PathLike, dtype: torch.dtype, device: torch.device | str):
        """The diffusers pipeline of ``model`` (hub id or folder) on ``device``: transformer and text encoders
        in ``dtype``, the VAE in float32 (decoding in fp32, as upstream); VAE and text encoders frozen."""

    @abc.abstractmethod
    def build_tiny(self, directory: str | os.PathLike, seed: int = 0, overwrite: bool = False) -> Path:
        """Build (offline, idempotent, atomic) this family's tiny random-weight pipeline at ``directory``."""

    # text
    @abc.abstractmethod
    def encode_prompts(self, pipeline, prompts: Sequence[str], max_sequence_length: int,
                       device: torch.device | str | None) -> Conditioning:
        """Conditioning of ``prompts`` (batch len(prompts)); every batch padded to the same lengths."""

    @abc.abstractmethod
    def negative_conditioning(self, pipeline, max_sequence_length: int,
                              device: torch.device | str | None) -> Conditioning:
        """The empty prompt's conditioning, batch 1, for classifier-free guidance."""

    # latents and schedule
    @abc.abstractmethod
    def latent_shape(self, pipeline, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the spatial latents of a square ``resolution``-pixel image; ValueError naming the
        resolution and the multiple it must be."""

    @abc.abstractmethod
    def sigmas(self, pipeline, num_steps: int, resolution: int) -> torch.Tensor:
        """The sampling schedule, float32 (num_steps + 1,), decreasing from about 1 to 0 (the family's shift)."""

    # the transformer
    @abc.abstractmethod
    def predict_velocity(self, model, x_t: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                         guidance: float | None = None, timestep_mode: str = "float") -> torch.Tensor:
        """v (B, C, h, w) at x_t (B, C, h, w), noise level sigma (B,) in [0, 1], convention v = eps - x0.

        ``model``: the transformer (whatever adapter is active) or a merged old-policy copy (called with
        the same keyword arguments). ``guidance``: the distilled guidance value of guidance-distilled
        models (ignored by the others). ``timestep_mode``: ``"float"`` (the diffusers pipeline's and
        training's timestep) or ``"long"`` (the rollout sampler's; SD3: truncated sigma * 1000 as upstream
        DiffusionNFT's sampler; a family without integer timesteps treats it as ``"float"``).
        """

    @abc.abstractmethod
    def decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [0, 1] from spatial latents (B, C, h, w)."""

    # derived, shared by every family (a family overrides them only when it differs)
    def combine_guidance(self, v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance v = v_uncond + g (v_cond - v_uncond) (Ho & Salimans 2022); shapes (B, C, h, w).
        A family whose pipeline combines differently (e.g. Qwen-Image's norm rescaling) overrides this."""
        return v_uncond + guidance_scale * (v_cond - v_uncond)

    def lora_targets(self, configured: Sequence[str]) -> tuple[str, ...]:
        """``config.lora.target_modules`` if given, else this family's default."""
        return tuple(configured) if configured else tuple(self.default_lora_targets)

    def check_guidance_scale(self, guidance_scale: float, key: str) -> None:
        """ValueError naming ``key`` when CFG is asked of a family that has none (guidance-distilled)."""
        if guidance_scale != 1.0 and not self.supports_cfg:
            raise ValueError(
                f"{key}={guidance_scale}: {self.pipeline_class} is guidance-distilled and has no classifier-free "
                "guidance; set it to 1.0 (the distilled guidance value is config.sample.distilled_guidance)"
            )
