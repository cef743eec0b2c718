"""The optional neutral-cell anchor of u_nft/loss.py (train.neutral_anchor_weight): off is the contract's loss
exactly; on, it adds lambda * E_U[(1 - |2r - 1|) mean_cell (v_theta - v_ref)^2] and touches only neutral cells."""
import pytest
import torch

from u_nft.loss import DenseLossOptions, u_nft_loss
from upstream_reference import upstream_scalar_loss


def _batch(B=2, C=4, H=8, W=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return dict(v_theta=rand(B, C, H, W), v_old=rand(B, C, H, W), v_ref=rand(B, C, H, W), x0=rand(B, C, H, W),
                noise=rand(B, C, H, W), t=torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.05)


def _dense_formula(b, r, beta, kl_weight, cell, adv_clip_max=5.0):
    """Contract loss written out independently: per-location implicit losses, per-sample adaptive weight."""
    t = b["t"].view(-1, 1, 1, 1).float()
    v_theta, v_old, x0 = b["v_theta"].float(), b["v_old"].float(), b["x0"].float()
    x_t = (1 - t) * x0 + t * b["noise"].float()
    total = 0.0
    for sign in (+1, -1):
        v = v_old + sign * beta * (v_theta - v_old)
        err = x_t - t * v - x0
        w = err.detach().abs().mean(dim=(1, 2, 3)).clamp(min=1e-5).view(-1, 1, 1)
        cells = torch.nn.functional.avg_pool2d(err.square().mean(dim=1, keepdim=True), cell).squeeze(1)
        weight = r if sign > 0 else 1 - r
        total = total + (weight * cells / w).mean(dim=(1, 2)).mean() / beta
    kl = (v_theta - b["v_ref"].float()).square().mean()
    return adv_clip_max * total + kl_weight * kl


def test_anchor_off_is_the_contract_loss_bit_for_bit():
    b = _batch()
    r = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    losses, grads = [], []
    for options in (DenseLossOptions(beta=0.7, kl_weight=0.1, cell_size=2),
                    DenseLossOptions(beta=0.7, kl_weight=0.1, cell_size=2, neutral_anchor_weight=0.0)):
        v = b["v_theta"].clone().requires_grad_(True)
        loss, diag = u_nft_loss(v, b["v_old"], b["x0"], b["t"], r, options, noise=b["noise"], v_ref=b["v_ref"])
        loss.backward()
        losses.append(loss)
        grads.append(v.grad)
        assert diag["anchor_loss"].item() == 0.0
        assert torch.equal(loss, diag["policy_loss"] + 0.1 * diag["kl_loss"])
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    torch.testing.assert_close(losses[0], _dense_formula(b, r.float(), 0.7, 0.1, 2), rtol=1e-5, atol=1e-6)
    # and with a constant map it is still upstream DiffusionNFT's scalar loss (contract property 1)
    r_scalar = torch.tensor([0.3, 0.8], dtype=torch.float64)
    loss, _ = u_nft_loss(b["v_theta"], b["v_old"], b["x0"], b["t"], r_scalar, DenseLossOptions(kl_weight=0.1),
                         noise=b["noise"], v_ref=b["v_ref"])
    expected = upstream_scalar_loss(b["v_theta"], b["v_old"], b["v_ref"], b["x0"], b["noise"], b["t"], r_scalar,
                                    1.0, kl_weight=0.1, adv_clip_max=5.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_anchor_adds_the_neutrality_weighted_reference_pull():
    b = _batch()
    r = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    off, _ = u_nft_loss(b["v_theta"], b["v_old"], b["x0"], b["t"], r, DenseLossOptions(cell_size=2),
                        noise=b["noise"], v_ref=b["v_ref"])
    on, diag = u_nft_loss(b["v_theta"], b["v_old"], b["x0"], b["t"], r,
                          DenseLossOptions(cell_size=2, neutral_anchor_weight=3.0), noise=b["noise"], v_ref=b["v_ref"])
    neutrality = 1 - (2 * r.float() - 1).abs()
    cells = torch.nn.functional.avg_pool2d((b["v_theta"] - b["v_ref"]).float().square().mean(dim=1, keepdim=True),
                                           2).squeeze(1)
    expected = (neutrality * cells).mean(dim=(1, 2)).mean()
    torch.testing.assert_close(diag["anchor_loss"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(on, off + 3.0 * expected, rtol=1e-5, atol=1e-6)


def test_anchor_gradient_lives_only_on_neutral_cells():
    b = _batch(B=1)
    r = torch.ones(1, 4, 4, dtype=torch.float64)
    r[0, 0, 0] = 0.5          # one neutral cell (2 x 2 latent pixels at the top left)
    r[0, 3, 3] = 0.0          # a fully negative cell: neutrality 0 as well
    grads = []
    for weight in (0.0, 5.0):
        v = b["v_theta"].clone().requires_grad_(True)
        loss, _ = u_nft_loss(v, b["v_old"], b["x0"], b["t"], r, DenseLossOptions(cell_size=2, neutral_anchor_weight=weight),
                             noise=b["noise"], v_ref=b["v_ref"])
        loss.backward()
        grads.append(v.grad)
    difference = (grads[1] - grads[0]).abs().sum(dim=1)[0]   # (8, 8) latent pixels
    assert difference[:2, :2].min() > 0
    difference[:2, :2] = 0
    assert difference.max().item() == pytest.approx(0.0, abs=1e-7)


def test_anchor_needs_v_ref_and_a_non_negative_weight():
    b = _batch(B=1)
    options = DenseLossOptions(neutral_anchor_weight=1.0, kl_weight=0.0)
    assert options.needs_v_ref and not DenseLossOptions(kl_weight=0.0).needs_v_ref
    with pytest.raises(ValueError, match="neutral_anchor_weight > 0 needs v_ref"):
        u_nft_loss(b["v_theta"], b["v_old"], b["x0"], b["t"], torch.full((1,), 0.5), options, noise=b["noise"])
    with pytest.raises(ValueError, match="train.neutral_anchor_weight must be >= 0"):
        DenseLossOptions(neutral_anchor_weight=-1.0)
