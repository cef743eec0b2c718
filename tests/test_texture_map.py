"""region_texture_map: local contrast against per-region texture targets."""
import pytest
import torch

import reward_maps
from reward_maps.base import RewardMapError
from reward_maps.masks import local_contrast

LAYOUT = [{"box": [0.0, 0.0, 0.5, 1.0], "texture": 1.0}, {"box": [0.5, 0.0, 1.0, 1.0], "texture": 0.0}]


def checkerboard(size=32, amplitude=0.5):
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (0.5 + amplitude * (((x + y) % 2) * 2 - 1) / 2).expand(3, size, size).clone()


def test_local_contrast_is_block_luma_std():
    image = checkerboard(8, amplitude=0.4)  # luma alternates 0.3 / 0.7: std 0.2 in every block
    torch.testing.assert_close(local_contrast(image, 4), torch.full((2, 2), 0.2), rtol=1e-5, atol=1e-6)
    assert local_contrast(torch.full((3, 8, 8), 0.3), 4).abs().max() < 1e-6


def test_texture_where_asked_and_flat_where_asked_scores_one():
    scorer = reward_maps.build_scorer("region_texture_map", regions=LAYOUT, contrast_scale=0.15)
    ideal = torch.full((3, 32, 32), 0.5)
    ideal[:, :, :16] = checkerboard(32)[:, :, :16]
    swapped = torch.full((3, 32, 32), 0.5)
    swapped[:, :, 16:] = checkerboard(32)[:, :, 16:]
    out = scorer(torch.stack([ideal, swapped]), ["a", "b"], [{}, {}])
    assert out.maps.shape == (2, 32, 32)
    torch.testing.assert_close(out.scores, torch.tensor([1.0, 0.0]))
    assert out.info[0]["region_scores"] == [1.0, 1.0] and out.info[1]["region_scores"] == [0.0, 0.0]


def test_partial_contrast_scores_linearly():
    scorer = reward_maps.build_scorer("region_texture_map", regions=[{"box": [0, 0, 1, 1], "texture": 1.0}],
                                      contrast_scale=0.2)
    out = scorer(checkerboard(16, amplitude=0.2).unsqueeze(0), ["a"], [{}])  # luma std 0.1 = half the scale
    torch.testing.assert_close(out.scores, torch.tensor([0.5]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options,match", [
    (dict(window=0), "window"), (dict(contrast_scale=0.0), "contrast_scale"),
    (dict(regions=[{"box": [0, 0, 1, 1], "texture": 2.0}]), "texture 2.0"),
])
def test_bad_options_name_the_option(options, match):
    with pytest.raises(RewardMapError, match=match):
        scorer = reward_maps.build_scorer("region_texture_map", **{"regions": LAYOUT, **options})
        scorer(torch.rand(1, 3, 16, 16), ["a"], [{}])
