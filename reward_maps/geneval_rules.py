"""GenEval rule engine: metadata parsing, detection selection, verdicts and the dense credit map.

Pure functions on plain data (no models), so every rule can be tested on synthetic detections.
Sources (facts in docs/upstream_facts.md §A): djghosh13/geneval ``evaluation/evaluate_images.py`` (the
benchmark's *standard* verdict) and yifan123/reward-server ``reward_server/gen_eval.py``
``evaluate_reward`` (the training reward used by flow_grpo and DiffusionNFT: *strict* verdict and the
*partial score*).

Vocabulary
    clause      one ``include`` or ``exclude`` entry of a metadata line: {class, count, color?, position?}
    detections  ``dict[class name -> list[Detection]]``, each list sorted by score (highest first) and
                already thresholded (:func:`select_detections`); classes with no detection are absent.
    credit      per detection, 1.0 (it satisfies every clause that claims it), 0.0 (it violates one:
                extra instance, wrong colour, wrong side) or None (no clause mentions its class).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "TAGS",
    "COLORS",
    "RELATIONS",
    "COCO_CLASSES",
    "Clause",
    "GenEvalSpec",
    "Detection",
    "Detections",
    "GenEvalVerdict",
    "GenEvalMetadataError",
    "parse_metadata",
    "normalize_class_name",
    "select_detections",
    "box_iou",
    "relative_position",
    "colors_needed",
    "evaluate_standard",
    "evaluate_strict",
    "object_credits",
    "missing_fraction",
    "evaluate",
    "render_credit_map",
    "image_record",
    "grouped_by_tag",
    "summarize",
    "detections_to_json",
    "detections_from_json",
]

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")

# The 80 COCO thing classes in COCO order, spelled as GenEval's metadata spells them
# (GenEval renames COCO's "mouse", "remote", "keyboard").
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# Other spellings of the same classes met in detector label maps (Detectron2/COCO, Pascal VOC).
_CLASS_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "diningtable": "dining table",
    "table": "dining table",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "hair dryer": "hair drier",
    "cellphone": "cell phone",
    "doughnut": "donut",
    "sportsball": "sports ball",
}

_COCO_SET = frozenset(COCO_CLASSES)
NOT_THIS_TAG = -10.0  # upstream's per-tag sentinel, removed before averaging


class GenEvalMetadataError(ValueError):
    """A malformed GenEval metadata dict; the message names the scorer, the sample and the field."""


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Clause:
    """One include/exclude clause. ``position`` = (relation, index of the target include clause)."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class GenEvalSpec:
    """A parsed GenEval metadata line."""

    tag: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()
    prompt: str | None = None


def normalize_class_name(name: str) -> str | None:
    """Map a detector label to GenEval's spelling of a COCO class, or None if it is not one.

    Lower-cases, turns ``_``/``-`` into spaces, collapses whitespace, then applies known aliases
    (``"mouse"`` -> ``"computer mouse"``, ``"diningtable"`` -> ``"dining table"``, ...).
    """
    key = " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())
    key = _CLASS_ALIASES.get(key, key)
    return key if key in _COCO_SET else None


def _meta_error(scorer: str, index: int, field: str, problem: str) -> GenEvalMetadataError:
    return GenEvalMetadataError(f"reward scorer {scorer!r}: metadata[{index}]{field} {problem}")


