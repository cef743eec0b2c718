"""Schedules and solvers (u_nft.solvers) against docs/upstream_facts.md §F, diffusers, and an exactly solvable flow."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from u_nft.solvers import (
    SOLVERS, ddim_step, dpm2_step, flow_step, sample, sd3_sigmas, transformer_timestep, x0_from_velocity,
)

F64 = torch.float64


def gaussian_velocity(mu, s):
    """Exact velocity field of the rectified flow whose data are N(mu, s²) per element.

    x_σ = (1−σ)x0 + σε has marginal N(m, V), m = (1−σ)μ, V = (1−σ)²s² + σ²; the ODE keeps
    (x − m)/√V fixed, so v = dx/dσ = −μ + (x − m)·(σ − (1−σ)s²)/V and the exact solution from σ = 1
    is x0 = μ + s·x_T.
    """
    def velocity(x, sigma):
        sigma = float(sigma)
        var = (1 - sigma) ** 2 * s**2 + sigma**2
        return -mu + (x - (1 - sigma) * mu) * (sigma - (1 - sigma) * s**2) / var
    return velocity


def gaussian_problem(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, generator=g, dtype=F64)
    s = torch.rand(n, generator=g, dtype=F64) * 0.5 + 0.5
    x_T = torch.randn(n, generator=g, dtype=F64)
    return gaussian_velocity(mu, s), x_T, mu + s * x_T


def uniform_sigmas(n):
    return torch.linspace(1, 0, n + 1, dtype=F64)


def max_error(solver, n, problem):
    velocity, x_T, exact = problem
    return (sample(velocity, x_T, uniform_sigmas(n), solver) - exact).abs().max().item()


# Schedules

def test_sd3_sigmas_for_ten_steps_are_the_listed_values():
    listed = [1.0, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0.0]
    sigmas = sd3_sigmas(10)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (11,)
    assert torch.allclose(sigmas, torch.tensor(listed), atol=5e-5, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 10, 28, 40])
def test_sd3_sigmas_equal_the_diffusers_scheduler(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    assert torch.equal(sd3_sigmas(num_steps, shift), scheduler.sigmas)


def test_long_timesteps_truncate_sigma_times_1000():
    timesteps = [transformer_timestep(s, 1).item() for s in sd3_sigmas(10)[:-1]]
    assert timesteps == [1000, 960, 913, 857, 790, 707, 602, 464, 278, 8]
    assert transformer_timestep(sd3_sigmas(10)[1], 3).dtype == torch.long


def test_float_timesteps_equal_the_scheduler_timesteps():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    ours = torch.stack([transformer_timestep(s, 2, "float") for s in sd3_sigmas(10)[:-1]])
    assert ours.dtype == torch.float32 and ours.shape == (10, 2)
    assert torch.equal(ours[:, 0], scheduler.timesteps) and torch.equal(ours[:, 1], scheduler.timesteps)


def test_unknown_timestep_mode_error_lists_accepted_modes():
    with pytest.raises(ValueError, match="'int'.*'long', 'float'"):
        transformer_timestep(0.5, 1, "int")


@pytest.mark.parametrize("bad", [torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.5, 0.7, 0.0]),
                                 torch.tensor([1.5, 0.0]), torch.tensor([0.0])])
def test_invalid_sigmas_are_rejected(bad):
    with pytest.raises(ValueError, match="sigmas"):
        sample(lambda x, s: x, torch.zeros(2), bad)


# Single steps

def test_flow_step_with_eta_zero_is_the_euler_step():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    assert torch.equal(flow_step(x, v, 0.7, 0.4), x + (0.4 - 0.7) * v)


def test_flow_step_with_eta_matches_the_sde_mean_and_std():
    x, v, noise = torch.full((1,), 0.3, dtype=F64), torch.full((1,), -0.8, dtype=F64), torch.ones(1, dtype=F64)
    sigma, sigma_next, eta = 0.6, 0.45, 0.7
    std = eta * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = 0.3 * (1 + std**2 * dt / (2 * sigma)) - 0.8 * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    expected = mean + std * math.sqrt(-dt)
    assert flow_step(x, v, sigma, sigma_next, eta, noise).item() == pytest.approx(expected, rel=1e-12)


def test_flow_step_at_sigma_one_uses_the_next_sigma_in_the_noise_scale():
    x, v, noise = torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)
    out = flow_step(x, v, 1.0, 0.9, 0.5, noise, sigma_at_one=0.9)
    assert out.item() == pytest.approx(0.5 * math.sqrt(1.0 / (1 - 0.9)) * math.sqrt(0.1), rel=1e-12)
    assert torch.isfinite(out).all()


def test_ddim_step_to_zero_returns_the_x0_prediction():
    g = torch.Generator().manual_seed(1)
    x, x0 = torch.randn(4, generator=g), torch.randn(4, generator=g)
    assert torch.equal(ddim_step(x, x0, 0.3, 0.0), x0)


def test_dpm2_step_with_constant_data_prediction_equals_ddim():
    g = torch.Generator().manual_seed(2)
    x, x0 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    assert torch.allclose(dpm2_step(x, x0, x0, 0.8, 0.6, 0.3), ddim_step(x, x0, 0.6, 0.3), atol=1e-12, rtol=0)


def test_dpm2_step_after_sigma_one_is_first_order():
    """λ(1) = −inf makes r0 infinite and D1 = 0 (upstream's float arithmetic): the previous x̂0 is unused."""
    g = torch.Generator().manual_seed(3)
    x, x0, x0_prev = (torch.randn(5, generator=g, dtype=F64) for _ in range(3))
    assert torch.allclose(dpm2_step(x, x0, x0_prev, 1.0, 0.9, 0.7), ddim_step(x, x0, 0.9, 0.7), atol=1e-12, rtol=0)


def test_dpm2_step_second_order_term_follows_the_2m_formula():
    x, x0, x0_prev = torch.tensor([0.4], dtype=F64), torch.tensor([1.2], dtype=F64), torch.tensor([0.5], dtype=F64)
    s1, s0, t = 0.8, 0.6, 0.35
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731
    h, r0 = lam(t) - lam(s0), (lam(s0) - lam(s1)) / (lam(t) - lam(s0))
    d1 = (1.2 - 0.5) / r0
    expected = (t / s0) * 0.4 - (1 - t) * (math.exp(-h) - 1) * 1.2 - 0.5 * (1 - t) * (math.exp(-h) - 1) * d1
    assert dpm2_step(x, x0, x0_prev, s1, s0, t).item() == pytest.approx(expected, rel=1e-12)


# Whole trajectories

def test_euler_converges_at_first_order():
    problem = gaussian_problem()
    errors = {n: max_error("flow", n, problem) for n in (20, 40, 80)}
    assert 1.9 < errors[20] / errors[40] < 2.1
    assert 1.9 < errors[40] / errors[80] < 2.1


def test_dpm2_converges_at_second_order():
    """Error ∝ log(N)/N²: the λ-steps next to σ = 1 and σ = 0 stay O(1) on a σ-uniform grid,
    which costs the log factor; without it the error ratio for halved steps would be 4."""
    problem = gaussian_problem()
    errors = {n: max_error("dpm2", n, problem) for n in (40, 80, 160)}
    scaled = {n: e * n**2 / math.log(n) for n, e in errors.items()}
    assert max(scaled.values()) / min(scaled.values()) < 1.1
    assert 3.2 < errors[80] / errors[160] < 4.0
    assert errors[160] < 0.05 * max_error("flow", 160, problem)


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_are_exact_when_the_data_is_a_point(solver):
    """For data δ_μ the trajectory is a straight line and x̂0 ≡ μ: every solver step is exact."""
    mu = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    velocity = gaussian_velocity(mu, torch.zeros(3, dtype=F64))
    x_T = torch.tensor([1.0, 0.5, -0.7], dtype=F64)
    out = sample(velocity, x_T, sd3_sigmas(7).double(), solver)
    assert torch.allclose(out, mu, atol=1e-12, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_last_step_returns_the_x0_prediction_exactly(solver):
    velocity, x_T, _ = gaussian_problem(8)
    seen = []

    def recording(x, sigma):
        v = velocity(x, sigma)
        seen.append((x.clone(), float(sigma), v))
        return v

    out = sample(recording, x_T, sd3_sigmas(6).double(), solver)
    x_last, sigma_last, v_last = seen[-1]
    assert len(seen) == 6
    assert torch.equal(out, x0_from_velocity(x_last, v_last, sigma_last))


def test_velocity_fn_gets_the_input_dtype_and_the_result_keeps_it():
    seen = []

    def velocity(x, sigma):
        seen.append((x.dtype, sigma.dtype, sigma.ndim))
        return -x

    out = sample(velocity, torch.ones(2, 3, dtype=torch.bfloat16), sd3_sigmas(3), "dpm2")
    assert out.dtype == torch.bfloat16
    assert seen == [(torch.bfloat16, torch.float32, 0)] * 3


def test_sde_sampling_is_deterministic_given_the_generator():
    velocity, x_T, _ = gaussian_problem(16)
    sigmas = sd3_sigmas(10)
    run = lambda seed: sample(velocity, x_T, sigmas, "flow", 0.7, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


def test_sde_with_per_sample_generators_is_independent_of_the_batch():
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(3, 4, generator=g, dtype=F64)
    velocity = gaussian_velocity(torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batched = sample(velocity, x_T, sd3_sigmas(5), "flow", 0.5, gens([10, 11, 12]))
    alone = sample(velocity, x_T[1:2], sd3_sigmas(5), "flow", 0.5, gens([11]))
    assert torch.equal(batched[1:2], alone)


def test_sde_sampling_preserves_the_data_distribution():
    """The Flow-GRPO SDE has the ODE's marginals: x0 ~ N(μ, s²) up to discretisation and MC error."""
    mu, s = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([0.5, 1.5], dtype=F64)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 2, generator=g, dtype=F64)
    x0 = sample(gaussian_velocity(mu, s), x_T, sd3_sigmas(50), "flow", 0.7, g)
    assert torch.allclose(x0.mean(0), mu, atol=0.06)
    assert torch.allclose(x0.std(0), s, rtol=0.05)
    # The noise matters: the SDE end points are not the ODE's deterministic map of x_T.
    assert (x0 - (mu + s * x_T)).abs().mean() > 0.1


def test_eta_zero_draws_no_noise():
    velocity, x_T, _ = gaussian_problem(4)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    sample(velocity, x_T, sd3_sigmas(4), "flow", 0.0, g)
    assert torch.equal(g.get_state(), state)


def test_unknown_solver_error_lists_the_accepted_names():
    with pytest.raises(ValueError, match=r"'heun'.*'flow', 'dpm2'"):
        sample(lambda x, s: x, torch.zeros(2), sd3_sigmas(2), "heun")


def test_dpm2_rejects_eta():
    with pytest.raises(ValueError, match="dpm2.*eta"):
        sample(lambda x, s: x, torch.zeros(2), sd3_sigmas(2), "dpm2", eta=0.5)
