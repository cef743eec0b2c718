"""GenEval reward map: rule engine on synthetic detections, map rule, model path on tiny random models."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from prompt_data import data_root, full_public_sets
from reward_maps.base import RewardMapError, build_scorer, validate_output
from reward_maps.geneval_rules import (
    COCO_CLASSES,
    COLORS,
    NOT_THIS_TAG,
    TAGS,
    Detection,
    GenEvalMetadataError,
    GenEvalSpec,
    colors_needed,
    detections_from_json,
    evaluate,
    evaluate_standard,
    evaluate_strict,
    grouped_by_tag,
    image_record,
    missing_fraction,
    normalize_class_name,
    object_credits,
    parse_metadata,
    relative_position,
    render_credit_map,
    select_detections,
    summarize,
)

# GenEval metadata: the shipped fixture, or the public set with U_NFT_DATA (tests/prompt_data.py)
METADATA_FILE = data_root() / "geneval" / "test_metadata.jsonl"


def det(x1, y1, x2, y2, score=0.95, color=None, mask=None):
    return Detection(box=(float(x1), float(y1), float(x2), float(y2)), score=score, color=color, mask=mask)


def spec(meta):
    return parse_metadata(meta)


def read_metadata_lines():
    return [json.loads(line) for line in METADATA_FILE.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------


def test_parser_accepts_every_official_metadata_line_and_reads_every_tag():
    lines = read_metadata_lines()
    specs = [parse_metadata(m, index=i) for i, m in enumerate(lines)]
    assert {s.tag for s in specs} == set(TAGS)
    if full_public_sets():
        assert len(specs) == 2212
    for s in specs:
        if s.tag == "counting":
            (inc,), (exc,) = s.include, s.exclude
            assert exc.cls == inc.cls and exc.count == inc.count + 1 and 2 <= inc.count <= 4
        else:
            assert s.exclude == ()
        if s.tag == "position":
            assert s.include[1].position[1] == 0 and s.include[0].position is None
        if s.tag == "color_attr":
            assert len(s.include) == 2 and s.include[0].color != s.include[1].color
        assert {c.cls for c in s.include} <= set(COCO_CLASSES)


@pytest.mark.parametrize(
    "meta, field",
    [
        ({"tag": "shape", "include": [{"class": "dog", "count": 1}]}, "['tag']"),
        ({"tag": "single_object"}, "['include']"),
        ({"tag": "single_object", "include": []}, "['include']"),
        ({"tag": "single_object", "include": [{"class": "dogg", "count": 1}]}, "['include'][0]['class']"),
        ({"tag": "counting", "include": [{"class": "dog", "count": 0}]}, "['include'][0]['count']"),
        ({"tag": "counting", "include": [{"class": "dog", "count": "2"}]}, "['include'][0]['count']"),
        ({"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "teal"}]}, "['include'][0]['color']"),
        ({"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["near", 0]}]},
         "['include'][1]['position']"),
        ({"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["above", 0]}]}, "['include'][0]['position'][1]"),
        ({"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3, "color": "red"}]},
         "['exclude'][0]"),
        ({"tag": "two_object", "include": [{"class": "dog", "count": 1, "size": 3}]}, "['include'][0]"),
        ("a photo of a dog", ""),
    ],
)
def test_malformed_metadata_error_names_scorer_sample_and_field(meta, field):
    with pytest.raises(GenEvalMetadataError) as err:
        parse_metadata(meta, scorer="geneval_map", index=3)
    message = str(err.value)
    assert "'geneval_map'" in message and f"metadata[3]{field}" in message


def test_detector_label_spellings_map_to_geneval_class_names():
    assert normalize_class_name("mouse") == "computer mouse"
    assert normalize_class_name("remote") == "tv remote"
    assert normalize_class_name("Dining_Table") == "dining table"
    assert normalize_class_name("diningtable") == "dining table"
    assert normalize_class_name("hair dryer") == "hair drier"
    assert normalize_class_name("wall-brick") is None
    assert all(normalize_class_name(c) == c for c in COCO_CLASSES)


# ---------------------------------------------------------------------------------------------
# Detection selection
# ---------------------------------------------------------------------------------------------


def test_threshold_is_strict_greater_than_in_float32():
    just_above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    rounds_to_threshold = 0.30000001  # float64 > 0.3, but float32(0.30000001) == float32(0.3)
    cands = [("dog", det(0, 0, 1, 1, s)) for s in (0.3, rounds_to_threshold, just_above, 0.2)]
    kept = select_detections(cands, "single_object")
    assert [d.score for d in kept["dog"]] == [just_above]


def test_counting_prompts_use_the_0_9_threshold_for_every_class():
    cands = [("dog", det(0, 0, 1, 1, 0.95)), ("dog", det(0, 0, 1, 1, 0.9)), ("cat", det(0, 0, 1, 1, 0.5))]
    assert {k: len(v) for k, v in select_detections(cands, "counting").items()} == {"dog": 1}
    assert {k: len(v) for k, v in select_detections(cands, "two_object").items()} == {"dog": 2, "cat": 1}


def test_selection_sorts_by_score_keeps_16_per_class_and_nms_is_off_by_default():
    rng = random.Random(0)
    scores = [rng.uniform(0.31, 1.0) for _ in range(20)]
    cands = [("cup", det(10, 10, 50, 50, s)) for s in scores]  # identical boxes: NMS would merge them
    kept = select_detections(cands, "single_object")["cup"]
    assert [d.score for d in kept] == sorted(scores, reverse=True)[:16]
    with_nms = select_detections(cands, "single_object", nms_threshold=0.5)["cup"]
    assert [d.score for d in with_nms] == [max(scores)]


# ---------------------------------------------------------------------------------------------
# Position
# ---------------------------------------------------------------------------------------------


def reference_relations(box_a, box_b, t=0.1):
    """docs/upstream_facts.md §A position rule, float64."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    da = (box_a[2] - box_a[0], box_a[3] - box_a[1])
    db = (box_b[2] - box_b[0], box_b[3] - box_b[1])
    off = (ca[0] - cb[0], ca[1] - cb[1])
    rev = [max(abs(o) - t * (a + b), 0) * math.copysign(1, o) if o else 0.0 for o, a, b in zip(off, da, db)]
    if all(abs(r) < 1e-3 for r in rev):
        return set(), (0.0, 0.0)
    norm = math.hypot(*off)
    dx, dy = rev[0] / norm, rev[1] / norm
    rels = {n for n, cond in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5)) if cond}
    return rels, (dx, dy)