def _parse_clause(raw: Any, kind: str, j: int, n_previous: int, scorer: str, index: int) -> Clause:
    field = f"[{kind!r}][{j}]"
    if not isinstance(raw, Mapping):
        raise _meta_error(scorer, index, field, f"must be a dict with 'class' and 'count', got {type(raw).__name__}")
    allowed = {"class", "count"} | ({"color", "position"} if kind == "include" else set())
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _meta_error(scorer, index, field, f"has unknown keys {unknown}; accepted: {sorted(allowed)}")
    cls = raw.get("class")
    if cls not in _COCO_SET:
        raise _meta_error(scorer, index, f"{field}['class']", f"= {cls!r} is not a GenEval COCO class; accepted: {list(COCO_CLASSES)}")
    count = raw.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise _meta_error(scorer, index, f"{field}['count']", f"= {count!r} must be an integer >= 1")
    color = raw.get("color")
    if color is not None and color not in COLORS:
        raise _meta_error(scorer, index, f"{field}['color']", f"= {color!r} is not a GenEval colour; accepted: {list(COLORS)}")
    position = raw.get("position")
    if position is not None:
        ok = isinstance(position, (list, tuple)) and len(position) == 2
        if not ok or position[0] not in RELATIONS:
            raise _meta_error(scorer, index, f"{field}['position']",
                              f"= {position!r} must be [relation, target clause index] with relation in {list(RELATIONS)}")
        target = position[1]
        # Upstream looks the target up among the include clauses already evaluated.
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < n_previous:
            raise _meta_error(scorer, index, f"{field}['position'][1]",
                              f"= {target!r} must index an earlier include clause (0..{n_previous - 1})")
        position = (position[0], target)
    return Clause(cls=cls, count=count, color=color, position=position)


def parse_metadata(meta: Any, *, scorer: str = "geneval_map", index: int = 0) -> GenEvalSpec:
    """Validate one GenEval metadata dict and return a :class:`GenEvalSpec`.

    Accepted: ``tag`` in :data:`TAGS`; ``include`` a non-empty list of clauses {class (one of the 80
    GenEval COCO names), count >= 1, optional color (one of :data:`COLORS`), optional position
    [relation in :data:`RELATIONS`, index of an earlier include clause]}; optional ``exclude`` list of
    {class, count}; optional ``prompt`` string. Other top-level keys are ignored (callers may carry
    their own). Errors name the scorer, the sample index and the bad field.
    """
    if not isinstance(meta, Mapping):
        raise _meta_error(scorer, index, "", f"must be a GenEval metadata dict, got {type(meta).__name__}")
    tag = meta.get("tag")
    if tag not in TAGS:
        raise _meta_error(scorer, index, "['tag']", f"= {tag!r} is not a GenEval tag; accepted: {list(TAGS)}")
    include = meta.get("include")
    if not isinstance(include, (list, tuple)) or not include:
        raise _meta_error(scorer, index, "['include']", f"must be a non-empty list of clauses, got {include!r}")
    exclude = meta.get("exclude", [])
    if not isinstance(exclude, (list, tuple)):
        raise _meta_error(scorer, index, "['exclude']", f"must be a list of clauses, got {type(exclude).__name__}")
    prompt = meta.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise _meta_error(scorer, index, "['prompt']", f"must be a string, got {type(prompt).__name__}")
    inc = tuple(_parse_clause(c, "include", j, j, scorer, index) for j, c in enumerate(include))
    exc = tuple(_parse_clause(c, "exclude", j, 0, scorer, index) for j, c in enumerate(exclude))
    return GenEvalSpec(tag=tag, include=inc, exclude=exc, prompt=prompt)


# --------------------------------------------------------------------------------------------
# Detections
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Detection:
    """One detected instance.

    box:   (x1, y1, x2, y2) in pixels, image y pointing down (mmdet ``mask2bbox``: x2 = last column + 1).
    score: detector confidence, compared in float32.
    mask:  (H, W) bool instance mask, or None (the box is used where a mask is needed).
    color: one of :data:`COLORS` once classified, else None.
    """

    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None
    color: str | None = None


