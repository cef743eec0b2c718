"""OCR reward map: the upstream scalar rule, the character alignment, the painting rule, and both engines
on text rendered with PIL at 512 px (correct, misspelled, partial, absent, and an extra wrong sign)."""
from __future__ import annotations

import functools
import json
import shutil
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reward_maps import build_scorer, registered_names
from reward_maps.base import RewardMapError, validate_output
from reward_maps.ocr import (
    EXTRA,
    MATCH,
    WRONG,
    TextLine,
    _RapidEngine,
    _text_prob_mask,
    align_to_target,
    character_values,
    extract_target,
    kept_lines,
    levenshtein,
    line_char_boxes,
    normalize_text,
    paint_reward_map,
    pool_map,
    recognized_text,
    spread_char_boxes,
    upstream_ocr_reward,
)

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"
SIZE = 512
PROMPT = 'A shop window with a neon sign that says "Open Now", at night'
TEXT_XY = (40, 60)  # the target sign; its letters fill rows ≈ 70–120 px, i.e. map rows 8–15
EXTRA_XY = (40, 330)  # the second sign; map rows ≈ 42–49
CASES = {
    "correct": [(TEXT_XY, "OPEN NOW")],
    "misspelled": [(TEXT_XY, "OPEM NOW")],
    "partial": [(TEXT_XY, "OPEN")],
    "absent": [],
    "extra_sign": [(TEXT_XY, "OPEN NOW"), (EXTRA_XY, "CLOSED")],
}


