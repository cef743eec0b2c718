"""Sampling schedules and ODE/SDE solvers for rectified-flow models (SD3 convention).

Convention (docs/upstream_facts.md §F): x_σ = (1 − σ)·x0 + σ·ε, σ = 1 is pure noise, the model predicts the
velocity v = ε − x0, so the x0-prediction is x̂0 = x − σ·v. Sampling integrates dx/dσ = v from
σ = 1 down to σ = 0 along a decreasing schedule ``sigmas`` (N + 1 values, the last one 0).

Solvers, as in upstream DiffusionNFT ``flow_grpo/diffusers_patch/solver.py``:
- ``"flow"``: the Flow-GRPO SDE step, with ``eta = 0`` the Euler step of the ODE;
- ``"dpm2"``: multistep DPM-Solver++(2M) in data prediction (Lu et al. 2022, arXiv 2211.01095,
  Alg. 2) with α = 1 − σ, λ = log(α/σ); the first and the last step are deterministic DDIM steps;
- ``"dpm1"``: DPM-Solver++ first order (the same first and last DDIM steps), deterministic;
- ``"ddim"``: the DDIM step in flow form, stochastic with ``eta`` in [0, 1] (ρ = η·σ_next·√(…));
- ``"dance"``: the DanceGRPO SDE step (Euler plus a score correction and noise η·√(σ − σ_next)).
With eta = 0, "flow", "dance", "ddim" and "dpm1" all reduce to the Euler step of the ODE (in exact
arithmetic: the DDIM and DPM-Solver++ first-order updates in flow form are x + (σ_next − σ)·v).

All functions are pure: tensors and floats in, tensors out; randomness only through explicit
noise tensors or generators.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

SOLVERS = ("flow", "dpm2", "dance", "ddim", "dpm1")  # upstream solver.py registers these five
DETERMINISTIC_SOLVERS = ("dpm2", "dpm1")  # eta must be 0
TIMESTEP_MODES = ("long", "float")

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None


# Schedules

def sd3_sigmas(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD3's sampling schedule: ``FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N).sigmas``.

    Returns a float32 tensor of shape (N + 1,), decreasing from σ_max to σ_min, then 0 appended.
    Computed as diffusers does (and with its float32/float64 roundings, so the values are equal):
    σ_train(k) = shift·(k/T) / (1 + (shift − 1)·k/T) for k = T…1 (float32), σ_max = σ_train(T) = 1,
    σ_min = σ_train(1); t = linspace(σ_max·T, σ_min·T, N); σ = shift·(t/T) / (1 + (shift − 1)·t/T).
    N = 10, shift 3 gives [1.0, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0].
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    # The training sigmas are float32 in diffusers; only their ends are used.
    ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps
    ends = shift * ends / (1 + (shift - 1) * ends)
    sigma_max, sigma_min = ends.tolist()
    timesteps = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sigmas = timesteps / num_train_timesteps
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


def transformer_timestep(sigma: float | torch.Tensor, batch_size: int, mode: str = "long",
                         device: torch.device | str | None = None) -> torch.Tensor:
    """The ``timestep`` tensor (B,) the SD3 transformer gets at noise level σ: σ·1000.

    ``mode="long"``: truncated to an integer (torch.long), as upstream's sampler does
    (1000, 960, 913, …, 278, 8 for N = 10). ``mode="float"``: the float32 value σ·1000, as the
    diffusers pipeline and upstream's training pass it. The product is taken in float32, as both do.
    """
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"timestep mode {mode!r} is not one of {TIMESTEP_MODES}")
    value = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(()) * 1000
    if mode == "long":
        value = value.long()
    return value.expand(batch_size)


def check_sigmas(sigmas: torch.Tensor) -> list[float]:
    """Validate a sampling schedule and return it as python floats (float64).

    Accepted: 1-D, at least 2 values, strictly decreasing, within [0, 1], ending at 0.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(sigmas.shape)}")
    values = sigmas.detach().double().cpu().tolist()
    if values[-1] != 0.0:
        raise ValueError(f"sigmas must end at 0 (the sampler returns x0), got last value {values[-1]}")
    if values[0] > 1.0 or any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must decrease strictly from at most 1 to 0, got {values}")
    return values


# Single steps

def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """x̂0 = x − σ·v (rectified flow, v = ε − x0). Shapes: x, v (B, …); σ scalar or broadcastable."""
    return x - sigma * v


