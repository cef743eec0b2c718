"""train.adv_mode (upstream's loss variants) per location, and the device-correct Monte Carlo location draw."""
import numpy as np
import pytest
import torch

from u_nft.loss import ADV_MODES, DenseLossOptions, apply_adv_mode, draw_locations, u_nft_loss
from u_nft.normalization import group_ids_from_keys, scalar_rewards_to_r
from upstream_reference import upstream_scalar_loss

C_MAX = 5.0


def upstream_mode_r(prompts, rewards, mode, adv_clip_max=C_MAX):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py, written out: PerPromptStatTracker advantages (global
    std + 1e-4), clamp to ±c, the adv_mode transform, then r = clamp(a / c / 2 + 1/2, 0, 1)."""
    prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
    adv = np.empty_like(rewards)
    for p in np.unique(prompts):
        adv[prompts == p] = (rewards[prompts == p] - rewards[prompts == p].mean()) / (np.std(rewards) + 1e-4)
    a = np.clip(adv, -adv_clip_max, adv_clip_max)
    if mode == "positive_only":
        a = np.clip(a, 0, adv_clip_max)
    elif mode == "negative_only":
        a = np.clip(a, -adv_clip_max, 0)
    elif mode == "one_only":
        a = np.where(a > 0, 1.0, 0.0)
    elif mode == "binary":
        a = np.sign(a)
    return torch.from_numpy(np.clip(a / adv_clip_max / 2.0 + 0.5, 0, 1))


def batch(B=6, C=4, H=8, W=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(v_theta=rand(B, C, H, W), v_old=rand(B, C, H, W), v_ref=rand(B, C, H, W), x0=rand(B, C, H, W),
                noise=rand(B, C, H, W), t=torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05)


@pytest.mark.parametrize("mode", ADV_MODES)
def test_constant_map_with_adv_mode_reproduces_the_upstream_variant(mode):
    prompts = ["a", "a", "a", "b", "b", "b"]
    rewards = torch.tensor([0.1, 0.5, 0.35, 0.9, 0.2, 0.2], dtype=torch.float64)
    b = batch()
    ref_theta = b["v_theta"].clone().requires_grad_(True)
    r_upstream = upstream_mode_r(prompts, rewards.numpy(), mode)
    expected = upstream_scalar_loss(ref_theta, b["v_old"], b["v_ref"], b["x0"], b["noise"], b["t"], r_upstream,
                                    beta=0.1, kl_weight=1e-4, adv_clip_max=C_MAX)
    expected.backward()

    r_ours = scalar_rewards_to_r(rewards, group_ids_from_keys(prompts), C_MAX)  # the "all" map, as the loop makes it
    ours_theta = b["v_theta"].clone().requires_grad_(True)
    options = DenseLossOptions(beta=0.1, kl_weight=1e-4, adv_clip_max=C_MAX, adv_mode=mode)
    loss, diag = u_nft_loss(ours_theta, b["v_old"], b["x0"], b["t"], r_ours.view(6, 1, 1).expand(6, 4, 4), options,
                            noise=b["noise"], v_ref=b["v_ref"])
    loss.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_theta.grad, ref_theta.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(diag["mean_r"].double(), r_upstream.mean(), rtol=1e-6, atol=1e-7)


def test_adv_modes_act_per_location_as_documented():
    r = torch.tensor([[[0.0, 0.3, 0.5, 0.6, 1.0]]])
    up = 0.5 + 0.5 / C_MAX
    down = 0.5 - 0.5 / C_MAX
    expected = {
        "all": [0.0, 0.3, 0.5, 0.6, 1.0],
        "positive_only": [0.5, 0.5, 0.5, 0.6, 1.0],
        "negative_only": [0.0, 0.3, 0.5, 0.5, 0.5],
        "one_only": [0.5, 0.5, 0.5, up, up],
        "binary": [down, down, 0.5, up, up],
    }
    for mode, values in expected.items():
        torch.testing.assert_close(apply_adv_mode(r, mode, C_MAX), torch.tensor([[values]]), msg=mode)


def test_default_adv_mode_is_upstreams_all():
    assert DenseLossOptions().adv_mode == "all"


def test_unknown_adv_mode_names_the_key_and_the_accepted_values():
    with pytest.raises(ValueError, match=r"train.adv_mode.*'all', 'positive_only'.*'binary'.*'both'"):
        DenseLossOptions(adv_mode="both")


# Monte Carlo location draws

def test_location_draw_is_reproducible_and_follows_q():
    q = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    a = draw_locations(q, 20000, torch.Generator().manual_seed(3))
    b = draw_locations(q, 20000, torch.Generator().manual_seed(3))
    assert a.dtype == torch.long and a.shape == (2, 20000) and torch.equal(a, b)
    freq = torch.stack([torch.bincount(row, minlength=4).double() / 20000 for row in a])
    torch.testing.assert_close(freq, q.double(), atol=0.015, rtol=0)
    assert (a[0] != 3).all()  # zero-probability cells are never drawn


def test_location_draw_with_a_cpu_generator_equals_torch_multinomial_on_the_cpu():
    q = torch.rand(3, 16, generator=torch.Generator().manual_seed(0))
    q = q / q.sum(dim=1, keepdim=True)
    ours = draw_locations(q, 9, torch.Generator().manual_seed(11))
    plain = torch.multinomial(q, 9, replacement=True, generator=torch.Generator().manual_seed(11))
    assert torch.equal(ours, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_location_draw_on_cuda_with_the_loops_cpu_generator_matches_the_cpu_draw():
    q = torch.full((4, 64), 1 / 64)
    cpu = draw_locations(q, 32, torch.Generator().manual_seed(5))
    gpu = draw_locations(q.cuda(), 32, torch.Generator().manual_seed(5))
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    b = {k: v.float() for k, v in batch(B=4).items()}
    r = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(2))
    options = DenseLossOptions(estimator="monte_carlo", num_locations=8)
    losses = [u_nft_loss(*(b[k].to(device) for k in ("v_theta", "v_old", "x0", "t")), r.to(device), options,
                         noise=b["noise"].to(device), generator=torch.Generator().manual_seed(1))[0].cpu()
              for device in ("cpu", "cuda")]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)  # same cells drawn on both devices
