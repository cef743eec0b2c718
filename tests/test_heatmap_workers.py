"""Heatmap overlays (reward_maps.heatmap), the worker pool (reward_maps.workers) and the plug-in example."""
import inspect
import pathlib
import threading
import time

import pytest
import torch
from PIL import Image

import reward_maps
from reward_maps import examples
from reward_maps.base import RewardMapError, RewardOutput, check_images, validate_output
from reward_maps.heatmap import COLORBAR_MIN_HEIGHT, COLORBAR_WIDTH, colorize, diverging_colormap, overlay_heatmap, save_grid
from reward_maps.workers import AsyncScorer, chunk_bounds

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "custom_rewards.md"


# Heatmaps -----------------------------------------------------------------------------------------


def _end_colors():
    cmap = diverging_colormap()
    return torch.tensor(cmap(0.0)[:3], dtype=torch.float32), torch.tensor(cmap(1.0)[:3], dtype=torch.float32)


def test_colormap_endpoints_and_neutral_midpoint():
    blue, red = _end_colors()
    rgb = colorize(torch.tensor([[0.0, 0.5, 1.0, 2.0]]))
    assert torch.allclose(rgb[:, 0, 0], blue) and torch.allclose(rgb[:, 0, 2], red)
    assert torch.allclose(rgb[:, 0, 1], torch.full((3,), 0.8654), atol=2e-3)  # r = 1/2: neutral grey
    assert torch.equal(rgb[:, 0, 3], rgb[:, 0, 2])  # clipped to the range
    assert rgb[2, 0, 0] > rgb[0, 0, 0] and rgb[0, 0, 2] > rgb[2, 0, 2]  # low = blue, high = red
    own_range = colorize(torch.tensor([[-3.0, -1.0]]), value_range=None)
    assert torch.allclose(own_range[:, 0, 0], blue) and torch.allclose(own_range[:, 0, 1], red)


def test_overlay_upsamples_cells_and_blends_with_alpha():
    image = torch.rand(3, 32, 48)
    reward_map = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]])
    plain = torch.tensor(list(overlay_heatmap(image, reward_map, alpha=0.0).getdata())).reshape(32, 48, 3)
    assert torch.equal(plain.permute(2, 0, 1), (image * 255).round().to(torch.int64))
    full = overlay_heatmap(image, reward_map, alpha=1.0)
    assert full.size == (48, 32)
    red = tuple(round(c * 255) for c in _end_colors()[1].tolist())
    assert full.getpixel((16, 0)) == red and full.getpixel((31, 15)) == red  # cell (0, 1) spans 16 x 16 px
    assert full.getpixel((0, 16)) == red and full.getpixel((16, 16)) != red


def test_save_grid_writes_image_overlay_pairs(tmp_path):
    path = save_grid(torch.rand(5, 3, 16, 24), torch.rand(5, 4, 4), tmp_path / "sub" / "grid.png", ncols=2, pad=2)
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.mode == "RGB"
        # 2 pairs per row, 3 rows, then the colour bar (at least COLORBAR_MIN_HEIGHT tall)
        assert grid.size == (2 * (2 * 24 + 2) + 2 + COLORBAR_WIDTH, max(3 * (16 + 2) + 2, COLORBAR_MIN_HEIGHT))
    with pytest.raises(RewardMapError, match="save_grid"):
        save_grid(torch.rand(2, 3, 8, 8), torch.rand(3, 2, 2), tmp_path / "bad.png")


# Worker pool --------------------------------------------------------------------------------------


def _indexing_scorer(images, prompts, metadata):
    """A scorer whose output reveals which image went where: map and score = image mean, info = prompt."""
    check_images("indexing", images, prompts, metadata)
    means = images.mean(dim=(1, 2, 3))
    maps = means[:, None, None].expand(-1, 2, 2).clone()
    return RewardOutput(maps, means, [{"prompt": p, "tag": m.get("tag")} for p, m in zip(prompts, metadata)])


def test_chunk_bounds_cover_batch_in_order():
    assert chunk_bounds(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2)]
    assert chunk_bounds(0, 4) == []


