"""Collateral-drift statistics (u_nft/drift.py): each one sees a change where it is and nowhere else."""
import pytest
import torch

from u_nft.drift import (color_histogram_distance, local_contrast_drift, part_means, pixel_drift, pool_mask,
                         record_trajectory, rewarded_mask, velocity_drift)
from u_nft.solvers import sample, sd3_sigmas

CENTRE = [{"box": [0.25, 0.25, 0.75, 0.75], "color": [1.0, 0.1, 0.1]}]


def _centre_mask(batch=2, size=16):
    return rewarded_mask([{}] * batch, size, size, regions=CENTRE)


def test_rewarded_mask_reads_per_prompt_layouts_before_the_default():
    left = [{"box": [0.0, 0.0, 0.5, 1.0], "color": [0, 0, 1]}]
    mask = rewarded_mask([{}, {"regions": left}], 8, 8, regions=CENTRE)
    assert mask[0, 2:6, 2:6].eq(1).all() and mask[0].sum() == 16
    assert mask[1, :, :4].eq(1).all() and mask[1].sum() == 32
    with pytest.raises(ValueError, match="sample 0: no layout"):
        rewarded_mask([{}], 8, 8)


def test_pixel_drift_separates_a_change_inside_from_one_outside():
    inside = _centre_mask()
    reference = torch.full((2, 3, 16, 16), 0.5)
    images = reference.clone()
    images[0, :, 4:12, 4:12] += 0.2          # image 0: only inside changed
    images[1, :, :2, :] -= 0.3               # image 1: only outside (top rows) changed
    parts = pixel_drift(images, reference, inside)
    assert parts.inside.tolist() == pytest.approx([0.2, 0.0])
    assert parts.outside[0].item() == pytest.approx(0.0)
    assert parts.outside[1].item() == pytest.approx(0.3 * 32 / (256 - 64))
    assert parts.means() == pytest.approx((0.1, 0.3 * 32 / 192 / 2))


def test_histogram_distance_is_zero_for_same_colours_and_one_for_disjoint():
    inside = _centre_mask(1)
    reference = torch.zeros(1, 3, 16, 16)
    shuffled = reference.clone()
    same = color_histogram_distance(shuffled, reference, inside)
    assert same.inside.item() == 0 and same.outside.item() == 0
    images = reference.clone()
    images[0, 0][inside[0].bool()] = 1.0     # inside turns red: a disjoint colour bin
    parts = color_histogram_distance(images, reference, inside, bins=4)
    assert parts.inside.item() == pytest.approx(1.0) and parts.outside.item() == pytest.approx(0.0)
    # a permutation of pixels inside a part keeps its histogram
    noise = torch.rand(1, 3, 16, 16)
    perm = noise.clone()
    perm[0, :, 0, :] = noise[0, :, 0, :].flip(-1)
    assert color_histogram_distance(perm, noise, inside).outside.item() == pytest.approx(0.0)


def test_local_contrast_drift_sees_texture_not_brightness():
    inside = _centre_mask(1)
    reference = torch.full((1, 3, 16, 16), 0.5)
    brighter = reference + 0.2               # flat shift: no contrast change anywhere
    parts = local_contrast_drift(brighter, reference, inside, window=4)
    assert parts.inside.item() == pytest.approx(0.0, abs=1e-6) and parts.outside.item() == pytest.approx(0.0, abs=1e-6)
    textured = reference.clone()
    textured[0, :, 0:4, 0:4] += torch.tensor([[0.2, -0.2], [-0.2, 0.2]]).repeat(2, 2)  # outside block (0, 0)
    parts = local_contrast_drift(textured, reference, inside, window=4)
    assert parts.inside.item() == pytest.approx(0.0, abs=1e-6)
    assert parts.outside.item() == pytest.approx(0.2 / 12, rel=1e-4)  # std 0.2 in 1 of 12 outside blocks


def test_velocity_drift_pools_the_mask_to_the_latent_grid():
    inside = _centre_mask(1, size=16)        # 16 px -> a 4 x 4 latent grid: centre 2 x 2 cells inside
    assert pool_mask(inside, (4, 4))[0].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    v_ref = torch.zeros(1, 4, 4, 4)
    v_theta = v_ref.clone()
    v_theta[0, :, 1:3, 1:3] = 1.0
    parts = velocity_drift(v_theta, v_ref, inside)
    assert parts.inside.item() == 1.0 and parts.outside.item() == 0.0


def test_part_means_marks_an_empty_part_as_nan():
    values = torch.ones(1, 4, 4)
    parts = part_means(values, torch.ones(1, 4, 4))
    assert parts.inside.item() == 1.0 and torch.isnan(parts.outside).all()
    assert parts.means()[1] != parts.means()[1]  # nan


def test_record_trajectory_returns_the_states_the_sampler_visited():
    x_T = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    sigmas = sd3_sigmas(4)

    def velocity(x, sigma):
        return x * 0.5

    x0, states = record_trajectory(lambda v: sample(v, x_T, sigmas, "flow"), velocity)
    assert len(states) == 4 and torch.equal(states[0][0], x_T)
    assert [float(s) for _, s in states] == pytest.approx(sigmas[:-1].tolist())
    assert torch.allclose(x0, sample(velocity, x_T, sigmas, "flow"))
