"""Mask helpers and mask-driven reward maps: soft masks, region colour/brightness, fixed mask files.

docs/theory.md §7: a binary mask can be used as r_map directly (values in {0, 1}, no
normalisation needed), and dilating or blurring it into a soft mask makes the signal more continuous.

Layouts. A layout is a list of regions; each region is a dict with exactly one of
    "box":  [x0, y0, x1, y1] in relative image coordinates (0..1, x to the right, y down), or
    "mask": path of a PNG (any mode; pixels >= 50% grey are inside), absolute or relative to option
            ``mask_root``,
and one target, "color": [r, g, b] in [0, 1] or "#rrggbb" (region_color_map), or "brightness": a
float in [0, 1] (region_brightness_map). Regions are composited in list order (later ones on top), so
overlaps take the later target. A layout comes from the factory option ``regions`` or, per prompt,
from ``metadata[metadata_key]`` (default key "regions"), which takes precedence.

Maps: inside region k the per-pixel reward is s_k(x) in [0, 1] (1 = on target); outside every region
it is ``neutral`` (default 0.5 = no signal, docs/contract.md property 4). With soft region weights w_k
(after ``dilate``/``blur_sigma``) compositing is the "over" operator:
    a <- w_k * s_k + (1 - w_k) * a,   c <- w_k + (1 - w_k) * c,   (a, c start at 0)
    map = a + (1 - c) * neutral,      score = sum(a) / sum(c)   (mean reward over region pixels)
which for hard masks is "later region wins; score = mean over region pixels".
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import torch

from reward_maps.base import RewardMapError, RewardOutput, check_images, register

__all__ = [
    "Region",
    "binary_to_soft",
    "parse_layout",
    "region_weights",
    "load_mask",
    "color_match",
    "brightness_match",
    "composite",
    "region_color_map",
    "region_brightness_map",
    "region_texture_map",
    "local_contrast",
    "texture_match",
    "mask_file_map",
]

# Rec. 601 luma weights, as in JFIF and PIL's convert("L").
LUMA = (0.299, 0.587, 0.114)


# Soft masks -------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    """(2r + 1,) normalised Gaussian with r = ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def binary_to_soft(mask: torch.Tensor, blur_sigma: float = 0.0, dilate: int = 0) -> torch.Tensor:
    """Binary mask -> soft mask (docs/theory.md §7): dilate, then Gaussian-blur.

    mask: (..., H, W) bool or float in [0, 1]. dilate: radius in pixels of a square structuring element
    (a (2d+1)^2 max filter). blur_sigma: Gaussian standard deviation in pixels (separable, kernel
    radius ceil(3 sigma), edges replicated so a mask touching the border stays 1 there).
    Returns float32 of the same shape, values in [0, 1]; identity (as float) when both are 0.
    """
    if dilate < 0 or blur_sigma < 0:
        raise RewardMapError(f"binary_to_soft: dilate={dilate!r} and blur_sigma={blur_sigma!r} must be >= 0")
    shape = mask.shape
    soft = mask.float().reshape(-1, 1, shape[-2], shape[-1])
    if dilate:
        soft = torch.nn.functional.max_pool2d(soft, 2 * int(dilate) + 1, stride=1, padding=int(dilate))
    if blur_sigma:
        kernel = _gaussian_kernel(blur_sigma, soft.device)
        r = kernel.numel() // 2
        soft = torch.nn.functional.pad(soft, (r, r, r, r), mode="replicate")
        soft = torch.nn.functional.conv2d(soft, kernel.reshape(1, 1, 1, -1))
        soft = torch.nn.functional.conv2d(soft, kernel.reshape(1, 1, -1, 1))
    return soft.clamp(0, 1).reshape(shape)


# Layouts ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Region:
    """One region of a layout: a relative box or a mask file, and a target (3 RGB values or 1 brightness)."""

    target: tuple[float, ...]
    box: tuple[float, float, float, float] | None = None
    mask: str | None = None


def _parse_color(where: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, str) and len(value) == 7 and value.startswith("#"):
        try:
            return tuple(int(value[i : i + 2], 16) / 255 for i in (1, 3, 5))
        except ValueError:
            pass
    elif isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        if all(0 <= v <= 1 for v in value):
            return tuple(float(v) for v in value)
    raise RewardMapError(f"{where}: color {value!r}; accepted: [r, g, b] in [0, 1] or '#rrggbb'")


