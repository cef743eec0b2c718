"""The dense-vs-scalar experiment (scripts/dense_vs_scalar.py, config/experiments.py) runs end to end."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "dense_vs_scalar.py"


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_configs_change_only_reward_and_estimator():
    experiments = _load(REPO_ROOT / "config" / "experiments.py", "experiments_under_test")
    tiny = experiments.tiny().to_dict()
    for name, make in experiments.EXPERIMENTS.items():
        config = make().to_dict()
        changed = {k for k in tiny if config[k] != tiny[k]}
        # the prompt-conditioned objective also brings its own prompt files (the layouts are their metadata)
        allowed = {"run_name", "reward_fn", "eval_reward_fn", "reward_options", "train", "logging"}
        assert changed <= allowed | ({"dataset"} if name.startswith("layout_") else set()), name
        train_changed = {k for k in tiny["train"] if config["train"][k] != tiny["train"][k]}
        assert train_changed <= {"scalar_mode", "estimator", "num_locations", "proposal"}, name
        # equal budgets: the same rollouts and optimizer steps for every method
        assert config["sample"] == tiny["sample"] and config["train"]["gradient_step_per_epoch"] == 4
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        experiments.get_config("nope")
    # the issue-8 grid (scripts/dense_vs_scalar.py) keeps its objectives, so its documented command reproduces
    assert list(experiments.OBJECTIVES) == ["centre", "quadrants", "global"]


def test_global_control_scorer_is_constant_per_image():
    module = _load(SCRIPT, "dense_vs_scalar_under_test")
    scorer = module.global_color_map(color=[1.0, 0.6, 0.1])
    images = torch.rand(3, 3, 16, 16)
    out = scorer(images, ["a"] * 3, [{}] * 3)
    assert out.maps.shape == (3, 16, 16)
    assert torch.allclose(out.maps, out.scores.reshape(3, 1, 1).expand(3, 16, 16))
    orange = torch.tensor([1.0, 0.6, 0.1]).reshape(1, 3, 1, 1).expand(1, 3, 16, 16)
    assert scorer(orange, ["a"], [{}]).scores.item() == pytest.approx(1.0)


def test_quick_study_end_to_end(tmp_path):
    runs, docs = tmp_path / "runs", tmp_path / "docs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--runs_dir", str(runs), "--docs_dir", str(docs)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("dense_vs_scalar.png", "dense_vs_scalar_samples.png", "dense_vs_scalar.md"):
        assert (docs / name).stat().st_size > 0, name
    table = (docs / "dense_vs_scalar.md").read_text(encoding="utf-8")
    rows = [line for line in table.splitlines() if line.startswith("| centre |")]
    assert [row.split("|")[2].strip() for row in rows] == ["dense", "scalar"]
    assert "**centre** (localized)" in table
    summary = json.loads((runs / "summary.json").read_text(encoding="utf-8"))
    centre = summary["objectives"]["centre"]
    assert summary["epochs"] == 2 and set(centre["methods"]) == {"dense", "scalar"}
    for stats in centre["methods"].values():
        assert len(stats["mean_curve"]) == 2 and len(stats["held_out"]) == 1
    # every method starts from the same initial model and rollout noise (equal budgets)
    assert centre["methods"]["dense"]["curves"][0][0] == centre["methods"]["scalar"]["curves"][0][0]
