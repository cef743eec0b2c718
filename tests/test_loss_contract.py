"""The math contract (docs/contract.md §1-2), checked against formulas written out independently here."""
import itertools

import pytest
import torch

from u_nft.loss import DenseLossOptions, expand_to_grid, location_proposal, u_nft_loss
from upstream_reference import upstream_scalar_loss


def random_batch(B=3, C=4, H=8, W=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)
    return dict(v_theta=rand(B, C, H, W), v_old=rand(B, C, H, W), v_ref=rand(B, C, H, W), x0=rand(B, C, H, W),
                noise=rand(B, C, H, W), t=torch.rand(B, generator=g, dtype=dtype) * 0.98 + 0.01,
                r=torch.rand(B, generator=g, dtype=dtype))


@pytest.mark.parametrize("beta,cell_size,shape", [
    (1.0, 2, (3, 4, 8, 8)), (0.1, 1, (2, 16, 4, 6)), (0.5, 4, (4, 4, 8, 16)), (2.0, 2, (1, 4, 12, 4)),
])
def test_constant_map_reproduces_scalar_loss(beta, cell_size, shape):
    B, C, H, W = shape
    batch = random_batch(B, C, H, W, seed=int(beta * 10) + cell_size)
    ref_theta = batch["v_theta"].clone().requires_grad_(True)
    expected = upstream_scalar_loss(ref_theta, batch["v_old"], batch["v_ref"], batch["x0"], batch["noise"], batch["t"],
                                    batch["r"], beta, kl_weight=1e-2, adv_clip_max=5.0)
    expected.backward()

    ours_theta = batch["v_theta"].clone().requires_grad_(True)
    r_map = batch["r"].view(B, 1, 1).expand(B, H // cell_size, W // cell_size)
    options = DenseLossOptions(beta=beta, kl_weight=1e-2, cell_size=cell_size)
    loss, diag = u_nft_loss(ours_theta, batch["v_old"], batch["x0"], batch["t"], r_map, options,
                            noise=batch["noise"], v_ref=batch["v_ref"])
    loss.backward()
    # The loss computes in fp32 whatever the input dtype; compare at fp32 precision.
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_theta.grad, ref_theta.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(diag["mean_r"].double(), batch["r"].mean(), rtol=1e-6, atol=1e-7)


def test_scalar_r_broadcasts_like_constant_map():
    batch = random_batch()
    opts = DenseLossOptions(beta=0.7)
    a, _ = u_nft_loss(batch["v_theta"], batch["v_old"], batch["x0"], batch["t"], batch["r"], opts, noise=batch["noise"])
    b, _ = u_nft_loss(batch["v_theta"], batch["v_old"], batch["x0"], batch["t"],
                      batch["r"].view(-1, 1, 1).expand(-1, 4, 4), opts, noise=batch["noise"])
    torch.testing.assert_close(a, b)


def exact_expectation(batch, r_map, options, valid_mask=None):
    loss, _ = u_nft_loss(batch["v_theta"], batch["v_old"], batch["x0"], batch["t"], r_map,
                         DenseLossOptions(**{**options.__dict__, "estimator": "exact"}),
                         noise=batch["noise"], valid_mask=valid_mask)
    return loss.item()


@pytest.mark.parametrize("proposal,masked", [("uniform", False), ("low_reward", False), ("informative", True)])
def test_location_sampling_is_unbiased(proposal, masked):
    """Mean of 2000 Monte Carlo estimates lies within 4 standard errors of the exact expectation."""
    batch = random_batch(B=2, C=4, H=8, W=8, seed=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    r_map = torch.rand(2, 4, 4, generator=g) ** 2  # skewed so a focused q differs from p
    valid = None
    if masked:
        valid = torch.ones(2, 4, 4)
        valid[0, :2] = 0
        valid[1, :, 3] = 0
    options = DenseLossOptions(estimator="monte_carlo", num_locations=4, proposal=proposal, proposal_mix=0.2)
    exact = exact_expectation(batch, r_map, options, valid)
    gen = torch.Generator().manual_seed(123)
    estimates = torch.tensor([
        u_nft_loss(batch["v_theta"], batch["v_old"], batch["x0"], batch["t"], r_map, options,
                   noise=batch["noise"], valid_mask=valid, generator=gen)[0].item()
        for _ in range(2000)
    ])
    standard_error = estimates.std() / len(estimates) ** 0.5
    assert abs(estimates.mean().item() - exact) < 4 * standard_error.item(), (estimates.mean(), exact, standard_error)
    if proposal != "uniform":
        assert standard_error > 0


@pytest.mark.parametrize("proposal", ["uniform", "low_reward", "informative"])
def test_importance_weights_make_any_proposal_unbiased_in_expectation(proposal):
    """Enumerating all locations: sum_u q(u) * p(u)/q(u) * f(u) = sum_u p(u) f(u) exactly."""
    g = torch.Generator().manual_seed(0)
    r = torch.rand(3, 16, generator=g)
    p = torch.rand(3, 16, generator=g)
    p[0, :5] = 0  # invalid locations
    p = p / p.sum(dim=1, keepdim=True)
    f = torch.randn(3, 16, generator=g)
    q = location_proposal(r, p, proposal, mix=0.1)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(3))
    assert ((q > 0) | (p == 0)).all()
    weights = torch.where(q > 0, p / q, torch.zeros_like(q))
    torch.testing.assert_close((q * weights * f).sum(dim=1), (p * f).sum(dim=1))


@pytest.mark.parametrize("beta", [0.3, 1.0, 2.5])
def test_closed_form_optimum_per_location(beta):
    """Free v_theta shared by N samples (same x_t, t): minimiser = v_old + (1/beta) mean_i[(2 r_i - 1)(v_i - v_old)]."""
    torch.manual_seed(int(beta * 100))
    N, C, H, W, cell = 5, 2, 4, 4, 2
    t = torch.full((N,), 0.6, dtype=torch.float64)
    x_t = torch.randn(1, C, H, W, dtype=torch.float64).expand(N, -1, -1, -1)
    targets = torch.randn(N, C, H, W, dtype=torch.float64)          # v_i = eps_i - x0_i
    x0 = x_t - 0.6 * targets
    v_old = torch.randn(1, C, H, W, dtype=torch.float64)
    r_map = torch.rand(N, H // cell, W // cell, dtype=torch.float64)
    options = DenseLossOptions(beta=beta, adaptive_weighting="none", cell_size=cell)

    v_free = v_old.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([v_free], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad()
        loss, _ = u_nft_loss(v_free.expand(N, -1, -1, -1), v_old.expand(N, -1, -1, -1), x0, t, r_map, options, x_t=x_t)
        loss.backward()
        return loss
    opt.step(closure)

    r_pix = expand_to_grid(r_map, (H, W)).unsqueeze(1)  # (N, 1, H, W)
    expected = v_old + ((2 * r_pix - 1) * (targets - v_old)).mean(dim=0, keepdim=True) / beta
    torch.testing.assert_close(v_free.detach(), expected, rtol=1e-4, atol=1e-4)

    # With v_old the mean of the targets this is the theorem's v_old + (2/beta) * Delta per location,
    # Delta = alpha (v+ - v_old) = mean_i r_i (v_i - v_old) for the empirical posterior.
    v_old_mean = targets.mean(dim=0, keepdim=True)
    theorem = v_old_mean + (2 / beta) * (r_pix * (targets - v_old_mean)).mean(dim=0, keepdim=True)
    formula = v_old_mean + ((2 * r_pix - 1) * (targets - v_old_mean)).mean(dim=0, keepdim=True) / beta
    torch.testing.assert_close(formula, theorem)


def neutral_setup(seed=7):
    torch.manual_seed(seed)
    N, C, H, W = 4, 2, 4, 4
    t = torch.rand(N, dtype=torch.float64) * 0.8 + 0.1
    targets = torch.randn(N, C, H, W, dtype=torch.float64)
    x0 = torch.randn(N, C, H, W, dtype=torch.float64)
    noise = x0 + targets  # so that eps - x0 = targets
    v_old = torch.randn(N, C, H, W, dtype=torch.float64)
    r_map = torch.rand(N, 2, 2, dtype=torch.float64)
    r_map[:, 0, :] = 0.5  # top half neutral
    return v_old, x0, noise, t, r_map


@pytest.mark.parametrize("weighting", ["none", "location", "sample"])
def test_neutral_regions_are_stationary_at_v_old(weighting):
    """Where r = 1/2 the gradient vanishes at v_theta = v_old whatever the targets; informative cells still move."""
    v_old, x0, noise, t, r_map = neutral_setup()
    v = v_old.clone().requires_grad_(True)
    loss, _ = u_nft_loss(v, v_old, x0, t, r_map, DenseLossOptions(adaptive_weighting=weighting), noise=noise)
    loss.backward()
    assert v.grad[..., :2, :].abs().max() < 1e-12
    assert v.grad[..., 2:, :].abs().max() > 1e-3


def test_neutral_regions_pull_only_toward_v_old():
    """Weighting off: in r = 1/2 cells the gradient is a positive multiple of (v_theta - v_old), the
    multiple the same over the sample's channels and pixels, so the targets play no part there."""
    v_old, x0, noise, t, r_map = neutral_setup()
    v = (v_old + torch.randn_like(v_old)).requires_grad_(True)
    loss, _ = u_nft_loss(v, v_old, x0, t, r_map, DenseLossOptions(beta=0.7, adaptive_weighting="none"), noise=noise)
    loss.backward()
    ratio = (v.grad / (v - v_old).detach())[..., :2, :].flatten(1)
    assert (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=0)  # fp32 inside the loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_fp32_loss_and_grad(dtype):
    batch = random_batch(dtype=torch.float32)
    v = batch["v_theta"].to(dtype).requires_grad_(True)
    loss, diag = u_nft_loss(v, batch["v_old"].to(dtype), batch["x0"].to(dtype), batch["t"],
                            torch.rand(3, 4, 4), DenseLossOptions(kl_weight=1e-4),
                            noise=batch["noise"].to(dtype), v_ref=batch["v_ref"].to(dtype))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert v.grad.dtype == dtype and torch.isfinite(v.grad.float()).all()
    assert all(value.dtype == torch.float32 for value in diag.values())


def test_coarser_r_grid_expands_by_nearest_cell():
    batch = random_batch(B=2, H=8, W=8)
    coarse = torch.rand(2, 2, 2, dtype=torch.float64)
    fine = coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    opts = DenseLossOptions(cell_size=2)
    args = (batch["v_theta"][:2], batch["v_old"][:2], batch["x0"][:2], batch["t"][:2])
    a, _ = u_nft_loss(*args, coarse, opts, noise=batch["noise"][:2])
    b, _ = u_nft_loss(*args, fine, opts, noise=batch["noise"][:2])
    torch.testing.assert_close(a, b)


def test_diagnostics_report_parts_and_neutral_share():
    batch = random_batch(B=2)
    r_map = torch.full((2, 4, 4), 0.5)
    r_map[0, 0, 0] = 1.0
    loss, diag = u_nft_loss(batch["v_theta"], batch["v_old"], batch["x0"], batch["t"], r_map,
                            DenseLossOptions(kl_weight=0.5), noise=batch["noise"], v_ref=batch["v_ref"])
    assert diag["neutral_fraction"].item() == pytest.approx(31 / 32)
    torch.testing.assert_close(loss, diag["policy_loss"] + 0.5 * diag["kl_loss"])
    torch.testing.assert_close(diag["policy_loss"], 5.0 * (diag["positive_loss"] + diag["negative_loss"]))


@pytest.mark.parametrize("bad,match", [
    (dict(r=torch.full((3, 4, 4), 1.5)), "r must lie in"),
    (dict(r=torch.rand(3, 3, 3)), "does not divide"),
    (dict(r=torch.rand(2, 4, 4)), "r must be"),
    (dict(t=torch.rand(2)), "t must have shape"),
    (dict(x_t=torch.zeros(3, 4, 8, 8)), "exactly one of x_t or noise"),
    (dict(v_old=torch.zeros(3, 4, 8, 4)), "v_old shape"),
    (dict(valid_mask=torch.zeros(3, 4, 4)), "no valid location for sample 0"),
])
def test_bad_inputs_raise_clear_errors(bad, match):
    batch = random_batch(dtype=torch.float32)
    kwargs = dict(v_theta=batch["v_theta"], v_old=batch["v_old"], x0=batch["x0"], t=batch["t"],
                  r=torch.rand(3, 4, 4), noise=batch["noise"])
    kwargs.update(bad)
    with pytest.raises(ValueError, match=match):
        u_nft_loss(**kwargs)


@pytest.mark.parametrize("field,value", [
    ("beta", 0.0), ("adaptive_weighting", "pixel"), ("estimator", "mc"), ("proposal", "worst"),
    ("cell_size", 0), ("proposal_mix", 0.0), ("kl_weight", -1.0),
])
def test_invalid_options_name_the_config_key(field, value):
    with pytest.raises(ValueError, match=f"train.{field}"):
        DenseLossOptions(**{field: value})


def test_options_grid_covers_all_modes():
    """Every combination of weighting x estimator x proposal runs and gives a finite differentiable loss."""
    batch = random_batch(dtype=torch.float32)
    for weighting, estimator, proposal in itertools.product(("sample", "location", "none"),
                                                            ("exact", "monte_carlo"),
                                                            ("uniform", "low_reward", "informative")):
        v = batch["v_theta"].clone().requires_grad_(True)
        opts = DenseLossOptions(adaptive_weighting=weighting, estimator=estimator, proposal=proposal, num_locations=3)
        loss, _ = u_nft_loss(v, batch["v_old"], batch["x0"], batch["t"], torch.rand(3, 4, 4), opts,
                             noise=batch["noise"], generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(v.grad).all()