def _resolve_path(name: str, path: str, mask_root: str | None) -> str:
    """The file a mask path names. With ``mask_root`` every path is confined to it: the path (relative to
    the root, or absolute) is resolved ('..' and symlinks followed) and must stay inside the resolved root,
    else RewardMapError. The check reads no file, so its answer is the same whether an outside path exists
    or not. Without ``mask_root`` only absolute paths are accepted (the layout's author chose them)."""
    if mask_root is None:
        if os.path.isabs(path):
            return path
        raise RewardMapError(
            f"reward scorer {name!r}: mask path {path!r} is relative; give an absolute path or option mask_root"
        )
    root = os.path.realpath(mask_root)
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != root:
        raise RewardMapError(
            f"reward scorer {name!r}: mask path {path!r} leaves mask_root {mask_root!r}; accepted: paths that stay "
            "inside mask_root after resolving '..', absolute paths and symlinks"
        )
    return resolved


def parse_layout(name: str, layout: Any, target_key: str, mask_root: str | None = None) -> tuple[Region, ...]:
    """Validate a layout (list of region dicts, see module doc) into hashable Regions.

    target_key: "color", "brightness" or "texture". Errors name the scorer, the region index and the accepted form.
    """
    if not isinstance(layout, (list, tuple)) or not layout:
        raise RewardMapError(f"reward scorer {name!r}: layout must be a non-empty list of regions, got {layout!r}")
    regions = []
    for i, spec in enumerate(layout):
        where = f"reward scorer {name!r}: region {i}"
        if not isinstance(spec, dict) or ("box" in spec) == ("mask" in spec):
            raise RewardMapError(f"{where}: {spec!r}; accepted: a dict with exactly one of 'box' or 'mask'")
        if target_key not in spec:
            raise RewardMapError(f"{where}: missing {target_key!r} (keys given: {sorted(spec)})")
        if target_key == "color":
            target = _parse_color(where, spec["color"])
        else:
            value = spec[target_key]
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise RewardMapError(f"{where}: {target_key} {value!r}; accepted: a number in [0, 1]")
            target = (float(value),)
        if "box" in spec:
            box = spec["box"]
            ok = isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
            if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise RewardMapError(f"{where}: box {box!r}; accepted: [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
            regions.append(Region(target, box=tuple(float(v) for v in box)))
        else:
            if not isinstance(spec["mask"], str):
                raise RewardMapError(f"{where}: mask {spec['mask']!r}; accepted: a PNG path")
            regions.append(Region(target, mask=_resolve_path(name, spec["mask"], mask_root)))
    return tuple(regions)


@functools.lru_cache(maxsize=256)
def load_mask(path: str, height: int, width: int, name: str = "mask") -> torch.Tensor:
    """Read a mask image, resize (bilinear) to (height, width), return (height, width) float32 in [0, 1].

    Cached per (path, size): files are read once per process. Errors name the scorer and the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((width, height), Image.BILINEAR)
    except (OSError, ValueError) as err:
        raise RewardMapError(f"reward scorer {name!r}: cannot read mask file {path!r}: {err}") from err
    data = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(height, width)
    return data.float() / 255


def _box_mask(box: tuple[float, float, float, float], height: int, width: int) -> torch.Tensor:
    """Pixels of a relative box, edges rounded to the nearest pixel boundary; never empty."""
    x0, y0, x1, y1 = box
    left, top = min(round(x0 * width), width - 1), min(round(y0 * height), height - 1)
    right, bottom = max(round(x1 * width), left + 1), max(round(y1 * height), top + 1)
    mask = torch.zeros(height, width)
    mask[top:bottom, left:right] = 1
    return mask


@functools.lru_cache(maxsize=256)
def region_weights(
    regions: tuple[Region, ...], height: int, width: int, blur_sigma: float = 0.0, dilate: int = 0, name: str = "mask"
) -> torch.Tensor:
    """(R, height, width) float32 weight in [0, 1] of each region (hard mask, then ``binary_to_soft``).

    Cached per (layout, size, softening), so a fixed layout costs nothing after the first batch.
    Raises if a mask file has no pixel inside at this size.
    """
    masks = []
    for region in regions:
        if region.box is not None:
            masks.append(_box_mask(region.box, height, width))
        else:
            mask = (load_mask(region.mask, height, width, name) >= 0.5).float()
            if not mask.any():
                raise RewardMapError(f"reward scorer {name!r}: mask file {region.mask!r} has no pixel >= 50% grey")
            masks.append(mask)
    return binary_to_soft(torch.stack(masks), blur_sigma, dilate)


# Per-pixel rewards ------------------------------------------------------------------------------


def color_match(image: torch.Tensor, target: tuple[float, float, float]) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (H, W): 1 - ||x - t||_2 / d_max(t), d_max = distance from t to the farthest
    corner of the RGB cube, so the reward spans exactly [0, 1] for every target."""
    t = torch.tensor(target, dtype=image.dtype, device=image.device).reshape(3, 1, 1)
    farthest = torch.maximum(t, 1 - t).square().sum().sqrt()
    return (1 - (image - t).square().sum(dim=0).sqrt() / farthest).clamp(0, 1)


def brightness_match(image: torch.Tensor, target: float) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (H, W): 1 - |Y - t| / max(t, 1 - t), Y = Rec. 601 luma (0.299, 0.587, 0.114)."""
    luma = torch.tensor(LUMA, dtype=image.dtype, device=image.device).reshape(3, 1, 1)
    y = (image * luma).sum(dim=0)
    return (1 - (y - target).abs() / max(target, 1 - target)).clamp(0, 1)


def local_contrast(image: torch.Tensor, window: int) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (H / window, W / window): std of Rec. 601 luma in each window x window block."""
    luma = torch.tensor(LUMA, dtype=image.dtype, device=image.device).reshape(3, 1, 1)
    y = (image * luma).sum(dim=0, keepdim=True)
    mean = torch.nn.functional.avg_pool2d(y, window)
    # Two-pass variance: E[y^2] - E[y]^2 cancels in fp32 and reports texture on flat blocks.
    centred = y - mean.repeat_interleave(window, dim=1).repeat_interleave(window, dim=2)
    return torch.nn.functional.avg_pool2d(centred.square(), window).sqrt()[0]


def texture_match(image: torch.Tensor, target: float, window: int = 4, contrast_scale: float = 0.15) -> torch.Tensor:
    """(3, H, W) -> (H, W): 1 - |s - t| / max(t, 1 - t), s = clip(local luma std / contrast_scale, 0, 1) per
    window x window block (expanded back to pixels). Target 1 asks for texture, 0 for a flat region."""
    height, width = image.shape[-2:]
    if height % window or width % window:
        raise RewardMapError(f"region_texture_map: image {height}x{width} is not divisible by window={window}")
    level = (local_contrast(image, window) / contrast_scale).clamp(0, 1)
    level = level.repeat_interleave(window, dim=0).repeat_interleave(window, dim=1)
    return (1 - (level - target).abs() / max(target, 1 - target)).clamp(0, 1)


def composite(rewards: torch.Tensor, weights: torch.Tensor, neutral: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-composite R region rewards (R, H, W) with weights (R, H, W) -> (map (H, W), score ()).

    a <- w s + (1 - w) a; c <- w + (1 - w) c; map = a + (1 - c) neutral; score = sum a / sum c.
    """
    covered = torch.zeros_like(rewards[0])
    accumulated = torch.zeros_like(rewards[0])
    for reward, weight in zip(rewards, weights):
        accumulated = weight * reward + (1 - weight) * accumulated
        covered = weight + (1 - weight) * covered
    return accumulated + (1 - covered) * neutral, accumulated.sum() / covered.sum().clamp(min=1e-12)


# Dataset checks (before any model loads) ---------------------------------------------------------


def _missing_masks(regions: tuple[Region, ...]) -> list[str]:
    return [f"mask file {r.mask!r} does not exist" for r in regions if r.mask is not None and not os.path.isfile(r.mask)]


def _layout_validator(name: str, target_key: str):
    def validate(prompts: list[str], metadata: list[dict], regions: list[dict] | None = None,
                 metadata_key: str = "regions", mask_root: str | None = None, **options) -> list[tuple[int, str]]:
        """[(index, why)] of samples without a usable layout: none given, a malformed region (box outside
        [0, 1], bad target), a mask path outside mask_root or a mask file that does not exist."""
        default = parse_layout(name, regions, target_key, mask_root) if regions is not None else None
        problems = []
        for i, meta in enumerate(metadata):
            layout = meta.get(metadata_key) if isinstance(meta, dict) else None
            if layout is None:
                if default is None:
                    problems.append((i, f"no layout: give metadata[{metadata_key!r}] or the option regions=[...]"))
                continue
            try:
                problems.extend((i, why) for why in _missing_masks(parse_layout(name, layout, target_key, mask_root)))
            except RewardMapError as err:
                problems.append((i, f"metadata[{metadata_key!r}]: " + str(err).replace(f"reward scorer {name!r}: ", "")))
        return problems

    return validate


def validate_mask_files(prompts: list[str], metadata: list[dict], metadata_key: str = "mask",
                        mask_root: str | None = None, **options) -> list[tuple[int, str]]:
    """mask_file_map's dataset check: [(index, why)] of samples whose ``metadata[metadata_key]`` is not a
    path string, leaves mask_root, or names a file that does not exist (checked only inside the root)."""
    problems = []
    for i, meta in enumerate(metadata):
        path = meta.get(metadata_key) if isinstance(meta, dict) else None
        if not isinstance(path, str):
            problems.append((i, f"metadata[{metadata_key!r}] must be a mask file path, got {path!r}"))
            continue
        try:
            resolved = _resolve_path("mask_file_map", path, mask_root)
        except RewardMapError as err:
            problems.append((i, str(err).replace("reward scorer 'mask_file_map': ", "")))
            continue
        if not os.path.isfile(resolved):
            problems.append((i, f"mask file {path!r} does not exist" + (f" under mask_root {mask_root!r}" if mask_root else "")))
    return problems


# Scorers ----------------------------------------------------------------------------------------


def _check_soft_options(name: str, neutral: float, blur_sigma: float, dilate: int) -> None:
    if not isinstance(neutral, (int, float)) or not 0 <= neutral <= 1:
        raise RewardMapError(f"reward scorer {name!r}: option neutral={neutral!r}; accepted: a number in [0, 1]")
    if not isinstance(blur_sigma, (int, float)) or blur_sigma < 0:
        raise RewardMapError(f"reward scorer {name!r}: option blur_sigma={blur_sigma!r}; accepted: pixels >= 0")
    if not isinstance(dilate, int) or dilate < 0:
        raise RewardMapError(f"reward scorer {name!r}: option dilate={dilate!r}; accepted: integer pixels >= 0")


def _region_scorer(name, target_key, match, device, regions, neutral, blur_sigma, dilate, metadata_key, mask_root):
    _check_soft_options(name, neutral, blur_sigma, dilate)
    default = parse_layout(name, regions, target_key, mask_root) if regions is not None else None

    def layout_for(i: int, meta: dict) -> tuple[Region, ...]:
        if meta.get(metadata_key) is not None:
            return parse_layout(name, meta[metadata_key], target_key, mask_root)
        if default is None:
            raise RewardMapError(
                f"reward scorer {name!r}: no layout for sample {i}; give option regions=[...] "
                f"or metadata[{metadata_key!r}]"
            )
        return default

    def scorer(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        check_images(name, images, prompts, metadata)
        metadata = metadata if metadata is not None else [{}] * len(prompts)
        images = images.to(device=device, dtype=torch.float32)
        height, width = images.shape[-2:]
        maps, scores, info = [], [], []
        for i, (image, meta) in enumerate(zip(images, metadata)):
            layout = layout_for(i, meta)
            weights = region_weights(layout, height, width, float(blur_sigma), dilate, name).to(device)
            rewards = torch.stack([match(image, r.target if len(r.target) > 1 else r.target[0]) for r in layout])
            reward_map, score = composite(rewards, weights, float(neutral))
            maps.append(reward_map)
            scores.append(score)
            region_means = (rewards * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp(min=1e-12)
            info.append({"region_scores": [round(float(s), 6) for s in region_means]})
        return RewardOutput(torch.stack(maps).cpu(), torch.stack(scores).cpu(), info, value_range=(0.0, 1.0))

    return scorer


@register("region_color_map", validate=_layout_validator("region_color_map", "color"))
def region_color_map(
    device="cpu",
    dtype=torch.float32,
    regions: list[dict] | None = None,
    neutral: float = 0.5,
    blur_sigma: float = 0.0,
    dilate: int = 0,
    metadata_key: str = "regions",
    mask_root: str | None = None,
):
    """Per-pixel closeness to each region's target colour (see module doc); neutral outside regions.

    Options: regions (default layout), neutral, blur_sigma / dilate (soft region edges, pixels),
    metadata_key (per-prompt layout key), mask_root (base of relative mask paths). Map (B, H, W) in [0, 1].
    """
    return _region_scorer(
        "region_color_map", "color", color_match, device, regions, neutral, blur_sigma, dilate, metadata_key, mask_root
    )


@register("region_brightness_map", validate=_layout_validator("region_brightness_map", "brightness"))
def region_brightness_map(
    device="cpu",
    dtype=torch.float32,
    regions: list[dict] | None = None,
    neutral: float = 0.5,
    blur_sigma: float = 0.0,
    dilate: int = 0,
    metadata_key: str = "regions",
    mask_root: str | None = None,
):
    """Per-pixel closeness of Rec. 601 luma to each region's target brightness; same options as
    :func:`region_color_map` with "brightness" targets."""
    return _region_scorer(
        "region_brightness_map", "brightness", brightness_match, device, regions, neutral, blur_sigma, dilate,
        metadata_key, mask_root,
    )


@register("region_texture_map", validate=_layout_validator("region_texture_map", "texture"))
def region_texture_map(
    device="cpu",
    dtype=torch.float32,
    regions: list[dict] | None = None,
    neutral: float = 0.5,
    blur_sigma: float = 0.0,
    dilate: int = 0,
    metadata_key: str = "regions",
    mask_root: str | None = None,
    window: int = 4,
    contrast_scale: float = 0.15,
):
    """Per-block closeness of local contrast (luma std in window x window pixels, divided by
    ``contrast_scale`` and clipped to [0, 1]) to each region's "texture" target in [0, 1]; same layout
    options as :func:`region_color_map`. A localized objective whose optimum (texture here, flat there)
    needs only a rearrangement of contrast, so even a random-weight VAE decoder can express it."""
    if not isinstance(window, int) or window < 1:
        raise RewardMapError(f"reward scorer 'region_texture_map': option window={window!r}; accepted: integer >= 1")
    if not contrast_scale > 0:
        raise RewardMapError(f"reward scorer 'region_texture_map': option contrast_scale={contrast_scale!r}; accepted: > 0")
    match = functools.partial(texture_match, window=window, contrast_scale=float(contrast_scale))
    return _region_scorer(
        "region_texture_map", "texture", match, device, regions, neutral, blur_sigma, dilate, metadata_key, mask_root
    )


@register("mask_file_map", validate=validate_mask_files)
def mask_file_map(
    device="cpu",
    dtype=torch.float32,
    metadata_key: str = "mask",
    mask_root: str | None = None,
    binary: bool = True,
    blur_sigma: float = 0.0,
    dilate: int = 0,
):
    """A fixed reward map per prompt, read from the image file at ``metadata[metadata_key]``.

    The file is resized (bilinear) to the image size; with ``binary`` it is thresholded at 50% grey
    (docs/theory.md §7: a binary mask is a valid r_map), else grey levels / 255 are the reward. ``dilate`` and
    ``blur_sigma`` soften it (:func:`binary_to_soft`). Score = mean of the map. The map does not depend
    on the image: useful as a spatial prior, or to test the training loop against a known target.
    """
    name = "mask_file_map"
    _check_soft_options(name, 0.5, blur_sigma, dilate)

    def scorer(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        check_images(name, images, prompts, metadata)
        height, width = images.shape[-2:]
        maps = []
        for i, meta in enumerate(metadata if metadata is not None else [{}] * len(prompts)):
            if not isinstance(meta.get(metadata_key), str):
                raise RewardMapError(
                    f"reward scorer {name!r}: sample {i} needs metadata[{metadata_key!r}] = a mask file path, "
                    f"got {meta.get(metadata_key)!r}"
                )
            mask = load_mask(_resolve_path(name, meta[metadata_key], mask_root), height, width, name)
            maps.append(binary_to_soft((mask >= 0.5).float() if binary else mask, float(blur_sigma), dilate))
        maps = torch.stack(maps)
        info = [{"mask": meta[metadata_key]} for meta in metadata]
        return RewardOutput(maps, maps.mean(dim=(1, 2)), info, value_range=(0.0, 1.0))

    return scorer
