"""U-DiffusionNFT training of SD3 / SD3.5 + LoRA with dense reward maps.

    torchrun --nproc_per_node=8 scripts/train_u_nft_sd3.py --config config/u_nft.py:sd3_ocr_map
    python scripts/train_u_nft_sd3.py --config config/u_nft.py:tiny            # CPU, offline tiny model
    ... --config.train.beta=0.1 --config.resume_from=runs/sd3_ocr_map           # overrides, resume

Each epoch: sample (old policy) -> score (reward maps) -> normalize (per prompt group, all ranks)
-> train (dense U-NFT loss) -> update the old policy -> save -> evaluate. The logic lives in u_nft/.
Failure behaviour (refused run folders, timeouts, damaged checkpoints): docs/reliability.md.
"""
import json
import os
import random
import sys

import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags
from tqdm.auto import tqdm

from reward_maps.combine import train_and_eval_reward_sets
from reward_maps.heatmap import save_grid
from u_nft import distributed as dist
from u_nft.checkpoint import (TrainState, capture_rng, config_differences, load_checkpoint, restore_rng,
                              rng_restore_note, save_checkpoint)
from u_nft.config_utils import loss_options, validate_config
from u_nft.data import KRepeatSampler, load_prompts
from u_nft.ema import EMA, old_policy_decay
from u_nft.evaluation import evaluate_prompts, summarize_scores
from u_nft.fast_policy import MergedOldPolicy, compile_policy_forwards
from u_nft.lora import (OLD, TRAINABLE, add_lora_adapters, load_lora_state, lora_state_dict, save_lora_diffusers,
                        soft_update_old, trainable_parameters)
from u_nft.rollout import encode_prompts, negative_embeddings
from u_nft.run_logging import RunDirError, RunLogger, choose_run_dir
from u_nft.sampled_cells import sampled_cell_scoring
from u_nft.solvers import sd3_sigmas
from u_nft.tiny_sd3 import build_tiny_sd3_pipeline, load_sd3_pipeline
from u_nft.diagnostics import epoch_reward_diagnostics
from u_nft.schedule import evaluation_due
from u_nft.upstream_keys import exit_on_upstream_keys
from u_nft.training import (mean_diagnostics, micro_step_loss, raw_reward_grid, resolve_device, resolve_dtypes,
                            rewards_to_r, rollout_batch, sample_seeds, timestep_permutations)

_CONFIG = config_flags.DEFINE_config_file("config", "config/u_nft.py:tiny", "Training configuration.")
flags.DEFINE_integer("stop_after_epochs", 0, "Stop (as if killed) after this many epochs of this process; 0 = off.")


def load_models(config, device, base_dtype):
    """Pipeline with frozen VAE / text encoders and a LoRA'd transformer (adapters "default" and "old")."""
    if config.pretrained.build_tiny_if_missing and dist.is_main():
        build_tiny_sd3_pipeline(config.pretrained.model)
    dist.barrier()
    pipeline = load_sd3_pipeline(config.pretrained.model, dtype=base_dtype, device=device)
    for module in (pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3):
        if module is not None:
            module.requires_grad_(False)
    pipeline.vae.to(torch.float32)  # decode in fp32, as upstream
    transformer = pipeline.transformer
    add_lora_adapters(transformer, config.lora.rank, config.lora.alpha, list(config.lora.target_modules),
                      config.lora.init, config.lora.init_path or None)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # both LoRAs in fp32 whatever the base dtype (the old one is EMA-mixed)
    if config.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return pipeline


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


