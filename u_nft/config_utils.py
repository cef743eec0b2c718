"""Derived sizes and up-front validation of a training config; errors name the config key."""
from __future__ import annotations

import dataclasses
import math
import os

from u_nft.ema import OLD_POLICY_DECAY_TYPES
from u_nft.loss import DenseLossOptions
from u_nft.normalization import SCALE_MODES
from u_nft.sharding import FSDP_TEXT_ENCODER_CHOICES, SHARDING_CHOICES
from u_nft.solvers import DETERMINISTIC_SOLVERS, SOLVERS

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
    for key, value in (("sample.resolution", s.resolution),
                       ("sample.num_groups", s.num_groups), ("sample.num_image_per_prompt", s.num_image_per_prompt),
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
    if t.get("compile", "off") not in ("auto", "on", "off"):
        raise ConfigError(f"config.train.compile must be 'auto', 'on' or 'off', got {t.compile!r}")
    sharding = t.get("sharding", "ddp")
    if sharding not in SHARDING_CHOICES:
        raise ConfigError(f"config.train.sharding must be one of {list(SHARDING_CHOICES)}, got {sharding!r}")
    if t.get("fsdp_text_encoders", "auto") not in FSDP_TEXT_ENCODER_CHOICES:
        raise ConfigError(f"config.train.fsdp_text_encoders must be one of {list(FSDP_TEXT_ENCODER_CHOICES)}, "
                          f"got {t.fsdp_text_encoders!r}")
    if sharding == "fsdp" and t.old_policy == "merged":
        raise ConfigError("config.train.old_policy='merged' keeps an unsharded copy of the transformer and needs "
                          "config.train.sharding='ddp'; with 'fsdp' use 'adapter' or 'auto' (docs/memory_plan.md)")
    if config.sample.solver not in SOLVERS:
        raise ConfigError(f"config.sample.solver must be one of {SOLVERS}, got {config.sample.solver!r}")
    from u_nft.models import FAMILY_NAMES

    if config.pretrained.build_tiny_if_missing and config.pretrained.tiny_family not in FAMILY_NAMES:
        raise ConfigError(f"config.pretrained.tiny_family must be one of {sorted(FAMILY_NAMES)}, "
                          f"got {config.pretrained.tiny_family!r}")
    if config.sample.solver in DETERMINISTIC_SOLVERS and config.sample.eta != 0:
        raise ConfigError(f"config.sample.solver={config.sample.solver!r} is deterministic: config.sample.eta must be 0, "
                          f"got {config.sample.eta!r} (use 'flow', 'ddim' or 'dance' for an SDE)")
    if config.sample.get("eval_solver", "flow") not in SOLVERS:
        raise ConfigError(f"config.sample.eval_solver must be one of {SOLVERS}, got {config.sample.eval_solver!r}")
    if not len(config.reward_fn):
        raise ConfigError("config.reward_fn is empty: name at least one reward with a weight")
    from reward_maps.base import RewardMapError, resolve_factory

    for key in ("reward_fn", "eval_reward_fn"):
        for name in config[key]:
            try:
                resolve_factory(name)
            except RewardMapError as err:
                raise ConfigError(f"config.{key}: {err}") from err
            weight = config[key][name]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"config.{key}[{name!r}] = {weight!r}: a reward weight must be a finite number")
    check_reward_options(config)
    for key in ("train", "test"):
        path = config.dataset[key]
        if key == "test" and not config.eval_freq:
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"config.dataset.{key}: prompt file {path!r} does not exist (see README: Data)")
    check_run_options(config, sizes)
    validate_datasets(config)
    return sizes


def check_reward_options(config) -> None:
    """``config.reward_options``: every key names a registered scorer or one in reward_fn / eval_reward_fn
    (a typo fails here, not silently), and the used scorers' factories accept their options."""
    from reward_maps.base import RewardMapError, check_options, registered_names

    used = list(dict.fromkeys([*config.reward_fn, *config.eval_reward_fn]))
    known = set(registered_names()) | set(used)
    for name in config.reward_options:
        if name not in known:
            raise ConfigError(
                f"config.reward_options.{name}: no such reward scorer; registered: {', '.join(sorted(registered_names()))} "
                f"(a plug-in 'package.module:callable' must also be in config.reward_fn or config.eval_reward_fn)"
            )
    for name in used:
        options = config.reward_options.get(name) or {}
        options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
        try:
            check_options(name, options)
        except RewardMapError as err:
            raise ConfigError(f"config.reward_options.{name}: {err}") from err