def test_position_rule_matches_the_stated_formula_on_random_boxes():
    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(600):
        a = sorted(rng.integers(0, 512, 2)), sorted(rng.integers(0, 512, 2))
        b = sorted(rng.integers(0, 512, 2)), sorted(rng.integers(0, 512, 2))
        box_a = (a[0][0], a[1][0], a[0][1], a[1][1])
        box_b = (b[0][0], b[1][0], b[0][1], b[1][1])
        want, (dx, dy) = reference_relations(box_a, box_b)
        if min(abs(abs(dx) - 0.5), abs(abs(dy) - 0.5)) < 1e-5:
            continue  # float32 vs float64 may disagree exactly at a threshold
        assert relative_position(box_a, box_b) == want, (box_a, box_b)
        compared += 1
    assert compared > 550


def test_position_uses_revised_offsets_and_image_y_down():
    # Centres 30 px apart horizontally, boxes 100 wide: |offset| 30 < 0.1·(100+100) → no relation.
    assert relative_position((30, 0, 130, 100), (0, 0, 100, 100)) == frozenset()
    # Far apart horizontally: A right of B; vertical offset 0.
    assert relative_position((300, 0, 400, 100), (0, 0, 100, 100)) == {"right of"}
    assert relative_position((0, 0, 100, 100), (300, 0, 400, 100)) == {"left of"}
    # Larger y is lower in the image: A below B.
    assert relative_position((0, 300, 100, 400), (0, 0, 100, 100)) == {"below"}
    # Diagonal at 45°: both components 0.707·(1 − shrink) > 0.5 → two relations.
    assert relative_position((1000, 1000, 1010, 1010), (0, 0, 10, 10)) == {"right of", "below"}


# ---------------------------------------------------------------------------------------------
# Verdicts and the partial score (hand-computed cases, one block per tag)
# ---------------------------------------------------------------------------------------------


def verdict_of(meta, detections):
    v = evaluate(spec(meta), detections)
    return v.correct, v.strict_correct, v.score, v.rewards


def test_single_object_verdicts_and_partial_score():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert verdict_of(meta, {"dog": [det(0, 0, 9, 9)]}) == (True, True, 1.0, [1.0])
    assert verdict_of(meta, {}) == (False, False, 0.0, [0.0])
    # Two dogs: the benchmark only needs >= 1; the training reward needs exactly 1.
    assert verdict_of(meta, {"dog": [det(0, 0, 9, 9), det(20, 0, 29, 9)]}) == (True, False, 0.0, [0.0])


