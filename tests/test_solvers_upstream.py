"""The solvers upstream DiffusionNFT registers besides flow / dpm2 (dance, ddim, dpm1), each against an
independent reference: diffusers' FlowMatchEulerDiscreteScheduler on the tiny SD3 transformer (all
first-order deterministic updates are the Euler step in flow form), and the step formulas of
NVlabs/DiffusionNFT flow_grpo/diffusers_patch/solver.py written out by hand."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from u_nft.solvers import SOLVERS, dance_step, ddim_step, dpm1_step, sample, sd3_sigmas, x0_from_velocity

F64 = torch.float64


def test_upstream_solver_names_are_all_registered():
    assert set(SOLVERS) == {"flow", "dance", "ddim", "dpm1", "dpm2"}


@pytest.fixture(scope="module")
def tiny_velocity(tiny_sd3_dir):
    """The tiny SD3 transformer as a velocity field v(x, σ) for two fixed random prompt embeddings."""
    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir / "transformer").eval()
    cfg = transformer.config
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 8, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    x_T = torch.randn(2, cfg.in_channels, 8, 8, generator=g)

    @torch.no_grad()
    def velocity(x, sigma):
        timestep = torch.as_tensor(sigma, dtype=torch.float32).reshape(()).expand(x.shape[0]) * 1000
        return transformer(hidden_states=x.float(), encoder_hidden_states=embeds, pooled_projections=pooled,
                           timestep=timestep, return_dict=False)[0]

    return velocity, x_T


def diffusers_euler(velocity, x_T, num_steps):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    scheduler.set_timesteps(num_steps)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t / 1000), t, x).prev_sample
    return x


@pytest.mark.parametrize("solver", ["flow", "dance", "ddim", "dpm1"])
def test_deterministic_first_order_solvers_match_diffusers_euler_on_the_tiny_model(tiny_velocity, solver):
    velocity, x_T = tiny_velocity
    reference = diffusers_euler(velocity, x_T, 6)
    ours = sample(velocity, x_T, sd3_sigmas(6), solver)
    assert reference.abs().mean() > 0.1  # a non-trivial trajectory
    assert torch.allclose(ours, reference, atol=2e-5, rtol=1e-5)


def test_dpm2_differs_from_euler_on_the_tiny_model(tiny_velocity):
    """The second-order solver is a different integrator (guards against all solvers aliasing Euler)."""
    velocity, x_T = tiny_velocity
    assert (sample(velocity, x_T, sd3_sigmas(6), "dpm2") - diffusers_euler(velocity, x_T, 6)).abs().max() > 1e-3


def test_dpm1_step_is_the_dpm_solver_first_order_formula():
    x, x0 = torch.tensor([0.7], dtype=F64), torch.tensor([-0.4], dtype=F64)
    s, t = 0.8, 0.5
    alpha_s, alpha_t = 1 - s, 1 - t
    h = (math.log(alpha_t) - math.log(t)) - (math.log(alpha_s) - math.log(s))
    expected = (t / s) * 0.7 - alpha_t * (math.exp(-h) - 1.0) * -0.4
    assert dpm1_step(x, x0, s, t).item() == pytest.approx(expected, rel=1e-12)
    # and it equals the deterministic DDIM step (both are exact for a linear x0-prediction)
    assert dpm1_step(x, x0, s, t).item() == pytest.approx(ddim_step(x, x0, s, t).item(), rel=1e-12)


def test_ddim_step_with_eta_follows_the_upstream_update():
    x, x0, noise = torch.tensor([0.3], dtype=F64), torch.tensor([1.1], dtype=F64), torch.tensor([-0.6], dtype=F64)
    s, t, eta = 0.7, 0.4, 0.8
    std = eta * t
    dt_sqrt = math.sqrt(1.0 - t**2 * (1 - s) ** 2 / (s**2 * (1 - t) ** 2))
    rho = std * dt_sqrt
    eps = (0.3 - (1 - s) * 1.1) / s
    expected = (1 - t) * 1.1 + math.sqrt(t**2 - rho**2) * eps + rho * -0.6
    assert ddim_step(x, x0, s, t, eta, noise).item() == pytest.approx(expected, rel=1e-12)


def test_dance_step_with_eta_follows_the_upstream_update():
    x, v, noise = torch.tensor([0.3], dtype=F64), torch.tensor([-0.9], dtype=F64), torch.tensor([0.5], dtype=F64)
    s, t, eta = 0.6, 0.45, 0.7
    dsigma = t - s
    x0 = 0.3 - s * -0.9
    score = -(0.3 - x0 * (1 - s)) / s**2
    expected = 0.3 + dsigma * -0.9 + (-0.5 * eta**2 * score) * dsigma + 0.5 * eta * math.sqrt(s - t)
    assert dance_step(x, v, s, t, eta, noise).item() == pytest.approx(expected, rel=1e-12)


def test_ddim_step_with_eta_to_zero_returns_x0():
    x, x0, noise = torch.randn(4, dtype=F64), torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)
    assert torch.allclose(ddim_step(x, x0, 0.2, 0.0, 0.9, noise), x0, atol=1e-15, rtol=0)
    assert torch.allclose(x0_from_velocity(x, (x - x0) / 0.2, 0.2), x0, atol=1e-12, rtol=0)


def gaussian_velocity(mu, s):
    """Exact velocity of the rectified flow of N(mu, s²) data (as in tests/test_solvers.py)."""
    def velocity(x, sigma):
        sigma = float(sigma)
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        return -mu + (x - (1 - sigma) * mu) * (sigma - (1 - sigma) * s**2) / var
    return velocity


@pytest.mark.parametrize("solver,eta", [("dance", 0.7), ("ddim", 0.7)])
def test_stochastic_solvers_preserve_the_data_distribution(solver, eta):
    mu, s = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.5, 1.5], dtype=F64)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(20000, 2, generator=g, dtype=F64)
    x0 = sample(gaussian_velocity(mu, s), x_T, sd3_sigmas(200).double(), solver, eta, g)
    assert torch.allclose(x0.mean(0), mu, atol=0.04)  # MC error of the mean: 1.5 / sqrt(20000) = 0.011
    assert torch.allclose(x0.std(0), s, rtol=0.05)
    assert (x0 - (mu + s * x_T)).abs().mean() > 0.1  # the noise is used


@pytest.mark.parametrize("solver", ["dpm1", "dpm2"])
def test_dpm_solvers_reject_eta(solver):
    with pytest.raises(ValueError, match=f"{solver}.*deterministic.*eta"):
        sample(lambda x, s: x, torch.zeros(2), sd3_sigmas(3), solver, eta=0.3)


def test_ddim_rejects_eta_above_one():
    with pytest.raises(ValueError, match="ddim.*eta in \\[0, 1\\]"):
        sample(lambda x, s: x, torch.zeros(2), sd3_sigmas(3), "ddim", eta=1.5)