Detections = dict[str, list[Detection]]


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel convention: area = (x2 − x1 + 1)·(y2 − y1 + 1)."""

    def area(b):
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area([max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])])
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def select_detections(
    candidates: Iterable[tuple[str, Detection]],
    tag: str,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    nms_threshold: float = 1.0,
) -> Detections:
    """GenEval's box selection (evaluate_images.py ``evaluate_image``), per class.

    Keep a detection iff ``float32(score) > float32(thr)`` with thr = ``counting_threshold`` when the
    tag is ``counting`` (every class) else ``threshold``; sort by score (highest first; ties keep input
    order), keep the first ``max_objects``; then greedy NMS, dropping boxes with
    IoU >= ``nms_threshold`` against a kept one (1.0 = off, upstream's setting).
    """
    thr = np.float32(counting_threshold if tag == "counting" else threshold)
    per_class: dict[str, list[Detection]] = {}
    for cls, det in candidates:
        if np.float32(det.score) > thr:
            per_class.setdefault(cls, []).append(det)
    selected: Detections = {}
    for cls, dets in per_class.items():
        order = sorted(range(len(dets)), key=lambda i: -float(np.float32(dets[i].score)))[:max_objects]
        kept: list[Detection] = []
        for i in order:
            if nms_threshold == 1 or all(box_iou(k.box, dets[i].box) < nms_threshold for k in kept):
                kept.append(dets[i])
        selected[cls] = kept
    return selected


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def relative_position(box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = 0.1) -> frozenset[str]:
    """Relations of A to B, GenEval's rule, computed in float32 like the upstream numpy arrays.

    c = box centre, d = (x2 − x1, y2 − y1), offset = c_A − c_B,
    revised = max(|offset| − t·(d_A + d_B), 0)·sign(offset) per axis (t = ``position_threshold``);
    no relation if both |revised| < 1e-3; else (dx, dy) = revised / ‖offset‖ and
    dx < −0.5 "left of", dx > 0.5 "right of", dy < −0.5 "above", dy > 0.5 "below" (image y down).
    """
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float32).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - np.float32(position_threshold) * (dim_a + dim_b), np.float32(0)) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return frozenset()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return frozenset(relations)


def colors_needed(spec: GenEvalSpec, detections: Detections) -> dict[str, int]:
    """How many top-scoring detections of each class need a colour: min(count, n_detected) per colour clause.

    This covers the standard verdict (top-``count`` when at least ``count`` are found), the strict
    verdict (all of them when exactly ``count`` are found) and the map (the claimed instances).
    """
    need: dict[str, int] = {}
    for clause in spec.include:
        if clause.color is not None:
            n = min(clause.count, len(detections.get(clause.cls, [])))
            if n:
                need[clause.cls] = max(need.get(clause.cls, 0), n)
    return need


def _colors(dets: Sequence[Detection], cls: str) -> list[str]:
    missing = [i for i, d in enumerate(dets) if d.color is None]
    if missing:
        raise ValueError(f"GenEval rules: detection(s) {missing} of class {cls!r} need a colour (Detection.color is None)")
    return [d.color for d in dets]


def _position_fails(objects: Sequence[Detection], targets: Sequence[Detection], relation: str, t: float) -> bool:
    """True iff some (object, target) pair lacks ``relation`` (every pair must hold)."""
    return any(relation not in relative_position(o.box, g.box, t) for o in objects for g in targets)


def evaluate_standard(spec: GenEvalSpec, detections: Detections, position_threshold: float = 0.1) -> tuple[bool, list[str], list[bool]]:
    """GenEval's benchmark verdict (evaluate_images.py ``evaluate``).

    Include clause: the top-``count`` detections of its class, needs >= count; with colour all of them
    must have it; with position [rel, g] (only if colour passed) every (object, target) pair over the
    target group's kept objects must have rel, and fails if group g did not match. Exclude clause fails
    if the class has >= count detections. Returns (correct, reasons, pass flag per include then exclude clause).
    """
    correct, reasons, flags = True, [], []
    groups: list[list[Detection] | None] = []
    for clause in spec.include:
        found = detections.get(clause.cls, [])[: clause.count]
        matched = len(found) >= clause.count
        if not matched:
            reasons.append(f"expected {clause.cls}>={clause.count}, found {len(found)}")
        else:
            if clause.color is not None:
                n_match = _colors(found, clause.cls).count(clause.color)
                if n_match < clause.count:
                    matched = False
                    reasons.append(f"expected {clause.color} {clause.cls}>={clause.count}, found {n_match} {clause.color}")
            if clause.position is not None and matched:
                relation, g = clause.position
                if groups[g] is None:
                    matched = False
                    reasons.append(f"no target for {clause.cls} to be {relation}")
                elif _position_fails(found, groups[g], relation, position_threshold):
                    matched = False
                    reasons.append(f"expected {clause.cls} {relation} target")
        correct &= matched
        flags.append(matched)
        groups.append(found if matched else None)
    for clause in spec.exclude:
        n = len(detections.get(clause.cls, []))
        ok = n < clause.count
        if not ok:
            reasons.append(f"expected {clause.cls}<{clause.count}, found {n}")
        correct &= ok
        flags.append(ok)
    return correct, reasons, flags


def evaluate_strict(spec: GenEvalSpec, detections: Detections, position_threshold: float = 0.1) -> tuple[bool, float, list[float], list[str], list[bool]]:
    """The training reward (reward-server ``evaluate_reward``): strict verdict and partial score.

    Per include clause with n = len(all kept detections of its class), c = count:
      rewards += [1 − |c − n| / c]                      (negative when n > 2c)
      n != c:  fail; rewards += [0.0] if the clause has colour or position
      n == c:  colour → rewards += [1 − |c − m| / c], m = colour matches; fail unless m == c
               position (only if still matched): target group g failed → fail, rewards += [0.0];
               else a failing (object, target) pair → fail, rewards += [0.0]; then ALWAYS rewards += [1.0]
               (upstream quirk: failed → [0, 1], passed → [1]).
    Exclude clauses are not checked. score = mean(rewards), or 0 if empty.
    Returns (strict_correct, score, rewards, reasons, pass flag per include clause).
    """
    correct, rewards, reasons, flags = True, [], [], []
    groups: list[list[Detection] | None] = []
    for clause in spec.include:
        found = detections.get(clause.cls, [])
        c, n = clause.count, len(found)
        rewards.append(1 - abs(c - n) / c)
        matched = n == c
        if not matched:
            reasons.append(f"expected {clause.cls}=={c}, found {n}")
            if clause.color is not None or clause.position is not None:
                rewards.append(0.0)
        else:
            if clause.color is not None:
                m = _colors(found, clause.cls).count(clause.color)
                rewards.append(1 - abs(c - m) / c)
                if m != c:
                    matched = False
                    reasons.append(f"expected {clause.color} {clause.cls}=={c}, found {m} {clause.color}")
            if clause.position is not None and matched:
                relation, g = clause.position
                if groups[g] is None:
                    matched = False
                    reasons.append(f"no target for {clause.cls} to be {relation}")
                    rewards.append(0.0)
                else:
                    if _position_fails(found, groups[g], relation, position_threshold):
                        matched = False
                        reasons.append(f"expected {clause.cls} {relation} target")
                        rewards.append(0.0)
                    rewards.append(1.0)
        correct &= matched
        flags.append(matched)
        groups.append(found if matched else None)
    score = sum(rewards) / len(rewards) if rewards else 0.0
    return correct, score, rewards, reasons, flags


def object_credits(spec: GenEvalSpec, detections: Detections, position_threshold: float = 0.1) -> dict[str, list[float | None]]:
    """Per-detection credit for the map (our rule; the training semantics: all kept detections count).

    For include clause (class C, count c) over C's detections D (score order):
      D[c:] are extra instances                                   → 0
      D[:c] are claimed                                           → 1, unless
        colour clause and the detection's colour differs          → 0
        position [rel, g] and some target t in T fails rel        → 0,
        T = top-count_g detections of clause g's class (the relation is judged geometrically even if
        clause g failed for another reason; with no target detection it is not judged here — the
        missing target is charged by :func:`missing_fraction`).
    Exclude clause (class C, count m): D[m−1:] (the instances that make it fail) → 0.
    A detection claimed by several clauses takes the minimum; classes no clause mentions → None.
    """
    credits: dict[str, list[float | None]] = {cls: [None] * len(dets) for cls, dets in detections.items()}

    def give(cls: str, i: int, value: float) -> None:
        old = credits[cls][i]
        credits[cls][i] = value if old is None else min(old, value)

    for clause in spec.include:
        dets = detections.get(clause.cls, [])
        for i, det in enumerate(dets):
            if i >= clause.count:
                give(clause.cls, i, 0.0)
                continue
            if clause.color is not None:
                _colors([det], clause.cls)  # the map needs the colour of every claimed instance
            ok = clause.color is None or det.color == clause.color
            if ok and clause.position is not None:
                relation, g = clause.position
                target = spec.include[g]
                targets = detections.get(target.cls, [])[: target.count]
                ok = not (targets and _position_fails([det], targets, relation, position_threshold))
            give(clause.cls, i, 1.0 if ok else 0.0)
    for clause in spec.exclude:
        dets = detections.get(clause.cls, [])
        for i in range(max(clause.count - 1, 0), len(dets)):
            give(clause.cls, i, 0.0)
    return credits


def missing_fraction(spec: GenEvalSpec, detections: Detections) -> float:
    """m = Σ_include max(count − n_detected, 0) / Σ_include count ∈ [0, 1] (objects with no location to blame)."""
    required = sum(c.count for c in spec.include)
    missing = sum(max(c.count - len(detections.get(c.cls, [])), 0) for c in spec.include)
    return missing / required if required else 0.0


@dataclasses.dataclass
class GenEvalVerdict:
    """Everything the rules say about one image (JSON-friendly via :meth:`to_json`)."""

    tag: str
    correct: bool               # standard (benchmark) verdict
    strict_correct: bool        # training verdict
    score: float                # partial score = the training reward
    rewards: list[float]        # the partial-score terms
    reasons: list[str]          # why the standard verdict failed
    strict_reasons: list[str]   # why the strict verdict failed
    clauses: list[dict[str, Any]]
    credits: dict[str, list[float | None]]
    missing_fraction: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate(spec: GenEvalSpec, detections: Detections, position_threshold: float = 0.1) -> GenEvalVerdict:
    """Standard verdict, strict verdict, partial score, per-clause diagnostics and per-object credits."""
    correct, reasons, std_flags = evaluate_standard(spec, detections, position_threshold)
    strict, score, rewards, strict_reasons, strict_flags = evaluate_strict(spec, detections, position_threshold)
    clauses = []
    for j, clause in enumerate(spec.include):
        dets = detections.get(clause.cls, [])
        top = dets[: clause.count]
        n_color = None
        if clause.color is not None and all(d.color is not None for d in top):
            n_color = sum(d.color == clause.color for d in top)
        clauses.append({
            "kind": "include", "class": clause.cls, "count": clause.count, "color": clause.color,
            "position": list(clause.position) if clause.position else None, "n_detected": len(dets),
            "n_color_matches_top": n_color, "standard": std_flags[j], "strict": strict_flags[j],
        })
    for j, clause in enumerate(spec.exclude):
        clauses.append({
            "kind": "exclude", "class": clause.cls, "count": clause.count,
            "n_detected": len(detections.get(clause.cls, [])), "standard": std_flags[len(spec.include) + j],
        })
    return GenEvalVerdict(
        tag=spec.tag, correct=bool(correct), strict_correct=bool(strict), score=float(score),
        rewards=[float(r) for r in rewards], reasons=reasons, strict_reasons=strict_reasons, clauses=clauses,
        credits=object_credits(spec, detections, position_threshold),
        missing_fraction=missing_fraction(spec, detections),
    )


# --------------------------------------------------------------------------------------------
# Map
# --------------------------------------------------------------------------------------------


def _region(det: Detection, height: int, width: int) -> torch.Tensor:
    """(H, W) bool: the detection's mask, or its box when it has no mask."""
    if det.mask is not None:
        mask = torch.as_tensor(np.asarray(det.mask, dtype=bool))
        if tuple(mask.shape) != (height, width):
            raise ValueError(f"GenEval map: mask of shape {tuple(mask.shape)} for a {height}x{width} map")
        return mask
    x1, y1, x2, y2 = (int(round(v)) for v in det.box[:4])
    region = torch.zeros(height, width, dtype=torch.bool)
    region[max(y1, 0): max(y2, 0), max(x1, 0): max(x2, 0)] = True
    return region


