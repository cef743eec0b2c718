"""Occlusion wrapper: exactness on an analytic scorer whose true map is known, and cell sampling."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

from reward_maps import build_scorer, registered_names
from reward_maps.base import RewardMapError, validate_output
from reward_maps.occlusion import OcclusionMap, cell_edges, gaussian_blur

GRID = (4, 3)
H, W = 32, 24  # cells of 8 x 8 pixels


def cell_brightness(images: torch.Tensor, grid=GRID) -> torch.Tensor:
    """(B, gh, gw) mean over channels and pixels of each cell (divisible sizes only)."""
    B, C, h, w = images.shape
    gh, gw = grid
    return images.reshape(B, C, gh, h // gh, gw, w // gw).mean(dim=(1, 3, 5))


WEIGHTS = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [2.5, 1.5, -0.5], [0.25, -3.0, 1.0]])


def analytic_scores(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """score = sum_u WEIGHTS[u] * brightness_u: occluding u with black changes it by WEIGHTS[u] * brightness_u."""
    return (cell_brightness(images) * WEIGHTS).sum(dim=(1, 2))


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(3, 3, H, W, dtype=torch.float64)


def test_black_fill_map_equals_weight_times_cell_brightness(images):
    out = OcclusionMap(analytic_scores, grid=GRID, fill=0.0, batch=5)(images, ["a"] * 3, [{}] * 3)
    out = validate_output("occlusion", out, 3)
    expected = WEIGHTS * cell_brightness(images)
    torch.testing.assert_close(out.maps.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.scores.double(), analytic_scores(images, None, None), rtol=0, atol=1e-6)
    assert out.value_range is None


def test_mean_fill_map_equals_weight_times_brightness_above_image_mean(images):
    # Per-channel mean fill gives the occluded cell the image's mean brightness.
    out = OcclusionMap(analytic_scores, grid=GRID, fill="mean")(images, ["a"] * 3, [{}] * 3)
    image_mean = images.mean(dim=(1, 2, 3)).view(-1, 1, 1)
    expected = WEIGHTS * (cell_brightness(images) - image_mean)
    torch.testing.assert_close(out.maps.double(), expected, rtol=0, atol=1e-6)


def test_score_cells_agree_with_full_map_at_requested_cells(images):
    occ = OcclusionMap(analytic_scores, grid=GRID, fill=0.3, batch=4)
    full = occ(images, ["a"] * 3, [{}] * 3).maps.reshape(3, -1)
    cells = torch.tensor([[0, 11, 5, 5], [7, 2, 2, 9], [10, 1, 3, 4]])
    sampled = occ.score_cells(images, ["a"] * 3, [{}] * 3, cells)
    assert sampled.shape == (3, 4)
    torch.testing.assert_close(sampled, full.gather(1, cells), rtol=0, atol=1e-6)


def test_score_cells_costs_one_scorer_image_per_requested_cell(images):
    seen = []

    def counting(x, prompts, metadata):
        seen.append(x.shape[0])
        return analytic_scores(x, prompts, metadata)

    OcclusionMap(counting, grid=GRID, batch=4).score_cells(images, ["a"] * 3, [{}] * 3, torch.zeros(3, 2, dtype=torch.long))
    assert seen == [3, 4, 2]  # base scores, then 6 occluded images in chunks of 4


def test_chunk_size_does_not_change_the_map(images):
    a = OcclusionMap(analytic_scores, grid=GRID, fill="blur", batch=1)(images, ["a"] * 3, [{}] * 3).maps
    b = OcclusionMap(analytic_scores, grid=GRID, fill="blur", batch=100)(images, ["a"] * 3, [{}] * 3).maps
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_blur_fill_of_constant_image_changes_nothing():
    constant = torch.full((1, 3, 20, 30), 0.4)
    torch.testing.assert_close(gaussian_blur(constant, 3.0), constant)
    out = OcclusionMap(lambda x, p, m: x.flatten(1).pow(2).sum(1), grid=(3, 4), fill="blur")(constant, ["a"], [{}])
    assert out.maps.abs().max() < 1e-4


def test_blur_preserves_channel_means_of_a_periodic_image():
    # Reflect padding of a symmetric pattern keeps the mean; detail (variance) must drop.
    y = torch.arange(32.0)
    pattern = (0.5 + 0.4 * torch.cos(y * torch.pi / 2)).view(1, 1, 32, 1).expand(1, 3, 32, 32)
    blurred = gaussian_blur(pattern, 2.0)
    assert blurred.var() < 0.05 * pattern.var()
    torch.testing.assert_close(blurred.mean(), pattern.mean(), rtol=0, atol=2e-2)


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 200), parts=st.integers(1, 200))
def test_cells_partition_the_pixels_for_any_grid(size, parts):
    if parts > size:
        with pytest.raises(RewardMapError, match="occlusion grid"):
            cell_edges(size, parts)
        return
    edges = cell_edges(size, parts)
    widths = [b - a for a, b in zip(edges, edges[1:])]
    assert edges[0] == 0 and edges[-1] == size
    assert min(widths) >= 1 and max(widths) - min(widths) <= 1


def test_non_divisible_grid_map_matches_brute_force_occlusion():
    torch.manual_seed(1)
    x = torch.rand(1, 3, 13, 10, dtype=torch.float64)
    score = lambda imgs, p, m: (imgs * torch.linspace(-1, 1, 10, dtype=imgs.dtype)).sum(dim=(1, 2, 3))
    out = OcclusionMap(score, grid=(3, 4), fill=0.0)(x, ["a"], [{}])
    rows, cols = [0, 4, 8, 13], [0, 2, 5, 7, 10]  # floor(i * n / parts)
    for i in range(3):
        for j in range(4):
            y = x.clone()
            y[..., rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = 0
            assert abs(float(out.maps[0, i, j]) - float(score(x, 0, 0) - score(y, 0, 0))) < 1e-6


def test_registered_occlusion_map_wraps_a_user_scorer_by_module_path(monkeypatch, images):
    from reward_maps.base import RewardOutput

    def analytic_factory(device="cpu", dtype=torch.float32, offset=0.0):
        def scorer(x, prompts, metadata):
            s = analytic_scores(x, prompts, metadata) + offset
            return RewardOutput(maps=cell_brightness(x).float(), scores=s.float(), info=[{}] * len(prompts))
        return scorer

    module = types.ModuleType("user_analytic_scorers")
    module.analytic_factory = analytic_factory
    monkeypatch.setitem(sys.modules, "user_analytic_scorers", module)
    assert "occlusion_map" in registered_names()
    occ = build_scorer("occlusion_map", scorer="user_analytic_scorers:analytic_factory",
                       scorer_options={"offset": 5.0}, grid=list(GRID), fill=0.0)
    out = occ(images.float(), ["a"] * 3, [{}] * 3)
    torch.testing.assert_close(out.maps, (WEIGHTS * cell_brightness(images)).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.scores, (analytic_scores(images, 0, 0) + 5).float(), rtol=0, atol=1e-5)


def test_bad_cells_and_options_raise_errors_naming_the_scorer(images):
    occ = OcclusionMap(analytic_scores, grid=GRID, name="my_occ")
    with pytest.raises(RewardMapError, match=r"my_occ.*\[0, 12\)"):
        occ.score_cells(images, ["a"] * 3, [{}] * 3, torch.tensor([[12]] * 3))
    with pytest.raises(RewardMapError, match=r"my_occ.*\(3, m\)"):
        occ.score_cells(images, ["a"] * 3, [{}] * 3, torch.tensor([1, 2, 3]))
    with pytest.raises(RewardMapError, match="fill must be one of"):
        OcclusionMap(analytic_scores, fill="noise")
    with pytest.raises(RewardMapError, match="unknown reward scorer 'nope'"):
        build_scorer("occlusion_map", scorer="nope")