def check_run_options(config, sizes: Sizes) -> None:
    """Keys whose bad values used to fail late or not at all (docs/reliability.md)."""
    limit = config.checkpoints_total_limit
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"config.checkpoints_total_limit must be an integer >= 1 (the newest N checkpoints are "
                          f"kept), got {limit!r}")
    if config.sample.num_image_per_prompt == 1 and config.train.map_normalization == "group":
        raise ConfigError(
            "config.sample.num_image_per_prompt = 1 trains nothing with train.map_normalization='group': each "
            "prompt's group holds one image, so every advantage is 0 and every r = 1/2 (no positive or negative "
            "signal). Use K >= 2 images per prompt (upstream: 24), or train.map_normalization='none' for rewards "
            "that already are optimality probabilities (masks)"
        )
    for key, allow_zero in (("reward_timeout_s", True), ("dist_timeout_s", False)):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
            accepted = "seconds >= 0 (0 = no limit)" if allow_zero else "seconds > 0"
            raise ConfigError(f"config.{key} must be {accepted}, got {value!r}")
    options = config.reward_options.to_dict() if hasattr(config.reward_options, "to_dict") else dict(config.reward_options)
    gh, gw = sizes.location_grid
    for name in dict.fromkeys([*config.reward_fn, *config.eval_reward_fn]):
        opts = options.get(name)
        size = opts.get("map_size") if isinstance(opts, dict) else None
        if size is None:
            continue
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if not (h % gh == 0 and w % gw == 0 or gh % h == 0 and gw % w == 0):
            raise ConfigError(
                f"config.reward_options[{name!r}].map_size = {size!r} cannot be pooled evenly onto the {gh}x{gw} "
                f"location grid (sample.resolution / 8 / train.cell_size); use a multiple or divisor of it"
            )


MAX_REPORTED_PROBLEMS = 100


def validate_datasets(config) -> None:
    """Run every scorer's dataset check on the whole prompt file it will see, before any model loads.

    Train prompts go to ``config.reward_fn``'s scorers, the evaluated test prompts (first
    ``dataset.max_test_prompts``) to ``config.eval_reward_fn``'s. Raises one ConfigError listing every
    bad line as ``file:line: scorer: why`` (the first MAX_REPORTED_PROBLEMS, and how many more).
    """
    from reward_maps.base import RewardMapError, dataset_problems
    from u_nft.data import load_prompt_lines

    options = config.reward_options.to_dict() if hasattr(config.reward_options, "to_dict") else dict(config.reward_options)
    for key, rewards in (("train", "reward_fn"), ("test", "eval_reward_fn")):
        if key == "test" and not config.eval_freq:
            continue
        path = config.dataset[key]
        try:
            prompts, metadata, lines = load_prompt_lines(path)
        except ValueError as err:
            raise ConfigError(f"config.dataset.{key}: {err}") from err
        if key == "test" and config.dataset.max_test_prompts:
            n = config.dataset.max_test_prompts
            prompts, metadata, lines = prompts[:n], metadata[:n], lines[:n]
        found = []
        for name in config[rewards]:
            try:
                problems = dataset_problems(name, prompts, metadata, options.get(name, {}))
            except (RewardMapError, TypeError) as err:
                raise ConfigError(f"config.reward_options[{name!r}]: {err}") from err
            found.extend((lines[i], name, why) for i, why in problems)
        if found:
            found.sort()
            shown = [f"  {path}:{line}: {name}: {why}" for line, name, why in found[:MAX_REPORTED_PROBLEMS]]
            more = len(found) - len(shown)
            raise ConfigError(
                f"config.dataset.{key}: {len(found)} prompt line(s) the reward scorers cannot score"
                + (f" (first {len(shown)} shown, {more} more)" if more else "") + ":\n" + "\n".join(shown)
            )