def test_partial_score_count_term_goes_negative():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    correct, strict, score, rewards = verdict_of(meta, {"dog": [det(i * 20, 0, i * 20 + 9, 9) for i in range(3)]})
    assert (correct, strict, score, rewards) == (True, False, -1.0, [-1.0])


def test_two_object_needs_both_classes():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    assert verdict_of(meta, {"dog": [det(0, 0, 9, 9)], "cat": [det(50, 0, 59, 9)]}) == (True, True, 1.0, [1.0, 1.0])
    assert verdict_of(meta, {"dog": [det(0, 0, 9, 9)], "person": [det(5, 5, 9, 9)]}) == (False, False, 0.5, [1.0, 0.0])


def test_counting_uses_exclude_in_standard_and_exact_count_in_strict():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}]}
    cups = [det(i * 20, 0, i * 20 + 9, 9) for i in range(5)]
    assert verdict_of(meta, {"cup": cups[:3]}) == (True, True, 1.0, [1.0])
    # 4 cups: include (top 3) passes, exclude (>= 4) fails; strict: 1 − 1/3.
    correct, strict, score, _ = verdict_of(meta, {"cup": cups[:4]})
    assert (correct, strict) == (False, False) and score == pytest.approx(2 / 3)
    correct, strict, score, _ = verdict_of(meta, {"cup": cups[:2]})
    assert (correct, strict) == (False, False) and score == pytest.approx(2 / 3)
    # Without the exclude clause the same 4 cups pass the standard rule.
    no_exclude = {"tag": "counting", "include": [{"class": "cup", "count": 3}]}
    assert evaluate_standard(spec(no_exclude), {"cup": cups[:4]})[0] is True


def test_colors_checks_top_count_in_standard_and_all_in_strict():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert verdict_of(meta, {"car": [det(0, 0, 9, 9, color="red")]}) == (True, True, 1.0, [1.0, 1.0])
    assert verdict_of(meta, {"car": [det(0, 0, 9, 9, color="blue")]}) == (False, False, 0.5, [1.0, 0.0])
    # Wrong count with a colour clause appends 0.0 in place of the colour term.
    two = {"car": [det(0, 0, 9, 9, 0.9, color="red"), det(20, 0, 29, 9, 0.8, color="blue")]}
    assert verdict_of(meta, two) == (True, False, 0.0, [0.0, 0.0])
    assert verdict_of(meta, {}) == (False, False, 0.0, [0.0, 0.0])


def test_colour_term_is_the_fraction_of_colour_matches():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    cars = {"car": [det(0, 0, 9, 9, 0.9, color="red"), det(20, 0, 29, 9, 0.8, color="green")]}
    assert verdict_of(meta, cars) == (False, False, 0.75, [1.0, 0.5])


def test_color_attr_fails_when_either_object_has_the_wrong_colour():
    meta = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "yellow"},
                                              {"class": "bench", "count": 1, "color": "black"}]}
    good = {"bus": [det(0, 0, 9, 9, color="yellow")], "bench": [det(50, 0, 59, 9, color="black")]}
    bad = {"bus": [det(0, 0, 9, 9, color="yellow")], "bench": [det(50, 0, 59, 9, color="white")]}
    assert verdict_of(meta, good) == (True, True, 1.0, [1.0, 1.0, 1.0, 1.0])
    assert verdict_of(meta, bad) == (False, False, 0.75, [1.0, 1.0, 1.0, 0.0])


POSITION_META = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                                 {"class": "cow", "count": 1, "position": ["right of", 0]}]}


def test_position_passed_appends_one_and_failed_appends_zero_then_one():
    laptop = [det(0, 0, 100, 100)]
    assert verdict_of(POSITION_META, {"laptop": laptop, "cow": [det(300, 0, 400, 100)]}) == (True, True, 1.0, [1.0, 1.0, 1.0])
    # Cow left of the laptop: rewards [1, 1, 0, 1] (upstream quirk), mean 0.75.
    assert verdict_of(POSITION_META, {"laptop": [det(300, 0, 400, 100)], "cow": [det(0, 0, 100, 100)]}) == (
        False, False, 0.75, [1.0, 1.0, 0.0, 1.0])


def test_position_without_a_matched_target_group_fails():
    # No laptop: target group failed → "no target" → [0] for the laptop, [1, 0] for the cow.
    correct, strict, score, rewards = verdict_of(POSITION_META, {"cow": [det(300, 0, 400, 100)]})
    assert (correct, strict, rewards) == (False, False, [0.0, 1.0, 0.0]) and score == pytest.approx(1 / 3)
    # Two laptops: the standard rule keeps the top one and passes; strict fails on the count.
    two_laptops = {"laptop": [det(0, 0, 100, 100, 0.99), det(0, 300, 100, 400, 0.5)], "cow": [det(300, 0, 400, 100)]}
    correct, strict, score, rewards = verdict_of(POSITION_META, two_laptops)
    assert (correct, strict, rewards) == (True, False, [0.0, 1.0, 0.0])


