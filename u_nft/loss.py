"""The U-DiffusionNFT loss: DiffusionNFT's implicit positive / negative losses, weighted per location.

Flow convention of SD3 (rectified flow, t = 1 is noise):

    x_t = (1 - t) x0 + t eps,     v = eps - x0,     x0_hat = x_t - t v_hat

Implicit policies (v_old detached; DiffusionNFT Eq. 5, arXiv 2509.16117):

    v+ = beta v_theta + (1 - beta) v_old          v- = (1 + beta) v_old - beta v_theta

Per location u of the U grid (cells of ``cell_size`` x ``cell_size`` latent pixels):

    l+(u) = mean_{c, pixels in u} (x0_hat+ - x0)^2 / w+        (likewise l- with x0_hat-)
    L_U   = adv_clip_max * mean_batch E_{U~p} [ r(U) l+(U) + (1 - r(U)) l-(U) ] / beta
            + kl_weight * mean_batch mean_{c,h,w} (v_theta - v_ref)^2
            [+ neutral_anchor_weight * mean_batch E_{U~p} [ n(U) mean_{c, pixels in U} (v_theta - v_ref)^2 ],
               n(U) = 1 - |2 r(U) - 1|: 1 on neutral cells (r = 1/2), 0 where r is 0 or 1; off by default]

``w`` is upstream's adaptive weight stopgrad(mean |x0_hat - x0|).clamp(min=1e-5), taken per sample
(upstream, default), per location, or off (w = 1). With a constant map r(u) = r this is exactly
upstream's scalar loss (docs/contract.md §1, property 1). ``estimator="exact"`` takes the full expectation
over p(U) (uniform over valid cells); ``"monte_carlo"`` draws m locations per sample from a proposal q
and weights them by p/q, an unbiased estimator of the same expectation (docs/theory.md §4).

The function takes tensors only; no model is called here.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from u_nft.diagnostics import policy_statistics

__all__ = ["DenseLossOptions", "u_nft_loss", "per_location_mean", "expand_to_grid", "location_proposal",
           "apply_adv_mode", "draw_locations"]

ADAPTIVE_MODES = ("sample", "location", "none")
ESTIMATORS = ("exact", "monte_carlo")
PROPOSALS = ("uniform", "low_reward", "informative")
ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")


@dataclasses.dataclass(frozen=True)
class DenseLossOptions:
    """Options of :func:`u_nft_loss` (config keys ``train.*`` of the same names).

    beta:            implicit-policy strength beta > 0 (upstream ``config.beta``).
    kl_weight:       weight of the KL-like term to v_ref (upstream ``config.train.beta``).
    adv_clip_max:    upstream multiplies the policy loss by this factor (default 5).
    adaptive_weighting: "sample" (upstream), "location", or "none".
    cell_size:       side of one location cell in latent pixels (1 latent cell, 2 = a transformer token).
    estimator:       "exact" expectation over U, or "monte_carlo".
    num_locations:   m, locations drawn per sample for "monte_carlo".
    proposal:        q(U) for "monte_carlo": "uniform" (q = p), "low_reward" (q ∝ p (1 - r)),
                     "informative" (q ∝ p |r - 1/2|); mixed with p so that q > 0 wherever p > 0.
    proposal_mix:    lambda in q = (1 - lambda) q_focus + lambda p; bounds the weights p/q by 1/lambda.
    neutral_tol:     |r - 1/2| below this counts as a neutral cell in the diagnostics.
    neutral_anchor_weight: lambda >= 0 of the optional neutral-cell anchor (default 0 = off, the loss is then
                     exactly the contract's): a per-location KL-like pull of v_theta toward v_ref weighted by
                     how neutral r is, n(U) = 1 - |2 r(U) - 1|. Contract point 4 pulls neutral cells toward
                     v_old, which moves every epoch; this anchors them to the starting model. Needs v_ref.
    adv_mode:        upstream ``config.train.adv_mode``, applied per location (:func:`apply_adv_mode`):
                     "all" (default, r as given), "positive_only", "negative_only", "one_only", "binary".
    """

    beta: float = 1.0
    kl_weight: float = 0.0
    adv_clip_max: float = 5.0
    adaptive_weighting: Literal["sample", "location", "none"] = "sample"
    cell_size: int = 2
    estimator: Literal["exact", "monte_carlo"] = "exact"
    num_locations: int = 64
    proposal: Literal["uniform", "low_reward", "informative"] = "uniform"
    proposal_mix: float = 0.1
    neutral_tol: float = 1e-3
    adv_mode: Literal["all", "positive_only", "negative_only", "one_only", "binary"] = "all"
    neutral_anchor_weight: float = 0.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"train.beta must be > 0, got {self.beta}")
        if self.kl_weight < 0:
            raise ValueError(f"train.kl_weight must be >= 0, got {self.kl_weight}")
        if self.adaptive_weighting not in ADAPTIVE_MODES:
            raise ValueError(f"train.adaptive_weighting must be one of {ADAPTIVE_MODES}, got {self.adaptive_weighting!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"train.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.proposal not in PROPOSALS:
            raise ValueError(f"train.proposal must be one of {PROPOSALS}, got {self.proposal!r}")
        if not isinstance(self.cell_size, int) or self.cell_size < 1:
            raise ValueError(f"train.cell_size must be a positive int, got {self.cell_size!r}")
        if self.estimator == "monte_carlo" and self.num_locations < 1:
            raise ValueError(f"train.num_locations must be >= 1, got {self.num_locations}")
        if not 0 < self.proposal_mix <= 1:
            raise ValueError(f"train.proposal_mix must be in (0, 1], got {self.proposal_mix}")
        if self.adv_mode not in ADV_MODES:
            raise ValueError(f"train.adv_mode must be one of {ADV_MODES}, got {self.adv_mode!r}")
        if not self.neutral_anchor_weight >= 0:
            raise ValueError(f"train.neutral_anchor_weight must be >= 0 (0 = off), got {self.neutral_anchor_weight}")

    @property
    def needs_v_ref(self) -> bool:
        """Whether the loss reads v_ref (the KL term or the neutral anchor is on)."""
        return self.kl_weight > 0 or self.neutral_anchor_weight > 0


def apply_adv_mode(r: torch.Tensor, mode: str, adv_clip_max: float) -> torch.Tensor:
    """Upstream DiffusionNFT's ``train.adv_mode`` (NVlabs/DiffusionNFT scripts/train_nft_sd3.py), per location.

    Upstream transforms the clipped advantage a = clip(A, -c, c) (c = adv_clip_max) and then sets
    r = clamp(a / c / 2 + 1/2, 0, 1). Here r is already that map, so a / c = 2r - 1 and each mode is:

    - "all":           r unchanged.
    - "positive_only": a -> clip(a, 0, c):  r -> max(r, 1/2). Locations better than their group mean keep
                       their positive weight; worse ones become neutral (r = 1/2) instead of negative.
    - "negative_only": a -> clip(a, -c, 0): r -> min(r, 1/2). Only worse-than-mean locations are pushed away.
    - "one_only":      a -> 1 if a > 0 else 0: r -> 1/2 + 1/(2c) where r > 1/2, else 1/2. Every better
                       location gets the same small positive weight (a unit advantage), the rest are neutral.
    - "binary":        a -> sign(a): r -> 1/2 + sign(r - 1/2)/(2c). A unit advantage of the location's sign;
                       exactly-neutral locations stay 1/2.

    Shapes: r (B, gh, gw) or any shape, values in [0, 1]; returns the same shape.
    """
    if mode == "all":
        return r
    a = 2.0 * r - 1.0  # a / c
    if mode == "positive_only":
        a = a.clamp(min=0.0)
    elif mode == "negative_only":
        a = a.clamp(max=0.0)
    elif mode == "one_only":
        a = (a > 0).to(r.dtype) / adv_clip_max
    elif mode == "binary":
        a = torch.sign(a) / adv_clip_max
    else:
        raise ValueError(f"train.adv_mode must be one of {ADV_MODES}, got {mode!r}")
    return (a / 2.0 + 0.5).clamp(0.0, 1.0)


def draw_locations(q: torch.Tensor, num_locations: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """m flat location indices per row of q (B, n), drawn with replacement; a (B, m) LongTensor on q's device.

    With a ``generator`` the draw runs on the generator's device (a CPU generator: on the CPU, from
    q copied there), then moves to q's device: the training loop's CPU generator then works for q on a
    GPU, and the same seed gives the same indices on either device (for the same q values).
    Without a generator it draws on q's device from the global RNG.
    """
    if generator is None or generator.device == q.device:
        return torch.multinomial(q, num_locations, replacement=True, generator=generator)
    idx = torch.multinomial(q.detach().to(generator.device), num_locations, replacement=True, generator=generator)
    return idx.to(q.device)


def per_location_mean(x: torch.Tensor, cell_size: int) -> torch.Tensor:
    """Mean over channels and the pixels of each cell: (B, C, H, W) -> (B, H/cell, W/cell)."""
    return F.avg_pool2d(x.mean(dim=1, keepdim=True), cell_size).squeeze(1)


def expand_to_grid(r: torch.Tensor, grid_hw: tuple[int, int], name: str = "r") -> torch.Tensor:
    """Nearest expansion of a coarser grid (B, gh, gw) to ``grid_hw`` when it divides evenly.

    A grid that does not divide the location grid evenly is rejected: the cells would straddle
    locations, and no choice of rule there is obviously right.
    """
    gh, gw = r.shape[-2:]
    H, W = grid_hw
    if (gh, gw) == (H, W):
        return r
    if H % gh or W % gw:
        raise ValueError(
            f"{name} grid {gh}x{gw} does not divide the location grid {H}x{W} evenly; "
            "pool the reward map to the location grid (normalization.pool_to_grid) or pick a divisor grid"
        )
    return r.repeat_interleave(H // gh, dim=-2).repeat_interleave(W // gw, dim=-1)


def location_proposal(r: torch.Tensor, p: torch.Tensor, proposal: str, mix: float) -> torch.Tensor:
    """Proposal q(U) over the flattened grid, (B, n): q = (1 - mix) q_focus + mix p; rows sum to 1."""
    if proposal == "uniform":
        return p
    focus = (1.0 - r) if proposal == "low_reward" else (r - 0.5).abs()
    focus = focus * p
    total = focus.sum(dim=1, keepdim=True)
    # A row with no focus mass (e.g. all cells neutral) falls back to p.
    focus = torch.where(total > 0, focus / total.clamp_min(1e-30), p)
    return (1.0 - mix) * focus + mix * p


def u_nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    options: DenseLossOptions = DenseLossOptions(),
    *,
    x_t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    v_ref: torch.Tensor | None = None,
    valid_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    locations: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dense-map DiffusionNFT loss.

    Args:
        v_theta: (B, C, H, W) velocity of the trained policy (carries the gradient).
        v_old:   (B, C, H, W) velocity of the old (sampling) policy; detached here.
        x0:      (B, C, H, W) clean latents from the rollout.
        t:       (B,) noise level in [0, 1] (timestep / 1000).
        r:       (B, gh, gw) optimality probabilities in [0, 1] on the location grid
                 (H / cell_size, W / cell_size) or a coarser grid dividing it; (B,) for a scalar.
        options: :class:`DenseLossOptions`.
        x_t / noise: exactly one: the noised latents, or the noise eps (x_t = (1 - t) x0 + t eps).
        v_ref:   (B, C, H, W) reference velocity (LoRA disabled) for the KL term, or None.
        valid_mask: (B, gh, gw) bool/0-1, locations that count (p(U) uniform over them), or None.
        generator: torch.Generator for the Monte Carlo draw, on any device (:func:`draw_locations`).
        locations: (B, m) long flat cell indices already drawn from p(U) (``u_nft.sampled_cells``: U drawn
                 before scoring, so the scorer evaluated exactly these); replaces the loss's own draw.
                 Needs estimator "monte_carlo" and proposal "uniform" (then q = p and every weight is 1);
                 the diagnostics mean_r / neutral_fraction are then taken over these cells.

    Returns:
        loss (0-d float32) and detached diagnostics: ``policy_loss``, ``positive_loss``,
        ``negative_loss``, ``kl_loss``, ``mean_r``, ``neutral_fraction``, ``importance_weight_max``, and
        :func:`u_nft.diagnostics.policy_statistics` (``old_deviate``, ``x0_norm``, ... ; ``kl_div`` with v_ref).
    """
    o = options
    if v_theta.ndim != 4:
        raise ValueError(f"v_theta must be (B, C, H, W), got shape {tuple(v_theta.shape)}")
    for name, other in (("v_old", v_old), ("x0", x0), ("v_ref", v_ref), ("x_t", x_t), ("noise", noise)):
        if other is not None and other.shape != v_theta.shape:
            raise ValueError(f"{name} shape {tuple(other.shape)} != v_theta shape {tuple(v_theta.shape)}")
    if (x_t is None) == (noise is None):
        raise ValueError("give exactly one of x_t or noise")
    B, _, H, W = v_theta.shape
    if H % o.cell_size or W % o.cell_size:
        raise ValueError(f"latent size {H}x{W} is not divisible by train.cell_size={o.cell_size}")
    grid = (H // o.cell_size, W // o.cell_size)
    if t.shape != (B,):
        raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")

    # Work in fp32 whatever the model dtype (bf16 / fp16 predictions).
    v_theta = v_theta.float()
    v_old = v_old.detach().float()
    x0 = x0.detach().float()
    t4 = t.detach().float().view(B, 1, 1, 1)
    x_t = (x_t.detach().float() if x_t is not None else (1 - t4) * x0 + t4 * noise.detach().float())

    r = r.detach().float()
    if r.ndim == 1:
        r = r.view(B, 1, 1)
    if r.ndim != 3 or r.shape[0] != B:
        raise ValueError(f"r must be (B,) or (B, gh, gw) with B={B}, got {tuple(r.shape)}")
    r = expand_to_grid(r, grid, "r")
    if r.numel() and (r.min() < 0 or r.max() > 1 or not torch.isfinite(r).all()):
        raise ValueError(f"r must lie in [0, 1], got range [{r.min().item():.4g}, {r.max().item():.4g}]")
    r = apply_adv_mode(r, o.adv_mode, o.adv_clip_max)

    p = torch.ones(B, *grid, device=r.device)
    if valid_mask is not None:
        p = expand_to_grid(valid_mask.detach().float().to(r.device), grid, "valid_mask")
    p_mass = p.flatten(1).sum(dim=1, keepdim=True)
    if (p_mass == 0).any():
        raise ValueError(f"valid_mask has no valid location for sample {int((p_mass == 0).nonzero()[0, 0])}")
    p = p.flatten(1) / p_mass  # (B, n): p(U)

    v_pos = o.beta * v_theta + (1 - o.beta) * v_old
    v_neg = (1 + o.beta) * v_old - o.beta * v_theta
    err_pos = x_t - t4 * v_pos - x0
    err_neg = x_t - t4 * v_neg - x0

    loc_pos = per_location_mean(err_pos.square(), o.cell_size)  # (B, gh, gw)
    loc_neg = per_location_mean(err_neg.square(), o.cell_size)
    if o.adaptive_weighting == "sample":
        w_pos = err_pos.detach().abs().mean(dim=(1, 2, 3)).clamp(min=1e-5).view(B, 1, 1)
        w_neg = err_neg.detach().abs().mean(dim=(1, 2, 3)).clamp(min=1e-5).view(B, 1, 1)
    elif o.adaptive_weighting == "location":
        w_pos = per_location_mean(err_pos.detach().abs(), o.cell_size).clamp(min=1e-5)
        w_neg = per_location_mean(err_neg.detach().abs(), o.cell_size).clamp(min=1e-5)
    else:
        w_pos = w_neg = torch.ones((), device=v_theta.device)
    pos = (r * loc_pos / w_pos).flatten(1)        # (B, n) r(U) l+(U)
    neg = ((1 - r) * loc_neg / w_neg).flatten(1)  # (B, n) (1 - r(U)) l-(U)

    if locations is not None:
        if o.estimator != "monte_carlo" or o.proposal != "uniform" or valid_mask is not None:
            raise ValueError("locations drawn before scoring need train.estimator='monte_carlo', "
                             f"train.proposal='uniform' and no valid_mask, got {o.estimator!r} / {o.proposal!r}")
        if locations.ndim != 2 or locations.shape[0] != B or locations.dtype != torch.long:
            raise ValueError(f"locations must be a ({B}, m) LongTensor, got {tuple(locations.shape)} {locations.dtype}")
        if locations.numel() and (locations.min() < 0 or locations.max() >= p.shape[1]):
            raise ValueError(f"locations must lie in [0, {p.shape[1]}) (the {grid[0]}x{grid[1]} location grid)")
    if o.estimator == "exact":
        pos_per_sample = (p * pos).sum(dim=1)
        neg_per_sample = (p * neg).sum(dim=1)
        max_weight = torch.ones((), device=v_theta.device)
    else:
        q = location_proposal(r.flatten(1), p, o.proposal, o.proposal_mix)
        if locations is not None:
            idx = locations.to(q.device)
        else:
            idx = draw_locations(q, o.num_locations, generator)  # (B, m)
        weight = p.gather(1, idx) / q.gather(1, idx)
        pos_per_sample = (weight * pos.gather(1, idx)).mean(dim=1)
        neg_per_sample = (weight * neg.gather(1, idx)).mean(dim=1)
        max_weight = weight.max()

    positive_loss = pos_per_sample.mean() / o.beta
    negative_loss = neg_per_sample.mean() / o.beta
    policy_loss = o.adv_clip_max * (positive_loss + negative_loss)
    if v_ref is not None:
        kl_loss = (v_theta - v_ref.detach().float()).square().mean(dim=(1, 2, 3)).mean()
    else:
        kl_loss = torch.zeros((), device=v_theta.device)
    loss = policy_loss + o.kl_weight * kl_loss
    anchor_loss = torch.zeros((), device=v_theta.device)
    if o.neutral_anchor_weight > 0:  # off: the loss above is untouched (bit-identical to the contract)
        if v_ref is None:
            raise ValueError("train.neutral_anchor_weight > 0 needs v_ref (the reference forward); "
                             "the training loop computes it when options.needs_v_ref")
        neutrality = (1.0 - (2.0 * r - 1.0).abs()).flatten(1)  # (B, n): 1 at r = 1/2
        anchor_cells = per_location_mean((v_theta - v_ref.detach().float()).square(), o.cell_size).flatten(1)
        anchor_loss = (p * neutrality * anchor_cells).sum(dim=1).mean()
        loss = loss + o.neutral_anchor_weight * anchor_loss

    r_flat, p_diag = r.flatten(1), p
    if locations is not None:  # off the drawn cells r is only a neutral filler
        r_flat = r_flat.gather(1, idx)
        p_diag = torch.full_like(r_flat, 1.0 / max(r_flat.shape[1], 1))
    diagnostics = {
        "policy_loss": policy_loss.detach(),
        "positive_loss": positive_loss.detach(),
        "negative_loss": negative_loss.detach(),
        "kl_loss": kl_loss.detach(),
        "anchor_loss": anchor_loss.detach(),
        "mean_r": (p_diag * r_flat).sum(dim=1).mean(),
        "neutral_fraction": (p_diag * ((r_flat - 0.5).abs() < o.neutral_tol).float()).sum(dim=1).mean(),
        "importance_weight_max": max_weight.detach(),
        **policy_statistics(v_theta, v_old, x0, v_ref),
    }
    return loss, diagnostics
