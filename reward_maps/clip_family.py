"""PickScore / CLIPScore / HPS-style reward maps from one transformers ``CLIPModel``.

Scalars, exactly as upstream (docs/upstream_facts.md §C; flow_grpo ``pickscore_scorer.py`` / ``clip_scorer.py``):

    pickscore_map   model yuvalkirstain/PickScore_v1, processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K
                    score = logit_scale.exp() * cos(text, image) / 26          (flow_grpo / DiffusionNFT)
    clipscore_map   model = processor = openai/clip-vit-large-patch14
                    score = logits_per_image.diag() / 100 = logit_scale.exp() * cos / 100   (~ cos)
    hps_map         HPS v2.1 weights converted to a transformers CLIPModel directory (see below)
                    score = cos(text, image)                                      (HPSv2 ``score.py``)

cos is the cosine of the projected text (EOS token) and image (CLS token) embeddings.

Image preprocessing runs on tensors, in torch, so gradients reach the pixels (no PIL, no torchvision):

    "shortest" (CLIPProcessor; PickScore): resize the shortest side to ``size`` (the long side to
        ``int(size * long / short)``, as transformers does), bicubic with antialiasing, centre crop
        ``crop`` (offset ``(new - crop) // 2``), OpenAI mean/std.
    CLIPScore (flow_grpo ``clip_scorer.py``, torchvision 0.21): the same geometry with torchvision's
        ``Resize(224)`` on the float tensor, i.e. bilinear with antialias=True (torchvision's default for
        tensors since 0.17; 0.15/0.16 defaulted to no antialias on tensors), no clipping or uint8 rounding,
        then ``CenterCrop`` (offset ``int(round((new - crop) / 2))``) and the processor's mean/std.
    "longest" (open_clip ``ResizeMaxSize``; HPS v2.1): resize the longest side to ``size`` (the other to
        ``round(size * side / longest)``), bicubic with antialiasing, pad to a square with 0 (black;
        ``pad // 2`` before, the rest after), then OpenAI mean/std. Unlike open_clip, an image whose longest
        side already equals ``size`` is padded too (open_clip would hand the model a non-square input).

Resized pixels are clamped to [0, 1] as PIL's uint8 output is. tests/test_clip_maps.py measures the
distance to the CLIPProcessor/PIL path (which also quantises to uint8).

Text: ``padding="max_length", max_length=77, truncation=True``. CLIP's causal text tower pools the EOS
token, so padding to 77 instead of upstream's ``padding=True`` (longest) gives the same embedding.

Dense maps, option ``map_method``:

    "value_path"   (default; one forward) ClearCLIP-like (Lan et al., ECCV 2024 drop the residual and the
                   feed-forward of the last block): the last vision block's value path for the patch tokens,
                   ``out_proj(v_proj(layer_norm1(h)))`` with no q/k mixing, residual or MLP, then
                   ``post_layernorm`` and ``visual_projection``; its cosine with the text embedding, in the
                   same units as the scalar (``logit_scale.exp() * cos / 26`` for PickScore), so
                   ``value_range`` is the scalar's range ``(-s, s)``. Group normalisation later removes any
                   positive affine map, so no sigmoid is applied. (Called "patch_text" before; that name
                   is rejected with a pointer here.)
    "maskclip"     (one forward) MaskCLIP (Zhou et al., ECCV 2022): the last block with its q/k attention
                   replaced by the value path (each token attends to itself only) but keeping the residual
                   and the MLP: ``h' = h + out_proj(v_proj(layer_norm1(h)))``, ``h'' = h' + mlp(layer_norm2(h'))``,
                   then ``post_layernorm`` and ``visual_projection``; same units and range as "value_path".
                   docs/clip_maps.md compares how the two localise.
    "grad_x_input" (one backward) ``sum_c x * d score / d x`` per pixel (baseline: black image), summed over
                   the pixels of each map cell (so the cells add up to the first-order Taylor attribution
                   ``sum x * grad``); signed, unbounded (value_range None). Pixels the crop drops get 0,
                   their exact attribution.
    "occlusion"    :class:`reward_maps.occlusion.OcclusionMap` of the scalar on a grid of ``map_size``
                   cells; unbounded (value_range None).

The map lives in the full image frame on a grid of ``map_size`` cells (default: one cell per vision
patch, extended to the image's aspect ratio; a square image gets exactly the patch grid). For
the patch methods each cell takes the patch under its centre. Cells whose centre falls outside the centre
crop (non-square images, "shortest" mode) were never seen by the scorer: ``outside_crop="global"``
(default) gives them the image's scalar score, so after group normalisation they carry the scalar
DiffusionNFT signal; ``"edge"`` repeats the nearest patch.

Every scorer also has ``score_cells(images, prompts, metadata, cells)``: occlusion deltas of the scalar
at the requested flat cells of the ``map_size`` grid, for Monte Carlo location sampling.

HPS v2.1 as a transformers directory. HPS v2.1 is open_clip ViT-H-14 with the state dict
``HPS_v2.1_compressed.pt``. Convert it once with :func:`convert_open_clip_state_dict`: take the config and
tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the same architecture), build a ``CLIPModel``
from that config, load the converted state dict (strict), ``save_pretrained`` model and tokenizer into
one directory, and pass that directory as ``model`` to ``hps_map``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from reward_maps.base import RewardMapError, RewardOutput, check_images, register
from reward_maps.occlusion import OcclusionMap, cell_edges, check_fill, parse_grid

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "MAP_METHODS",
    "Preprocess",
    "Placement",
    "placement",
    "preprocess_images",
    "encode_text",
    "encode_image",
    "default_map_size",
    "patch_map_to_frame",
    "cell_sum",
    "convert_open_clip_state_dict",
    "ClipMapScorer",
    "build_clip_map_scorer",
    "pickscore_map",
    "clipscore_map",
    "hps_map",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_PATHS = ("value_path", "maskclip")  # map methods that read the patch tokens (one forward)
MAP_METHODS = (*PATCH_PATHS, "grad_x_input", "occlusion")
RENAMED_MAP_METHODS = {"patch_text": "value_path"}  # old name -> new name (the map itself is unchanged)
OUTSIDE_CROP = ("global", "edge")
TEXT_MAX_LENGTH = 77
_PIL_TO_TORCH_MODE = {3: "bicubic", 2: "bilinear"}  # PIL resample codes the tensor path reproduces

# name -> (default model, default processor (None: the model dir), resize mode, divisor of logit*cos;
# None: the upstream score is the bare cosine)
PRESETS: dict[str, dict[str, Any]] = {
    "pickscore": dict(model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                      resize="shortest", divisor=26.0),
    # flow_grpo clip_scorer.py: torchvision Resize(224) (bilinear, antialias) + CenterCrop + Normalize on
    # float tensors, whatever the processor's resample says.
    "clipscore": dict(model="openai/clip-vit-large-patch14", processor=None, resize="shortest", divisor=100.0,
                      transform="torchvision"),
    "hps": dict(model=None, processor=None, resize="longest", divisor=None),
}


# ----------------------------------------------------------------------------------------------------
# Geometry and preprocessing


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Tensor preprocessing of one scorer.

    resize: "shortest" (resize shortest side to ``size``, centre crop) or "longest" (resize longest side
    to ``size``, zero pad); crop: model input (h, w); interpolation: torch mode ("bicubic" | "bilinear");
    mean, std: per-channel normalisation; clamp: clip resized pixels to [0, 1] (PIL's uint8 output does);
    crop_offset: "floor" (transformers ``(new - crop) // 2``) or "round" (torchvision ``CenterCrop``:
    ``int(round((new - crop) / 2))``, Python's round-half-to-even).
    """

    resize: str
    size: int
    crop: tuple[int, int]
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    clamp: bool = True
    crop_offset: str = "floor"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an H x W image lands in the model input.

    The image is resized to (new_h, new_w); the model input window starts at (top, left) of the resized
    image (negative = zero padding before it). Model coordinate of image point (y, x), in pixels:
    ``y * new_h / H - top``, ``x * new_w / W - left``.
    """

    new_h: int
    new_w: int
    top: int
    left: int


def placement(height: int, width: int, prep: Preprocess) -> Placement:
    """Resized size and crop / pad offsets of an image, following the upstream processors' integer rules."""
    crop_h, crop_w = prep.crop
    if prep.resize == "shortest":
        short, long = min(height, width), max(height, width)
        new_long = int(prep.size * long / short)  # transformers get_resize_output_image_size truncates
        new_h, new_w = (prep.size, new_long) if height <= width else (new_long, prep.size)
        if new_h < crop_h or new_w < crop_w:
            raise RewardMapError(f"preprocess: resized image {new_h}x{new_w} is smaller than the crop {crop_h}x{crop_w}")
        if prep.crop_offset == "round":  # torchvision CenterCrop
            return Placement(new_h, new_w, int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0)))
        return Placement(new_h, new_w, (new_h - crop_h) // 2, (new_w - crop_w) // 2)
    if prep.resize == "longest":
        scale = prep.size / max(height, width)
        new_h, new_w = round(height * scale), round(width * scale)  # open_clip ResizeMaxSize rounds
        return Placement(new_h, new_w, -((crop_h - new_h) // 2), -((crop_w - new_w) // 2))
    raise RewardMapError(f"preprocess: resize must be 'shortest' or 'longest', got {prep.resize!r}")


def preprocess_images(images: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised model input (B, 3, crop_h, crop_w), differentiable."""
    H, W = images.shape[-2:]
    pl = placement(H, W, prep)
    crop_h, crop_w = prep.crop
    x = images.float()
    if (pl.new_h, pl.new_w) != (H, W):
        x = F.interpolate(x, size=(pl.new_h, pl.new_w), mode=prep.interpolation, align_corners=False, antialias=True)
        if prep.clamp:
            x = x.clamp(0.0, 1.0)  # PIL resizes to uint8, which clips the bicubic overshoot
    if pl.top >= 0 and pl.left >= 0:
        x = x[..., pl.top:pl.top + crop_h, pl.left:pl.left + crop_w]
    else:
        pad_top, pad_left = -pl.top, -pl.left
        x = F.pad(x, (pad_left, crop_w - pl.new_w - pad_left, pad_top, crop_h - pl.new_h - pad_top), value=0.0)
    mean = torch.tensor(prep.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def default_map_size(height: int, width: int, prep: Preprocess, patch_grid: tuple[int, int]) -> tuple[int, int]:
    """One map cell per vision patch, in the image frame: (round(H / p), round(W / p)), p = patch side in image px.

    A square image gets exactly ``patch_grid``.
    """
    pl = placement(height, width, prep)
    patch_px = prep.crop[0] / patch_grid[0] * height / pl.new_h  # one patch, in original image pixels
    return max(1, round(height / patch_px)), max(1, round(width / patch_px))


def patch_map_to_frame(patch_map: torch.Tensor, height: int, width: int, prep: Preprocess,
                       map_size: tuple[int, int], outside_crop: str, outside_value: torch.Tensor) -> torch.Tensor:
    """Patch grid (B, gh, gw) over the model input -> map (B, h, w) over the H x W image.

    Each map cell takes the patch under its centre. Cells whose centre is outside the model input window
    get ``outside_value`` (B,) for ``outside_crop="global"``, the nearest patch for ``"edge"``.
    """
    pl = placement(height, width, prep)
    gh, gw = patch_map.shape[-2:]
    crop_h, crop_w = prep.crop
    device = patch_map.device
    h, w = map_size
    model_y = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) * height / h * (pl.new_h / height) - pl.top
    model_x = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) * width / w * (pl.new_w / width) - pl.left
    rows = torch.floor(model_y * gh / crop_h).long().clamp(0, gh - 1)
    cols = torch.floor(model_x * gw / crop_w).long().clamp(0, gw - 1)
    out = patch_map[:, rows][:, :, cols]
    if outside_crop == "global":
        inside = ((model_y >= 0) & (model_y < crop_h))[:, None] & ((model_x >= 0) & (model_x < crop_w))[None, :]
        out = torch.where(inside, out, outside_value.to(out.dtype).view(-1, 1, 1))
    return out


def cell_sum(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Sum of (B, H, W) values over each cell of a (gh, gw) grid (edges: :func:`cell_edges`) -> (B, gh, gw)."""
    H, W = values.shape[-2:]

    def assignment(size: int, parts: int) -> torch.Tensor:
        edges = cell_edges(size, parts)
        index = torch.bucketize(torch.arange(size), torch.tensor(edges[1:]), right=True)
        return F.one_hot(index, parts).to(values.dtype).to(values.device)  # (size, parts)

    return torch.einsum("bhw,hi,wj->bij", values, assignment(H, grid[0]), assignment(W, grid[1]))


# ----------------------------------------------------------------------------------------------------
# Model passes


def _pooled(output: Any) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output is the projected feature; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _run_encoder_layer(layer: Any, hidden: torch.Tensor) -> torch.Tensor:
    """One unmasked ``CLIPEncoderLayer`` pass (B, T, C) -> (B, T, C) on every supported transformers.

    transformers 4.x's layer takes ``(hidden, attention_mask, causal_attention_mask)`` and returns a
    tuple; 5.x dropped ``causal_attention_mask`` and returns the tensor.
    """
    import inspect

    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:
        out = layer(hidden, None, None)
    else:
        out = layer(hidden, None)
    return out[0] if isinstance(out, tuple) else out


def encode_text(model: Any, tokenizer: Any, texts: list[str], device: torch.device | str) -> torch.Tensor:
    """Projected text embeddings (N, D), not normalised: padding to 77 tokens with truncation."""
    tokens = tokenizer(texts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt")
    return _pooled(model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                           attention_mask=tokens["attention_mask"].to(device)))


def encode_image(model: Any, pixel_values: torch.Tensor, patch_path: str = "value_path"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One vision pass -> (global (B, D), patch embeddings (B, gh, gw, D)); neither normalised.

    global  = visual_projection(post_layernorm(CLS of the last block))  == ``get_image_features``.
    For the patch tokens h entering the last block, with a = out_proj(v_proj(layer_norm1(h))) (the
    attention output when every token attends only to itself):
      "value_path" (ClearCLIP-like)  patches = visual_projection(post_layernorm(a))  (no residual, no MLP)
      "maskclip"   (MaskCLIP)        h' = h + a;  patches = visual_projection(post_layernorm(h' + mlp(layer_norm2(h'))))
    """
    if patch_path not in PATCH_PATHS:
        raise RewardMapError(f"encode_image: patch_path must be one of {PATCH_PATHS}, got {patch_path!r}")
    vision = model.vision_model
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    *body, last = vision.encoder.layers
    for layer in body:
        hidden = _run_encoder_layer(layer, hidden)
    cls = _run_encoder_layer(last, hidden)[:, 0]
    global_embedding = model.visual_projection(vision.post_layernorm(cls))
    attention = last.self_attn
    values = attention.out_proj(attention.v_proj(last.layer_norm1(hidden[:, 1:])))
    if patch_path == "maskclip":
        values = hidden[:, 1:] + values
        values = values + last.mlp(last.layer_norm2(values))
    patches = model.visual_projection(vision.post_layernorm(values))
    config = model.config.vision_config
    gh, gw = pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size
    return global_embedding, patches.reshape(patches.shape[0], gh, gw, -1)


def convert_open_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ViT CLIP state dict (e.g. HPS_v2.1_compressed.pt) -> transformers ``CLIPModel`` keys.

    open_clip keeps fused q/k/v (``attn.in_proj_weight``, rows q, k, v) and projections as (width, out)
    matrices applied as ``x @ proj``; transformers has separate q/k/v Linear layers and Linear
    projections (``weight = proj.T``). A ``module.`` prefix (DDP checkpoints) is stripped.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    towers = (("visual.transformer.resblocks.", "vision_model.encoder.layers."),
              ("transformer.resblocks.", "text_model.encoder.layers."))
    block_parts = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
    direct = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale",
    }
    for key, value in sd.items():
        if key in direct:
            out[direct[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # open_clip's causal mask buffer; transformers builds its own
        else:
            for prefix, target in towers:
                if not key.startswith(prefix):
                    continue
                index, _, rest = key[len(prefix):].partition(".")
                base = f"{target}{index}."
                if rest.startswith("attn.in_proj_"):
                    kind = rest.rsplit("_", 1)[-1]  # "weight" | "bias"
                    for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                        out[f"{base}self_attn.{name}.{kind}"] = chunk.contiguous()
                else:
                    part, _, kind = rest.rpartition(".")
                    if part not in block_parts:
                        raise RewardMapError(f"convert_open_clip_state_dict: unknown block parameter {key!r}")
                    out[f"{base}{block_parts[part]}.{kind}"] = value
                break
            else:
                raise RewardMapError(f"convert_open_clip_state_dict: unknown parameter {key!r} (ViT open_clip models only)")
    return out


# ----------------------------------------------------------------------------------------------------
# The scorer


def _format_text(template: str, prompt: str) -> str:
    # str.replace, not str.format: prompts may contain braces.
    return template.replace("{prompt}", prompt)


class ClipMapScorer:
    """A CLIP-family reward-map scorer (see the module docstring for formulas and options).

    texts: (template, weight) pairs; the score is ``sum_j weight_j * score(image, template_j(prompt))``
    with ``score = logit_scale.exp() * cos / divisor`` (or the bare cosine when divisor is None).
    One text ``("{prompt}", 1.0)`` is the upstream scorer; two with weights +1/-1 are SRPO's
    semantic-relative reward (:mod:`reward_maps.semantic_relative`).
    """

    TEXT_CACHE_SIZE = 4096

    def __init__(self, name: str, model: Any, tokenizer: Any, prep: Preprocess, divisor: float | None,
                 texts: Sequence[tuple[str, float]], map_method: str, map_size: tuple[int, int] | None,
                 outside_crop: str, occlusion_fill: str | float, occlusion_batch: int, device: str, dtype: torch.dtype):
        self.name, self.model, self.tokenizer, self.prep = name, model, tokenizer, prep
        self.divisor = divisor
        self.texts = tuple((str(t), float(w)) for t, w in texts)
        self.map_method, self.map_size, self.outside_crop = map_method, map_size, outside_crop
        self.occlusion_fill, self.occlusion_batch = occlusion_fill, occlusion_batch
        self.device, self.dtype = torch.device(device), dtype
        config = model.config.vision_config
        self.patch_grid = (config.image_size // config.patch_size, config.image_size // config.patch_size)
        self._text_cache: dict[str, torch.Tensor] = {}

    # -- units
    def _cos_to_score(self, cos: torch.Tensor) -> torch.Tensor:
        if self.divisor is None:
            return cos
        return self.model.logit_scale.exp() * cos / self.divisor  # flow_grpo: (logit_scale * cos) / 26

    @property
    def value_bound(self) -> float:
        """Largest |map| of the patch methods: sum_j |w_j| * (logit_scale.exp() / divisor, or 1)."""
        unit = 1.0 if self.divisor is None else float(self.model.logit_scale.exp()) / self.divisor
        return unit * sum(abs(w) for _, w in self.texts)

    # -- passes
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """(B, J, D) unit-norm embeddings of the J formatted texts of each prompt.

        Cached per prompt: occlusion re-scores the same prompt once per cell, and training sees each
        prompt K times per epoch.
        """
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            if len(self._text_cache) + len(missing) > self.TEXT_CACHE_SIZE:
                self._text_cache.clear()
            texts = [_format_text(t, p) for p in missing for t, _ in self.texts]
            with torch.no_grad():
                emb = F.normalize(encode_text(self.model, self.tokenizer, texts, self.device).float(), dim=-1)
            for prompt, e in zip(missing, emb.view(len(missing), len(self.texts), -1)):
                self._text_cache[prompt] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    def forward(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable in ``images``: (scores (B,), patch scores (B, gh, gw)) in score units."""
        text = self.text_embeddings(prompts)
        weights = torch.tensor([w for _, w in self.texts], device=self.device)
        pixels = preprocess_images(images.to(self.device), self.prep).to(self.dtype)
        patch_path = self.map_method if self.map_method in PATCH_PATHS else "value_path"
        global_embedding, patches = encode_image(self.model, pixels, patch_path)
        cos_global = torch.einsum("bd,bjd->bj", F.normalize(global_embedding.float(), dim=-1), text)
        cos_patch = torch.einsum("bhwd,bjd->bjhw", F.normalize(patches.float(), dim=-1), text)
        scores = torch.einsum("bj,j->b", self._cos_to_score(cos_global), weights)
        patch_scores = torch.einsum("bjhw,j->bhw", self._cos_to_score(cos_patch), weights)
        return scores, patch_scores

    def scalar(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        """The upstream scalar (B,) float32, no gradient."""
        with torch.no_grad():
            return self.forward(images, prompts)[0].float()

    def resolve_map_size(self, height: int, width: int) -> tuple[int, int]:
        if self.map_size is not None:
            return self.map_size
        return default_map_size(height, width, self.prep, self.patch_grid)

    def occlusion(self, height: int, width: int) -> OcclusionMap:
        return OcclusionMap(self.scalar, grid=self.resolve_map_size(height, width), fill=self.occlusion_fill,
                            batch=self.occlusion_batch, name=f"{self.name}[occlusion]")

    def score_cells(self, images: torch.Tensor, prompts: list[str], metadata: list | None,
                    cells: torch.Tensor) -> torch.Tensor:
        """Occlusion deltas (B, m) of the scalar at flat cells (B, m) of the ``map_size`` grid."""
        return self.occlusion(*images.shape[-2:]).score_cells(images, prompts, metadata, cells)

    def grad_x_input(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores (B,), per-pixel attribution sum_c x * d score / d x (B, H, W))."""
        x = images.detach().to(self.device).float().requires_grad_(True)
        with torch.enable_grad():
            scores, _ = self.forward(x, prompts)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        return scores.detach().float(), (grad * x.detach()).sum(dim=1)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> RewardOutput:
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        check_images(self.name, images, prompts, metadata)
        H, W = images.shape[-2:]
        size = self.resolve_map_size(H, W)
        if self.map_method in PATCH_PATHS:
            with torch.no_grad():
                scores, patch_scores = self.forward(images, prompts)
            maps = patch_map_to_frame(patch_scores, H, W, self.prep, size, self.outside_crop, scores)
            bound = self.value_bound
            value_range = (-bound, bound)
        elif self.map_method == "grad_x_input":
            scores, attribution = self.grad_x_input(images, prompts)
            maps, value_range = cell_sum(attribution, size), None
        else:
            out = self.occlusion(H, W)(images, prompts, metadata)
            scores, maps, value_range = out.scores, out.maps, None
        info = [{"score": float(scores[b]), "map_method": self.map_method,
                 "texts": [_format_text(t, prompts[b]) for t, _ in self.texts]} for b in range(len(prompts))]
        return RewardOutput(maps=maps.float().to(images.device), scores=scores.float().to(images.device),
                            info=info, value_range=value_range)


# ----------------------------------------------------------------------------------------------------
# Factories


def _check_options(name: str, map_method: str, map_size: Any, outside_crop: str, occlusion_fill: Any,
                   occlusion_batch: Any) -> tuple[int, int] | None:
    if map_method in RENAMED_MAP_METHODS:
        raise RewardMapError(f"reward scorer {name!r}: option map_method={map_method!r} was renamed "
                             f"{RENAMED_MAP_METHODS[map_method]!r} (a ClearCLIP-like value path, not MaskCLIP); "
                             f"choose from {MAP_METHODS}")
    if map_method not in MAP_METHODS:
        raise RewardMapError(f"reward scorer {name!r}: option map_method must be one of {MAP_METHODS}, got {map_method!r}")
    if outside_crop not in OUTSIDE_CROP:
        raise RewardMapError(f"reward scorer {name!r}: option outside_crop must be one of {OUTSIDE_CROP}, got {outside_crop!r}")
    check_fill(occlusion_fill, f"reward scorer {name!r}: option occlusion_fill")
    if isinstance(occlusion_batch, bool) or not isinstance(occlusion_batch, int) or occlusion_batch < 1:
        raise RewardMapError(f"reward scorer {name!r}: option occlusion_batch must be a positive int, got {occlusion_batch!r}")
    return None if map_size is None else parse_grid(map_size, f"reward scorer {name!r}: option map_size")


def _load_model(name: str, model: str, device: str, dtype: torch.dtype) -> Any:
    from transformers import CLIPModel

    try:
        loaded = CLIPModel.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise RewardMapError(f"reward scorer {name!r}: cannot load CLIPModel from option model={model!r}: {err}") from err
    return loaded.eval().requires_grad_(False).to(device=device, dtype=dtype)


def _load_preprocess(name: str, preset: str, processor: str, model: Any) -> tuple[Any, Preprocess]:
    """Tokenizer and tensor preprocessing; "shortest" presets read size/crop/mean/std from the processor."""
    vision = model.config.vision_config
    if PRESETS[preset]["resize"] == "longest":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(processor)
        except (OSError, ValueError) as err:
            raise RewardMapError(f"reward scorer {name!r}: cannot load a tokenizer from option processor={processor!r}: {err}") from err
        return tokenizer, Preprocess("longest", vision.image_size, (vision.image_size, vision.image_size))
    from transformers import CLIPProcessor

    try:
        loaded = CLIPProcessor.from_pretrained(processor)
    except (OSError, ValueError) as err:
        raise RewardMapError(f"reward scorer {name!r}: cannot load CLIPProcessor from option processor={processor!r}: {err}") from err
    ip = loaded.image_processor
    resample = int(ip.resample)
    if resample not in _PIL_TO_TORCH_MODE:
        raise RewardMapError(f"reward scorer {name!r}: processor {processor!r} resamples with PIL mode {resample}; "
                             f"supported: {sorted(_PIL_TO_TORCH_MODE)} (bilinear, bicubic)")
    crop = (int(ip.crop_size["height"]), int(ip.crop_size["width"])) if ip.do_center_crop else None
    if crop != (vision.image_size, vision.image_size):
        raise RewardMapError(f"reward scorer {name!r}: processor {processor!r} crops to {crop}, but the model expects "
                             f"{vision.image_size}x{vision.image_size} inputs")
    mean, std = tuple(float(m) for m in ip.image_mean), tuple(float(s) for s in ip.image_std)
    if PRESETS[preset].get("transform") == "torchvision":
        # torchvision 0.21 (flow_grpo's pin): Resize on a float tensor = bilinear with antialias=True
        # (the default since 0.17), no uint8 rounding or clipping; CenterCrop rounds the offset.
        prep = Preprocess("shortest", int(ip.size["shortest_edge"]), crop, "bilinear", mean, std,
                          clamp=False, crop_offset="round")
    else:
        prep = Preprocess("shortest", int(ip.size["shortest_edge"]), crop, _PIL_TO_TORCH_MODE[resample], mean, std)
    return loaded.tokenizer, prep


def build_clip_map_scorer(name: str, preset: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                          model: str | None = None, processor: str | None = None,
                          texts: Sequence[tuple[str, float]] = (("{prompt}", 1.0),), map_method: str = "value_path",
                          map_size: int | Sequence[int] | None = None, outside_crop: str = "global",
                          occlusion_fill: str | float = "mean", occlusion_batch: int = 16) -> ClipMapScorer:
    """Load model and processor once and build a :class:`ClipMapScorer` for ``preset`` in :data:`PRESETS`."""
    if preset not in PRESETS:
        raise RewardMapError(f"reward scorer {name!r}: unknown CLIP preset (option base) {preset!r}; choose from {sorted(PRESETS)}")
    size = _check_options(name, map_method, map_size, outside_crop, occlusion_fill, occlusion_batch)
    for template, _ in texts:
        if "{prompt}" not in template:
            raise RewardMapError(f"reward scorer {name!r}: text template {template!r} must contain '{{prompt}}'")
    model = model or PRESETS[preset]["model"]
    if model is None:
        raise RewardMapError(
            f"reward scorer {name!r}: option model is required: a transformers CLIPModel directory holding HPS v2.1 "
            "weights: python scripts/convert_hps_to_transformers.py --checkpoint HPS_v2.1_compressed.pt --out DIR"
        )
    processor = processor or PRESETS[preset]["processor"] or model
    clip = _load_model(name, model, device, dtype)
    tokenizer, prep = _load_preprocess(name, preset, processor, clip)
    return ClipMapScorer(name, clip, tokenizer, prep, PRESETS[preset]["divisor"], texts, map_method, size,
                         outside_crop, occlusion_fill, occlusion_batch, device, dtype)


@register("pickscore_map")
def pickscore_map(device: str = "cpu", dtype: torch.dtype = torch.float32, *,
                  model: str = PRESETS["pickscore"]["model"], processor: str = PRESETS["pickscore"]["processor"],
                  map_method: str = "value_path", map_size: int | Sequence[int] | None = None,
                  outside_crop: str = "global", occlusion_fill: str | float = "mean",
                  occlusion_batch: int = 16) -> ClipMapScorer:
    """PickScore_v1: score = logit_scale.exp() * cos / 26; model/processor: hub id or local directory."""
    return build_clip_map_scorer("pickscore_map", "pickscore", device=device, dtype=dtype, model=model,
                                 processor=processor, map_method=map_method, map_size=map_size,
                                 outside_crop=outside_crop, occlusion_fill=occlusion_fill,
                                 occlusion_batch=occlusion_batch)


@register("clipscore_map")
def clipscore_map(device: str = "cpu", dtype: torch.dtype = torch.float32, *,
                  model: str = PRESETS["clipscore"]["model"], processor: str | None = None,
                  map_method: str = "value_path", map_size: int | Sequence[int] | None = None,
                  outside_crop: str = "global", occlusion_fill: str | float = "mean",
                  occlusion_batch: int = 16) -> ClipMapScorer:
    """CLIPScore (flow_grpo): score = logit_scale.exp() * cos / 100; processor defaults to the model dir."""
    return build_clip_map_scorer("clipscore_map", "clipscore", device=device, dtype=dtype, model=model,
                                 processor=processor, map_method=map_method, map_size=map_size,
                                 outside_crop=outside_crop, occlusion_fill=occlusion_fill,
                                 occlusion_batch=occlusion_batch)


@register("hps_map")
def hps_map(device: str = "cpu", dtype: torch.dtype = torch.float32, *, model: str | None = None,
            processor: str | None = None, map_method: str = "value_path",
            map_size: int | Sequence[int] | None = None, outside_crop: str = "global",
            occlusion_fill: str | float = "mean", occlusion_batch: int = 16) -> ClipMapScorer:
    """HPS v2.1-style: score = cos; "longest" resize + zero pad; model = converted transformers directory."""
    return build_clip_map_scorer("hps_map", "hps", device=device, dtype=dtype, model=model, processor=processor,
                                 map_method=map_method, map_size=map_size, outside_crop=outside_crop,
                                 occlusion_fill=occlusion_fill, occlusion_batch=occlusion_batch)