def test_position_must_hold_for_every_object_target_pair():
    meta = {"tag": "position", "include": [{"class": "laptop", "count": 2},
                                            {"class": "cow", "count": 1, "position": ["right of", 0]}]}
    laptops = [det(0, 0, 100, 100, 0.9), det(500, 0, 600, 100, 0.8)]  # cow sits between them
    correct, strict, _, rewards = verdict_of(meta, {"laptop": laptops, "cow": [det(300, 0, 400, 100)]})
    assert (correct, strict, rewards) == (False, False, [1.0, 1.0, 0.0, 1.0])


def test_empty_include_scores_zero_and_exclude_is_ignored_by_the_training_reward():
    assert evaluate_strict(GenEvalSpec(tag="single_object", include=()), {})[1] == 0.0
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "bowl", "count": 1}]}
    dets = {"cup": [det(0, 0, 9, 9), det(20, 0, 29, 9)], "bowl": [det(50, 0, 59, 9)]}
    correct, strict, score, _ = verdict_of(meta, dets)
    assert (correct, strict, score) == (False, True, 1.0)


def test_missing_colour_on_a_needed_detection_is_an_error():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    with pytest.raises(ValueError, match="need a colour"):
        evaluate(spec(meta), {"car": [det(0, 0, 9, 9)]})
    assert colors_needed(spec(meta), {"car": [det(0, 0, 9, 9), det(0, 0, 9, 9)]}) == {"car": 1}
    assert colors_needed(spec(meta), {}) == {}


# An independent transcription of docs/upstream_facts.md §A, compared with the engine on random detections.


def oracle(meta, objs):
    def rel_ok(objects, targets, rel):
        return all(rel in relative_position(o.box, t.box) for o in objects for t in targets)

    standard, groups = True, []
    for req in meta["include"]:
        found = objs.get(req["class"], [])[: req["count"]]
        ok = len(found) >= req["count"]
        if ok and "color" in req:
            ok = sum(o.color == req["color"] for o in found) >= req["count"]
        if ok and "position" in req:
            target = groups[req["position"][1]]
            ok = target is not None and rel_ok(found, target, req["position"][0])
        groups.append(found if ok else None)
        standard &= ok
    for req in meta.get("exclude", []):
        standard &= len(objs.get(req["class"], [])) < req["count"]

    strict, groups, rewards = True, [], []
    for req in meta["include"]:
        found, c = objs.get(req["class"], []), req["count"]
        rewards.append(1 - abs(c - len(found)) / c)
        ok = len(found) == c
        if not ok and ("color" in req or "position" in req):
            rewards.append(0.0)
        if ok and "color" in req:
            m = sum(o.color == req["color"] for o in found)
            rewards.append(1 - abs(c - m) / c)
            ok = m == c
        if ok and "position" in req:
            target = groups[req["position"][1]]
            if target is None or not rel_ok(found, target, req["position"][0]):
                ok = False
                rewards.append(0.0)
            if target is not None:
                rewards.append(1.0)
        groups.append(found if ok else None)
        strict &= ok
    return standard, strict, sum(rewards) / len(rewards)


def random_detections(meta, rng):
    objs = {}
    classes = {c["class"]: c for c in meta["include"]}
    for cls, clause in classes.items():
        n = rng.choice([clause["count"]] * 3 + [0, clause["count"] - 1, clause["count"] + 1, clause["count"] + 2])
        dets = []
        for _ in range(max(n, 0)):
            x, y = rng.uniform(0, 400), rng.uniform(0, 400)
            w, h = rng.uniform(10, 120), rng.uniform(10, 120)
            color = clause.get("color") if rng.random() < 0.7 else rng.choice(COLORS)
            dets.append(det(x, y, x + w, y + h, rng.uniform(0.3, 1.0), color=color or rng.choice(COLORS)))
        if dets:
            objs[cls] = sorted(dets, key=lambda d: -d.score)
    return objs