def flow_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, eta: float = 0.0,
              noise: torch.Tensor | None = None, sigma_at_one: float | None = None) -> torch.Tensor:
    """One step σ → σ_next of the Flow-GRPO SDE (upstream ``flow_grpo_step``); eta = 0 is Euler.

    dt = σ_next − σ (< 0), std = eta·√(σ / (1 − σ)), with ``sigma_at_one`` (upstream: σ_1, the
    schedule's second value) used for σ in the denominator when σ = 1;
    mean = x·(1 + std²·dt/(2σ)) + v·(1 + std²·(1 − σ)/(2σ))·dt;  x' = mean + std·√(−dt)·noise.
    With eta = 0 this is x' = x + dt·v exactly. Shapes: x, v, noise (B, …).
    """
    dt = sigma_next - sigma
    if eta == 0.0:
        return x + dt * v
    if noise is None:
        raise ValueError("flow_step with eta > 0 needs a standard-normal `noise` tensor shaped like x")
    denominator_sigma = sigma
    if sigma == 1.0:
        if sigma_at_one is None:
            raise ValueError("flow_step at sigma = 1 with eta > 0 needs `sigma_at_one` (the next sigma)")
        denominator_sigma = sigma_at_one
    std = eta * math.sqrt(sigma / (1.0 - denominator_sigma))
    mean = x * (1 + std**2 * dt / (2 * sigma)) + v * ((1 + std**2 * (1 - sigma) / (2 * sigma)) * dt)
    return mean + (std * math.sqrt(-dt)) * noise


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM step in flow form (upstream ``ddim_step`` / ``ddim_update``): ε̂ = (x − (1 − σ)·x̂0)/σ.

    eta = 0: x' = (1 − σ_next)·x̂0 + σ_next·ε̂ (for σ_next = 0 exactly x̂0).
    eta in (0, 1]: std = η·σ_next, ρ = std·√(1 − σ_next²(1 − σ)² / (σ²(1 − σ_next)²)),
    x' = (1 − σ_next)·x̂0 + √(σ_next² − ρ²)·ε̂ + ρ·noise. Shapes: x, x0, noise (B, …).
    """
    eps = (x - (1 - sigma) * x0) / sigma
    if eta == 0.0:
        return (1 - sigma_next) * x0 + sigma_next * eps
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs a standard-normal `noise` tensor shaped like x")
    if not 0 < eta <= 1:
        raise ValueError(f"ddim_step needs eta in [0, 1], got {eta}")
    ratio = (sigma_next * (1 - sigma)) ** 2 / (sigma * (1 - sigma_next)) ** 2 if sigma_next < 1 else 0.0
    rho = eta * sigma_next * math.sqrt(max(1.0 - ratio, 0.0))
    return (1 - sigma_next) * x0 + math.sqrt(max(sigma_next**2 - rho**2, 0.0)) * eps + rho * noise


def dance_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, eta: float = 0.0,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """One step σ → σ_next of the DanceGRPO SDE (upstream ``dance_grpo_step``); eta = 0 is Euler.

    dσ = σ_next − σ (< 0), x̂0 = x − σ·v, score ŝ = −(x − (1 − σ)·x̂0)/σ²,
    x' = x + dσ·v − ½·η²·ŝ·dσ + η·√(σ − σ_next)·noise. Shapes: x, v, noise (B, …).
    """
    dsigma = sigma_next - sigma
    if eta == 0.0:
        return x + dsigma * v
    if noise is None:
        raise ValueError("dance_step with eta > 0 needs a standard-normal `noise` tensor shaped like x")
    score = -(x - (1 - sigma) * x0_from_velocity(x, v, sigma)) / sigma**2
    mean = x + dsigma * v - (0.5 * eta**2 * dsigma) * score
    return mean + (eta * math.sqrt(-dsigma)) * noise


def dpm1_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """DPM-Solver++ first-order step (upstream ``dpm_solver_first_order_update``), 0 < σ_next < σ < 1:
    h = λ_next − λ_σ, x' = (σ_next/σ)·x − α_next·(e^{−h} − 1)·x̂0. Shapes: x, x0 (B, …)."""
    h = _lambda(sigma_next) - _lambda(sigma)
    return (sigma_next / sigma) * x + (-(1.0 - sigma_next) * math.expm1(-h)) * x0


def _lambda(sigma: float) -> float:
    """λ = log(α/σ) with α = 1 − σ; −inf at σ = 1."""
    alpha = 1.0 - sigma
    return -math.inf if alpha == 0.0 else math.log(alpha) - math.log(sigma)