def save(run_dir, config, state, transformer, optimizer, scaler, ema, params):
    """Checkpoint everything the loop reads (main rank writes; all ranks contribute their RNG)."""
    dist.check_replicas_equal(params, "LoRA weights")
    rngs = dist.all_gather_object(capture_rng())
    if dist.is_main():
        tensors = {"lora_default": lora_state_dict(transformer, TRAINABLE), "lora_old": lora_state_dict(transformer, OLD),
                   "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict()}
        if ema is not None:
            tensors["ema"] = ema.state_dict()

        def write_lora(folder):  # diffusers-format LoRA of the EMA weights (what evaluation uses)
            with ema_weights(ema, params):
                save_lora_diffusers(transformer, TRAINABLE, folder / "lora")

        path = save_checkpoint(run_dir, state, tensors, rngs, config, config.checkpoints_total_limit, write_lora)
        print(f"saved checkpoint {path}", flush=True)
    dist.barrier()


def restore(config, state, transformer, optimizer, scaler, ema):
    ckpt = load_checkpoint(config.resume_from)
    if dist.is_main():
        for path, why in ckpt.skipped:
            print(f"WARNING: skipped damaged checkpoint {path}: {why}", flush=True)
        current = json.loads(config.to_json_best_effort())
        for key, saved, now in config_differences(ckpt.config, current):
            print(f"WARNING: config.{key} differs from the checkpoint's: {saved!r} -> {now!r} (using {now!r})",
                  flush=True)
    load_lora_state(transformer, TRAINABLE, ckpt.tensors["lora_default"])
    load_lora_state(transformer, OLD, ckpt.tensors["lora_old"])
    optimizer.load_state_dict(ckpt.tensors["optimizer"])
    scaler.load_state_dict(ckpt.tensors["scaler"])
    if ema is not None:
        ema.load_state_dict(ckpt.tensors["ema"])
    note = rng_restore_note(len(ckpt.rng) if ckpt.rng is not None else None, dist.world_size())
    if note is None:
        restore_rng(ckpt.rng[dist.rank()])
    elif dist.is_main():
        print(f"WARNING: {note}", flush=True)
    if dist.is_main():
        print(f"resumed from {ckpt.path} at epoch {ckpt.state.epoch}, step {ckpt.state.global_step}", flush=True)
    return ckpt.state


class ema_weights:
    """Context: the EMA weights swapped into the trainable LoRA (no-op without EMA)."""

    def __init__(self, ema, params):
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)


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
    pipeline = load_models(config, device, base_dtype)
    transformer = pipeline.transformer
    params = trainable_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate,
                                  betas=(config.train.adam_beta1, config.train.adam_beta2),
                                  weight_decay=config.train.adam_weight_decay, eps=config.train.adam_epsilon)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16 and device.type == "cuda")
    ema = EMA(params) if config.train.ema else None
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
    sigmas = sd3_sigmas(config.sample.num_steps)
    eval_sigmas = sd3_sigmas(config.sample.eval_num_steps)
    train_t = sigmas[:-1]  # the sampler's noise levels; training draws from these
    max_len = config.sample.max_sequence_length

    def encode(batch_prompts):
        embeds, pooled = encode_prompts(pipeline, batch_prompts, max_len, device)
        return embeds.to(base_dtype), pooled.to(base_dtype)

    negative = None
    if config.sample.guidance_scale != 1.0 or config.sample.eval_guidance_scale != 1.0:
        negative = negative_embeddings(pipeline, 1, max_len, device)

    state = TrainState()
    if config.resume_from:
        state = restore(config, state, transformer, optimizer, scaler, ema)
        sampler.load_state_dict(state.sampler)  # refuses a changed seed or group sizes
    use_merged = config.train.old_policy == "merged" or config.train.old_policy == "auto" and device.type == "cuda"
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
    epochs_run = 0

    def evaluate(epoch, label):
        """Sample the test prompts with the EMA weights (upstream: deterministic Euler, 40 steps), score, log."""
        with ema_weights(ema, params):
            result = evaluate_prompts(pipeline, encode, test_prompts, test_metadata, eval_rewards,
                                      seed=config.seed, resolution=config.sample.resolution, sigmas=eval_sigmas,
                                      solver=config.sample.eval_solver, guidance_scale=config.sample.eval_guidance_scale,
                                      negative=negative, batch_size=config.sample.test_batch_size,
                                      autocast_dtype=autocast_dtype, keep_images=config.logging.num_log_images)
        if is_main:
            summary = summarize_scores(result)
            logger.log({**{f"eval/{k}": v for k, v in summary.items()}, "eval/epochs_trained": state.epoch},
                       state.global_step, epoch)
            print(f"eval after {state.epoch} epoch(s): {summary}", flush=True)
            for name, maps in result.maps.items():
                save_grid(result.images, maps, os.path.join(run_dir, "images", f"{label}_eval_{name}.png"),
                          value_range=None)

    if state.epoch == 0 and evaluation_due(0, config.eval_freq, config.num_epochs, config.eval_at_start):
        evaluate(0, "start")  # the base model: the first point of every curve (upstream evaluates at epoch 0)

    for epoch in range(state.epoch, config.num_epochs):
        # Sample with the old policy; score each batch in the reward workers while the next one samples
        transformer.eval()
        rollouts, pending, drawn_cells = [], [], []
        batches = sampler.batches(epoch)
        for b, indices in enumerate(tqdm(batches, desc=f"epoch {epoch}: sampling", disable=not is_main)):
            first = (b * dist.world_size() + dist.rank()) * config.sample.train_batch_size
            seeds = sample_seeds(config.seed, epoch, range(first, first + len(indices)))
            ro = rollout_batch(pipeline, encode, indices, [prompts[i] for i in indices], [metadata[i] for i in indices],
                               seeds, config.sample.resolution, sigmas, config.sample.solver, config.sample.eta,
                               config.sample.guidance_scale, autocast_dtype, negative, old_policy=old_policy)
            rollouts.append(ro)
            drawn_cells.append(cells_plan.draw(epoch, ro.prompts))
            pending.append(train_rewards.submit(ro.images, ro.prompts, cells_plan.attach(ro.metadata, drawn_cells[-1]),
                                                label=f"epoch {epoch} batch {b}"))
        outputs = [p.result() for p in pending]

        # Rewards -> r on the location grid (normalized per prompt group over all ranks)
        raw = torch.cat([raw_reward_grid(o, train_rewards.weights, sizes.location_grid, config.train.scalar_mode)
                         for o in outputs])
        all_prompts = [p for ro in rollouts for p in ro.prompts]
        cells = cells_plan.concat(drawn_cells)  # (N, m) drawn U, or None: normalize at those cells only
        r = rewards_to_r(cells_plan.compact(raw, cells), all_prompts, config.train.map_normalization,
                         config.train.adv_clip_max, config.train.map_scale, config.train.map_sigma_min,
                         config.train.map_fixed_scale)
        r = cells_plan.expand(r, cells)
        x0 = torch.cat([ro.latents for ro in rollouts])
        embeds = torch.cat([ro.prompt_embeds for ro in rollouts])
        pooled = torch.cat([ro.pooled_embeds for ro in rollouts])
        names = list(train_rewards.weights)  # zero-std groups, top-k rewards, r areas, map means (u_nft/diagnostics.py)
        reward_log = {f"diag/{k}": v for k, v in epoch_reward_diagnostics(
            {n: torch.cat([o[n].scores for o in outputs]) for n in names},
            {n: torch.cat([o[n].maps for o in outputs]) for n in names},
            train_rewards.weights, all_prompts, r, options.neutral_tol).items()}
        reward_log |= mean_diagnostics([{f"reward/{name}": torch.cat([o[name].scores for o in outputs]).mean()
                                        for name in train_rewards.weights}])

        # Train: shuffled micro-batches x the sampler's timesteps, gradient accumulation, AdamW
        transformer.train()
        generator = torch.Generator().manual_seed(sample_seeds(config.seed, epoch, [dist.rank()])[0])
        history, grad_norms, micro = [], [], 0
        for inner in range(config.train.num_inner_epochs):
            order = torch.randperm(x0.shape[0], generator=generator)
            for start in tqdm(range(0, x0.shape[0], config.train.batch_size), desc=f"epoch {epoch}: training",
                              disable=not is_main):
                idx = order[start:start + config.train.batch_size]
                perms = timestep_permutations(len(idx), len(train_t), sizes.num_train_timesteps, generator)
                for j in range(sizes.num_train_timesteps):
                    t = train_t[perms[:, j]].to(device)
                    noise = torch.randn(x0[idx].shape, generator=generator).to(device)
                    loss, diag = micro_step_loss(transformer, x0[idx], noise, t, r[idx], embeds[idx], pooled[idx],
                                                 options, autocast_dtype, generator, old_policy,
                                                 locations=None if cells is None else cells[idx])
                    scaler.scale(loss / sizes.accumulation_steps).backward()
                    history.append(diag)
                    micro += 1
                    if micro % sizes.accumulation_steps == 0:
                        dist.average_gradients(params)
                        scaler.unscale_(optimizer)
                        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
                        scaler.step(optimizer)
                        scaler.update()
                        optimizer.zero_grad(set_to_none=True)
                        state.global_step += 1
                        if ema is not None:
                            ema.step(params)
                        grad_norms.append(grad_norm.detach().float())

        # Update the old policy, log, evaluate, save
        decay = old_policy_decay(state.global_step, config.train.decay_type)
        soft_update_old(transformer, decay)
        if old_policy is not None:
            old_policy.refresh(transformer)
        state.epoch = epoch + 1
        sampler.set_epoch(epoch + 1)
        state.sampler = sampler.state_dict()
        metrics = {**{f"train/{k}": v for k, v in mean_diagnostics(history).items()}, **reward_log,
                   "train/grad_norm": float(torch.stack(grad_norms).mean()), "train/old_decay": decay,
                   "train/r_mean": float(r.mean())}
        if is_main:
            logger.log(metrics, state.global_step, epoch)
            print(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
            if epoch % config.logging.image_every == 0:
                n = config.logging.num_log_images
                name = next(iter(outputs[0]))
                images = torch.cat([ro.images for ro in rollouts])[:n]
                grid = save_grid(images, r[:n], os.path.join(run_dir, "images", f"epoch{epoch:04d}_train_r.png"),
                                 value_range=(0, 1))
                save_grid(images, torch.cat([o[name].maps for o in outputs])[:n],
                          os.path.join(run_dir, "images", f"epoch{epoch:04d}_train_{name}.png"), value_range=None)
                logger.log_image("images/train_r", grid, state.global_step)
        last = epoch + 1 == config.num_epochs
        # Save before evaluating: a failing evaluation (scorer error, OOM) must not cost the epoch's training.
        if config.save_freq and (epoch + 1) % config.save_freq == 0 or last:
            save(run_dir, config, state, transformer, optimizer, scaler, ema, params)
        if evaluation_due(epoch + 1, config.eval_freq, config.num_epochs, config.eval_at_start):
            evaluate(epoch, f"epoch{epoch:04d}")
        epochs_run += 1
        if flags.FLAGS.stop_after_epochs and epochs_run >= flags.FLAGS.stop_after_epochs:
            break

    train_rewards.close()
    eval_rewards.close()
    if is_main:
        logger.close()
        print(f"done: run dir {run_dir} (images/, metrics.jsonl, checkpoints/*/lora/)", flush=True)
    dist.cleanup()


if __name__ == "__main__":
    exit_on_upstream_keys(sys.argv)  # an upstream DiffusionNFT key names ours instead (docs/upstream_parity.md)
    app.run(main)
