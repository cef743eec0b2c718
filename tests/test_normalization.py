"""Map normalization (docs/contract.md §3) and its scalar special case = upstream's advantage pipeline."""
import numpy as np
import pytest
import torch

from upstream_reference import upstream_advantage_r
from u_nft.normalization import (
    combine_rewards,
    group_ids_from_keys,
    normalize_reward_maps,
    pool_to_grid,
    scalar_rewards_to_r,
    validate_map_range,
)


@pytest.mark.parametrize("global_std", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalar_normalization_equals_upstream_advantages(global_std, seed):
    rng = np.random.default_rng(seed)
    prompts = [f"prompt {i}" for i in rng.integers(0, 6, size=48)]
    rewards = rng.normal(size=48) * rng.choice([0.01, 1.0, 30.0])
    expected = upstream_advantage_r(prompts, rewards, global_std=global_std)
    ours = scalar_rewards_to_r(torch.tensor(rewards, dtype=torch.float32), group_ids_from_keys(prompts),
                               global_std=global_std)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=2e-6)


def test_constant_maps_normalize_to_the_scalar_r():
    rng = np.random.default_rng(3)
    rewards = torch.tensor(rng.normal(size=24), dtype=torch.float32)
    groups = torch.arange(24) // 6
    maps = rewards.view(-1, 1, 1).expand(-1, 4, 4)
    r_map = normalize_reward_maps(maps, groups)
    r_scalar = scalar_rewards_to_r(rewards, groups)
    torch.testing.assert_close(r_map, r_scalar.view(-1, 1, 1).expand(-1, 4, 4))


def test_map_normalization_is_elementwise_per_group():
    """r(u) depends on the group's values at u only: a change at one cell of one image moves only that cell
    within the group (the global scale aside), and other groups are untouched when the scale is fixed."""
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(8, 3, 3, generator=g)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    base = normalize_reward_maps(raw, groups, scale="fixed", fixed_scale=1.0)
    bumped = raw.clone()
    bumped[1, 2, 2] += 0.05
    after = normalize_reward_maps(bumped, groups, scale="fixed", fixed_scale=1.0)
    changed = (after - base).abs() > 1e-7
    assert changed[:4, 2, 2].all() and changed.sum() == 4  # the group's four images at that cell


def test_formula_of_each_scale_mode():
    g = torch.Generator().manual_seed(1)
    raw = torch.rand(6, 2, 2, generator=g, dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    centred = raw.clone()
    for k in (0, 1):
        centred[groups == k] -= raw[groups == k].mean(dim=0)
    c = 5.0
    expected = {
        "global": raw.std(unbiased=False) + 1e-4,
        "group": torch.stack([raw[groups == k].std(unbiased=False) + 1e-4 for k in (0, 1)])[groups].view(6, 1, 1),
        "location": torch.stack([centred[groups == k].square().mean(dim=0).sqrt().clamp(min=0.05)
                                 for k in (0, 1)])[groups],
        "fixed": torch.tensor(0.3, dtype=torch.float64),
    }
    for mode, z in expected.items():
        r = normalize_reward_maps(raw, groups, adv_clip_max=c, scale=mode, sigma_min=0.05, fixed_scale=0.3)
        want = (0.5 + 0.5 * (centred / (c * z)).clamp(-1, 1)).float()
        torch.testing.assert_close(r, want, msg=mode)
        assert r.min() >= 0 and r.max() <= 1


def test_identical_group_gives_neutral_map():
    raw = torch.rand(1, 4, 4).expand(5, -1, -1)
    r = normalize_reward_maps(raw, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(r, torch.full_like(r, 0.5))


def test_pool_to_grid_averages_blocks_and_expands_coarse_maps():
    maps = torch.arange(16.0).view(1, 4, 4)
    torch.testing.assert_close(pool_to_grid(maps, (2, 2)), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]]))
    coarse = torch.tensor([[[1.0, 2.0]]])
    torch.testing.assert_close(pool_to_grid(coarse, (2, 4)), torch.tensor([[[1.0, 1.0, 2.0, 2.0]] * 2]))
    with pytest.raises(ValueError, match="cannot be pooled evenly"):
        pool_to_grid(torch.zeros(1, 5, 5), (2, 2))


def test_combine_rewards_is_weighted_sum_with_scalars_as_constant_maps():
    maps = torch.rand(3, 8, 8)
    scalars = torch.tensor([1.0, 2.0, 3.0])
    combined = combine_rewards({"m": maps, "s": scalars}, {"m": 0.5, "s": 2.0}, (4, 4))
    expected = 0.5 * pool_to_grid(maps, (4, 4)) + 2.0 * scalars.view(3, 1, 1)
    torch.testing.assert_close(combined, expected)
    with pytest.raises(ValueError, match="no reward values for \\['x'\\]"):
        combine_rewards({"m": maps}, {"x": 1.0}, (4, 4))


def test_group_ids_merge_equal_prompts_in_first_seen_order():
    assert group_ids_from_keys(["b", "a", "b", "c", "a"]).tolist() == [0, 1, 0, 2, 1]


def test_mask_range_check_names_reward_and_sample():
    maps = torch.rand(4, 2, 2)
    maps[2, 0, 0] = 1.2
    with pytest.raises(ValueError, match="reward 'my_mask': map of sample 2"):
        validate_map_range("my_mask", maps)
    maps[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="sample 2"):
        validate_map_range("my_mask", maps)


def test_bad_scale_mode_names_the_key():
    with pytest.raises(ValueError, match="train.map_scale"):
        normalize_reward_maps(torch.rand(2, 2, 2), torch.zeros(2, dtype=torch.long), scale="pixel")
