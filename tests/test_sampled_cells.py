"""Monte Carlo locations drawn before scoring: occlusion maps score only the drawn cells, and the loss uses them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from reward_maps.base import RewardMapError, RewardOutput
from reward_maps.combine import RewardSet
from reward_maps.occlusion import LOCATIONS_KEY, OcclusionMap, covering_cells
from u_nft.loss import DenseLossOptions, u_nft_loss
from u_nft.normalization import group_ids_from_keys, normalize_reward_maps
from u_nft.sampled_cells import NEUTRAL_R, SampledCellScoring, sampled_cell_scoring

REPO = Path(__file__).resolve().parents[1]
GRID = (4, 4)


def weighted_brightness(images, prompts, metadata):
    """score = sum_u w_u * brightness of cell u (4 x 4 cells), so every occluded cell changes it differently."""
    b, c, h, w = images.shape
    cells = images.reshape(b, c, 4, h // 4, 4, w // 4).mean(dim=(1, 3, 5))
    weights = torch.arange(16, dtype=images.dtype).view(4, 4) - 7.5
    return (cells * weights).sum(dim=(1, 2))


SCORED: list[int] = []  # images per call of the wrapped scorer below


def counted_brightness(device="cpu", dtype=None):
    """A user scorer (``"test_sampled_cells:counted_brightness"``) whose scalar is ``weighted_brightness``;
    it records how many images each call evaluates."""
    def score(images, prompts, metadata):
        assert all(LOCATIONS_KEY not in md for md in metadata)  # the wrapped scorer never sees the request
        SCORED.append(images.shape[0])
        scores = weighted_brightness(images, prompts, metadata).float()
        return RewardOutput(maps=scores.view(-1, 1, 1), scores=scores, info=[{}] * len(prompts), value_range=None)
    return score


@pytest.fixture
def batch():
    torch.manual_seed(0)
    prompts = ["a cat"] * 3 + ["a dog"] * 3
    return torch.rand(6, 3, 32, 32), prompts, [{} for _ in prompts]


def test_m_drawn_cells_cost_m_plus_one_scorer_images_per_sample(batch):
    images, prompts, metadata = batch
    options = {"occlusion_map": {"scorer": "test_sampled_cells:counted_brightness", "grid": GRID, "fill": 0.0}}
    rewards = RewardSet({"occlusion_map": 1.0}, options, num_workers=2)
    try:
        assert rewards.names_with("score_cells") == ["occlusion_map"]
        plan = SampledCellScoring(True, GRID, num_locations=3, seed=7)
        cells = plan.draw(epoch=2, prompts=prompts)
        SCORED.clear()
        sparse = rewards(images, prompts, plan.attach(metadata, cells))["occlusion_map"]
        unique = sum(len(set(row.tolist())) for row in cells)
        assert sum(SCORED) == len(prompts) + unique <= len(prompts) * (3 + 1)
        SCORED.clear()
        full = rewards(images, prompts, metadata)["occlusion_map"]
        assert sum(SCORED) == len(prompts) * (16 + 1)
    finally:
        rewards.close()
    # the drawn cells carry exactly the full map's values; the rest are unscored zeros
    torch.testing.assert_close(plan.compact(sparse.maps, cells), plan.compact(full.maps, cells))
    torch.testing.assert_close(sparse.scores, full.scores)
    for b, row in enumerate(cells):
        assert sparse.info[b]["scored_cells"] == sorted(set(row.tolist()))
        others = torch.ones(16, dtype=torch.bool)
        others[row] = False
        assert torch.all(sparse.maps[b].flatten()[others] == 0)


def test_groups_share_cells_on_every_rank_and_epochs_differ():
    plan = SampledCellScoring(True, (8, 8), num_locations=5, seed=3)
    a = plan.draw(0, ["x", "y", "x"])
    b = plan.draw(0, ["y", "x"])  # another rank's batch, other order
    assert a.shape == (3, 5) and a.dtype == torch.long
    assert torch.equal(a[0], a[2]) and torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])
    assert not torch.equal(plan.draw(1, ["x"])[0], a[0])
    draws = torch.cat([plan.draw(e, [f"p{i}" for i in range(50)]).flatten() for e in range(8)])
    counts = torch.bincount(draws, minlength=64).float()
    assert counts.min() > 0 and counts.std() / counts.mean() < 0.35  # uniform over the 64 cells


def test_normalizing_at_drawn_cells_equals_full_normalization_there():
    torch.manual_seed(1)
    plan = SampledCellScoring(True, (4, 4), num_locations=6, seed=0)
    prompts = ["a"] * 4 + ["b"] * 4
    raw = torch.randn(8, 4, 4)
    cells = plan.draw(0, prompts)
    ids = group_ids_from_keys(prompts)
    # per-cell group means and a fixed scale: the drawn-cell r equals the full r at those cells
    full = normalize_reward_maps(raw, ids, 5.0, "fixed", fixed_scale=0.3)
    compact = normalize_reward_maps(plan.compact(raw, cells), ids, 5.0, "fixed", fixed_scale=0.3)
    r = plan.expand(compact, cells)
    assert r.shape == (8, 4, 4)
    torch.testing.assert_close(r.flatten(1).gather(1, cells), full.flatten(1).gather(1, cells))
    drawn = torch.zeros(8, 16, dtype=torch.bool).scatter_(1, cells, True)
    assert torch.all(r.flatten(1)[~drawn] == NEUTRAL_R)


def test_loss_with_given_locations_equals_its_own_draw_of_them():
    torch.manual_seed(2)
    B, C, H = 3, 4, 8
    v_theta = torch.randn(B, C, H, H, requires_grad=True)
    v_old, x0, noise = torch.randn(B, C, H, H), torch.randn(B, C, H, H), torch.randn(B, C, H, H)
    t, r = torch.rand(B), torch.rand(B, 4, 4)
    options = DenseLossOptions(estimator="monte_carlo", num_locations=5, cell_size=2)
    own, own_diag = u_nft_loss(v_theta, v_old, x0, t, r, options, noise=noise,
                               generator=torch.Generator().manual_seed(9))
    idx = torch.multinomial(torch.full((B, 16), 1 / 16), 5, replacement=True,
                            generator=torch.Generator().manual_seed(9))
    given, diag = u_nft_loss(v_theta, v_old, x0, t, r, options, noise=noise, locations=idx)
    torch.testing.assert_close(given, own)
    torch.testing.assert_close(diag["mean_r"], r.flatten(1).gather(1, idx).mean())
    with pytest.raises(ValueError, match="train.proposal='uniform'"):
        u_nft_loss(v_theta, v_old, x0, t, r, DenseLossOptions(estimator="monte_carlo", proposal="low_reward"),
                   noise=noise, locations=idx)
    with pytest.raises(ValueError, match=r"lie in \[0, 16\)"):
        u_nft_loss(v_theta, v_old, x0, t, r, options, noise=noise, locations=idx + 16)


def test_covering_cells_follow_pool_to_grid():
    assert covering_cells([0, 5, 5], (4, 4), (4, 4)) == [0, 5]
    # coarser occlusion grid (2 x 2) under a 4 x 4 location grid: nearest expansion
    assert covering_cells([0, 1, 4, 15], (4, 4), (2, 2)) == [0, 3]
    # finer occlusion grid (4 x 4) under a 2 x 2 location grid: the 2 x 2 block of each location
    assert covering_cells([3], (2, 2), (4, 4)) == [10, 11, 14, 15]
    with pytest.raises(RewardMapError, match="neither divides"):
        covering_cells([0], (4, 4), (3, 3))
    with pytest.raises(RewardMapError, match=r"in \[0, 16\)"):
        covering_cells([16], (4, 4), (4, 4))


def test_plan_is_on_only_where_cells_can_be_drawn_first():
    args = dict(cell_scorers=["occlusion_map"], grid=(4, 4), num_locations=4, seed=0)
    assert sampled_cell_scoring(True, "monte_carlo", "uniform", False, **args)[0].enabled
    for enabled, estimator, proposal, scalar in [(False, "monte_carlo", "uniform", False),
                                                 (True, "exact", "uniform", False),
                                                 (True, "monte_carlo", "uniform", True)]:
        plan, note = sampled_cell_scoring(enabled, estimator, proposal, scalar, **args)
        assert not plan.enabled and note is None
        x = torch.rand(2, 4, 4)
        assert plan.draw(0, ["a", "b"]) is None and plan.compact(x, None) is x and plan.expand(x, None) is x
    plan, note = sampled_cell_scoring(True, "monte_carlo", "low_reward", False, **args)
    assert not plan.enabled and "train.proposal='low_reward'" in note
    assert not sampled_cell_scoring(True, "monte_carlo", "uniform", False, **{**args, "cell_scorers": []})[0].enabled


def test_mixed_requests_in_one_batch_are_refused(batch):
    images, prompts, metadata = batch
    occ = OcclusionMap(weighted_brightness, grid=GRID)
    half = [{LOCATIONS_KEY: {"grid": [4, 4], "cells": [1]}}] * 3 + [{}] * 3
    with pytest.raises(RewardMapError, match="set it for all of them or for none"):
        occ(images, prompts, half)


CONFIG_FILE = '''
import importlib.util
spec = importlib.util.spec_from_file_location("u_nft_configs", {configs!r})
configs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(configs)


def get_config(name):
    config = configs.tiny()
    regions = config.reward_options["region_color_map"]["regions"]
    config.reward_fn = {{"occlusion_map": 1.0}}
    config.reward_options = {{"occlusion_map": {{"scorer": "counting_scorer:region_color_counted",
                                                "scorer_options": {{"regions": regions}}, "grid": (4, 4)}}}}
    config.eval_reward_fn = {{"region_color_map": 1.0}}
    config.train.estimator = "monte_carlo"
    config.train.num_locations = 4
    return config
'''

SCORER_MODULE = '''
import json, os
from reward_maps.base import build_scorer


def region_color_counted(device="cpu", dtype=None, regions=None):
    inner = build_scorer("region_color_map", device=device, dtype=dtype, regions=regions)

    def score(images, prompts, metadata):
        with open(os.environ["COUNT_FILE"], "a") as f:
            f.write(json.dumps(list(prompts)) + "\\n")
        return inner(images, prompts, metadata)
    return score
'''


@pytest.mark.slow
def test_train_script_scores_only_the_drawn_cells(tmp_path, tiny_sd3_dir):
    """The real script, one epoch with an occlusion map and monte_carlo U: each image costs 1 + the unique
    occlusion cells covering its group's drawn locations, exactly, and far fewer than 1 + 16."""
    import subprocess

    (tmp_path / "counting_scorer.py").write_text(SCORER_MODULE)
    config_path = tmp_path / "occlusion_config.py"
    config_path.write_text(CONFIG_FILE.format(configs=str(REPO / "config" / "u_nft.py")))
    count_file = tmp_path / "counts.jsonl"
    sys.path.insert(0, str(REPO / "tests"))
    from test_train_e2e import small_run_args  # noqa: E402

    args = small_run_args(tmp_path / "runs", tiny_sd3_dir, "occ", epochs=1)
    args[1] = f"{config_path}:occ"
    args += ["--config.eval_freq=0"]
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "COUNT_FILE": str(count_file), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    import os
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_u_nft_sd3.py"), *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    per_prompt: dict[str, int] = {}
    for line in count_file.read_text().splitlines():
        for p in json.loads(line):
            per_prompt[p] = per_prompt.get(p, 0) + 1
    plan = SampledCellScoring(True, (8, 8), num_locations=4, seed=42)  # tiny: 64 px / 8 / cell 1; seed 42
    assert len(per_prompt) == 4
    for prompt, count in per_prompt.items():
        covering = covering_cells(plan.draw(0, [prompt])[0].tolist(), (8, 8), GRID)
        assert count == 4 * (1 + len(covering)) < 4 * (1 + 16), prompt  # 4 images per group
