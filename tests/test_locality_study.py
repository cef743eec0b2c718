"""The issue-17 study: the prompt-conditioned layout objective, its variants, and the script end to end."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reward_maps.base import dataset_problems
from reward_maps.masks import region_color_map
from u_nft.data import load_prompts

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "locality_study.py"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def experiments():
    return _load(REPO_ROOT / "config" / "experiments.py", "experiments_for_locality")


def _colors(meta):
    return [tuple(region["color"]) for region in meta["regions"]]


def test_layout_prompts_come_in_swapped_twins_and_the_test_subjects_are_held_out(experiments):
    subjects = {}
    for path in (experiments.LAYOUT_TRAIN, experiments.LAYOUT_TEST):
        prompts, metadata = load_prompts(path)
        assert dataset_problems("region_color_map", prompts, metadata, {"regions": None}) == []
        by_subject = {}
        for prompt, meta in zip(prompts, metadata):
            by_subject.setdefault(prompt.split(",")[0], []).append((prompt, meta))
        for subject, pair in by_subject.items():
            assert len(pair) == 2, subject
            (p1, m1), (p2, m2) = pair
            # identical boxes, swapped colours, and prompts that differ only in the colour words
            assert [r["box"] for r in m1["regions"]] == [r["box"] for r in m2["regions"]]
            assert _colors(m1) == _colors(m2)[::-1] and _colors(m1)[0] != _colors(m1)[1]
            assert p1.replace("red", "X").replace("blue", "red").replace("X", "blue") == p2
        subjects[path] = set(by_subject)
    assert not subjects[experiments.LAYOUT_TRAIN] & subjects[experiments.LAYOUT_TEST]


def test_layout_score_is_the_mean_over_regions_and_the_map_per_region(experiments):
    prompts, metadata = load_prompts(experiments.LAYOUT_TEST)
    scorer = region_color_map(regions=None)
    image = torch.full((1, 3, 64, 64), 0.5)
    image[0, :, :, :32] = torch.tensor([1.0, 0.1, 0.1]).view(3, 1, 1)  # red left half
    out_red_left = scorer(image, prompts[:1], metadata[:1])  # "red on the left, blue on the right"
    out_blue_left = scorer(image, prompts[1:2], metadata[1:2])
    for out in (out_red_left, out_blue_left):
        region_scores = out.info[0]["region_scores"]
        assert out.scores[0].item() == pytest.approx(sum(region_scores) / 2, abs=1e-6)  # equal-area regions
    assert out_red_left.info[0]["region_scores"][0] == pytest.approx(1.0)
    assert out_blue_left.info[0]["region_scores"][0] < 0.5  # the same image is wrong for the swapped prompt
    assert out_red_left.scores[0] > out_blue_left.scores[0]
    reward_map = out_red_left.maps[0]
    assert reward_map[32, 5].item() == pytest.approx(1.0) and reward_map[2, 32].item() == 0.5  # neutral outside


def test_variants_are_overrides_the_train_script_accepts(experiments):
    from ml_collections import config_flags  # noqa: F401  (the parser the train script uses)

    base = experiments.experiment("layout", "dense")
    assert base.dataset.train == experiments.LAYOUT_TRAIN and base.reward_options.region_color_map.regions is None
    for name, overrides in experiments.VARIANTS.items():
        for item in overrides:
            key, _, value = item.partition("=")
            node = base
            for part in key.split(".")[:-1]:
                node = node[part]
            assert key.split(".")[-1] in node, f"variant {name}: unknown key {key}"
            assert value, f"variant {name}: {item}"
    assert experiments.VARIANTS["base"] == ()
    assert "proj_out" in experiments.VARIANTS["ff_out_r32"][0] and "lora.rank=32" in experiments.VARIANTS["ff_out_r32"]


def test_quick_study_end_to_end(tmp_path):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--nice", "0", "--runs_dir", str(runs),
                             "--docs_dir", str(docs)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probe = json.loads((runs / "centre_dense_base_s0" / "drift.json").read_text(encoding="utf-8"))
    assert probe["epochs_trained"] == [0, 1, 2] and probe["probe_images"] == 4
    assert probe["inside_fraction"] == pytest.approx(0.25)  # the centre box
    for metric in ("pixel", "histogram", "contrast", "velocity"):
        assert probe[f"{metric}_inside"][0] == 0.0 and probe[f"{metric}_outside"][0] == 0.0
        assert len(probe[f"{metric}_outside"]) == 3
    assert probe["pixel_inside"][-1] > 0 and probe["velocity_outside"][-1] > 0  # the LoRA moved
    for name in ("locality_reward.png", "locality_drift.png", "locality_tradeoff.png", "locality_study.md"):
        assert (docs / name).stat().st_size > 0, name
    table = (docs / "locality_study.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| centre | ")]
    assert [row.split("|")[2].strip() for row in rows[:2]] == ["dense", "scalar"]
    assert "--config.save_freq=1" in table and "--measure" in table
    study = json.loads((runs / "study.json").read_text(encoding="utf-8"))
    dense = study["centre/dense/base"]
    assert dense["seeds"] == [0] and len(dense["probe_curves"][0]) == 3
    assert dense["pixel_ratio"]["mean"] == pytest.approx(probe["pixel_outside"][-1] / probe["pixel_inside"][-1])