def test_engine_matches_the_stated_rules_on_random_detections_for_every_tag():
    lines = read_metadata_lines()
    rng = random.Random(0)
    seen = {tag: set() for tag in TAGS}
    # 600 lines of the public set; the fixture's few dozen each several times, with fresh random detections
    for meta in rng.sample(lines, 600) if len(lines) >= 600 else rng.choices(lines, k=600):
        objs = random_detections(meta, rng)
        v = evaluate(spec(meta), objs)
        want = oracle(meta, objs)
        assert (v.correct, v.strict_correct) == want[:2], meta
        assert v.score == pytest.approx(want[2], abs=1e-12), meta
        seen[meta["tag"]].add((v.correct, v.strict_correct))
    for tag, outcomes in seen.items():
        assert {(True, True), (False, False)} <= outcomes, tag


# ---------------------------------------------------------------------------------------------
# Credits and the map
# ---------------------------------------------------------------------------------------------


def box_mask(h, w, x1, y1, x2, y2):
    m = np.zeros((h, w), dtype=bool)
    m[y1:y2, x1:x2] = True
    return m


def test_map_marks_extra_instances_low_and_counted_ones_high():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}]}
    cups = [det(0, 0, 4, 4, 0.99, mask=box_mask(16, 16, 0, 0, 4, 4)), det(6, 0, 10, 4, 0.98, mask=box_mask(16, 16, 6, 0, 10, 4)),
            det(12, 0, 16, 4, 0.97, mask=box_mask(16, 16, 12, 0, 16, 4))]
    dets = {"cup": cups, "person": [det(0, 10, 16, 16, mask=box_mask(16, 16, 0, 10, 16, 16))]}
    v = evaluate(spec(meta), dets)
    assert v.credits == {"cup": [1.0, 1.0, 0.0], "person": [None]}
    m = render_credit_map(dets, v.credits, v.missing_fraction, 16, 16)
    assert torch.all(m[0:4, 0:4] == 1) and torch.all(m[0:4, 6:10] == 1) and torch.all(m[0:4, 12:16] == 0)
    assert torch.all(m[10:, :] == 0.5) and torch.all(m[5:10, :] == 0.5)  # other classes and background neutral


def test_map_marks_wrong_colour_and_wrong_side_low():
    meta = {"tag": "color_attr", "include": [{"class": "bus", "count": 1, "color": "yellow"},
                                              {"class": "bench", "count": 1, "color": "black"}]}
    dets = {"bus": [det(0, 0, 8, 8, color="yellow")], "bench": [det(8, 8, 16, 16, color="white")]}
    v = evaluate(spec(meta), dets)
    assert v.credits == {"bus": [1.0], "bench": [0.0]}
    m = render_credit_map(dets, v.credits, v.missing_fraction, 16, 16)  # no masks: boxes are painted
    assert torch.all(m[:8, :8] == 1) and torch.all(m[8:, 8:] == 0) and torch.all(m[:8, 8:] == 0.5)

    wrong_side = {"laptop": [det(300, 0, 400, 100)], "cow": [det(0, 0, 100, 100)]}
    assert object_credits(spec(POSITION_META), wrong_side) == {"laptop": [1.0], "cow": [0.0]}
    right_side = {"laptop": [det(0, 0, 100, 100)], "cow": [det(300, 0, 400, 100)]}
    assert object_credits(spec(POSITION_META), right_side) == {"laptop": [1.0], "cow": [1.0]}


def test_missing_objects_lower_the_background_by_the_missing_fraction():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 3}]}
    dets = {"cat": [det(0, 0, 4, 4)]}
    m_frac = missing_fraction(spec(meta), dets)
    assert m_frac == pytest.approx(3 / 4)  # 1 dog + 2 cats missing of 4 requested
    v = evaluate(spec(meta), dets)
    m = render_credit_map(dets, v.credits, v.missing_fraction, 8, 8)
    assert torch.all(m[:4, :4] == 1) and m[7, 7].item() == pytest.approx(0.5 * (1 - 0.75))
    half = render_credit_map(dets, v.credits, v.missing_fraction, 8, 8, missing_weight=0.5)
    assert half[7, 7].item() == pytest.approx(0.5 * (1 - 0.375))
    assert torch.all(render_credit_map({}, {}, 1.0, 4, 4) == 0)


def test_overlapping_credited_regions_take_the_minimum():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}
    dets = {"dog": [det(0, 0, 6, 6)], "cat": [det(4, 4, 8, 8), det(0, 6, 2, 8, 0.5)]}  # second cat is extra
    v = evaluate(spec(meta), dets)
    m = render_credit_map(dets, v.credits, v.missing_fraction, 8, 8)
    assert m[5, 5] == 1 and m[7, 0] == 0
    dets = {"dog": [det(0, 0, 6, 6)], "cat": [det(0, 0, 6, 6), det(0, 0, 6, 6, 0.5)]}
    v = evaluate(spec(meta), dets)
    assert render_credit_map(dets, v.credits, v.missing_fraction, 8, 8)[3, 3] == 0


