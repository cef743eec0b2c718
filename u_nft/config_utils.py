"""Derived sizes and up-front validation of a training config; errors name the config key."""
from __future__ import annotations

import dataclasses
import os

from u_nft.ema import OLD_POLICY_DECAY_TYPES
from u_nft.loss import DenseLossOptions
from u_nft.normalization import SCALE_MODES
from u_nft.solvers import SOLVERS

VAE_SCALE = 8  # SD3's VAE downsamples by 8
PATCH = 2      # SD3's transformer patch size


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch arithmetic of one epoch, per rank unless stated otherwise."""

    world_size: int
    samples_per_epoch: int          # all ranks: num_groups * K
    samples_per_rank: int
    sampling_batches: int           # per rank per epoch
    train_batches: int              # per rank per inner epoch
    num_train_timesteps: int        # int(num_steps * timestep_fraction)
    accumulation_steps: int         # backward passes per optimizer step
    latent_hw: tuple[int, int]
    location_grid: tuple[int, int]  # (gh, gw) of U


def derive_sizes(config, world_size: int) -> Sizes:
    """Compute and check the epoch's batch arithmetic (DiffusionNFT derives them the same way)."""
    s, t = config.sample, config.train
    for key, value in (("sample.num_groups", s.num_groups), ("sample.num_image_per_prompt", s.num_image_per_prompt),
                       ("sample.train_batch_size", s.train_batch_size), ("train.batch_size", t.batch_size),
                       ("sample.num_steps", s.num_steps), ("train.gradient_step_per_epoch", t.gradient_step_per_epoch),
                       ("train.num_inner_epochs", t.num_inner_epochs)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.{key} must be a positive integer, got {value!r}")
    total = s.num_groups * s.num_image_per_prompt
    if total % (world_size * s.train_batch_size):
        raise ConfigError(
            f"sample.num_groups * sample.num_image_per_prompt = {total} must be divisible by "
            f"world_size * sample.train_batch_size = {world_size} * {s.train_batch_size}"
        )
    per_rank = total // world_size
    if per_rank % t.batch_size:
        raise ConfigError(f"samples per rank ({per_rank}) must be divisible by train.batch_size = {t.batch_size}")
    if not 0 < t.timestep_fraction <= 1:
        raise ConfigError(f"config.train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
    num_timesteps = int(s.num_steps * t.timestep_fraction)
    if num_timesteps < 1:
        raise ConfigError("sample.num_steps * train.timestep_fraction must leave at least one training timestep")
    train_batches = per_rank // t.batch_size
    micro_steps = train_batches * num_timesteps
    if micro_steps % t.gradient_step_per_epoch:
        raise ConfigError(
            f"train.gradient_step_per_epoch = {t.gradient_step_per_epoch} must divide the {micro_steps} "
            f"backward passes per inner epoch ({train_batches} batches x {num_timesteps} timesteps)"
        )
    if s.resolution % (VAE_SCALE * PATCH):
        raise ConfigError(f"config.sample.resolution must be a multiple of {VAE_SCALE * PATCH}, got {s.resolution}")
    latent = s.resolution // VAE_SCALE
    if latent % t.cell_size:
        raise ConfigError(
            f"config.train.cell_size = {t.cell_size} must divide the latent size {latent} (resolution / 8)"
        )
    return Sizes(world_size, total, per_rank, per_rank // s.train_batch_size, train_batches, num_timesteps,
                 micro_steps // t.gradient_step_per_epoch, (latent, latent), (latent // t.cell_size,) * 2)


def loss_options(train) -> DenseLossOptions:
    """The loss options from ``config.train`` (raises ValueError naming ``train.<key>``)."""
    names = [f.name for f in dataclasses.fields(DenseLossOptions)]
    return DenseLossOptions(**{name: train[name] for name in names if name in train})


def validate_config(config, world_size: int) -> Sizes:
    """Check everything that can be checked before models load. Returns the derived sizes."""
    sizes = derive_sizes(config, world_size)
    try:
        loss_options(config.train)
    except ValueError as err:
        raise ConfigError(f"config.{err}") from err
    t = config.train
    if t.map_normalization not in ("group", "none"):
        raise ConfigError(f"config.train.map_normalization must be 'group' or 'none', got {t.map_normalization!r}")
    if t.map_scale not in SCALE_MODES:
        raise ConfigError(f"config.train.map_scale must be one of {SCALE_MODES}, got {t.map_scale!r}")
    if t.decay_type not in OLD_POLICY_DECAY_TYPES:
        raise ConfigError(f"config.train.decay_type must be one of {OLD_POLICY_DECAY_TYPES}, got {t.decay_type!r}")
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"config.mixed_precision must be 'no', 'fp16' or 'bf16', got {config.mixed_precision!r}")
    if config.base_dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"config.base_dtype must be auto/fp32/bf16/fp16, got {config.base_dtype!r}")
    if t.old_policy not in ("auto", "adapter", "merged"):
        raise ConfigError(f"config.train.old_policy must be 'auto', 'adapter' or 'merged', got {t.old_policy!r}")
    if config.sample.solver not in SOLVERS:
        raise ConfigError(f"config.sample.solver must be one of {SOLVERS}, got {config.sample.solver!r}")
    if not len(config.reward_fn):
        raise ConfigError("config.reward_fn is empty: name at least one reward with a weight")
    from reward_maps.base import RewardMapError, resolve_factory

    for key in ("reward_fn", "eval_reward_fn"):
        for name in config[key]:
            try:
                resolve_factory(name)
            except RewardMapError as err:
                raise ConfigError(f"config.{key}: {err}") from err
    for key in ("train", "test"):
        path = config.dataset[key]
        if key == "test" and not config.eval_freq:
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"config.dataset.{key}: prompt file {path!r} does not exist (see README: Data)")
    return sizes
