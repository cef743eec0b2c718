"""Heatmap grids: one value -> one colour across a grid, declared ranges clip, colour bars are drawn."""
import pytest
import torch
from PIL import Image

from reward_maps.base import RewardMapError, RewardOutput
from reward_maps.heatmap import (COLORBAR_MIN_HEIGHT, COLORBAR_WIDTH, colorbar_image, colorize, grid_value_range,
                                 save_grid, save_map_image, save_reward_grid)

H = W = 16  # image size; maps are 2 x 2, so every map cell is an 8 x 8 px square in the overlay
PAD = 2


def _overlay_cell(grid: Image.Image, panel: int, row: int, col: int, ncols: int = 4):
    """The RGB of map cell (row, col) in the overlay of ``panel`` (alpha = 1: pure map colour)."""
    x = PAD + (panel % ncols) * (2 * W + PAD) + W + col * (W // 2) + W // 4
    y = PAD + (panel // ncols) * (H + PAD) + row * (H // 2) + H // 4
    return grid.getpixel((x, y))


def _grey(value: float = 0.5, lo: float = 0.0, hi: float = 1.0):
    return tuple(round(c * 255) for c in colorize(torch.tensor([[value]]), (lo, hi))[:, 0, 0].tolist())


def _grid(tmp_path, maps, value_range, name="grid.png", **kwargs):
    images = torch.rand(maps.shape[0], 3, H, W, generator=torch.Generator().manual_seed(0))
    path = save_grid(images, maps, tmp_path / name, ncols=4, value_range=value_range, alpha=1.0, pad=PAD, **kwargs)
    return Image.open(path).convert("RGB")


def test_neutral_half_is_the_same_grey_in_every_panel_of_a_declared_range_grid(tmp_path):
    # panel i: cell (0, 0) is r = 1/2, the other cells differ per panel (so a per-panel min/max would move it)
    maps = torch.stack([torch.tensor([[0.5, 0.1 * i], [1.0 - 0.1 * i, 0.2 + 0.05 * i]]) for i in range(6)])
    grid = _grid(tmp_path, maps, (0.0, 1.0))
    colours = {_overlay_cell(grid, i, 0, 0) for i in range(6)}
    assert colours == {_grey()}
    (r, g, b), = colours
    assert max(r, g, b) - min(r, g, b) <= 1 and 215 <= r <= 225  # neutral grey, not a tint


def test_unbounded_grid_uses_one_range_for_all_panels(tmp_path):
    # panel 0 spans [0, 1], panel 1 spans [0, 10]: one grid range [0, 10], so 1.0 is NOT panel 0's red
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.5]], [[0.0, 10.0], [1.0, 5.0]]])
    grid = _grid(tmp_path, maps, None)
    assert grid_value_range(maps, None) == (0.0, 10.0)
    assert _overlay_cell(grid, 0, 0, 1) == _overlay_cell(grid, 1, 1, 0) == _grey(1.0, 0.0, 10.0)  # value 1.0
    assert _overlay_cell(grid, 0, 0, 0) == _overlay_cell(grid, 1, 0, 0) == _grey(0.0, 0.0, 10.0)  # value 0.0
    assert _overlay_cell(grid, 1, 1, 1) == _grey(0.5)  # 5.0, the grid's middle, is the neutral grey
    assert _overlay_cell(grid, 0, 0, 1) != _grey(1.0)  # a per-panel min/max would have made it red


def test_declared_range_clips_values_outside_instead_of_renormalizing(tmp_path):
    inside = torch.tensor([[[0.0, 1.0], [0.5, 0.25]]])
    outside = torch.tensor([[[-5.0, 7.0], [0.5, 0.25]]])  # same cells, ends pushed far outside (0, 1)
    a, b = _grid(tmp_path, inside, (0.0, 1.0), "a.png"), _grid(tmp_path, outside, (0.0, 1.0), "b.png")
    for row, col in ((0, 0), (0, 1), (1, 0), (1, 1)):
        assert _overlay_cell(a, 0, row, col) == _overlay_cell(b, 0, row, col)
    assert _overlay_cell(b, 0, 1, 0) == _grey()  # 0.5 stays neutral although the map's own range is [-5, 7]