# ---------------------------------------------------------------------------------------------
# Records and summaries
# ---------------------------------------------------------------------------------------------


def test_summary_is_the_mean_over_tags_of_per_tag_accuracy_and_groups_use_the_sentinel():
    records = [
        {"tag": "single_object", "correct": True, "strict_correct": True, "score": 1.0},
        {"tag": "single_object", "correct": True, "strict_correct": False, "score": 0.0},
        {"tag": "counting", "correct": False, "strict_correct": False, "score": 0.5},
        {"tag": "counting", "correct": False, "strict_correct": False, "score": -1.0},
        {"tag": "counting", "correct": True, "strict_correct": True, "score": 1.0},
        {"tag": "counting", "correct": False, "strict_correct": False, "score": 0.0},
    ]
    s = summarize(records)
    assert s["per_tag"]["single_object"]["accuracy"] == 1.0 and s["per_tag"]["counting"]["accuracy"] == 0.25
    assert s["overall"] == pytest.approx((1.0 + 0.25) / 2)
    assert s["accuracy"] == pytest.approx(3 / 6) and s["strict_accuracy"] == pytest.approx(2 / 6)
    assert s["mean_score"] == pytest.approx(1.5 / 6)
    grouped = grouped_by_tag(records, "strict_correct")
    assert grouped["single_object"] == [1.0, 0.0] + [NOT_THIS_TAG] * 4
    assert [x for x in grouped["counting"] if x != NOT_THIS_TAG] == [0.0, 0.0, 1.0, 0.0]
    assert set(grouped["position"]) == {NOT_THIS_TAG}
    v = evaluate(spec({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}), {})
    assert image_record(v) == {"tag": "single_object", "correct": False, "strict_correct": False, "score": 0.0}


# ---------------------------------------------------------------------------------------------
# Model-path pieces (no models)
# ---------------------------------------------------------------------------------------------


def test_detector_resize_follows_mmcv_keep_ratio_and_pads_to_32():
    from reward_maps.geneval import detector_input_size, preprocess_for_detector

    assert detector_input_size(512, 512) == (800, 800)
    assert detector_input_size(480, 640) == (800, 1067)
    assert detector_input_size(1024, 4096) == (333, 1333)
    imgs = torch.full((1, 30, 50, 3), 200, dtype=torch.uint8)
    imgs[..., 0] = 10
    x, resized = preprocess_for_detector(imgs, short_edge=60, long_edge=100)
    assert resized == (60, 100) and tuple(x.shape) == (1, 3, 64, 128)
    # mmdet pads with the raw value 128 before Normalize (Pad precedes Normalize in GenEval's config)
    pad = (128 - torch.tensor((123.675, 116.28, 103.53))) / torch.tensor((58.395, 57.12, 57.375))
    assert torch.allclose(x[0, :, 60:, :], pad.view(3, 1, 1).expand(3, 4, 128))
    assert torch.allclose(x[0, :, :, 100:], pad.view(3, 1, 1).expand(3, 64, 28))
    assert x[0, 0, 0, 0].item() == pytest.approx((10 - 123.675) / 58.395, rel=1e-5)
    swapped, _ = preprocess_for_detector(imgs, short_edge=60, long_edge=100, swap_channels=True)
    assert swapped[0, 0, 0, 0].item() == pytest.approx((200 - 123.675) / 58.395, rel=1e-5)


def test_instance_postprocess_scores_are_class_prob_times_mean_mask_prob():
    from reward_maps.geneval import instance_postprocess, masks_to_boxes

    class_logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 3.0, 0.0, 0.0]])  # 2 queries, 3 classes + no-object
    mask_logits = torch.full((2, 4, 4), -5.0)
    mask_logits[0, :2, :2] = 2.0
    mask_logits[1, 2:, 1:] = 1.0
    labels, scores, masks, boxes = instance_postprocess(class_logits, mask_logits, (16, 16), (16, 16), (16, 16), max_per_image=6)
    assert len(labels) == 6
    best = scores.argmax()
    p = torch.softmax(class_logits[0], 0)[0]
    logit_up = torch.nn.functional.interpolate(mask_logits[None, :1], size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
    on = logit_up > 0
    assert labels[best] == 0 and torch.equal(masks[best], on)
    assert scores[best].item() == pytest.approx((p * logit_up.sigmoid()[on].mean()).item(), rel=1e-5)
    ys, xs = on.nonzero(as_tuple=True)
    assert boxes[best].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert masks_to_boxes(torch.zeros(1, 5, 5, dtype=torch.bool)).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_colour_crop_pastes_on_grey_999_and_clip_transform_is_centre_crop_224():
    from reward_maps.geneval import CLIP_MEAN, CLIP_STD, clip_preprocess, color_crop

    image = np.zeros((20, 30, 3), dtype=np.uint8)
    image[...] = (255, 0, 0)
    mask = box_mask(20, 30, 5, 5, 10, 10)
    crop = np.asarray(color_crop(image, det(4, 4, 12, 10, mask=mask)))
    assert crop.shape == (6, 8, 3)
    assert (crop[0, 0] == 153).all() and (crop[1, 1] == (255, 0, 0)).all()
    from PIL import Image

    x = clip_preprocess(Image.new("RGB", (40, 20), (153, 153, 153)))
    assert tuple(x.shape) == (3, 224, 224)
    expected = (153 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 100, 100], expected, atol=1e-5)


