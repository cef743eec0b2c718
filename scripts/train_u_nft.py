"""U-DiffusionNFT training of a text-to-image flow model + LoRA with dense reward maps, for every model family.

    torchrun --nproc_per_node=8 scripts/train_u_nft.py --config config/u_nft.py:sd3_ocr_map
    python scripts/train_u_nft.py --config config/u_nft.py:tiny               # CPU, offline tiny model
    ... --config.train.beta=0.1 --config.resume_from=runs/sd3_ocr_map          # overrides, resume

The family (SD3 / SD3.5, FLUX.1, Qwen-Image) is read from the pipeline folder's model_index.json
(``u_nft.models.family_for``); ``scripts/train_u_nft_sd3.py`` runs this same trainer. Each epoch:
sample (old policy) -> score (reward maps) -> normalize (per prompt group, all ranks) -> train (dense
U-NFT loss) -> update the old policy -> save -> evaluate. The logic lives in u_nft/ (u_nft/epoch.py).
Failure behaviour (refused run folders, timeouts, damaged checkpoints): docs/reliability.md.
"""
import dataclasses
import functools
import json
import os
import random
import sys

import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags

from reward_maps.combine import train_and_eval_reward_sets
from reward_maps.heatmap import save_grid
from u_nft import distributed as dist
from u_nft.checkpoint import TrainState, config_differences, load_checkpoint, restore_rng, rng_restore_note
from u_nft.config_utils import loss_options, validate_config
from u_nft.data import KRepeatSampler, load_prompts
from u_nft.ema import EMA, ema_weights
from u_nft.epoch import (OptimizerStep, Sampling, TrainBatch, epoch_metrics, normalize_epoch, reward_diagnostics,
                         sample_epoch, score_epoch, train_epoch, update_old_policy)
from u_nft.evaluation import evaluate_prompts, summarize_scores
from u_nft.fast_policy import MergedOldPolicy, compile_policy_forwards
from u_nft.lora import add_lora_adapters, trainable_parameters
from u_nft.models import conditioning_to, family_for, family_named
from u_nft.run_logging import RunDirError, RunLogger, choose_run_dir
from u_nft.sampled_cells import sampled_cell_scoring
from u_nft.schedule import evaluation_due
from u_nft.sharding import TrainedLoRA, make_sharding, text_encoders_of
from u_nft.training import resolve_device, resolve_dtypes, sample_seeds
from u_nft.upstream_keys import exit_on_upstream_keys

_CONFIG = config_flags.DEFINE_config_file("config", "config/u_nft.py:tiny", "Training configuration.")
flags.DEFINE_integer("stop_after_epochs", 0, "Stop (as if killed) after this many epochs of this process; 0 = off.")


# ---- setup --------------------------------------------------------------------------------------------

def load_models(config, device, base_dtype):
    """(family, pipeline): frozen VAE / text encoders and a LoRA'd transformer (adapters "default", "old").

    The family is read from the pipeline folder (built first from ``pretrained.tiny_family`` when
    ``pretrained.build_tiny_if_missing`` and absent). Empty ``lora.target_modules`` -> the family's
    default, recorded in the config so config.json names the layers actually trained.
    """
    if config.pretrained.build_tiny_if_missing and dist.is_main():
        family_named(config.pretrained.tiny_family).build_tiny(config.pretrained.model)
    dist.barrier()
    family = family_for(config.pretrained.model)
    family.check_guidance_scale(config.sample.guidance_scale, "config.sample.guidance_scale")
    family.check_guidance_scale(config.sample.eval_guidance_scale, "config.sample.eval_guidance_scale")
    pipeline = family.load_pipeline(config.pretrained.model, dtype=base_dtype, device=device)
    config.lora.target_modules = family.lora_targets(config.lora.target_modules)
    transformer = pipeline.transformer
    add_lora_adapters(transformer, config.lora.rank, config.lora.alpha, list(config.lora.target_modules),
                      config.lora.init, config.lora.init_path or None)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # both LoRAs in fp32 whatever the base dtype (the old one is EMA-mixed)
    if config.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return family, pipeline


def make_run_dir(config):
    """Rank 0 chooses the run folder (a fresh run refuses one holding checkpoints); every rank gets its answer."""
    choice = None
    if dist.is_main():
        try:
            choice = str(choose_run_dir(config.logdir, config.run_name, config.resume_from))
        except RunDirError as err:
            choice = err
    choice = dist.broadcast_object(choice)
    if isinstance(choice, Exception):
        raise choice
    return choice


def save(run_dir, config, state, strategy, trained):
    """Checkpoint everything the loop reads, with the EMA weights as a diffusers LoRA in its lora/ folder
    (every rank calls it: RNG states from all ranks; under fsdp every rank writes its shards)."""
    path = strategy.save(run_dir, state, trained, config, config.checkpoints_total_limit)
    if dist.is_main():
        print(f"saved checkpoint {path}", flush=True)