def render_credit_map(
    detections: Detections,
    credits: Mapping[str, Sequence[float | None]],
    missing: float,
    height: int,
    width: int,
    missing_weight: float = 1.0,
) -> torch.Tensor:
    """The GenEval reward map, (H, W) float32 in [0, 1].

    Pixels inside the region (mask, else box) of a credited detection take its credit (1 satisfies,
    0 violates); where credited regions overlap the minimum wins (a violation is not hidden by a
    neighbour). Every other pixel is background
        b = 0.5 · (1 − missing_weight · m),   m = :func:`missing_fraction`,
    i.e. neutral (1/2) when every requested object is present, and lowered uniformly by the share of
    requested objects that were not found (no location to blame for them); clipped to [0, 0.5].
    """
    background = 0.5 * (1.0 - missing_weight * missing)
    out = torch.full((height, width), min(max(background, 0.0), 0.5), dtype=torch.float32)
    painted = torch.full((height, width), math.inf, dtype=torch.float32)
    for cls, dets in detections.items():
        for det, credit in zip(dets, credits.get(cls, [])):
            if credit is not None:
                region = _region(det, height, width)
                painted[region] = torch.clamp(painted[region], max=float(credit))
    hit = torch.isfinite(painted)
    out[hit] = painted[hit]
    return out