def test_bad_options_name_the_option_before_loading_models():
    with pytest.raises(RewardMapError, match="counting_threshold"):
        build_scorer("geneval_map", counting_threshold=1.5, detector="/nonexistent")
    with pytest.raises(RewardMapError, match="map_size"):
        build_scorer("geneval_map", map_size=(0, 4), detector="/nonexistent")


# ---------------------------------------------------------------------------------------------
# End to end on tiny random models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    from reward_maps.geneval import build_tiny_mask2former
    from u_nft.tiny_models import build_tiny_clip

    root = tmp_path_factory.mktemp("geneval_tiny")
    return build_tiny_mask2former(root / "mask2former"), build_tiny_clip(root / "clip")


@pytest.fixture(scope="session")
def permissive_scorer(tiny_dirs):
    # Random weights give scores near 1/81, so thresholds 0 let detections through.
    detector, clip = tiny_dirs
    return build_scorer("geneval_map", detector=str(detector), clip_model=str(clip), threshold=0.0,
                        counting_threshold=0.0, detector_short_edge=64, detector_long_edge=96)


E2E_META = [
    {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"}, {"class": "computer mouse", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red dog and a blue computer mouse"},
    {"tag": "position", "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 2, "position": ["right of", 0]}],
     "prompt": "a photo of a cow right of a laptop"},
]


def test_end_to_end_tiny_models_give_valid_maps_and_the_scalar_of_the_reported_detections(permissive_scorer):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 56)
    out = validate_output("geneval_map", permissive_scorer(images, ["a", "b"], E2E_META), 2)
    assert tuple(out.maps.shape) == (2, 40, 56) and out.maps.dtype == torch.float32
    assert torch.isfinite(out.maps).all() and out.maps.min() >= 0 and out.maps.max() <= 1
    n_detected = 0
    for i, meta in enumerate(E2E_META):
        info = out.info[i]
        json.dumps(info)
        dets = detections_from_json(info["detections"])
        n_detected += sum(len(v) for v in dets.values())
        assert all(len(v) <= 16 for v in dets.values())
        v = evaluate(parse_metadata(meta), dets)
        assert out.scores[i].item() == pytest.approx(v.score, abs=1e-6)
        assert (info["correct"], info["strict_correct"], info["score"]) == (v.correct, v.strict_correct, v.score)
        for cls, rows in info["detections"].items():
            assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
            assert all(0 <= r["box"][0] <= r["box"][2] <= 56 and 0 <= r["box"][1] <= r["box"][3] <= 40 for r in rows)
        if i == 0 and dets.get("dog"):  # only the first prompt has a colour clause on "dog"
            assert dets["dog"][0].color in COLORS  # the colour clause's instance was classified
        values = set(out.maps[i].unique().tolist())
        background = 0.5 * (1 - v.missing_fraction)
        assert all(min(abs(x - t) for t in (0.0, 1.0, background)) < 1e-6 for x in values)
    assert n_detected > 0  # the detection path was exercised, not skipped


def test_end_to_end_default_thresholds_drop_random_detections_and_map_size_pools(tiny_dirs):
    detector, clip = tiny_dirs
    scorer = build_scorer("geneval_map", detector=str(detector), clip_model=str(clip), detector_short_edge=64,
                          detector_long_edge=96, map_size=(5, 7))
    out = scorer(torch.rand(1, 3, 40, 56), ["x"], E2E_META[:1])
    # Random class probabilities (~1/81) never pass 0.3: nothing found, every object missing.
    assert out.info[0]["detections"] == {} and out.scores.tolist() == [0.0]
    assert tuple(out.maps.shape) == (1, 5, 7) and torch.all(out.maps == 0)