def restore(config, strategy, trained):
    """The TrainState of ``config.resume_from``, with LoRAs, optimizer, scaler, EMA and RNGs restored."""
    ckpt = load_checkpoint(config.resume_from)
    if dist.is_main():
        for path, why in ckpt.skipped:
            print(f"WARNING: skipped damaged checkpoint {path}: {why}", flush=True)
        current = json.loads(config.to_json_best_effort())
        for key, saved, now in config_differences(ckpt.config, current):
            print(f"WARNING: config.{key} differs from the checkpoint's: {saved!r} -> {now!r} (using {now!r})",
                  flush=True)
    strategy.load(ckpt, trained)  # both LoRAs, optimizer, scaler, EMA (u_nft/sharding.py)
    note = rng_restore_note(len(ckpt.rng) if ckpt.rng is not None else None, dist.world_size())
    if note is None:
        restore_rng(ckpt.rng[dist.rank()])
    elif dist.is_main():
        print(f"WARNING: {note}", flush=True)
    if dist.is_main():
        print(f"resumed from {ckpt.path} at epoch {ckpt.state.epoch}, step {ckpt.state.global_step}", flush=True)
    return ckpt.state


def samplings(config, family, pipeline, device, base_dtype, autocast_dtype):
    """(training rollouts, evaluation) :class:`u_nft.epoch.Sampling` settings: same family, encoder and
    negative prompt; the evaluation's own steps, solver and CFG scale (deterministic, eta 0)."""
    max_len, sample = config.sample.max_sequence_length, config.sample

    def encode(batch_prompts):
        return conditioning_to(family.encode_prompts(pipeline, batch_prompts, max_len, device), base_dtype)

    negative = None
    if sample.guidance_scale != 1.0 or sample.eval_guidance_scale != 1.0:
        negative = family.negative_conditioning(pipeline, max_len, device)
    train = Sampling(family, pipeline, encode, sample.resolution,
                     family.sigmas(pipeline, sample.num_steps, sample.resolution), sample.solver, sample.eta,
                     sample.guidance_scale, negative, sample.distilled_guidance, autocast_dtype)
    evaluation = dataclasses.replace(
        train, sigmas=family.sigmas(pipeline, sample.eval_num_steps, sample.resolution), solver=sample.eval_solver,
        eta=0.0, guidance_scale=sample.eval_guidance_scale)
    return train, evaluation


def evaluate(run_dir, sampling, ema, params, test_prompts, test_metadata, rewards, config, state, logger, lockstep,
             epoch, label):
    """Sample the test prompts with the EMA weights (upstream: deterministic Euler, 40 steps), score, log
    (main rank: ``logger`` is None elsewhere) under ``epoch``; image grids named ``label``. ``lockstep``:
    every rank runs as many sampling batches (a sharded model's forwards are collectives)."""
    with ema_weights(ema, params):
        result = evaluate_prompts(sampling.family, sampling.pipeline, sampling.encode, test_prompts, test_metadata,
                                  rewards, seed=config.seed, resolution=sampling.resolution, sigmas=sampling.sigmas,
                                  solver=sampling.solver, guidance_scale=sampling.guidance_scale,
                                  negative=sampling.negative, batch_size=config.sample.test_batch_size,
                                  autocast_dtype=sampling.autocast_dtype, keep_images=config.logging.num_log_images,
                                  guidance=sampling.guidance, lockstep=lockstep)
    if logger is not None:
        summary = summarize_scores(result)
        logger.log({**{f"eval/{k}": v for k, v in summary.items()}, "eval/epochs_trained": state.epoch},
                   state.global_step, epoch)
        print(f"eval after {state.epoch} epoch(s): {summary}", flush=True)
        for name, maps in result.maps.items():
            save_grid(result.images, maps, os.path.join(run_dir, "images", f"{label}_eval_{name}.png"),
                      value_range=result.value_ranges.get(name), label=name)


def log_epoch(run_dir, epoch, metrics, rollouts, scores, r, state, logger, config):
    """Main rank: metrics to metrics.jsonl / W&B and stdout; every ``image_every`` epochs the first images
    with their r map (in [0, 1]) and the first scorer's raw map (in its declared range)."""
    logger.log(metrics, state.global_step, epoch)
    print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    if epoch % config.logging.image_every == 0:
        n = config.logging.num_log_images
        name = next(iter(scores.outputs[0]))
        images = rollouts.images[:n]
        grid = save_grid(images, r[:n], os.path.join(run_dir, "images", f"epoch{epoch:04d}_train_r.png"),
                         value_range=(0, 1), label="r (normalized map)")
        save_grid(images, scores.maps(name)[:n], os.path.join(run_dir, "images", f"epoch{epoch:04d}_train_{name}.png"),
                  value_range=scores.outputs[0][name].value_range, label=name)
        logger.log_image("images/train_r", grid, state.global_step)