# --------------------------------------------------------------------------------------------
# Records and summaries (evaluation)
# --------------------------------------------------------------------------------------------


def image_record(verdict: GenEvalVerdict) -> dict[str, Any]:
    """Per-image result for the evaluation script: tag, correct, strict_correct, score."""
    return {"tag": verdict.tag, "correct": verdict.correct, "strict_correct": verdict.strict_correct, "score": verdict.score}


def grouped_by_tag(records: Sequence[Mapping[str, Any]], key: str = "correct") -> dict[str, list[float]]:
    """Upstream's per-tag lists: for every tag, 1.0/0.0 (``records[i][key]``) on its images and −10.0 elsewhere."""
    grouped: dict[str, list[float]] = {tag: [] for tag in TAGS}
    for rec in records:
        for tag in TAGS:
            grouped[tag].append((1.0 if rec[key] else 0.0) if rec["tag"] == tag else NOT_THIS_TAG)
    return grouped


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Benchmark summary: per tag the mean standard/strict accuracy and mean score; ``overall`` = plain mean
    over the tags present of the per-tag standard accuracy (GenEval's score; all 6 tags in the official set),
    ``overall_strict`` likewise. Also the plain image means ``mean_score``, ``accuracy``, ``strict_accuracy``."""
    per_tag: dict[str, dict[str, float]] = {}
    for tag in TAGS:
        recs = [r for r in records if r["tag"] == tag]
        if recs:
            per_tag[tag] = {
                "n": len(recs),
                "accuracy": float(np.mean([bool(r["correct"]) for r in recs])),
                "strict_accuracy": float(np.mean([bool(r["strict_correct"]) for r in recs])),
                "score": float(np.mean([r["score"] for r in recs])),
            }
    n = len(records)
    return {
        "per_tag": per_tag,
        "overall": float(np.mean([v["accuracy"] for v in per_tag.values()])) if per_tag else float("nan"),
        "overall_strict": float(np.mean([v["strict_accuracy"] for v in per_tag.values()])) if per_tag else float("nan"),
        "accuracy": float(np.mean([bool(r["correct"]) for r in records])) if n else float("nan"),
        "strict_accuracy": float(np.mean([bool(r["strict_correct"]) for r in records])) if n else float("nan"),
        "mean_score": float(np.mean([r["score"] for r in records])) if n else float("nan"),
        "n": n,
    }


def detections_to_json(detections: Detections, credits: Mapping[str, Sequence[float | None]] | None = None) -> dict[str, list[dict]]:
    """Boxes, scores, colours (and credits) per class, without masks."""
    out = {}
    for cls, dets in detections.items():
        rows = []
        for i, d in enumerate(dets):
            row = {"box": [float(v) for v in d.box[:4]], "score": float(d.score), "color": d.color}
            if credits is not None:
                row["credit"] = credits[cls][i]
            rows.append(row)
        out[cls] = rows
    return out


def detections_from_json(data: Mapping[str, Sequence[Mapping[str, Any]]]) -> Detections:
    """Inverse of :func:`detections_to_json` (masks are not stored, so they come back as None)."""
    return {cls: [Detection(box=tuple(r["box"]), score=r["score"], color=r.get("color")) for r in rows] for cls, rows in data.items()}
