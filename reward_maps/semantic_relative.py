"""Semantic-relative reward map: SRPO's positive-minus-negative control phrases, made dense.

SRPO (Shen et al., "Directly Aligning the Full Diffusion Trajectory with Fine-Grained Human Preference",
arXiv 2509.06942, eqs. 8-9) scores the same image against two texts built around
the prompt p, a positive control phrase ("realistic photo", p) and a negative one ("CG render", p), and
uses the difference

    r_SRP(x) = RM(x, p_pos) - RM(x, p_neg) = f_img(x)^T (C_pos - C_neg)        (for a CLIP-like RM)

Whatever the reward model likes about an image regardless of the control phrase (its colour or
saturation biases) enters both terms equally and cancels; only the semantic difference between the
phrases is rewarded. SRPO's SGP-HPS metric is this difference with HPS v2.1.

Here, with a CLIP-family model (:mod:`reward_maps.clip_family`, preset ``base``):

    scores = s(global image embedding, p_pos) - s(global image embedding, p_neg)
    maps   = s(patch embedding, p_pos) - s(patch embedding, p_neg)   (map_method="value_path" or "maskclip")

with s the preset's score units (PickScore: logit_scale.exp() * cos / 26; CLIPScore: ... / 100; HPS: cos).
``map_method="grad_x_input"`` and ``"occlusion"`` attribute the same scalar difference instead. Swapping the
two phrases negates maps and scores exactly; equal phrases give 0 everywhere. ``value_range`` of the
patch-text map is ``(-2 s_max, 2 s_max)``.

Templates contain ``{prompt}``; SRPO prepends the control words, hence the defaults
``"realistic photo, {prompt}"`` and ``"CG render, {prompt}"``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from reward_maps.base import register
from reward_maps.clip_family import ClipMapScorer, build_clip_map_scorer

__all__ = ["DEFAULT_POSITIVE", "DEFAULT_NEGATIVE", "semantic_relative_map"]

DEFAULT_POSITIVE = "realistic photo, {prompt}"
DEFAULT_NEGATIVE = "CG render, {prompt}"


@register("semantic_relative_map")
def semantic_relative_map(device: str = "cpu", dtype: torch.dtype = torch.float32, *, base: str = "pickscore",
                          model: str | None = None, processor: str | None = None,
                          positive: str = DEFAULT_POSITIVE, negative: str = DEFAULT_NEGATIVE,
                          map_method: str = "value_path", map_size: int | Sequence[int] | None = None,
                          outside_crop: str = "global", occlusion_fill: str | float = "mean",
                          occlusion_batch: int = 16) -> ClipMapScorer:
    """SRPO semantic-relative map with a CLIP-family model.

    base: "pickscore" (default; PickScore_v1 from the hub), "clipscore" or "hps" (a converted HPS v2.1
    directory as ``model``, SRPO's choice); model/processor: override the preset's hub ids or directories;
    positive/negative: templates containing ``{prompt}``; the rest as in :mod:`reward_maps.clip_family`.
    """
    return build_clip_map_scorer("semantic_relative_map", base, device=device, dtype=dtype, model=model,
                                 processor=processor, texts=((positive, 1.0), (negative, -1.0)),
                                 map_method=map_method, map_size=map_size, outside_crop=outside_crop,
                                 occlusion_fill=occlusion_fill, occlusion_batch=occlusion_batch)
