"""GenEval reward map: Mask2Former instances + CLIP colours → GenEval rules → a dense credit map.

Registered as ``geneval_map``. The rules (thresholds, verdicts, partial score, map rule) live in
:mod:`reward_maps.geneval_rules`; this module runs the models, transformers only (no mmdet/mmcv):

- detector: ``Mask2FormerForUniversalSegmentation``. Upstream's numbers need upstream's weights: GenEval's
  mmdet checkpoint ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth``
  converted with ``scripts/convert_geneval_detector.py`` (:mod:`reward_maps.mmdet_convert`); pass the
  output folder as ``detector``. The default ``facebook/mask2former-swin-small-coco-instance`` is the same
  architecture trained by facebookresearch/Mask2Former (detectron2), so its detections, and hence scores,
  differ from GenEval's. mmdet's test-time pre/post-processing is rewritten here (Pad 128 before
  Normalize, cv2 bilinear resize; transformers' ``post_process_instance_segmentation``
  resizes masks through a fixed 384×384 grid, thresholds with ``>=`` and rounds scores to 6 decimals,
  which would break GenEval's float32 ``>`` thresholds);
- colour model: ``CLIPModel`` (default ``openai/clip-vit-large-patch14`` = open_clip ViT-L-14 "openai"),
  zero-shot over 10 colours × 3 templates, with open_clip's eval transform written with PIL.

Scalar ``scores`` = the training reward of flow_grpo / DiffusionNFT (the partial score); ``info`` also
carries the standard (benchmark) and strict verdicts, per-clause diagnostics and the detections.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reward_maps.base import RewardMapError, RewardOutput, check_images, register
from reward_maps.geneval_rules import (
    COCO_CLASSES,
    COLORS,
    Detection,
    Detections,
    GenEvalMetadataError,
    GenEvalSpec,
    colors_needed,
    detections_to_json,
    evaluate,
    normalize_class_name,
    parse_metadata,
    render_credit_map,
    select_detections,
)

__all__ = [
    "DEFAULT_DETECTOR",
    "DEFAULT_CLIP_MODEL",
    "COLOR_TEMPLATES",
    "quantize_images",
    "detector_input_size",
    "preprocess_for_detector",
    "jpeg_roundtrip",
    "CONVENTIONS",
    "masks_to_boxes",
    "instance_postprocess",
    "coco_label_names",
    "color_crop",
    "clip_preprocess",
    "ColorClassifier",
    "GenEvalMapScorer",
    "geneval_map",
    "build_tiny_mask2former",
]

NAME = "geneval_map"
DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")

# mmdet config of GenEval's detector: ImageNet mean/std in 0..255 units, to_rgb, Resize(1333, 800)
# keep_ratio, Pad(size_divisor=32); Mask2Former test_cfg max_per_image=100.
DETECTOR_MEAN = (123.675, 116.28, 103.53)
DETECTOR_STD = (58.395, 57.12, 57.375)
DETECTOR_PAD_VALUE = 128  # mmdet Pad(pad_val=dict(img=(128, 128, 128))), applied before Normalize

# Named input conventions (option ``convention``): what reaches the detector.
#   official      GenEval evaluate_images.py: mmdet loads the PNG from disk (BGR) and flips it to RGB.
#   diffusionnft  NVlabs/DiffusionNFT flow_grpo/gen_eval.py: ``inference_detector`` gets RGB numpy arrays,
#                 which mmdet takes for BGR, so the network sees BGR. Colours are classified on RGB.
#   flow_grpo     yifan123/flow_grpo rewards.geneval_score + reward-server: PIL JPEG (quality 75) round
#                 trip, then the same RGB arrays as diffusionnft; the colour classifier sees the JPEG too.
CONVENTIONS = {
    "official": dict(swap_channels=False, jpeg_quality=None),
    "diffusionnft": dict(swap_channels=True, jpeg_quality=None),
    "flow_grpo": dict(swap_channels=True, jpeg_quality=75),
}
DEFAULT_CONVENTION = "official"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GREY_999 = 0x99  # GenEval pastes the object over solid #999 before colour classification


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers' ``from_pretrained`` dtype keyword: ``dtype`` from 4.56 (``torch_dtype`` deprecated
    there), ``torch_dtype`` before (4.46-4.55 pass an unknown ``dtype`` on to the model's ``__init__``)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    return {key: dtype}


def _error(problem: str) -> RewardMapError:
    return RewardMapError(f"reward scorer {NAME!r}: {problem}")


# --------------------------------------------------------------------------------------------
# Detector: pre- and post-processing (mmdet 2.x semantics)
# --------------------------------------------------------------------------------------------


def quantize_images(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1] → (B, H, W, 3) uint8, ``round(255·x)`` as upstream's PIL/numpy conversion."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def detector_input_size(height: int, width: int, short_edge: int = 800, long_edge: int = 1333) -> tuple[int, int]:
    """mmcv ``imrescale`` keep-ratio size: s = min(long/max(H,W), short/min(H,W)); (int(H·s + .5), int(W·s + .5))."""
    scale = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def _resize_bilinear_u8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, H, W) float holding uint8 values -> (B, 3, h, w), as mmcv ``imresize`` (cv2 INTER_LINEAR on uint8).

    Uses OpenCV when it is importable (bit-exact with mmcv: cv2's fixed-point bilinear); otherwise torch
    bilinear (half-pixel centres, no antialias) rounded back to uint8, which can differ from cv2 by 1 grey
    level on some pixels.
    """
    try:
        import cv2
    except ImportError:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)
    arrays = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    resized = [cv2.resize(np.ascontiguousarray(a), (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for a in arrays]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float().to(x.device)


def preprocess_for_detector(
    images_u8: torch.Tensor,
    short_edge: int = 800,
    long_edge: int = 1333,
    size_divisor: int = 32,
    swap_channels: bool = False,
    pad_value: int = DETECTOR_PAD_VALUE,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, 3) uint8 RGB → normalised, padded pixel values (B, 3, Hp, Wp) and the resized (h, w).

    GenEval's mmdet test pipeline, in its order: Resize(1333, 800, keep_ratio) bilinear on uint8
    (:func:`_resize_bilinear_u8`), Pad(size_divisor=32) at the bottom/right with the raw pixel value
    ``pad_value`` (128), then Normalize: (x − mean)/std. ``swap_channels`` feeds BGR instead, which is
    what mmdet's network sees when it is handed an RGB array (DiffusionNFT / reward-server).
    """
    b, h, w, _ = images_u8.shape
    rh, rw = detector_input_size(h, w, short_edge, long_edge)
    x = images_u8.permute(0, 3, 1, 2).float()
    if swap_channels:
        x = x.flip(1)
    if (rh, rw) != (h, w):
        x = _resize_bilinear_u8(x, (rh, rw))
    ph, pw = -(-rh // size_divisor) * size_divisor, -(-rw // size_divisor) * size_divisor
    x = F.pad(x, (0, pw - rw, 0, ph - rh), value=float(pad_value))
    # With swap_channels the RGB-ordered mean/std still apply: mmdet's to_rgb flip runs inside
    # Normalize, so an RGB array reaches the network as BGR normalised with RGB statistics.
    mean = torch.tensor(DETECTOR_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(DETECTOR_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std, (rh, rw)


def jpeg_roundtrip(images_u8: torch.Tensor, quality: int) -> torch.Tensor:
    """(B, H, W, 3) uint8 → the same after PIL JPEG encode (``quality``, PIL's default 4:2:0) and decode.

    Flow-GRPO's ``geneval_score`` sends ``Image.save(buf, format="JPEG")`` bytes (quality 75) to its
    reward server, which decodes them with PIL before the detector and the colour classifier.
    """
    import io

    from PIL import Image

    out = []
    for array in images_u8.cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        out.append(np.asarray(Image.open(buffer, formats=["JPEG"]).convert("RGB")))
    return torch.from_numpy(np.stack(out)).to(images_u8.device)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet ``mask2bbox``: (K, H, W) bool → (K, 4) float32 [x_min, y_min, x_max + 1, y_max + 1]; empty → zeros."""
    k = masks.shape[0]
    boxes = torch.zeros(k, 4, dtype=torch.float32, device=masks.device)
    if k == 0:
        return boxes
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (K, W), (K, H)
    w, h = cols.shape[1], rows.shape[1]
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    nonempty = cols.any(dim=1) & rows.any(dim=1)
    x0 = torch.where(cols, xs, w).min(dim=1).values
    x1 = torch.where(cols, xs, -1).max(dim=1).values + 1
    y0 = torch.where(rows, ys, h).min(dim=1).values
    y1 = torch.where(rows, ys, -1).max(dim=1).values + 1
    stacked = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes[nonempty] = stacked[nonempty]
    return boxes


def instance_postprocess(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    resized_hw: tuple[int, int],
    padded_hw: tuple[int, int],
    out_hw: tuple[int, int],
    max_per_image: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet 2.x ``MaskFormerFusionHead.instance_postprocess`` for one image.

    class_logits (Q, C+1), mask_logits (Q, h', w') at 1/4 of the padded input. Mask logits are resized
    bilinearly to the padded input, cropped to the resized image, resized to ``out_hw`` and
    thresholded at 0. p = softmax(class_logits)[:, :C]; the top ``max_per_image`` (query, class) pairs by
    p; score = p · mean(sigmoid(mask logit) over the mask's pixels) (0 for an empty mask).
    Returns labels (K,), scores (K,) float32, masks (K, H, W) bool, boxes (K, 4) float32.
    """
    class_logits = class_logits.float()
    num_queries, num_classes = class_logits.shape[0], class_logits.shape[1] - 1
    probs = class_logits.softmax(dim=-1)[:, :-1]
    k = min(max_per_image, num_queries * num_classes)
    top_p, top_idx = probs.flatten().topk(k, sorted=False)
    labels = top_idx % num_classes
    queries = top_idx // num_classes
    unique_q, inverse = torch.unique(queries, return_inverse=True)
    logits = mask_logits[unique_q].float()[None]
    logits = F.interpolate(logits, size=padded_hw, mode="bilinear", align_corners=False)
    logits = logits[..., : resized_hw[0], : resized_hw[1]]
    logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)[0]
    binary = logits > 0
    mask_score = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = top_p * mask_score[inverse]
    masks = binary[inverse]
    return labels, scores, masks, masks_to_boxes(masks)


def coco_label_names(id2label: dict[Any, str]) -> dict[int, str]:
    """Model label id → GenEval COCO class name, for the labels that name one of the 80 classes.

    Raises if none does (a detector that is not a COCO instance model).
    """
    names = {int(i): normalize_class_name(label) for i, label in id2label.items()}
    names = {i: n for i, n in names.items() if n is not None}
    if not names:
        sample = list(id2label.values())[:5]
        raise _error(f"detector labels {sample}... name none of the 80 COCO classes; use a COCO instance model")
    return names


# --------------------------------------------------------------------------------------------
# Colour classification (GenEval: open_clip + CLIP_benchmark zero-shot)
# --------------------------------------------------------------------------------------------


def color_crop(image_u8: np.ndarray, det: Detection):
    """The PIL crop GenEval classifies: the image pasted over grey #999 through the mask, cropped to the box.

    image_u8: (H, W, 3) uint8 RGB. Without a mask the whole image is kept (GenEval does the same).
    """
    from PIL import Image

    if det.mask is not None:
        mask = np.asarray(det.mask, dtype=bool)[..., None]
        image_u8 = np.where(mask, image_u8, np.uint8(GREY_999))
    x1, y1, x2, y2 = (int(round(float(v))) for v in det.box[:4])
    # An empty box only comes from an empty mask, whose score is 0 and never passes a threshold.
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    return Image.fromarray(np.ascontiguousarray(image_u8)).crop((x1, y1, x2, y2))


def clip_preprocess(image, size: int = 224) -> torch.Tensor:
    """open_clip eval transform: resize the short edge to ``size`` (bicubic; long edge int(size·long/short)),
    centre crop size×size (top = round((h − size)/2)), to [0, 1], (x − mean)/std (OpenAI). → (3, size, size)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ColorClassifier:
    """Zero-shot colour of each detection, as GenEval: 10 colours × :data:`COLOR_TEMPLATES`.

    Text weights per class: W[:, k] = normalise(mean_t normalise(text(template_t(colour_k, class))));
    logits = 100 · normalise(image(crop)) · W; the colour is the argmax. Weights are cached per class.
    """

    def __init__(self, model, tokenizer, device: str | torch.device, batch_size: int = 16):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, torch.device(device), batch_size
        self.image_size = int(model.config.vision_config.image_size)
        self._weights: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_weights(self, cls: str) -> torch.Tensor:
        """(D, 10) float32 zero-shot weights for ``cls``."""
        if cls not in self._weights:
            columns = []
            for color in COLORS:
                texts = [t.format(c=color, cls=cls) for t in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                emb = _features(self.model.get_text_features(**tokens)).float()
                emb = F.normalize(emb, dim=-1).mean(dim=0)
                columns.append(emb / emb.norm())
            self._weights[cls] = torch.stack(columns, dim=1)
        return self._weights[cls]

    @torch.no_grad()
    def __call__(self, image_u8: np.ndarray, dets: Sequence[Detection], cls: str) -> list[str]:
        """Colours of ``dets`` (all of class ``cls``) in the (H, W, 3) uint8 image."""
        if not dets:
            return []
        weights = self.text_weights(cls)
        dtype = next(self.model.parameters()).dtype
        labels = []
        for start in range(0, len(dets), self.batch_size):
            crops = [clip_preprocess(color_crop(image_u8, d), self.image_size) for d in dets[start: start + self.batch_size]]
            pixels = torch.stack(crops).to(self.device, dtype)
            feats = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
            labels.extend((100.0 * feats @ weights).argmax(dim=1).tolist())
        return [COLORS[i] for i in labels]


# --------------------------------------------------------------------------------------------
# Scorer
# --------------------------------------------------------------------------------------------


def _check_options(opts: dict[str, Any]) -> None:
    if opts["convention"] not in CONVENTIONS:
        raise _error(f"option convention={opts['convention']!r} must be one of {sorted(CONVENTIONS)} "
                     f"(default {DEFAULT_CONVENTION!r})")
    for key in ("threshold", "counting_threshold"):
        if not isinstance(opts[key], (int, float)) or not 0.0 <= opts[key] <= 1.0:
            raise _error(f"option {key}={opts[key]!r} must be a number in [0, 1]")
    if not isinstance(opts["nms_threshold"], (int, float)) or not 0.0 < opts["nms_threshold"] <= 1.0:
        raise _error(f"option nms_threshold={opts['nms_threshold']!r} must be in (0, 1] (1.0 = no NMS, GenEval's setting)")
    if not isinstance(opts["missing_weight"], (int, float)) or not 0.0 <= opts["missing_weight"] <= 1.0:
        raise _error(f"option missing_weight={opts['missing_weight']!r} must be in [0, 1]")
    for key in ("max_objects", "max_per_image", "detector_short_edge", "detector_long_edge", "clip_batch_size"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _error(f"option {key}={value!r} must be a positive integer")
    if not isinstance(opts["position_threshold"], (int, float)) or opts["position_threshold"] < 0:
        raise _error(f"option position_threshold={opts['position_threshold']!r} must be a number >= 0")
    size = opts["map_size"]
    if size is not None:
        pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(v, int) and v >= 1 for v in pair)):
            raise _error(f"option map_size={size!r} must be None (image resolution), a positive int or (h, w)")


class GenEvalMapScorer:
    """Callable scorer (see :mod:`reward_maps.base`); models are built once, in the factory."""

    def __init__(self, detector, color_classifier: ColorClassifier, device: str | torch.device, **opts):
        self.detector, self.colors, self.device = detector, color_classifier, torch.device(device)
        self.opts = opts
        self.labels = coco_label_names(detector.config.id2label)
        size = opts["map_size"]
        self.map_size = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)

    def parse(self, metadata: Sequence[Any]) -> list[GenEvalSpec]:
        """Validate every sample's metadata before any model runs."""
        try:
            return [parse_metadata(m, scorer=NAME, index=i) for i, m in enumerate(metadata)]
        except GenEvalMetadataError as err:
            raise RewardMapError(str(err)) from err

    @torch.no_grad()
    def detect(self, images_u8: torch.Tensor, specs: Sequence[GenEvalSpec]) -> list[Detections]:
        """Run Mask2Former on the batch; per image, the GenEval-selected detections (with masks)."""
        o = self.opts
        pixels, resized = preprocess_for_detector(
            images_u8, o["detector_short_edge"], o["detector_long_edge"],
            swap_channels=CONVENTIONS[o["convention"]]["swap_channels"],
        )
        dtype = next(self.detector.parameters()).dtype
        out = self.detector(pixel_values=pixels.to(self.device, dtype))
        height, width = images_u8.shape[1:3]
        result = []
        for i, spec in enumerate(specs):
            labels, scores, masks, boxes = instance_postprocess(
                out.class_queries_logits[i], out.masks_queries_logits[i], resized, tuple(pixels.shape[-2:]),
                (height, width), o["max_per_image"],
            )
            candidates, row_of = [], {}
            for j, (label, score, box) in enumerate(zip(labels.tolist(), scores.tolist(), boxes.tolist())):
                if label in self.labels:
                    det = Detection(box=tuple(box), score=score)
                    row_of[id(det)] = j
                    candidates.append((self.labels[label], det))
            selected = select_detections(
                candidates, spec.tag, o["threshold"], o["counting_threshold"], o["max_objects"], o["nms_threshold"]
            )
            # Masks are copied to host only for the few detections that survive selection.
            for dets in selected.values():
                for det in dets:
                    det.mask = masks[row_of[id(det)]].cpu().numpy()
            result.append(selected)
        return result

    def classify_colors(self, image_u8: np.ndarray, spec: GenEvalSpec, detections: Detections) -> None:
        """Set ``Detection.color`` on the top detections every colour clause needs."""
        for cls, n in colors_needed(spec, detections).items():
            dets = detections[cls][:n]
            for det, color in zip(dets, self.colors(image_u8, dets, cls)):
                det.color = color

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        check_images(NAME, images, prompts, metadata)
        specs = self.parse(metadata)
        images_u8 = quantize_images(images)
        quality = CONVENTIONS[self.opts["convention"]]["jpeg_quality"]
        if quality is not None:
            images_u8 = jpeg_roundtrip(images_u8, quality)
        detections = self.detect(images_u8, specs)
        images_np = images_u8.cpu().numpy()
        height, width = images_u8.shape[1:3]
        maps, scores, info = [], [], []
        for i, (spec, dets) in enumerate(zip(specs, detections)):
            self.classify_colors(images_np[i], spec, dets)
            verdict = evaluate(spec, dets, self.opts["position_threshold"])
            maps.append(render_credit_map(dets, verdict.credits, verdict.missing_fraction, height, width,
                                          self.opts["missing_weight"]))
            scores.append(verdict.score)
            record = verdict.to_json()
            record["convention"] = self.opts["convention"]
            record["detections"] = detections_to_json(dets, verdict.credits)
            info.append(record)
        maps_t = torch.stack(maps) if maps else torch.zeros(0, height, width)
        if self.map_size is not None and tuple(maps_t.shape[-2:]) != self.map_size:
            maps_t = F.interpolate(maps_t[:, None], size=self.map_size, mode="area")[:, 0]
        return RewardOutput(maps=maps_t, scores=torch.tensor(scores, dtype=torch.float32), info=info, value_range=(0.0, 1.0))


def validate_geneval_metadata(prompts: list[str], metadata: list[dict], **options) -> list[tuple[int, str]]:
    """Dataset check before any model loads: [(index, why)] of samples whose metadata
    :func:`reward_maps.geneval_rules.parse_metadata` rejects (missing tag / include, unknown class,
    colour or relation, bad count or position). ``options`` are the factory options (unused)."""
    problems = []
    for i, meta in enumerate(metadata):
        try:
            parse_metadata(meta, scorer=NAME, index=i)
        except GenEvalMetadataError as err:
            problems.append((i, str(err).replace(f"reward scorer {NAME!r}: metadata[{i}]", "metadata", 1)))
    return problems


@register(NAME, validate=validate_geneval_metadata)
def geneval_map(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    detector: str | os.PathLike = DEFAULT_DETECTOR,
    clip_model: str | os.PathLike = DEFAULT_CLIP_MODEL,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    nms_threshold: float = 1.0,
    position_threshold: float = 0.1,
    max_per_image: int = 100,
    detector_short_edge: int = 800,
    detector_long_edge: int = 1333,
    convention: str = DEFAULT_CONVENTION,
    clip_batch_size: int = 16,
    missing_weight: float = 1.0,
    map_size: int | tuple[int, int] | None = None,
) -> GenEvalMapScorer:
    """Build the GenEval map scorer.

    detector / clip_model: hub id or local directory (``from_pretrained``). Thresholds as GenEval
    (score > 0.3, > 0.9 for counting prompts, ≤ 16 per class, NMS off, position offset 0.1).
    detector_short_edge/long_edge: mmdet Resize(1333, 800). convention: what reaches the detector, one of
    :data:`CONVENTIONS` — "official" (default; GenEval's benchmark: RGB), "diffusionnft" (DiffusionNFT's
    training reward: RGB arrays read as BGR by mmdet), "flow_grpo" (JPEG quality 75, then as diffusionnft). missing_weight: how much missing objects darken the
    background (see :func:`reward_maps.geneval_rules.render_credit_map`). map_size: None = image
    resolution, else area-pooled to (h, w).
    """
    opts = dict(
        threshold=threshold, counting_threshold=counting_threshold, max_objects=max_objects,
        nms_threshold=nms_threshold, position_threshold=position_threshold, max_per_image=max_per_image,
        detector_short_edge=detector_short_edge, detector_long_edge=detector_long_edge,
        convention=convention, clip_batch_size=clip_batch_size,
        missing_weight=missing_weight, map_size=map_size,
    )
    _check_options(opts)
    from transformers import AutoTokenizer, CLIPModel, Mask2FormerForUniversalSegmentation

    try:
        det_model = Mask2FormerForUniversalSegmentation.from_pretrained(str(detector), **_dtype_kwargs(dtype))
    except (OSError, ValueError) as err:
        raise _error(f"cannot load detector={str(detector)!r} (hub id or local Mask2Former directory): {err}") from err
    try:
        clip = CLIPModel.from_pretrained(str(clip_model), **_dtype_kwargs(dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(clip_model))
    except (OSError, ValueError) as err:
        raise _error(f"cannot load clip_model={str(clip_model)!r} (hub id or local CLIP directory): {err}") from err
    det_model.to(device).eval()
    clip.to(device).eval()
    return GenEvalMapScorer(det_model, ColorClassifier(clip, tokenizer, device, clip_batch_size), device, **opts)


# --------------------------------------------------------------------------------------------
# Tiny offline detector (tests, smoke runs)
# --------------------------------------------------------------------------------------------

# Detectron2 / transformers spelling of the COCO classes (GenEval renames three of them); the tiny
# model uses it so that the label-name normalisation is exercised.
_DETECTRON2_RENAMES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}


def build_tiny_mask2former(directory: str | os.PathLike, num_queries: int = 10, seed: int = 0) -> Path:
    """Save a random-weight ``Mask2FormerForUniversalSegmentation`` (tiny Swin backbone, 80 COCO labels).

    Loads with ``Mask2FormerForUniversalSegmentation.from_pretrained(directory)``, the call the scorer
    makes for hub ids. ~0.36 M parameters.
    """
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    directory = Path(directory)
    names = [_DETECTRON2_RENAMES.get(n, n) for n in COCO_CLASSES]
    backbone = SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
        drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
        encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
        num_attention_heads=2, num_queries=num_queries,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(directory)
    return directory