def dpm2_step(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor, sigma_prev: float, sigma: float,
              sigma_next: float) -> torch.Tensor:
    """Multistep DPM-Solver++(2M) step σ → σ_next (Lu et al. 2022, Alg. 2; upstream solver.py).

    With m0 = x̂0 at σ and m1 = x̂0 at σ_prev: h = λ_next − λ_σ, r0 = (λ_σ − λ_prev)/h,
    D0 = m0, D1 = (m0 − m1)/r0,
    x' = (σ_next/σ)·x − α_next·(e^{−h} − 1)·D0 − ½·α_next·(e^{−h} − 1)·D1.
    When σ_prev = 1 (λ_prev = −inf, r0 = inf) D1 = 0, as upstream's float arithmetic gives: the
    step is then first order. Needs 0 < σ_next < σ < σ_prev ≤ 1. Shapes: x, x0, x0_prev (B, …).
    """
    lam_prev, lam, lam_next = _lambda(sigma_prev), _lambda(sigma), _lambda(sigma_next)
    h = lam_next - lam
    alpha_next = 1.0 - sigma_next
    coefficient = -alpha_next * math.expm1(-h)
    x_next = (sigma_next / sigma) * x + coefficient * x0
    if math.isfinite(lam_prev):
        r0 = (lam - lam_prev) / h
        x_next = x_next + (0.5 * coefficient / r0) * (x0 - x0_prev)
    return x_next


# The sampling loop

def _standard_normal(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, 1) noise shaped like ``like``; a list of generators draws sample i from generator i.

    Noise is drawn on each generator's own device, then moved, so CPU generators can drive GPU sampling.
    """
    if generator is None:
        return torch.randn(like.shape, device=like.device, dtype=like.dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)
    if len(generator) != like.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]} samples")
    return torch.cat([
        torch.randn((1, *like.shape[1:]), generator=g, device=g.device, dtype=like.dtype) for g in generator
    ]).to(like.device)


def sample(velocity_fn: VelocityFn, x_T: torch.Tensor, sigmas: torch.Tensor, solver: str = "flow",
           eta: float = 0.0, generator: Generators = None) -> torch.Tensor:
    """Integrate from x_T (σ = sigmas[0]) to σ = 0 and return x0, shaped and typed like x_T.

    ``velocity_fn(x, sigma) -> v``: x (B, …) in x_T's dtype, sigma the 0-d tensor ``sigmas[i]``;
    one call per step (N = len(sigmas) − 1 calls). The state is kept in at least float32.
    ``solver``: ``"flow"`` (SDE with ``eta``, Euler for eta = 0), ``"dance"`` (DanceGRPO SDE),
    ``"ddim"`` (eta in [0, 1]), or ``"dpm2"`` / ``"dpm1"`` (DPM-Solver++ 2M / first order,
    deterministic: eta must be 0). ``generator``: one ``torch.Generator`` for the batch, or one per
    sample (then sample i's noise does not depend on the rest of the batch); used only if eta > 0
    (one draw per step).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; accepted: {SOLVERS}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if solver in DETERMINISTIC_SOLVERS and eta != 0.0:
        raise ValueError(f"solver {solver!r} is deterministic; eta must be 0, got {eta} (use solver 'flow')")
    if solver == "ddim" and eta > 1:
        raise ValueError(f"solver 'ddim' needs eta in [0, 1], got {eta}")
    sig = check_sigmas(sigmas)
    num_steps = len(sig) - 1
    x = x_T.to(torch.promote_types(x_T.dtype, torch.float32))
    x0_prev = None
    for i in range(num_steps):
        sigma, sigma_next = sig[i], sig[i + 1]
        v = velocity_fn(x.to(x_T.dtype), sigmas[i]).to(x.dtype)
        noise = _standard_normal(x, generator) if eta > 0 else None
        if solver == "flow":
            x = flow_step(x, v, sigma, sigma_next, eta, noise, sigma_at_one=sig[1])
            continue
        if solver == "dance":
            x = dance_step(x, v, sigma, sigma_next, eta, noise)
            continue
        x0 = x0_from_velocity(x, v, sigma)
        if solver == "ddim":
            x = ddim_step(x, x0, sigma, sigma_next, eta, noise)
        elif i == 0 or i == num_steps - 1:  # dpm1 / dpm2: DDIM at the ends, as upstream
            x = ddim_step(x, x0, sigma, sigma_next)
        elif solver == "dpm1":
            x = dpm1_step(x, x0, sigma, sigma_next)
        else:
            x = dpm2_step(x, x0, x0_prev, sig[i - 1], sigma, sigma_next)
        x0_prev = x0
    return x.to(x_T.dtype)