def test_scorer_rejects_malformed_metadata_naming_the_sample(permissive_scorer):
    bad = [E2E_META[0], {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "teal"}]}]
    with pytest.raises(RewardMapError, match=r"'geneval_map'.*metadata\[1\]\['include'\]\[0\]\['color'\]"):
        permissive_scorer(torch.rand(2, 3, 8, 8), ["a", "b"], bad)


# ---------------------------------------------------------------------------------------------
# Input conventions (official / diffusionnft / flow_grpo)
# ---------------------------------------------------------------------------------------------


def test_conventions_are_named_with_official_the_default_and_unknown_ones_rejected():
    import inspect

    from reward_maps.geneval import CONVENTIONS, DEFAULT_CONVENTION, geneval_map

    assert DEFAULT_CONVENTION == "official"
    assert inspect.signature(geneval_map).parameters["convention"].default == "official"
    assert CONVENTIONS == {
        "official": {"swap_channels": False, "jpeg_quality": None},
        "diffusionnft": {"swap_channels": True, "jpeg_quality": None},
        "flow_grpo": {"swap_channels": True, "jpeg_quality": 75},
    }
    with pytest.raises(RewardMapError, match=r"convention='mmdet'.*diffusionnft.*flow_grpo.*official"):
        build_scorer("geneval_map", convention="mmdet", detector="/nonexistent")


def _recording_detector(scorer):
    """Wrap the scorer's detector so each call's pixel_values are kept (the real model still runs)."""
    seen = []
    model = scorer.detector

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, pixel_values):
            seen.append(pixel_values.clone())
            return self.inner(pixel_values=pixel_values)

    scorer.detector = Recorder()
    return seen, model


def test_detector_input_per_convention_official_rgb_diffusionnft_bgr_flow_grpo_jpeg75(permissive_scorer):
    from PIL import Image
    import io

    from reward_maps.geneval import preprocess_for_detector, quantize_images

    torch.manual_seed(1)
    images = torch.rand(1, 3, 40, 56)
    seen, model = _recording_detector(permissive_scorer)
    try:
        inputs = {}
        for convention in ("official", "diffusionnft", "flow_grpo"):
            permissive_scorer.opts["convention"] = convention
            out = permissive_scorer(images, ["a"], E2E_META[:1])
            assert out.info[0]["convention"] == convention
            inputs[convention] = seen[-1]
    finally:
        permissive_scorer.detector, permissive_scorer.opts["convention"] = model, "official"
    u8 = quantize_images(images)
    rgb, _ = preprocess_for_detector(u8, 64, 96)
    assert torch.equal(inputs["official"], rgb)
    # diffusionnft: the channels reach the network reversed (B, G, R), normalised with the RGB statistics
    mean = torch.tensor((123.675, 116.28, 103.53)).view(1, 3, 1, 1)
    std = torch.tensor((58.395, 57.12, 57.375)).view(1, 3, 1, 1)
    raw_rgb, raw_bgr = rgb * std + mean, inputs["diffusionnft"] * std + mean
    assert torch.allclose(raw_bgr, raw_rgb.flip(1), atol=1e-3) and not torch.allclose(raw_bgr, raw_rgb, atol=1.0)
    # flow_grpo: PIL's JPEG at quality 75 first (independent encode here), then the diffusionnft input
    buffer = io.BytesIO()
    Image.fromarray(u8[0].numpy()).save(buffer, format="JPEG")  # PIL's default quality is 75
    decoded = torch.from_numpy(np.array(Image.open(buffer).convert("RGB")))[None]
    expected, _ = preprocess_for_detector(decoded, 64, 96, swap_channels=True)
    assert torch.equal(inputs["flow_grpo"], expected) and not torch.equal(decoded, u8)


def test_detector_resize_is_cv2_bilinear_on_uint8_as_mmcv():
    cv2 = pytest.importorskip("cv2")
    from reward_maps.geneval import preprocess_for_detector

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1, 37, 53, 3), dtype=np.uint8)
    x, (h, w) = preprocess_for_detector(torch.from_numpy(img), short_edge=60, long_edge=100)
    raw = x[0, :, :h, :w] * torch.tensor((58.395, 57.12, 57.375)).view(3, 1, 1) + torch.tensor((123.675, 116.28, 103.53)).view(3, 1, 1)
    expected = cv2.resize(img[0], (w, h), interpolation=cv2.INTER_LINEAR)  # mmcv.imresize(..., "bilinear")
    assert torch.allclose(raw, torch.from_numpy(expected).permute(2, 0, 1).float(), atol=1e-3)