@pytest.mark.parametrize("options", [{"num_workers": 3}, {"num_workers": 2, "chunk_size": 1}, {"num_workers": 1}])
def test_pool_preserves_order_and_equals_direct_call(options):
    images = torch.rand(7, 3, 4, 4)
    prompts = [f"prompt {i}" for i in range(7)]
    metadata = [{"tag": i} for i in range(7)]
    direct = _indexing_scorer(images, prompts, metadata)
    with AsyncScorer(_indexing_scorer, **options) as pool:
        pooled = pool.submit(images, prompts, metadata).result(timeout=30)
    assert torch.equal(pooled.maps, direct.maps) and torch.equal(pooled.scores, direct.scores)
    assert pooled.info == direct.info


def test_pool_of_real_scorer_matches_direct_call():
    scorer = reward_maps.build_scorer("jpeg_map")
    images = torch.rand(4, 3, 32, 32)
    direct = scorer(images, ["p"] * 4, [{}] * 4)
    with AsyncScorer(scorer, name="jpeg_map", num_workers=2) as pool:
        pooled = validate_output("jpeg_map", pool(images, ["p"] * 4, [{}] * 4), 4)
    assert torch.equal(pooled.maps, direct.maps) and torch.equal(pooled.scores, direct.scores)
    assert pooled.info == direct.info and pooled.value_range is None


def test_chunks_run_concurrently():
    barrier = threading.Barrier(4, timeout=10)  # fails unless four chunks are in flight together

    def sleepy(images, prompts, metadata):
        barrier.wait()
        time.sleep(0.2)
        return _indexing_scorer(images, prompts, metadata)

    with AsyncScorer(sleepy, num_workers=4) as pool:
        start = time.perf_counter()
        future = pool.submit(torch.rand(8, 3, 2, 2), ["p"] * 8, [{}] * 8)
        submitted = time.perf_counter() - start
        out = future.result(timeout=30)
        elapsed = time.perf_counter() - start
    assert out.scores.shape == (8,)
    assert submitted < 0.1  # submit returns before any chunk finishes
    assert elapsed < 0.7  # four 0.2 s chunks in parallel, not 0.8 s in series


def test_chunk_exception_surfaces_naming_scorer_and_images():
    def fails_on_second_chunk(images, prompts, metadata):
        if "bad" in prompts:
            raise ValueError("engine crashed")
        return _indexing_scorer(images, prompts, metadata)

    with AsyncScorer(fails_on_second_chunk, name="ocr_map", num_workers=2) as pool:
        future = pool.submit(torch.rand(4, 3, 2, 2), ["ok", "ok", "bad", "ok"], [{}] * 4)
        with pytest.raises(RewardMapError, match=r"'ocr_map' failed on images 2:4: engine crashed") as info:
            future.result(timeout=30)
    assert isinstance(info.value.__cause__, ValueError)


def test_bad_chunk_output_is_reported_by_validation():
    def wrong_shape(images, prompts, metadata):
        return RewardOutput(torch.zeros(1, 2, 2), torch.zeros(1), [{}])

    with AsyncScorer(wrong_shape, name="broken", num_workers=1) as pool:
        with pytest.raises(RewardMapError, match="'broken'.*maps must have shape"):
            pool(torch.rand(3, 3, 2, 2), ["p"] * 3, [{}] * 3)


def test_closed_pool_rejects_work_and_bad_options_are_named():
    pool = AsyncScorer(_indexing_scorer)
    pool.close()
    with pytest.raises(RuntimeError):
        pool.submit(torch.rand(1, 3, 2, 2), ["p"], [{}])
    with pytest.raises(RewardMapError, match="num_workers"):
        AsyncScorer(_indexing_scorer, num_workers=0)


# The plug-in example ------------------------------------------------------------------------------


def test_center_mask_plugin_builds_by_module_path_and_rewards_centre_brightness():
    scorer = reward_maps.build_scorer("reward_maps.examples:center_mask")
    images = torch.zeros(2, 3, 8, 8)
    images[0, :, 2:6, 2:6] = 1.0  # bright centre
    images[1, :, :2] = 1.0  # bright top rows only
    out = validate_output("center_mask", scorer(images, ["a", "b"], [{}, {}]), 2)
    assert out.maps.shape == (2, 8, 8)
    assert out.maps[0, 2:6, 2:6].eq(1).all() and out.maps[1, 2:6, 2:6].eq(0).all()
    assert out.maps[:, :2].eq(0.5).all()  # outside the box: neutral
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.0]))
    assert "center_mask" not in reward_maps.registered_names()  # a plug-in needs no registration


def test_docs_show_the_example_code_verbatim():
    assert inspect.getsource(examples.center_mask) in DOC.read_text()
    assert '"reward_maps.examples:center_mask"' in DOC.read_text()