# ---- the loop -----------------------------------------------------------------------------------------

def main(_):
    open_pools = []  # reward worker pools, shut down in the finally below
    try:
        train(_CONFIG.value, open_pools)
    finally:
        # After an error or Ctrl-C, abandon scorer calls still running (a hung scorer must not keep the
        # process alive; the workers are daemon threads); after success the pools are already closed.
        for rewards in open_pools:
            rewards.close(wait=False)


def train(config, open_pools):
    """Validate, set up, run the epoch loop; every rank runs this."""
    dist.init_distributed(timeout_s=config.dist_timeout_s or None)
    sizes = validate_config(config, dist.world_size())
    device = resolve_device(config.device)
    base_dtype, autocast_dtype = resolve_dtypes(config.mixed_precision, config.base_dtype, device)
    torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
    torch.manual_seed(config.seed)  # identical LoRA initialisation on every rank
    run_dir = make_run_dir(config)
    is_main = dist.is_main()
    if is_main:
        print(f"run dir: {run_dir}\n{sizes}\nper epoch: {sizes.samples_per_epoch} images "
              f"({config.sample.num_groups} prompts x {config.sample.num_image_per_prompt}), "
              f"{config.train.gradient_step_per_epoch} optimizer steps of {sizes.accumulation_steps} backward passes "
              f"x {sizes.world_size} ranks", flush=True)

    # Models, optimizer, rewards, data
    family, pipeline = load_models(config, device, base_dtype)
    transformer = pipeline.transformer
    # train.sharding: replicas ("ddp") or FSDP2 shards per transformer block ("fsdp"), before the optimizer
    strategy = make_sharding(config.train.sharding, autocast_dtype, config.train.fsdp_text_encoders)
    for line in strategy.prepare(transformer, text_encoders_of(pipeline)):
        if is_main:
            print(line, flush=True)
    params = trainable_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate,
                                  betas=(config.train.adam_beta1, config.train.adam_beta2),
                                  weight_decay=config.train.adam_weight_decay, eps=config.train.adam_epsilon)
    scaler = strategy.grad_scaler(autocast_dtype == torch.float16 and device.type == "cuda", device)
    ema = EMA(params) if config.train.ema else None
    trained = TrainedLoRA(transformer, optimizer, scaler, ema, params)
    step = OptimizerStep(optimizer, scaler, params, config.train.max_grad_norm, sizes.accumulation_steps,
                         reduce_gradients=strategy.reduce_gradients, ema=ema,
                         clip_grad_norm=strategy.clip_grad_norm)
    # Rollout noise, timesteps and shuffles use their own seeded generators; the global RNGs differ per
    # rank only for whatever else draws from them.
    random.seed(config.seed + dist.rank())
    np.random.seed(config.seed + dist.rank())
    torch.manual_seed(config.seed + dist.rank())
    options = loss_options(config.train)
    # one instance of each scorer the two sets share (same name and options)
    train_rewards, eval_rewards = train_and_eval_reward_sets(
        dict(config.reward_fn), dict(config.eval_reward_fn), config.reward_options.to_dict(), device, torch.float32,
        config.reward_workers, timeout_s=config.reward_timeout_s or None)
    open_pools.extend([train_rewards, eval_rewards])
    prompts, metadata = load_prompts(config.dataset.train)
    test_prompts, test_metadata = load_prompts(config.dataset.test) if config.eval_freq else ([], [])
    if config.dataset.max_test_prompts:
        test_prompts = test_prompts[:config.dataset.max_test_prompts]
        test_metadata = test_metadata[:config.dataset.max_test_prompts]
    sampler = KRepeatSampler(len(prompts), config.sample.num_image_per_prompt, config.sample.num_groups,
                             config.sample.train_batch_size, dist.world_size(), dist.rank(), config.seed)
    sampling, eval_sampling = samplings(config, family, pipeline, device, base_dtype, autocast_dtype)
    train_t = sampling.sigmas[:-1]  # the sampler's noise levels; training draws from these

    state = TrainState()
    if config.resume_from:
        state = restore(config, strategy, trained)
        sampler.load_state_dict(state.sampler)  # refuses a changed seed or group sizes
    use_merged, old_policy_note = strategy.resolve_old_policy(config.train.old_policy, device)
    if old_policy_note and is_main:
        print(f"note: {old_policy_note}", flush=True)
    old_policy = MergedOldPolicy(transformer) if use_merged else None  # built after resume: it copies the old LoRA
    compile_policy_forwards(transformer, old_policy, config.train.compile, device)  # in place: eval sampling too
    # Monte Carlo U drawn before scoring, so occlusion maps score only the drawn cells (no-op plan otherwise)
    cells_plan, cells_note = sampled_cell_scoring(
        config.train.score_sampled_cells, config.train.estimator, config.train.proposal, config.train.scalar_mode,
        train_rewards.names_with("score_cells"), sizes.location_grid, config.train.num_locations, config.seed)
    if cells_note and is_main:
        print(f"note: {cells_note}", flush=True)
    logger = RunLogger(run_dir, config, config.logging.wandb_mode, config.logging.wandb_project,
                       config.run_name, start_epoch=state.epoch) if is_main else None
    if logger is not None and logger.superseded:
        print(f"moved {logger.superseded} metrics.jsonl record(s) of epochs >= {state.epoch} (written after the "
              f"checkpoint, or by an earlier run without checkpoints) to metrics.superseded.jsonl", flush=True)
    evaluate_ema = functools.partial(evaluate, run_dir, eval_sampling, ema, params, test_prompts, test_metadata,
                                     eval_rewards, config, state, logger, strategy.lockstep_forwards)

    if state.epoch == 0 and evaluation_due(0, config.eval_freq, config.num_epochs, config.eval_at_start):
        evaluate_ema(0, "start")  # the base model: the first point of every curve (upstream evaluates at epoch 0)

    epochs_run = 0
    for epoch in range(state.epoch, config.num_epochs):
        # Sample with the old policy; each batch is scored in the reward workers while the next one samples
        transformer.eval()
        rollouts = sample_epoch(sampling, sampler.batches(epoch), prompts, metadata, config.seed, epoch,
                                config.sample.train_batch_size, train_rewards, cells_plan, old_policy, is_main)
        # Score: reward maps (or scalars) on the location grid
        scores = score_epoch(rollouts, train_rewards.weights, sizes.location_grid, config.train.scalar_mode)
        # Normalize: r per prompt group over all ranks
        r, cells = normalize_epoch(scores.raw, rollouts.prompts, rollouts.drawn_cells, cells_plan,
                                   config.train.map_normalization, config.train.adv_clip_max, config.train.map_scale,
                                   config.train.map_sigma_min, config.train.map_fixed_scale)
        reward_log = reward_diagnostics(scores, train_rewards.weights, rollouts.prompts, r, options.neutral_tol)
        # Train: shuffled micro-batches x the sampler's timesteps, gradient accumulation, AdamW
        generator = torch.Generator().manual_seed(sample_seeds(config.seed, epoch, [dist.rank()])[0])
        history, grad_norms = train_epoch(
            family, transformer, TrainBatch(rollouts.latents, rollouts.cond, r, cells), train_t, options, step,
            state, generator, num_inner_epochs=config.train.num_inner_epochs, batch_size=config.train.batch_size,
            num_train_timesteps=sizes.num_train_timesteps, old_policy=old_policy, autocast_dtype=autocast_dtype,
            guidance=sampling.guidance, progress=is_main, label=f"epoch {epoch}: training")
        # Update the old policy
        decay = update_old_policy(transformer, old_policy, state.global_step, config.train.decay_type)
        state.epoch = epoch + 1
        sampler.set_epoch(epoch + 1)
        state.sampler = sampler.state_dict()
        # Log, save (before evaluating: a failing evaluation must not cost the epoch's training), evaluate
        metrics = epoch_metrics(history, grad_norms, decay, r, reward_log)
        if is_main:
            log_epoch(run_dir, epoch, metrics, rollouts, scores, r, state, logger, config)
        if config.save_freq and (epoch + 1) % config.save_freq == 0 or epoch + 1 == config.num_epochs:
            save(run_dir, config, state, strategy, trained)
        if evaluation_due(epoch + 1, config.eval_freq, config.num_epochs, config.eval_at_start):
            evaluate_ema(epoch, f"epoch{epoch:04d}")
        epochs_run += 1
        if flags.FLAGS.stop_after_epochs and epochs_run >= flags.FLAGS.stop_after_epochs:
            break

    train_rewards.close()
    eval_rewards.close()
    if is_main:
        logger.close()
        print(f"done: run dir {run_dir} (images/, metrics.jsonl, checkpoints/*/lora/)", flush=True)
    dist.cleanup()


def run():
    """Command-line entry (also of scripts/train_u_nft_sd3.py)."""
    exit_on_upstream_keys(sys.argv)  # an upstream DiffusionNFT key names ours instead (docs/upstream_parity.md)
    app.run(main)


if __name__ == "__main__":
    run()
