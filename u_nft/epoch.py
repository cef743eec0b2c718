"""One DiffusionNFT epoch with reward maps, as the algorithm box: each arrow of the train script is one call.

    rollouts = sample_epoch(...)        # old policy, every family through the seam (u_nft.models)
    scores   = score_epoch(...)         # reward maps and scalars of every image (worker threads)
    r, cells = normalize_epoch(...)     # raw maps -> r on the location grid, per prompt group, all ranks
    history  = train_epoch(...)         # dense U-NFT loss on the sampler's timesteps, accumulation, OptimizerStep
    decay    = update_old_policy(...)   # upstream's decay schedule; merged copy re-merged

Everything here is family-agnostic: latents are (B, C, h, w), conditioning is a dict of batch-first
tensors (:mod:`u_nft.models.base`), and the family is only ever called, never tested.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from u_nft import distributed as dist
from u_nft.diagnostics import epoch_reward_diagnostics
from u_nft.ema import old_policy_decay
from u_nft.lora import OLD, soft_update_old
from u_nft.loss import DenseLossOptions
from u_nft.models.base import Conditioning, cat_conditioning, index_conditioning
from u_nft.training import (Rollout, mean_diagnostics, micro_step_loss, raw_reward_grid, rewards_to_r,
                            rollout_batch, sample_seeds, timestep_permutations)


@dataclasses.dataclass
class Sampling:
    """How images are sampled: the family and its pipeline, the prompt encoder ``encode(prompts) ->
    Conditioning``, the schedule (sigmas (N + 1,)), solver, CFG scale with the empty prompt's
    ``negative`` conditioning (batch 1), the distilled ``guidance`` value and the autocast dtype."""

    family: Any
    pipeline: Any
    encode: Callable[[list[str]], Conditioning]
    resolution: int
    sigmas: torch.Tensor
    solver: str
    eta: float = 0.0
    guidance_scale: float = 1.0
    negative: Conditioning | None = None
    guidance: float | None = None
    autocast_dtype: torch.dtype | None = None

    def rollout(self, prompt_indices, prompts, metadata, seeds, adapter: str | None = OLD, old_policy=None) -> Rollout:
        """One batch: :func:`u_nft.training.rollout_batch` with these settings."""
        return rollout_batch(self.family, self.pipeline, self.encode, prompt_indices, prompts, metadata, seeds,
                             self.resolution, self.sigmas, self.solver, self.eta, self.guidance_scale,
                             self.autocast_dtype, self.negative, adapter=adapter, old_policy=old_policy,
                             guidance=self.guidance)


@dataclasses.dataclass
class EpochRollouts:
    """This rank's rollouts of one epoch, the scorers' pending outputs and the drawn cells per batch."""

    rollouts: list[Rollout]
    pending: list
    drawn_cells: list

    @property
    def prompts(self) -> list[str]:
        return [p for ro in self.rollouts for p in ro.prompts]

    @property
    def images(self) -> torch.Tensor:
        return torch.cat([ro.images for ro in self.rollouts])

    @property
    def latents(self) -> torch.Tensor:
        return torch.cat([ro.latents for ro in self.rollouts])

    @property
    def cond(self) -> Conditioning:
        return cat_conditioning([ro.cond for ro in self.rollouts])


@torch.no_grad()
def sample_epoch(sampling: Sampling, batches: Sequence[Sequence[int]], prompts: Sequence[str],
                 metadata: Sequence[dict], seed: int, epoch: int, batch_size: int, rewards, cells_plan,
                 old_policy=None, progress: bool = False) -> EpochRollouts:
    """Sample this rank's ``batches`` (prompt indices) with the old policy; submit each batch to the
    ``rewards`` workers as soon as it is decoded, so scoring overlaps the next batch's sampling.

    Sample seeds: (run seed, epoch, position in the epoch's global order) (:func:`sample_seeds`), so a
    rollout depends neither on world size nor on resumption. ``cells_plan``: the Monte Carlo cells drawn
    before scoring (:mod:`u_nft.sampled_cells`; a disabled plan passes through).
    """
    rollouts, pending, drawn_cells = [], [], []
    for b, indices in enumerate(tqdm(batches, desc=f"epoch {epoch}: sampling", disable=not progress)):
        first = (b * dist.world_size() + dist.rank()) * batch_size
        seeds = sample_seeds(seed, epoch, range(first, first + len(indices)))
        ro = sampling.rollout(indices, [prompts[i] for i in indices], [metadata[i] for i in indices], seeds,
                              old_policy=old_policy)
        rollouts.append(ro)
        drawn_cells.append(cells_plan.draw(epoch, ro.prompts))
        pending.append(rewards.submit(ro.images, ro.prompts, cells_plan.attach(ro.metadata, drawn_cells[-1]),
                                      label=f"epoch {epoch} batch {b}"))
    return EpochRollouts(rollouts, pending, drawn_cells)


@dataclasses.dataclass
class EpochScores:
    """Every scorer's outputs for this rank's images (name -> RewardOutput, concatenated over batches)
    and their weighted sum on the location grid, ``raw`` (N, gh, gw)."""

    outputs: list[dict]
    raw: torch.Tensor

    def scores(self, name: str) -> torch.Tensor:
        return torch.cat([o[name].scores for o in self.outputs])

    def maps(self, name: str) -> torch.Tensor:
        return torch.cat([o[name].maps for o in self.outputs])


def score_epoch(rollouts: EpochRollouts, weights: dict[str, float], grid_hw: tuple[int, int],
                scalar_mode: bool) -> EpochScores:
    """Wait for the scorers and combine their maps (or, in scalar mode, their scalars) on the grid."""
    outputs = [p.result() for p in rollouts.pending]
    raw = torch.cat([raw_reward_grid(o, weights, grid_hw, scalar_mode) for o in outputs])
    return EpochScores(outputs, raw)


def normalize_epoch(raw: torch.Tensor, prompts: Sequence[str], drawn_cells: Sequence, cells_plan,
                    normalization: str, adv_clip_max: float, scale: str, sigma_min: float,
                    fixed_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """raw grids (N, gh, gw) -> (r (N, gh, gw), drawn cells (N, m) or None), normalized per prompt group
    over all ranks (:func:`u_nft.training.rewards_to_r`), at the drawn cells only when cells were drawn."""
    cells = cells_plan.concat(drawn_cells)
    r = rewards_to_r(cells_plan.compact(raw, cells), prompts, normalization, adv_clip_max, scale, sigma_min,
                     fixed_scale)
    return cells_plan.expand(r, cells), cells


def reward_diagnostics(scores: EpochScores, weights: dict[str, float], prompts: Sequence[str], r: torch.Tensor,
                       neutral_tol: float) -> dict[str, float]:
    """``diag/*`` (zero-std groups, top-k rewards, r areas, map means: :mod:`u_nft.diagnostics`) and
    ``reward/<name>`` (mean scalar reward) over all ranks. Collective."""
    names = list(weights)
    log = {f"diag/{k}": v for k, v in epoch_reward_diagnostics(
        {n: scores.scores(n) for n in names}, {n: scores.maps(n) for n in names}, weights, prompts, r,
        neutral_tol).items()}
    return log | mean_diagnostics([{f"reward/{n}": scores.scores(n).mean() for n in names}])


@dataclasses.dataclass
class TrainBatch:
    """What training reads of an epoch: x0 (N, C, h, w), conditioning (batch N), r (N, gh, gw), cells."""

    x0: torch.Tensor
    cond: Conditioning
    r: torch.Tensor
    cells: torch.Tensor | None = None


@dataclasses.dataclass
class OptimizerStep:
    """One optimizer step after ``accumulation_steps`` backward passes: reduce the gradients over ranks
    (``reduce_gradients(params)``, e.g. :func:`u_nft.distributed.average_gradients`: the one place that
    decides how ranks share gradients), unscale, clip to ``max_grad_norm`` (``clip_grad_norm(params,
    max_norm) -> pre-clip total norm``; a sharding strategy's for sharded gradients), AdamW, EMA."""

    optimizer: torch.optim.Optimizer
    scaler: Any
    params: list
    max_grad_norm: float
    accumulation_steps: int
    reduce_gradients: Callable[[list], None]
    ema: Any = None
    clip_grad_norm: Callable[[list, float], torch.Tensor] = torch.nn.utils.clip_grad_norm_

    def __call__(self) -> torch.Tensor:
        """Step and return the (pre-clip) gradient norm."""
        self.reduce_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip_grad_norm(self.params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        return grad_norm.detach().float()


def train_epoch(family, transformer, batch: TrainBatch, train_t: torch.Tensor, options: DenseLossOptions,
                step: OptimizerStep, state, generator: torch.Generator, *, num_inner_epochs: int, batch_size: int,
                num_train_timesteps: int, old_policy=None, autocast_dtype=None, guidance: float | None = None,
                progress: bool = False, label: str = "training"):
    """Shuffled micro-batches x ``num_train_timesteps`` of the sampler's timesteps ``train_t``, the dense
    loss (:func:`u_nft.training.micro_step_loss`), ``step()`` every ``step.accumulation_steps`` backward
    passes (``state.global_step`` advances with it).

    Draws (shuffles, timesteps, noise) come from ``generator`` alone. Returns (per-micro-step
    diagnostics, grad norms).
    """
    transformer.train()
    device = batch.x0.device
    history, grad_norms, micro = [], [], 0
    n = batch.x0.shape[0]
    for _ in range(num_inner_epochs):
        order = torch.randperm(n, generator=generator)
        for start in tqdm(range(0, n, batch_size), desc=label, disable=not progress):
            idx = order[start:start + batch_size]
            perms = timestep_permutations(len(idx), len(train_t), num_train_timesteps, generator)
            x0, cond, r = batch.x0[idx], index_conditioning(batch.cond, idx), batch.r[idx]
            locations = None if batch.cells is None else batch.cells[idx]
            for j in range(num_train_timesteps):
                t = train_t[perms[:, j]].to(device)
                noise = torch.randn(x0.shape, generator=generator).to(device)
                loss, diag = micro_step_loss(family, transformer, x0, noise, t, r, cond, options, autocast_dtype,
                                             generator, old_policy, locations=locations, guidance=guidance)
                step.scaler.scale(loss / step.accumulation_steps).backward()
                history.append(diag)
                micro += 1
                if micro % step.accumulation_steps == 0:
                    grad_norms.append(step())
                    state.global_step += 1
    return history, grad_norms


def update_old_policy(transformer, old_policy, global_step: int, decay_type: int) -> float:
    """Old LoRA <- decay * old + (1 - decay) * trained, decay = upstream's schedule at ``global_step``
    (:func:`u_nft.ema.old_policy_decay`); the merged copy (if any) re-merged. Returns the decay."""
    decay = old_policy_decay(global_step, decay_type)
    soft_update_old(transformer, decay)
    if old_policy is not None:
        old_policy.refresh(transformer)
    return decay


def epoch_metrics(history: list[dict], grad_norms: list[torch.Tensor], decay: float, r: torch.Tensor,
                  reward_log: dict[str, float]) -> dict[str, float]:
    """The epoch's metrics: ``train/*`` loss diagnostics (mean over micro-steps and ranks; collective),
    the reward diagnostics, mean grad norm, the old-policy decay and the mean r."""
    return {**{f"train/{k}": v for k, v in mean_diagnostics(history).items()}, **reward_log,
            "train/grad_norm": float(torch.stack(grad_norms).mean()), "train/old_decay": decay,
            "train/r_mean": float(r.mean())}