def test_colour_bar_is_drawn_right_of_the_panels(tmp_path):
    maps = torch.rand(3, 2, 2)
    grid = _grid(tmp_path, maps, (0.0, 1.0))
    panels_w, panels_h = 3 * (2 * W + PAD) + PAD, H + 2 * PAD
    assert grid.size == (panels_w + COLORBAR_WIDTH, max(panels_h, COLORBAR_MIN_HEIGHT))
    bar = grid.crop((panels_w, 0, grid.width, grid.height))
    pixels = list(bar.getdata())
    reds = sum(r > 150 and g < 80 and b < 80 for r, g, b in pixels)
    blues = sum(b > 150 and r < 100 and g < 120 for r, g, b in pixels)
    assert reds > 20 and blues > 20  # both ends of the colormap are in the bar
    no_bar = _grid(tmp_path, maps, (0.0, 1.0), "plain.png", colorbar=False)
    assert no_bar.size == (panels_w, panels_h)


def test_colour_bar_has_the_requested_size_and_spans_the_colormap():
    bar = colorbar_image((-2.0, 2.0), height=200, label="clip_map\ndeclared range")
    assert bar.size == (COLORBAR_WIDTH, 200)
    column = [bar.getpixel((int(COLORBAR_WIDTH * 0.16), y)) for y in (20, 100, 180)]
    top, middle, bottom = column
    assert top[0] > top[2] and bottom[2] > bottom[0]  # red on top (high), blue at the bottom (low)
    assert max(middle) - min(middle) <= 6  # grey in the middle


def test_save_reward_grid_uses_the_scorers_declared_range(tmp_path):
    maps = torch.tensor([[[0.0, 2.0], [-2.0, 1.0]]])
    out = RewardOutput(maps=maps, scores=torch.zeros(1), info=[{}], value_range=(-2.0, 2.0))
    images = torch.rand(1, 3, H, W)
    path = save_reward_grid(images, out, tmp_path / "r.png", label="clip", alpha=1.0)
    grid = Image.open(path).convert("RGB")
    assert _overlay_cell(grid, 0, 0, 0) == _grey(0.0, -2.0, 2.0) == _grey()  # 0 is the middle of (-2, 2)
    unbounded = RewardOutput(maps=maps, scores=torch.zeros(1), info=[{}], value_range=None)
    grid = Image.open(save_reward_grid(images, unbounded, tmp_path / "u.png", alpha=1.0)).convert("RGB")
    assert _overlay_cell(grid, 0, 1, 1) == _grey(1.0, -2.0, 2.0)  # grid range [-2, 2] from the map itself


def test_mean_map_image_has_a_colour_bar_and_nearest_cells(tmp_path):
    path = save_map_image(torch.tensor([[0.0, 1.0], [0.5, 0.5]]), tmp_path / "m.png", (0.0, 1.0), size=64)
    image = Image.open(path).convert("RGB")
    assert image.size == (64 + COLORBAR_WIDTH, COLORBAR_MIN_HEIGHT)
    assert image.getpixel((8, 40)) == image.getpixel((56, 56)) == _grey()


def test_grid_value_range_rejects_empty_ranges_and_handles_constant_maps():
    with pytest.raises(RewardMapError, match="value_range"):
        grid_value_range(torch.zeros(1, 2, 2), (1.0, 1.0))
    assert grid_value_range(torch.full((2, 2, 2), 3.0), None) == (2.5, 3.5)  # constant -> neutral grey
    assert grid_value_range(torch.tensor([[[float("nan"), 2.0], [float("inf"), -1.0]]]), None) == (-1.0, 2.0)
    assert grid_value_range(torch.full((1, 2, 2), float("nan")), None) == (0.0, 1.0)
