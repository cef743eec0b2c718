"""OCR reward maps: where in the image the prompt's quoted text is written right, wrong, or not at all.

Scalar (upstream, flow_grpo ``ocr.py`` as used by DiffusionNFT; docs/upstream_facts.md §B). The target is the first
quoted span, ``prompt.split('"')[1]``. The recognised string joins the texts of all engine lines with
confidence > 0 (the engine already dropped lines below ``drop_score = 0.5``) with ``""``. Both strings are
normalised by removing ``' '`` and lowercasing, then

    dist   = 0                              if target is a substring of recognised
           = Levenshtein(recognised, target)  otherwise
    dist   = min(dist, len(target))
    reward = 1 - dist / len(target)          and 0 when the engine raises.

Upstream crashes on a prompt without a quote and on a target that normalises to ``""``; here both raise
:class:`RewardMapError` naming the scorer and the sample index.

Engines. ``ocr_map`` runs RapidOCR (``rapidocr-onnxruntime``: PP-OCRv4 det + rec in ONNX, the model family
upstream runs through PaddleOCR 2.9.1, whose English pipeline is PP-OCRv3 det + en PP-OCRv4 rec; RapidOCR
bundles the Chinese+English ch_PP-OCRv4 models, so recognitions can differ slightly). Detection settings
default to PaddleOCR 2.9.1's (limit 960 "max", thresh 0.3, box_thresh 0.6, unclip 1.5, no dilation), the
angle classifier is off (upstream ``use_angle_cls=False``). ``ocr_map_tesseract`` runs Tesseract through
pytesseract; its words play the role of lines, confidence = Tesseract conf / 100.

Channel order. Upstream hands the RGB uint8 array ``(x * 255).round()`` to PaddleOCR, which treats arrays
as BGR. ``ocr_map`` does the same by default (``channel_order="rgb_as_bgr"``) so that the scalar sees
what upstream's engine saw; ``channel_order="bgr"`` feeds true BGR (recognitions differ on ~7 % of
rendered test images). Tesseract is given true RGB (no upstream to mimic).

Map (values in [0, 1], 0.5 = no information), painted at image resolution and area-pooled to
``(H // map_stride, W // map_stride)`` (default 8: the SD3 latent grid):

1. Character labels. The normalised recognised string ``R`` is aligned to the target ``T`` by a fitting
   alignment (all of ``T``, a window of ``R``; unit costs, :func:`align_to_target`); when ``T`` is a
   substring of ``R`` the window is that occurrence, as in the scalar's substring rule. Characters of
   ``R`` aligned to an equal target character score 1; substituted characters, characters inside the
   window that the target lacks, and characters outside the window (extra text) score 0; further exact
   occurrences of ``T`` score 1. Target characters aligned to nothing are *missing*;
   ``missing_frac = missing / len(T)``.
2. Kept lines (confidence ≥ drop_score and > 0) are filled with their mean character score, then each
   character's box with its own score. RapidOCR's ``return_word_box=True`` gives per-character boxes;
   otherwise (Tesseract, or when the engine's boxes do not match its text) the line box is split evenly
   along its length, one slice per character (spaces included, so positions stay put).
3. Missing text. If ``missing_frac > 0``, the *unexplained text-like* region is the set of pixels where the
   detector's text probability is ≥ ``text_prob_thresh`` or a low-confidence line lies, outside every kept
   line. If it covers ≥ ``min_unexplained_frac`` of the image it is painted ``0.5 * (1 - missing_frac)``
   (text that should have been the target but is unreadable) and everything else stays 0.5. Otherwise the
   documented fallback applies: every pixel outside kept lines gets ``0.5 - missing_penalty * missing_frac``
   (a mild global penalty; the group normalisation then localises missing text against the peers that
   did write it). With nothing missing, unexplained regions stay neutral.

An image without any text therefore scores 0 with a uniform map of ``0.5 - missing_penalty``; a correct
image scores 1 with 1 on the text and 0.5 elsewhere; a correct sign next to a wrong one scores 1 (the
substring rule) while the map marks the wrong sign 0, which a scalar cannot see.

Cost per 512x512 image on this 2-core CPU while it was shared (load ≈ 7): RapidOCR with character boxes
0.3 s (quiet machine) to 0.65 s (loaded), one onnxruntime thread; Tesseract 0.4–1.1 s; the alignment and
painting ≈ 20 ms. Batches run on ``num_workers`` threads, each with its own engine (onnxruntime and the
tesseract subprocess release the GIL): 2 workers on 2 cores gave 0.74 s per image under that load.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reward_maps.base import RewardMapError, RewardOutput, check_images, register

__all__ = [
    "TextLine",
    "Alignment",
    "extract_target",
    "normalize_text",
    "levenshtein",
    "upstream_distance",
    "upstream_ocr_reward",
    "is_kept",
    "kept_lines",
    "recognized_text",
    "align_to_target",
    "spread_char_boxes",
    "line_char_boxes",
    "character_values",
    "paint_reward_map",
    "pool_map",
    "OcrMapScorer",
    "ocr_map",
    "ocr_map_tesseract",
]

logger = logging.getLogger(__name__)

UPSTREAM_DROP_SCORE = 0.5  # PaddleOCR 2.9.1 drop_score (= RapidOCR text_score)
NEUTRAL = 0.5
MATCH, WRONG, EXTRA = "match", "wrong", "extra"
LABEL_VALUE = {MATCH: 1.0, WRONG: 0.0, EXTRA: 0.0}

# PaddleOCR 2.9.1 detector defaults (utility.py parse_args), mapped to RapidOCR option names.
PADDLE_DET_OPTIONS = {
    "det_limit_side_len": 960,
    "det_limit_type": "max",
    "det_thresh": 0.3,
    "det_box_thresh": 0.6,
    "det_unclip_ratio": 1.5,
    "det_donot_use_dilation": True,
    "det_score_mode": "fast",
    # PaddleOCR's det NormalizeImage (ImageNet statistics); RapidOCR's own default is 0.5 / 0.5.
    "det_mean": [0.485, 0.456, 0.406],
    "det_std": [0.229, 0.224, 0.225],
}
CHANNEL_ORDERS = ("rgb_as_bgr", "bgr")


# ---------------------------------------------------------------------------------------------------
# Target and scalar: the upstream rule
# ---------------------------------------------------------------------------------------------------


def extract_target(prompt: str, scorer: str = "ocr_map", index: int | None = None) -> str:
    """The OCR target of ``prompt``: ``prompt.split('"')[1]`` (upstream), not normalised.

    Raises RewardMapError naming the scorer and sample index when the prompt has no ``"`` (upstream:
    IndexError) or the target is empty after normalisation (upstream: ZeroDivisionError).
    """
    where = f"reward scorer {scorer!r}: prompt" + (f" {index}" if index is not None else "")
    parts = prompt.split('"')
    if len(parts) < 2:
        raise RewardMapError(
            f"{where} has no quoted text; the OCR target is the text after the first double quote "
            f"(prompt.split('\"')[1]), e.g. 'a sign that says \"OPEN\"'. Got {prompt!r}"
        )
    target = parts[1]
    if not normalize_text(target):
        raise RewardMapError(f"{where} quotes an empty text {target!r} (spaces do not count); got {prompt!r}")
    return target


def validate_ocr_prompts(prompts: list[str], metadata: list[dict], **options) -> list[tuple[int, str]]:
    """Dataset check before any model loads: [(index, why)] of prompts without an OCR target
    (:func:`extract_target`'s rule). ``options`` are the scorer's factory options (unused)."""
    problems = []
    for i, prompt in enumerate(prompts):
        parts = prompt.split('"')
        if len(parts) < 2:
            problems.append((i, "no quoted text: the OCR target is the text after the first double quote, "
                                'e.g. a sign that says "OPEN"'))
        elif not normalize_text(parts[1]):
            problems.append((i, f"quotes an empty text {parts[1]!r} (spaces do not count)"))
    return problems


def normalize_text(text: str) -> str:
    """Upstream normalisation: remove ASCII spaces ``' '`` only (not tabs or newlines), then lowercase."""
    return text.replace(" ", "").lower()


def upstream_distance(a: str, b: str) -> int:
    """python-Levenshtein's ``distance`` (package ``Levenshtein``), the function upstream's OCR reward calls."""
    try:
        from Levenshtein import distance
    except ImportError as err:
        raise RewardMapError("reward scorer 'ocr_map': the upstream OCR reward needs python-Levenshtein: "
                             "pip install 'Levenshtein>=0.21' (or the extra u-diffusionnft[ocr])") from err
    return int(distance(a, b))


def levenshtein(a: str, b: str) -> int:
    """Edit distance with unit insert / delete / substitute costs (equal to :func:`upstream_distance`).

    Used by the character alignment; the scalar calls :func:`upstream_distance`."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def upstream_ocr_reward(recognized: str, target: str) -> tuple[float, int]:
    """Upstream OCR reward and its clipped distance, from the raw recognised string and raw target.

    reward = 1 - min(dist, len(T)) / len(T), dist = 0 if T ⊂ R else Levenshtein(R, T),
    with R, T normalised by :func:`normalize_text` (yifan123/flow_grpo ``flow_grpo/ocr.py``, whose distance is
    python-Levenshtein's: :func:`upstream_distance`). T must be non-empty after normalising.
    """
    r, t = normalize_text(recognized), normalize_text(target)
    dist = 0 if t in r else upstream_distance(r, t)
    dist = min(dist, len(t))
    return 1.0 - dist / len(t), dist


# ---------------------------------------------------------------------------------------------------
# Engine results
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TextLine:
    """One recognised text region: a RapidOCR line or a Tesseract word.

    box:        4 (x, y) image-pixel points, clockwise from top-left (the reading direction runs
                from the first to the second point).
    text:       the recognised text, raw (spaces and case as the engine returned them).
    score:      recognition confidence in [0, 1].
    char_boxes: one 4-point box per character of ``text`` when the engine gives them, else None.
    """

    box: tuple[tuple[float, float], ...]
    text: str
    score: float
    char_boxes: tuple[tuple[tuple[float, float], ...], ...] | None = None


def is_kept(line: TextLine, drop_score: float = UPSTREAM_DROP_SCORE) -> bool:
    """Whether a line reaches upstream's reward: ``score >= drop_score`` (engine filter) and ``score > 0``."""
    return line.score >= drop_score and line.score > 0


def kept_lines(lines: Sequence[TextLine], drop_score: float = UPSTREAM_DROP_SCORE) -> list[TextLine]:
    """The lines that reach upstream's reward (:func:`is_kept`), in engine order."""
    return [line for line in lines if is_kept(line, drop_score)]


def recognized_text(lines: Sequence[TextLine], drop_score: float = UPSTREAM_DROP_SCORE) -> str:
    """Upstream's recognised string: the kept lines' texts joined with ``""`` in engine order."""
    return "".join(line.text for line in kept_lines(lines, drop_score))


# ---------------------------------------------------------------------------------------------------
# Alignment of recognised characters to the target
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Fitting alignment of the whole target T to a window R[start:end] of the recognised string.

    labels:  one of "match" / "wrong" / "extra" per character of R.
    missing: number of target characters aligned to no character of R.
    cost:    edit cost of the window, ``min over i <= j of Levenshtein(R[i:j], T)``.
    window:  (start, end) of the aligned window in R.
    """

    labels: tuple[str, ...]
    missing: int
    cost: int
    window: tuple[int, int]


def align_to_target(recognized: str, target: str) -> Alignment:
    """Align the (normalised) target to its best-matching window of the (normalised) recognised string.

    Semi-global DP (Sellers 1980): D[0][j] = 0 (the window may start anywhere in R), D[i][0] = i,
    D[i][j] = min(D[i-1][j-1] + [T_i != R_j], D[i-1][j] + 1 (T_i missing), D[i][j-1] + 1 (R_j extra)),
    end = the last j minimising D[m][j]. Ties in the traceback prefer match/substitution, then extra.
    Characters outside the window are "extra"; further exact occurrences of T outside it are "match".
    """
    m, n = len(target), len(recognized)
    table = np.zeros((m + 1, n + 1), dtype=np.int64)
    table[:, 0] = np.arange(m + 1)
    for i in range(1, m + 1):
        for j in range(1, n + 1):
            table[i, j] = min(
                table[i - 1, j - 1] + (target[i - 1] != recognized[j - 1]),
                table[i - 1, j] + 1,
                table[i, j - 1] + 1,
            )
    # The last minimising end: on a tie it keeps a substituted character in the window (marked wrong
    # where it stands) rather than counting it extra and the target's character missing.
    end = n - int(np.argmin(table[m][::-1]))
    labels = [EXTRA] * n
    missing = 0
    i, j = m, end
    while i > 0:
        if j > 0 and table[i, j] == table[i - 1, j - 1] + (target[i - 1] != recognized[j - 1]):
            labels[j - 1] = MATCH if target[i - 1] == recognized[j - 1] else WRONG
            i, j = i - 1, j - 1
        elif j > 0 and table[i, j] == table[i, j - 1] + 1:
            j -= 1  # labels[j] stays EXTRA: a character inside the window the target lacks
        else:
            missing += 1
            i -= 1
    start = j
    # A second correct copy of the target is not wrong text: score it like the first.
    search = 0
    while m and (k := recognized.find(target, search)) != -1:
        if all(label == EXTRA for label in labels[k : k + m]):
            labels[k : k + m] = [MATCH] * m
            search = k + m
        else:
            search = k + 1
    return Alignment(tuple(labels), missing, int(table[m, end]), (start, end))


# ---------------------------------------------------------------------------------------------------
# Character boxes and painting
# ---------------------------------------------------------------------------------------------------


def spread_char_boxes(box: Sequence[Sequence[float]], n: int) -> list[np.ndarray]:
    """Split a 4-point line box (tl, tr, br, bl) into ``n`` equal slices along its reading direction.

    Slice k spans fractions [k/n, (k+1)/n] of both the top edge tl→tr and the bottom edge bl→br.
    Returns n arrays of shape (4, 2), clockwise from top-left.
    """
    tl, tr, br, bl = (np.asarray(p, dtype=np.float64) for p in box)
    slices = []
    for k in range(n):
        a, b = k / n, (k + 1) / n
        slices.append(np.stack([tl + (tr - tl) * a, tl + (tr - tl) * b, bl + (br - bl) * b, bl + (br - bl) * a]))
    return slices


def line_char_boxes(line: TextLine) -> list[np.ndarray]:
    """One (4, 2) box per character of ``line.text``: the engine's own when it gave one per character,
    else :func:`spread_char_boxes` of the line box."""
    if line.char_boxes is not None and len(line.char_boxes) == len(line.text):
        return [np.asarray(b, dtype=np.float64) for b in line.char_boxes]
    return spread_char_boxes(line.box, len(line.text))


def character_values(lines: Sequence[TextLine], target: str) -> tuple[list[list[float | None]], Alignment]:
    """Per-character scores of the kept ``lines`` against the raw ``target``.

    Characters are normalised one by one (``' '`` dropped → value None, others lowercased, which may give
    several characters whose labels are averaged) and concatenated in line order, the string the scalar
    sees; :func:`align_to_target` labels them, and "match" → 1, "wrong"/"extra" → 0.
    Returns (values per line per character, the alignment).
    """
    owners: list[tuple[int, int]] = []
    pieces: list[str] = []
    for line_index, line in enumerate(lines):
        for char_index, char in enumerate(line.text):
            if char == " ":
                continue
            lowered = char.lower()
            owners.extend([(line_index, char_index)] * len(lowered))
            pieces.append(lowered)
    alignment = align_to_target("".join(pieces), normalize_text(target))
    sums = [[0.0] * len(line.text) for line in lines]
    counts = [[0] * len(line.text) for line in lines]
    for (line_index, char_index), label in zip(owners, alignment.labels):
        sums[line_index][char_index] += LABEL_VALUE[label]
        counts[line_index][char_index] += 1
    values = [
        [s / c if c else None for s, c in zip(line_sums, line_counts)]
        for line_sums, line_counts in zip(sums, counts)
    ]
    return values, alignment


def _polygon_mask(shape: tuple[int, int], polygons: Sequence[np.ndarray]) -> np.ndarray:
    """(H, W) bool mask of the union of polygons given in image pixels (PIL rasterisation, edges included)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        draw.polygon([(float(x), float(y)) for x, y in polygon], fill=1)
    return np.asarray(canvas, dtype=bool)


def paint_reward_map(
    shape: tuple[int, int],
    lines: Sequence[TextLine],
    values: Sequence[Sequence[float | None]],
    missing_frac: float,
    unexplained: np.ndarray | None = None,
    missing_penalty: float = 0.1,
    min_unexplained_frac: float = 1e-3,
) -> tuple[np.ndarray, str]:
    """Paint the (H, W) float32 OCR reward map (module docstring, rule 2–3).

    shape:        (H, W) image size in pixels.
    lines:        the kept lines; ``values[k][c]`` is the score of character c of line k (None: no score).
    missing_frac: fraction of target characters not read anywhere, in [0, 1].
    unexplained:  (H, W) bool mask of text-like pixels (detector probability, low-confidence lines), or None.
    Returns (map, missing-text mode: "none" | "text_like" | "global").
    """
    from PIL import Image, ImageDraw

    height, width = shape
    line_mask = _polygon_mask(shape, [np.asarray(line.box) for line in lines])
    base = np.full(shape, NEUTRAL, dtype=np.float32)
    mode = "none"
    if missing_frac > 0:
        region = unexplained & ~line_mask if unexplained is not None else None
        if region is not None and region.mean() >= min_unexplained_frac:
            base[region] = NEUTRAL * (1.0 - missing_frac)
            mode = "text_like"
        else:
            base[:] = NEUTRAL - missing_penalty * missing_frac
            mode = "global"
    canvas = Image.fromarray(base, mode="F")
    draw = ImageDraw.Draw(canvas)
    for line, line_values in zip(lines, values):
        scored = [v for v in line_values if v is not None]
        if not scored:
            continue
        draw.polygon([(float(x), float(y)) for x, y in line.box], fill=float(np.mean(scored)))
        for char_box, value in zip(line_char_boxes(line), line_values):
            if value is not None:
                draw.polygon([(float(x), float(y)) for x, y in char_box], fill=float(value))
    painted = np.asarray(canvas, dtype=np.float32).reshape(height, width)
    return np.clip(painted, 0.0, 1.0), mode


def pool_map(reward_map: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Area-average an (H, W) map to ``size`` = (h, w) (exact block means when h | H and w | W)."""
    tensor = torch.as_tensor(reward_map, dtype=torch.float32)[None, None]
    return F.adaptive_avg_pool2d(tensor, size)[0, 0]


def _text_prob_mask(prob: np.ndarray | None, shape: tuple[int, int], thresh: float) -> np.ndarray | None:
    """Resize the detector's (h, w) text probability to the image and threshold it (bool (H, W))."""
    if prob is None:
        return None
    from PIL import Image

    resized = Image.fromarray(prob.astype(np.float32), mode="F").resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32) >= thresh


# ---------------------------------------------------------------------------------------------------
# Engines: image (H, W, 3) uint8 RGB -> (all lines incl. low-confidence, text probability or None)
# ---------------------------------------------------------------------------------------------------


class _CapturingSession:
    """Wraps RapidOCR's detector session and keeps its last output: the DB text-probability map."""

    def __init__(self, session: Callable[[np.ndarray], Any]):
        self.session = session
        self.last: np.ndarray | None = None

    def __call__(self, batch: np.ndarray):
        outputs = self.session(batch)
        self.last = np.asarray(outputs[0])
        return outputs

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def _use_fixed_side_limit(text_det: Any, options: dict[str, Any]) -> None:
    """Make RapidOCR's detector resize as PaddleOCR's ``DetResizeForTest`` does.

    RapidOCR 1.4's ``TextDetector.get_preprocess`` ignores ``det_limit_side_len`` when
    ``det_limit_type="max"``: it picks 960 / 1500 / 2000 from the image's longer side, so a 1024 px image
    is run at 1024 px, where PaddleOCR (limit 960, type max) runs it at 960 px. Here the configured limit
    is used for every image (the mean / std stay the configured ones).
    """
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    limit, kind = int(options["det_limit_side_len"]), str(options["det_limit_type"])
    mean, std = text_det.mean, text_det.std
    text_det.get_preprocess = lambda max_wh: DetPreProcess(limit, kind, mean, std)


class _RapidEngine:
    """One RapidOCR instance (not shared between threads) and the options of its call."""

    name = "rapidocr"

    def __init__(self, channel_order: str, intra_op_threads: int, engine_options: dict[str, Any], word_boxes: bool):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as err:
            raise RewardMapError(
                "reward scorer 'ocr_map' needs rapidocr-onnxruntime: pip install 'rapidocr-onnxruntime>=1.4' "
                f"(or the extra u-diffusionnft[ocr]); import failed: {err}"
            ) from err
        options = {
            **PADDLE_DET_OPTIONS,
            "use_cls": False,  # upstream use_angle_cls=False
            "text_score": 0.0,  # keep low-confidence lines; the drop_score cut is applied here
            "intra_op_num_threads": intra_op_threads,
            "inter_op_num_threads": 1,
            **engine_options,
        }
        self.engine = RapidOCR(**options)
        _use_fixed_side_limit(self.engine.text_det, options)
        self.capture = _CapturingSession(self.engine.text_det.infer)
        self.engine.text_det.infer = self.capture
        self.channel_order = channel_order
        self.word_boxes = word_boxes
        # RapidOCR.__call__ resets these post-processing values whenever call options are given.
        self.call_options = {
            "box_thresh": options["det_box_thresh"],
            "unclip_ratio": options["det_unclip_ratio"],
            "text_score": options["text_score"],
        }

    def __call__(self, rgb: np.ndarray) -> tuple[list[TextLine], np.ndarray | None]:
        array = np.ascontiguousarray(rgb[..., ::-1]) if self.channel_order == "bgr" else rgb
        self.capture.last = None
        try:
            result, _ = self.engine(array, use_cls=False, return_word_box=self.word_boxes, **self.call_options)
        except Exception:  # noqa: BLE001 - the word-box step is ours, not upstream's: retry without it
            if not self.word_boxes:
                raise
            result, _ = self.engine(array, use_cls=False, return_word_box=False, **self.call_options)
        lines = [self._line(entry) for entry in (result or [])]
        return lines, self._probability(rgb.shape[:2])

    @staticmethod
    def _line(entry: list) -> TextLine:
        box = tuple((float(x), float(y)) for x, y in entry[0])
        text, score = str(entry[1]), float(entry[2])
        char_boxes = None
        if len(entry) >= 5 and entry[3] and "".join(entry[4]) == text and len(entry[3]) == len(text):
            char_boxes = tuple(tuple((float(x), float(y)) for x, y in b) for b in entry[3])
        return TextLine(box, text, score, char_boxes)

    def _probability(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The DB probability (h, w), or None when RapidOCR letterboxed the input (its frame then differs)."""
        height, width = shape
        if self.capture.last is None:
            return None
        letterboxed = height <= self.engine.min_height or (
            self.engine.width_height_ratio != -1 and width / height > self.engine.width_height_ratio
        )
        return None if letterboxed else self.capture.last[0, 0]


class _TesseractEngine:
    """Tesseract via pytesseract; words become lines (no character boxes, no probability map)."""

    name = "tesseract"

    def __init__(self, lang: str, config: str, tesseract_cmd: str | None):
        try:
            import pytesseract
        except ImportError as err:
            raise RewardMapError(
                f"reward scorer 'ocr_map_tesseract' needs pytesseract: pip install pytesseract; import failed: {err}"
            ) from err
        command = tesseract_cmd or pytesseract.pytesseract.tesseract_cmd
        if shutil.which(command) is None:
            raise RewardMapError(
                f"reward scorer 'ocr_map_tesseract': the tesseract binary {command!r} was not found; install it "
                "(Debian: apt-get install tesseract-ocr) or pass tesseract_cmd=<path>"
            )
        if tesseract_cmd is not None:
            # pytesseract reads the binary from a module global; there is no per-call option.
            pytesseract.pytesseract.tesseract_cmd = tesseract_cmd
        self.pytesseract = pytesseract
        self.lang = lang
        self.config = config

    def __call__(self, rgb: np.ndarray) -> tuple[list[TextLine], None]:
        from PIL import Image

        data = self.pytesseract.image_to_data(
            Image.fromarray(rgb), lang=self.lang, config=self.config, output_type=self.pytesseract.Output.DICT
        )
        lines = []
        for text, conf, left, top, w, h in zip(
            data["text"], data["conf"], data["left"], data["top"], data["width"], data["height"]
        ):
            conf = float(conf)
            if conf < 0 or not str(text).strip():
                continue  # conf -1 marks page/block/line rows, not words
            x0, y0, x1, y1 = float(left), float(top), float(left + w), float(top + h)
            lines.append(TextLine(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), str(text), conf / 100.0))
        return lines, None


# ---------------------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------------------


def _to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float [0, 1] → (B, H, W, 3) uint8 as upstream: ``(x * 255).round().clamp(0, 255)``."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class OcrMapScorer:
    """Callable scorer; builds ``num_workers`` engines once and scores a batch on a thread pool."""

    def __init__(
        self,
        name: str,
        make_engine: Callable[[], Any],
        num_workers: int,
        device: str,
        drop_score: float,
        map_stride: int,
        map_size: tuple[int, int] | None,
        missing_penalty: float,
        text_prob_thresh: float | None,
        min_unexplained_frac: float,
    ):
        self.name = name
        self.device = device
        self.drop_score = drop_score
        self.map_stride = map_stride
        self.map_size = map_size
        self.missing_penalty = missing_penalty
        self.text_prob_thresh = text_prob_thresh
        self.min_unexplained_frac = min_unexplained_frac
        self.engines: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(num_workers):
            self.engines.put(make_engine())
        self.pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix=name) if num_workers > 1 else None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        if self.map_size is not None:
            return self.map_size
        return max(1, height // self.map_stride), max(1, width // self.map_stride)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> RewardOutput:
        check_images(self.name, images, prompts, metadata)
        targets = [extract_target(prompt, self.name, i) for i, prompt in enumerate(prompts)]
        arrays = _to_uint8_rgb(images)
        jobs = list(zip(arrays, targets))
        results = list(self.pool.map(self._score_one, jobs)) if self.pool else [self._score_one(j) for j in jobs]
        maps = torch.stack([r[0] for r in results]).to(self.device)
        scores = torch.tensor([r[1] for r in results], dtype=torch.float32, device=self.device)
        return RewardOutput(maps=maps, scores=scores, info=[r[2] for r in results], value_range=(0.0, 1.0))

    def _score_one(self, job: tuple[np.ndarray, str]) -> tuple[torch.Tensor, float, dict[str, Any]]:
        rgb, target = job
        shape = rgb.shape[:2]
        engine = self.engines.get()
        error = None
        try:
            lines, prob = engine(rgb)
        except Exception as err:  # noqa: BLE001 - upstream scores an engine failure as 0, so do we
            logger.warning("reward scorer %r: OCR engine failed (%r); scoring the image 0 as upstream", self.name, err)
            lines, prob, error = [], None, repr(err)
        finally:
            self.engines.put(engine)
        # Score (upstream scalar)
        kept = kept_lines(lines, self.drop_score)
        recognized = recognized_text(lines, self.drop_score)
        score, dist = upstream_ocr_reward(recognized, target)
        # Map
        values, alignment = character_values(kept, target)
        missing_frac = alignment.missing / len(normalize_text(target))
        unexplained = _text_prob_mask(prob, shape, self.text_prob_thresh) if self.text_prob_thresh is not None else None
        weak = [np.asarray(line.box) for line in lines if not is_kept(line, self.drop_score)]
        if weak:
            weak_mask = _polygon_mask(shape, weak)
            unexplained = weak_mask if unexplained is None else unexplained | weak_mask
        reward_map, mode = paint_reward_map(
            shape, kept, values, missing_frac, unexplained, self.missing_penalty, self.min_unexplained_frac
        )
        info = {
            "engine": engine.name,
            "target": target,
            "recognized": normalize_text(recognized),
            "distance": dist,
            "missing": alignment.missing,
            "wrong": alignment.labels.count(WRONG),
            "extra": alignment.labels.count(EXTRA),
            "missing_mode": mode,
            "lines": [
                {"text": line.text, "score": line.score, "box": [list(p) for p in line.box],
                 "kept": is_kept(line, self.drop_score)}
                for line in lines
            ],
        }
        if error is not None:
            info["error"] = error
        return pool_map(reward_map, self.output_size(*shape)), float(score), info


def _check_common_options(name: str, num_workers: int, drop_score: float, map_stride: int,
                          map_size, missing_penalty: float, min_unexplained_frac: float) -> tuple[int, int] | None:
    """Validate options shared by both OCR scorers; errors name the scorer and option."""
    if not isinstance(num_workers, int) or num_workers < 1:
        raise RewardMapError(f"reward scorer {name!r}: num_workers must be an int >= 1, got {num_workers!r}")
    if not 0.0 <= drop_score <= 1.0:
        raise RewardMapError(f"reward scorer {name!r}: drop_score must be in [0, 1], got {drop_score!r}")
    if not isinstance(map_stride, int) or map_stride < 1:
        raise RewardMapError(f"reward scorer {name!r}: map_stride must be an int >= 1, got {map_stride!r}")
    if map_size is not None:
        if len(map_size) != 2 or any(not isinstance(s, int) or s < 1 for s in map_size):
            raise RewardMapError(f"reward scorer {name!r}: map_size must be (h, w) positive ints or None, got {map_size!r}")
        map_size = (int(map_size[0]), int(map_size[1]))
    if not 0.0 <= missing_penalty <= NEUTRAL:
        raise RewardMapError(f"reward scorer {name!r}: missing_penalty must be in [0, 0.5], got {missing_penalty!r}")
    if not 0.0 <= min_unexplained_frac <= 1.0:
        raise RewardMapError(
            f"reward scorer {name!r}: min_unexplained_frac must be in [0, 1], got {min_unexplained_frac!r}"
        )
    return map_size


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@register("ocr_map", validate=validate_ocr_prompts)
def ocr_map(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    num_workers: int | None = None,
    intra_op_threads: int | None = None,
    channel_order: str = "rgb_as_bgr",
    drop_score: float = UPSTREAM_DROP_SCORE,
    word_boxes: bool = True,
    use_text_prob: bool = True,
    text_prob_thresh: float = 0.3,
    min_unexplained_frac: float = 1e-3,
    missing_penalty: float = 0.1,
    map_stride: int = 8,
    map_size: tuple[int, int] | None = None,
    engine_options: dict[str, Any] | None = None,
) -> OcrMapScorer:
    """OCR reward map with RapidOCR (PP-OCRv4 ONNX). ``dtype`` is unused (no torch model); maps are float32.

    num_workers:      threads (one engine each); default min(4, CPUs).
    intra_op_threads: onnxruntime threads per engine; default max(1, CPUs // num_workers).
    channel_order:    "rgb_as_bgr" (upstream: RGB array to a BGR engine) or "bgr" (true colours).
    drop_score:       confidence cut of lines that count (upstream 0.5).
    word_boxes:       use RapidOCR's per-character boxes (else even spread along each line).
    use_text_prob:    localise missing text with the detector's text probability ≥ text_prob_thresh.
    missing_penalty:  global fallback slope: non-text pixels get 0.5 - missing_penalty * missing_frac.
    map_stride / map_size: output grid (H // stride, W // stride) unless map_size=(h, w) is given.
    engine_options:   extra RapidOCR(**kwargs) settings (e.g. det_model_path, rec_model_path, rec_keys_path).
    """
    name = "ocr_map"
    num_workers = _default_workers() if num_workers is None else num_workers
    map_size = _check_common_options(
        name, num_workers, drop_score, map_stride, map_size, missing_penalty, min_unexplained_frac
    )
    if not 0.0 <= text_prob_thresh <= 1.0:
        raise RewardMapError(f"reward scorer {name!r}: text_prob_thresh must be in [0, 1], got {text_prob_thresh!r}")
    if channel_order not in CHANNEL_ORDERS:
        raise RewardMapError(f"reward scorer {name!r}: channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
    if intra_op_threads is None:
        intra_op_threads = max(1, (os.cpu_count() or 1) // num_workers)
    if not isinstance(intra_op_threads, int) or intra_op_threads < 1:
        raise RewardMapError(f"reward scorer {name!r}: intra_op_threads must be an int >= 1, got {intra_op_threads!r}")
    engine_options = dict(engine_options or {})

    def make_engine() -> _RapidEngine:
        return _RapidEngine(channel_order, intra_op_threads, engine_options, word_boxes)

    return OcrMapScorer(
        name, make_engine, num_workers, device, drop_score, map_stride, map_size, missing_penalty,
        text_prob_thresh if use_text_prob else None, min_unexplained_frac,
    )


@register("ocr_map_tesseract", validate=validate_ocr_prompts)
def ocr_map_tesseract(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    num_workers: int | None = None,
    lang: str = "eng",
    tesseract_config: str = "--psm 11",
    tesseract_cmd: str | None = None,
    drop_score: float = UPSTREAM_DROP_SCORE,
    min_unexplained_frac: float = 1e-3,
    missing_penalty: float = 0.1,
    map_stride: int = 8,
    map_size: tuple[int, int] | None = None,
) -> OcrMapScorer:
    """OCR reward map with Tesseract (pytesseract). Same map rule as :func:`ocr_map`; words are the
    lines, confidence = conf / 100, characters are spread evenly over each word box, and missing text is
    localised only on low-confidence words (Tesseract has no probability map).

    tesseract_config: extra tesseract CLI flags; "--psm 11" (sparse text) suits signs in scenes.
    tesseract_cmd:    path of the tesseract binary (default: pytesseract's, "tesseract" on PATH).
    """
    name = "ocr_map_tesseract"
    num_workers = _default_workers() if num_workers is None else num_workers
    map_size = _check_common_options(
        name, num_workers, drop_score, map_stride, map_size, missing_penalty, min_unexplained_frac
    )

    def make_engine() -> _TesseractEngine:
        return _TesseractEngine(lang, tesseract_config, tesseract_cmd)

    return OcrMapScorer(
        name, make_engine, num_workers, device, drop_score, map_stride, map_size, missing_penalty, None,
        min_unexplained_frac,
    )