def render(items, size: int = SIZE, font_size: int = 56) -> torch.Tensor:
    """(3, size, size) float image in [0, 1]: black DejaVuSans-Bold text on white."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(FONT, font_size)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for xy, text in items:
        draw.text(xy, text, font=font, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def quad(x0, y0, x1, y1):
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


# ---------------------------------------------------------------------------------------------------
# Target extraction and the upstream scalar
# ---------------------------------------------------------------------------------------------------


def test_target_is_first_quoted_span_as_upstream_split():
    assert extract_target('a sign "Hello World" and "Other"') == "Hello World"
    # upstream takes split('"')[1] even when the quote is never closed
    assert extract_target('a sign saying "Open late') == "Open late"


def test_prompt_without_quote_raises_error_naming_scorer_and_index():
    with pytest.raises(RewardMapError, match=r"'ocr_map': prompt 3 has no quoted text"):
        extract_target("a sign with no quotes", "ocr_map", 3)


def test_empty_quoted_target_raises_instead_of_dividing_by_zero():
    with pytest.raises(RewardMapError, match="empty text"):
        extract_target('a sign "  " here', "ocr_map", 0)


def test_normalisation_removes_only_ascii_spaces_and_lowercases():
    assert normalize_text("Hello  World") == "helloworld"
    assert normalize_text("A\tB\nC") == "a\tb\nc"


def test_levenshtein_known_distances():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2


@functools.lru_cache(maxsize=None)
def _reference_distance(a: str, b: str) -> int:
    """Textbook recursion, independent of the DP under test."""
    if not a or not b:
        return len(a) + len(b)
    return min(
        _reference_distance(a[1:], b) + 1,
        _reference_distance(a, b[1:]) + 1,
        _reference_distance(a[1:], b[1:]) + (a[0] != b[0]),
    )


@settings(max_examples=80, deadline=None)
@given(st.text("abc", max_size=7), st.text("abc", max_size=7))
def test_levenshtein_equals_reference_recursion_and_is_symmetric(a, b):
    assert levenshtein(a, b) == _reference_distance(a, b) == levenshtein(b, a)


def test_reward_substring_rule_ignores_extra_text():
    assert upstream_ocr_reward("WELCOME hello world xyz", "Hello World") == (1.0, 0)


def test_reward_uses_levenshtein_when_not_a_substring():
    reward, dist = upstream_ocr_reward("helo", "hello")
    assert dist == 1 and reward == pytest.approx(0.8)


def test_reward_clips_distance_at_target_length():
    # Levenshtein("zzzzzzzzzz", "ab") = 10 > 2, clipped to 2: reward 0, never negative
    assert upstream_ocr_reward("zzzzzzzzzz", "ab") == (0.0, 2)
    assert upstream_ocr_reward("", "Open Now") == (0.0, 7)


def test_reward_ignores_case_and_spaces():
    assert upstream_ocr_reward("O P E N now", "open NOW")[0] == 1.0


def test_recognized_text_keeps_lines_at_drop_score_and_above_but_never_zero():
    lines = [
        TextLine(quad(0, 0, 1, 1), "keep", 0.5),
        TextLine(quad(0, 0, 1, 1), "drop", 0.499),
        TextLine(quad(0, 0, 1, 1), "zero", 0.0),
    ]
    assert recognized_text(lines) == "keep"
    assert recognized_text(lines, drop_score=0.0) == "keepdrop"  # confidence 0 never counts (upstream > 0)
    assert [line.text for line in kept_lines(lines, 0.4)] == ["keep", "drop"]


# ---------------------------------------------------------------------------------------------------
# Alignment
# ---------------------------------------------------------------------------------------------------


def test_alignment_of_exact_text_is_all_match():
    a = align_to_target("opennow", "opennow")
    assert a.labels == (MATCH,) * 7 and a.missing == 0 and a.cost == 0


def test_alignment_marks_text_outside_the_target_window_extra():
    a = align_to_target("xxopenyy", "open")
    assert a.labels == (EXTRA, EXTRA, MATCH, MATCH, MATCH, MATCH, EXTRA, EXTRA)
    assert a.window == (2, 6) and a.cost == 0


def test_alignment_marks_substitution_wrong_and_deletion_missing():
    assert align_to_target("opem", "open").labels == (MATCH, MATCH, MATCH, WRONG)
    partial = align_to_target("open", "opennow")
    assert partial.labels == (MATCH,) * 4 and partial.missing == 3


def test_alignment_scores_a_second_exact_copy_as_match_and_a_wrong_copy_as_extra():
    a = align_to_target("openxopen", "open")
    assert a.labels == (MATCH,) * 4 + (EXTRA,) + (MATCH,) * 4
    b = align_to_target("openopem", "open")
    assert b.labels == (MATCH,) * 4 + (EXTRA,) * 4


@settings(max_examples=80, deadline=None)
@given(st.text("abc", max_size=8), st.text("abc", min_size=1, max_size=5))
def test_alignment_cost_is_best_window_levenshtein_and_labels_account_for_it(recognized, target):
    a = align_to_target(recognized, target)
    n = len(recognized)
    best = min(levenshtein(recognized[i:j], target) for i in range(n + 1) for j in range(i, n + 1))
    assert a.cost == best
    start, end = a.window
    inside = a.labels[start:end]
    aligned = inside.count(MATCH) + inside.count(WRONG)
    assert aligned + a.missing == len(target)
    assert inside.count(WRONG) + inside.count(EXTRA) + a.missing == a.cost


# ---------------------------------------------------------------------------------------------------
# Character boxes, values, painting, pooling
# ---------------------------------------------------------------------------------------------------


def test_spread_char_boxes_tile_the_line_box_in_reading_order():
    boxes = spread_char_boxes(quad(10, 20, 110, 40), 4)
    assert len(boxes) == 4
    np.testing.assert_allclose([b[0, 0] for b in boxes], [10, 35, 60, 85])
    np.testing.assert_allclose([b[1, 0] for b in boxes], [35, 60, 85, 110])
    assert all(np.allclose(b[:, 1], [20, 20, 40, 40]) for b in boxes)


def test_engine_char_boxes_are_used_only_when_one_per_character():
    own = TextLine(quad(0, 0, 30, 10), "ab", 0.9, (quad(0, 0, 5, 10), quad(20, 0, 30, 10)))
    assert line_char_boxes(own)[1][0, 0] == 20
    mismatched = TextLine(quad(0, 0, 30, 10), "abc", 0.9, (quad(0, 0, 5, 10),))
    np.testing.assert_allclose(line_char_boxes(mismatched)[1][0, 0], 10)


def test_character_values_skip_spaces_and_span_lines():
    # recognised "opnxx" vs target "open": best window "opn" (cost 1: the 'e' is missing), "xx" is extra
    lines = [TextLine(quad(0, 0, 1, 1), "Op n", 0.9), TextLine(quad(0, 0, 1, 1), "XX", 0.9)]
    values, alignment = character_values(lines, "open")
    assert values == [[1.0, 1.0, None, 1.0], [0.0, 0.0]]
    assert alignment.missing == 1 and alignment.cost == 1


def test_correct_line_is_one_inside_and_neutral_outside():
    line = TextLine(quad(100, 100, 300, 150), "OPEN", 0.99)
    values, alignment = character_values([line], "open")
    reward_map, mode = paint_reward_map((256, 512), [line], values, alignment.missing / 4)
    assert mode == "none"
    assert np.all(reward_map[100:151, 100:301] == 1.0)
    assert np.all(reward_map[:90] == 0.5) and np.all(reward_map[:, 310:] == 0.5)


def test_wrong_character_is_zero_where_it_is_and_one_elsewhere_on_the_line():
    line = TextLine(quad(100, 100, 300, 150), "OPEM", 0.99)
    values, _ = character_values([line], "open")
    reward_map, _ = paint_reward_map((256, 512), [line], values, 0.0)
    assert np.all(reward_map[110:140, 255:295] == 0.0)  # last quarter: the M
    assert np.all(reward_map[110:140, 105:245] == 1.0)


def test_missing_text_penalises_unexplained_text_like_pixels_when_the_detector_sees_them():
    shape = (128, 128)
    line = TextLine(quad(10, 10, 60, 30), "OPEN", 0.99)
    unexplained = np.zeros(shape, dtype=bool)
    unexplained[80:100, 20:100] = True
    unexplained[12:28, 12:58] = True  # inside the kept line: already explained
    reward_map, mode = paint_reward_map(shape, [line], [[1.0] * 4], 3 / 7, unexplained)
    assert mode == "text_like"
    np.testing.assert_allclose(reward_map[80:100, 20:100], 0.5 * (1 - 3 / 7), rtol=1e-6)
    assert np.all(reward_map[10:31, 10:61] == 1.0)
    assert np.all(reward_map[40:70] == 0.5)


def test_missing_text_without_detector_evidence_applies_the_mild_global_penalty():
    shape = (64, 64)
    tiny = np.zeros(shape, dtype=bool)
    tiny[0, 0] = True  # 1 pixel < min_unexplained_frac of the image
    reward_map, mode = paint_reward_map(shape, [], [], 1.0, tiny, missing_penalty=0.1)
    assert mode == "global"
    np.testing.assert_allclose(reward_map, 0.4, rtol=1e-6)


def test_text_probability_is_resized_to_the_image_and_thresholded():
    prob = np.zeros((4, 4), dtype=np.float32)
    prob[1:3, 1:3] = 0.9
    mask = _text_prob_mask(prob, (64, 64), 0.3)
    assert mask.shape == (64, 64) and mask[32, 32] and not mask[2, 2] and not mask[60, 60]


def test_pool_map_is_the_block_mean():
    full = np.zeros((16, 16), dtype=np.float32)
    full[:8, :8] = 1.0
    full[8:, 8:12] = 1.0
    pooled = pool_map(full, (2, 2))
    np.testing.assert_allclose(pooled.numpy(), [[1.0, 0.0], [0.0, 0.5]])


# ---------------------------------------------------------------------------------------------------
# Factories
# ---------------------------------------------------------------------------------------------------


def test_both_ocr_scorers_are_registered():
    assert {"ocr_map", "ocr_map_tesseract"} <= set(registered_names())


@pytest.mark.parametrize(
    "option, value",
    [("channel_order", "rgb"), ("num_workers", 0), ("map_stride", 0), ("missing_penalty", 0.7), ("drop_score", 2.0)],
)
def test_bad_option_is_rejected_naming_the_option(option, value):
    with pytest.raises(RewardMapError, match=option):
        build_scorer("ocr_map", **{option: value})


# ---------------------------------------------------------------------------------------------------
# RapidOCR on rendered text
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rapid_scorer():
    return build_scorer("ocr_map", num_workers=2)


@pytest.fixture(scope="module")
def rapid_results(rapid_scorer):
    images = torch.stack([render(items) for items in CASES.values()])
    out = rapid_scorer(images, [PROMPT] * len(CASES), [{}] * len(CASES))
    out = validate_output("ocr_map", out, len(CASES))
    return {name: (out.maps[i], float(out.scores[i]), out.info[i]) for i, name in enumerate(CASES)}


def test_rapid_map_has_latent_grid_shape_and_json_info(rapid_results):
    reward_map, _, info = rapid_results["correct"]
    assert reward_map.shape == (SIZE // 8, SIZE // 8) and reward_map.dtype == torch.float32
    json.dumps(info)
    assert info["target"] == "Open Now" and info["engine"] == "rapidocr"


def test_rapid_correct_text_scores_one_and_lights_up_only_the_text(rapid_results):
    reward_map, score, info = rapid_results["correct"]
    assert score == 1.0 and info["recognized"] == "opennow"
    assert reward_map[8:16, 6:50].mean() > 0.8
    assert torch.all(reward_map[24:] == 0.5)  # no text below the sign: neutral


def test_rapid_misspelled_text_scores_between_and_marks_the_wrong_letter(rapid_results):
    correct_map = rapid_results["correct"][0]
    reward_map, score, info = rapid_results["misspelled"]
    assert 0.0 < score < 1.0
    assert score == pytest.approx(upstream_ocr_reward(info["recognized"], "Open Now")[0])
    assert info["wrong"] >= 1
    assert reward_map[8:16].min() == 0.0 and reward_map[8:16].mean() < correct_map[8:16].mean()


def test_rapid_partial_text_scores_the_read_fraction_and_penalises_the_rest(rapid_results):
    reward_map, score, info = rapid_results["partial"]
    assert score == pytest.approx(4 / 7) and info["missing"] == 3
    assert reward_map[8:16, 6:25].mean() > 0.8  # OPEN itself is right
    assert reward_map[30:].max() < 0.5  # the missing NOW costs something: global fallback


def test_rapid_absent_text_scores_zero_with_a_uniform_penalty(rapid_results):
    reward_map, score, info = rapid_results["absent"]
    assert score == 0.0 and info["recognized"] == ""
    assert info["missing_mode"] == "global"
    torch.testing.assert_close(reward_map, torch.full_like(reward_map, 0.4))


def test_rapid_extra_wrong_sign_keeps_the_scalar_but_lowers_the_map(rapid_results):
    correct_map, _, _ = rapid_results["correct"]
    reward_map, score, info = rapid_results["extra_sign"]
    assert score == 1.0  # the substring rule: the scalar cannot see the wrong sign
    assert info["extra"] >= 5
    assert reward_map[40:52].min() == 0.0 and torch.all(correct_map[40:52] == 0.5)
    assert reward_map[8:16, 6:50].mean() > 0.8


def test_rapid_prompt_without_quote_raises_before_ocr(rapid_scorer):
    images = torch.stack([render([]), render([])])
    with pytest.raises(RewardMapError, match=r"'ocr_map': prompt 1 has no quoted text"):
        rapid_scorer(images, ['a "sign"', "a sign"], [{}, {}])


def test_rapid_detector_probability_is_high_on_text_and_low_on_background():
    engine = _RapidEngine("rgb_as_bgr", 1, {}, True)
    rgb = (render(CASES["correct"]).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    lines, prob = engine(rgb)
    mask = _text_prob_mask(prob, rgb.shape[:2], 0.3)
    assert mask[85:105, 60:120].mean() > 0.5
    assert mask[250:].mean() == 0.0
    assert lines[0].char_boxes is not None and len(lines[0].char_boxes) == len(lines[0].text)


@pytest.mark.slow
def test_rapid_threaded_batch_equals_sequential_scoring(rapid_results):
    sequential = build_scorer("ocr_map", num_workers=1)
    for name in ("misspelled", "extra_sign"):
        out = sequential(render(CASES[name])[None], [PROMPT], [{}])
        torch.testing.assert_close(out.maps[0], rapid_results[name][0])
        assert float(out.scores[0]) == rapid_results[name][1]


@pytest.mark.slow
def test_rapid_cost_per_512px_image_is_reported():
    scorer = build_scorer("ocr_map", num_workers=1, intra_op_threads=1)
    images = torch.stack([render(CASES["correct"])] * 3)
    scorer(images[:1], [PROMPT], [{}])  # warm-up
    start = time.perf_counter()
    scorer(images, [PROMPT] * 3, [{}] * 3)
    per_image = (time.perf_counter() - start) / 3
    print(f"ocr_map: {per_image:.3f} s per 512 px image (1 worker, 1 thread)")
    assert per_image < 5.0


# ---------------------------------------------------------------------------------------------------
# Tesseract
# ---------------------------------------------------------------------------------------------------

needs_tesseract = pytest.mark.skipif(shutil.which("tesseract") is None, reason="tesseract binary not installed")


@pytest.fixture(scope="module")
def tesseract_results():
    names = ("correct", "misspelled", "absent")
    scorer = build_scorer("ocr_map_tesseract", num_workers=2)
    images = torch.stack([render(CASES[name]) for name in names])
    out = validate_output("ocr_map_tesseract", scorer(images, [PROMPT] * 3, [{}] * 3), 3)
    return {name: (out.maps[i], float(out.scores[i]), out.info[i]) for i, name in enumerate(names)}


@needs_tesseract
def test_tesseract_scores_correct_one_misspelled_between_absent_zero(tesseract_results):
    assert tesseract_results["correct"][1] == 1.0
    assert 0.0 < tesseract_results["misspelled"][1] < 1.0
    assert tesseract_results["absent"][1] == 0.0


@needs_tesseract
def test_tesseract_map_marks_the_misspelled_word_below_the_correct_one(tesseract_results):
    correct_map = tesseract_results["correct"][0]
    wrong_map = tesseract_results["misspelled"][0]
    assert correct_map[8:16, 6:50].mean() > 0.8 and torch.all(correct_map[24:] == 0.5)
    assert wrong_map[8:16].min() == 0.0 and wrong_map[8:16].mean() < correct_map[8:16].mean()


def test_tesseract_missing_binary_raises_naming_the_scorer():
    with pytest.raises(RewardMapError, match="'ocr_map_tesseract'.*not found"):
        build_scorer("ocr_map_tesseract", tesseract_cmd="/nonexistent/tesseract")


# ---------------------------------------------------------------------------------------------------
# PaddleOCR-equivalent detector settings and upstream's edit distance
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.text("abcé ", max_size=12), st.text("abcé ", max_size=12))
def test_scalar_distance_is_python_levenshtein_and_equals_the_alignment_dp(a, b):
    import Levenshtein

    from reward_maps.ocr import upstream_distance

    assert upstream_distance(a, b) == Levenshtein.distance(a, b) == levenshtein(a, b)
    t = b.replace(" ", "").lower()
    if t:
        r = a.replace(" ", "").lower()
        dist = 0 if t in r else min(Levenshtein.distance(r, t), len(t))
        assert upstream_ocr_reward(a, b) == (1.0 - dist / len(t), dist)


def test_rapid_detector_normalises_with_paddle_imagenet_mean_std():
    engine = _RapidEngine("rgb_as_bgr", 1, {}, False)
    pre = engine.engine.text_det.get_preprocess(512)
    np.testing.assert_allclose(pre.mean, [0.485, 0.456, 0.406])
    np.testing.assert_allclose(pre.std, [0.229, 0.224, 0.225])
    pixel = np.full((1, 1, 3), 128, dtype=np.uint8)
    np.testing.assert_allclose(pre.normalize(pixel)[0, 0], (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-5)


@pytest.mark.parametrize("side, detector_side", [(512, 512), (1024, 960), (1600, 960)])
def test_rapid_detector_resizes_like_paddle_limit_960_max(side, detector_side):
    """PaddleOCR det_limit_side_len=960, type max: a 1024 px image runs at 960 px (RapidOCR alone: 1024)."""
    engine = _RapidEngine("rgb_as_bgr", 1, {}, False)
    image = np.full((side, side, 3), 255, dtype=np.uint8)
    image[side // 3: side // 3 + side // 10, side // 8: side // 2] = 0  # a dark bar, so detection runs
    engine(image)
    assert engine.capture.last.shape[-2:] == (detector_side, detector_side)
