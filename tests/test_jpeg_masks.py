"""JPEG compressibility maps (reward_maps.jpeg) and mask rewards (reward_maps.masks)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

import reward_maps
from reward_maps import jpeg, masks
from reward_maps.base import RewardMapError, validate_output


def _score(name, images, metadata=None, **options):
    scorer = reward_maps.build_scorer(name, **options)
    metadata = metadata if metadata is not None else [{} for _ in range(len(images))]
    return validate_output(name, scorer(images, ["p"] * len(images), metadata), len(images))


def _upstream_size_kb(image):
    """flow_grpo/DDPO jpeg_incompressibility, re-stated: PIL JPEG quality 95, bytes / 1000."""
    pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.tell() / 1000


def _varied_images(count, size, seed=0):
    """Smooth random fields of varying frequency plus noise of varying strength."""
    generator = torch.Generator().manual_seed(seed)
    images = []
    for k in range(count):
        coarse = torch.rand(1, 3, 2 + 3 * (k % 5), 2 + 3 * (k % 5), generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        amount = (k / count) ** 2
        images.append((smooth * (1 - amount) + torch.rand(1, 3, size, size, generator=generator) * amount).clamp(0, 1))
    return torch.cat(images)


# JPEG ---------------------------------------------------------------------------------------------


def test_zigzag_order_starts_like_the_standard():
    order = jpeg.zigzag_order()
    assert order[:10].tolist() == [0, 1, 8, 16, 9, 2, 3, 10, 17, 24]
    assert sorted(order.tolist()) == list(range(64)) and order[-1] == 63


@pytest.mark.parametrize("quality", [95, 50])
def test_parsed_quantisation_tables_match_pil(quality):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, format="JPEG", quality=quality)
    pil_tables = Image.open(buffer).quantization  # natural order in Pillow >= 8.3
    tables = jpeg.encoder_tables(quality)
    assert tables.quant[0].flatten().tolist() == list(pil_tables[0])
    assert tables.quant[1].flatten().tolist() == list(pil_tables[1])
    assert tables.sampling == (2, 2)  # PIL's default 4:2:0


def test_scores_equal_upstream_formulas():
    images = _varied_images(4, 64)
    kb = torch.tensor([_upstream_size_kb(im) for im in images])
    compress = _score("jpeg_map", images)
    incompress = _score("jpeg_incompressibility_map", images)
    torch.testing.assert_close(compress.scores, (-kb / 500).float())
    torch.testing.assert_close(incompress.scores, kb.float())
    assert [i["jpeg_bytes"] for i in compress.info] == [round(k * 1000) for k in kb.tolist()]
    assert compress.value_range is None


def test_calibrated_map_mean_equals_score_and_cells_are_latent_cells():
    images = _varied_images(3, 64)[:, :, :48, :]  # 48 x 64 pixels -> 6 x 8 cells
    out = _score("jpeg_map", images)
    assert out.maps.shape == (3, 6, 8)
    torch.testing.assert_close(out.maps.mean(dim=(1, 2)), out.scores, rtol=1e-5, atol=1e-8)
    assert (out.maps <= 0).all()  # compressibility is a negative size


def test_block_bit_sum_tracks_real_jpeg_size():
    # Measured: correlation 0.99999 and mean relative error ~1% over 24 images of 128 px
    # (the largest error, ~8%, is on the flattest image, where the header dominates).
    images = _varied_images(16, 96, seed=1)
    pixels = jpeg.to_uint8(images)
    real = torch.tensor(jpeg.encoded_sizes(pixels), dtype=torch.float64)
    predicted = jpeg.encoder_tables(95).header_bytes + jpeg.block_bits(pixels).double().sum(dim=(1, 2)) / 8
    correlation = np.corrcoef(real.numpy(), predicted.numpy())[0, 1]
    assert correlation > 0.999
    assert ((predicted - real).abs() / real).mean() < 0.03
    assert ((predicted - real).abs() / real).max() < 0.12


def test_flat_cells_score_higher_than_noisy_cells():
    image = torch.full((1, 3, 64, 64), 0.4)
    image[..., :, 32:] = torch.rand(1, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    out = _score("jpeg_map", image)
    flat, noisy = out.maps[0, :, :4], out.maps[0, :, 4:]
    assert flat.min() > noisy.max()
    incompress = _score("jpeg_incompressibility_map", image)
    assert incompress.maps[0, :, :4].max() < incompress.maps[0, :, 4:].min()


def test_map_is_local_noise_in_one_patch_raises_that_patch_cost():
    image = torch.full((1, 3, 64, 64), 0.5)
    noisy = image.clone()
    noisy[..., 16:32, 32:48] = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    bits = jpeg.block_bits(jpeg.to_uint8(noisy)) - jpeg.block_bits(jpeg.to_uint8(image))
    inside = bits[0, 2:4, 4:6]
    outside = bits[0].clone()
    outside[2:4, 4:6] = 0
    assert inside.min() > 100 and outside.abs().max() < 0.05 * inside.min()


def test_block_option_averages_cells_and_uncalibrated_mean_is_close():
    images = _varied_images(2, 64, seed=2)
    fine = _score("jpeg_map", images)
    coarse = _score("jpeg_map", images, block=16)
    torch.testing.assert_close(coarse.maps, torch.nn.functional.avg_pool2d(fine.maps[:, None], 2)[:, 0])
    estimated = _score("jpeg_map", images, calibrate=False)
    relative = (estimated.maps.mean(dim=(1, 2)) - fine.scores).abs() / fine.scores.abs()
    assert (relative < 0.1).all()


@pytest.mark.parametrize("options", [{"block": 12}, {"block": 0}, {"quality": 101}])
def test_bad_jpeg_options_name_scorer_and_accepted_values(options):
    with pytest.raises(RewardMapError, match="jpeg_map.*accepted"):
        reward_maps.build_scorer("jpeg_map", **options)


# Masks --------------------------------------------------------------------------------------------


def test_binary_to_soft_identity_dilation_and_blur():
    mask = torch.zeros(2, 21, 21)
    mask[:, 10, 10] = 1
    assert torch.equal(masks.binary_to_soft(mask), mask)
    dilated = masks.binary_to_soft(mask, dilate=2)
    assert dilated[0].sum() == 25 and dilated[0, 8:13, 8:13].eq(1).all()
    soft = masks.binary_to_soft(mask > 0, blur_sigma=1.5, dilate=2)
    assert soft.shape == mask.shape and soft.min() >= 0 and soft.max() <= 1
    torch.testing.assert_close(soft[0].sum(), torch.tensor(25.0), rtol=1e-4, atol=1e-4)  # blur keeps mass
    row = soft[0, 10, 10:]
    assert (row[:-1] >= row[1:]).all() and row[0] > 0.8 and row[-1] < 1e-3  # decays away from the centre


def test_region_color_map_is_one_on_target_neutral_outside_and_zero_at_opposite_corner():
    regions = [{"box": [0, 0, 0.5, 1], "color": "#ff0000"}]
    image = torch.zeros(2, 3, 8, 8)
    image[0, 0] = 1  # red everywhere
    image[1, 1:] = 1  # cyan: the farthest colour from red
    out = _score("region_color_map", image, regions=regions)
    assert out.maps[0, :, :4].eq(1).all() and out.maps[:, :, 4:].eq(0.5).all()
    assert out.maps[1, :, :4].abs().max() < 1e-6
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.0]))


def test_later_region_overrides_and_score_is_mean_over_region_pixels():
    regions = [{"box": [0, 0, 1, 0.5], "color": [1, 0, 0]}, {"box": [0, 0, 0.5, 0.5], "color": [0, 0, 1]}]
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0] = 1  # red
    out = _score("region_color_map", image, regions=regions)
    assert out.maps[0, :4, 4:].eq(1).all()  # only the red region covers these
    blue_reward = masks.color_match(image[0], (0.0, 0.0, 1.0))[0, 0]
    assert torch.allclose(out.maps[0, :4, :4], blue_reward) and blue_reward < 0.5
    torch.testing.assert_close(out.scores[0], (1 + blue_reward) / 2)
    assert out.maps[0, 4:].eq(0.5).all()


def test_brightness_map_targets_luma():
    regions = [{"box": [0, 0, 1, 1], "brightness": 0.25}]
    image = torch.full((3, 3, 4, 4), 0.25)
    image[1] = 1.0
    image[2] = 0.625
    out = _score("region_brightness_map", image, regions=regions)
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.0, 0.5]))


def test_metadata_layout_overrides_default_per_prompt():
    image = torch.zeros(2, 3, 4, 4)
    default = [{"box": [0, 0, 1, 1], "color": [0, 0, 0]}]
    metadata = [{}, {"regions": [{"box": [0, 0, 0.5, 0.5], "color": [0, 0, 0]}]}]
    out = _score("region_color_map", image, metadata, regions=default)
    assert out.maps[0].eq(1).all()
    assert out.maps[1, :2, :2].eq(1).all() and out.maps[1, 2:].eq(0.5).all()


def test_soft_regions_blend_towards_neutral():
    out = _score("region_color_map", torch.zeros(1, 3, 32, 32), regions=[{"box": [0.25, 0.25, 0.75, 0.75], "color": [0, 0, 0]}],
                 blur_sigma=2.0)
    row = out.maps[0, 16]
    assert row[16] > 0.99 and row[0] == pytest.approx(0.5, abs=1e-4)
    assert ((row[:16][1:] - row[:16][:-1]) >= -1e-6).all()  # rises monotonically from neutral to 1


def _write_mask(path, mask):
    Image.fromarray((mask * 255).astype(np.uint8)).save(path)
    return str(path)


def test_mask_file_regions_and_mask_file_map(tmp_path):
    mask = np.zeros((16, 16))
    mask[:, 8:] = 1
    _write_mask(tmp_path / "right.png", mask)
    image = torch.zeros(1, 3, 8, 8)
    layout = [{"mask": "right.png", "brightness": 0.0}]
    out = _score("region_brightness_map", image, regions=layout, mask_root=str(tmp_path))
    assert out.maps[0, :, 4:].eq(1).all() and out.maps[0, :, :4].eq(0.5).all()

    fixed = _score("mask_file_map", torch.rand(2, 3, 8, 8), [{"mask": "right.png"}] * 2, mask_root=str(tmp_path))
    assert fixed.maps[:, :, 4:].eq(1).all() and fixed.maps[:, :, :4].eq(0).all()
    torch.testing.assert_close(fixed.scores, torch.tensor([0.5, 0.5]))


def test_mask_errors_name_scorer_and_file(tmp_path):
    image = torch.zeros(1, 3, 8, 8)
    with pytest.raises(RewardMapError, match="mask_file_map.*cannot read mask file.*missing.png"):
        _score("mask_file_map", image, [{"mask": str(tmp_path / "missing.png")}])
    with pytest.raises(RewardMapError, match="mask_file_map.*relative.*mask_root"):
        _score("mask_file_map", image, [{"mask": "a.png"}])
    with pytest.raises(RewardMapError, match="mask_file_map.*metadata\\['mask'\\]"):
        _score("mask_file_map", image, [{}])
    empty = _write_mask(tmp_path / "empty.png", np.zeros((8, 8)))
    with pytest.raises(RewardMapError, match="region_color_map.*empty.png.*no pixel"):
        _score("region_color_map", image, regions=[{"mask": empty, "color": [0, 0, 0]}])
    with pytest.raises(RewardMapError, match="region_color_map.*no layout for sample 0"):
        _score("region_color_map", image)
    with pytest.raises(RewardMapError, match="region 0.*color.*accepted"):
        reward_maps.build_scorer("region_color_map", regions=[{"box": [0, 0, 1, 1], "color": [255, 0, 0]}])
    with pytest.raises(RewardMapError, match="region 0.*box.*accepted"):
        reward_maps.build_scorer("region_brightness_map", regions=[{"box": [0.5, 0, 0.2, 1], "brightness": 1}])


def test_region_maps_are_registered_and_batched_fast_enough():
    assert {"jpeg_map", "jpeg_incompressibility_map", "region_color_map", "region_brightness_map",
            "mask_file_map"} <= set(reward_maps.registered_names())
    out = _score("region_color_map", torch.rand(8, 3, 128, 128), regions=[{"box": [0, 0, 1, 1], "color": [1, 1, 1]}])
    assert out.maps.shape == (8, 128, 128) and out.maps.dtype == torch.float32
