"""scripts/train_u_nft.py end to end on the tiny offline FLUX pipeline (config/u_nft.py:flux_tiny): the real
entry, diffusers' FluxPipeline, the merged old policy, resume, torchrun on 2 gloo ranks, evaluation, the LoRA."""
import json
from pathlib import Path

import pytest
import torch

from test_train_e2e import assert_same_checkpoint, assert_two_epochs_trained, run_script
from test_train_e2e import checkpoint_tensors as checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_u_nft.py"
CONFIG = f"{REPO / 'config' / 'u_nft.py'}:flux_tiny"


def small_run_args(logdir, tiny_dir, name, *extra, epochs=2, batch=8):
    """flux_tiny shrunk to 8 images per epoch (2 prompts x 4), 3 sampling steps, one optimizer step per epoch,
    evaluation (2 prompts) after the last epoch only."""
    return ["--config", CONFIG, f"--config.logdir={logdir}", f"--config.run_name={name}",
            f"--config.pretrained.model={tiny_dir}", f"--config.num_epochs={epochs}",
            "--config.sample.num_groups=2", "--config.sample.num_image_per_prompt=4",
            f"--config.sample.train_batch_size={batch}", f"--config.train.batch_size={batch}",
            "--config.sample.num_steps=3", "--config.sample.eval_num_steps=3",
            "--config.train.gradient_step_per_epoch=1", "--config.save_freq=1", "--config.eval_freq=2",
            "--config.eval_at_start=False", "--config.dataset.max_test_prompts=2",
            "--config.logging.num_log_images=4", *extra]


def run(script, args, nproc=1):
    return run_script(args, nproc, script=script)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_flux_dir):
    """Two epochs on FLUX with the fast merged old policy (the GPU default) forced on the CPU."""
    logdir = tmp_path_factory.mktemp("flux_runs")
    proc = run(SCRIPT, small_run_args(logdir, tiny_flux_dir, "full", "--config.train.old_policy=merged"))
    return logdir / "full", proc.stdout


def test_flux_run_has_finite_losses_images_heatmaps_and_the_flux_family(flux_run):
    from u_nft.run_logging import read_metrics

    run_dir, stdout = flux_run
    assert_two_epochs_trained(read_metrics(run_dir))
    images = {p.name for p in (run_dir / "images").glob("*.png")}
    assert {"epoch0000_train_r.png", "epoch0000_train_region_color_map.png"} <= images  # r-map and reward heatmaps
    assert any("eval" in name for name in images)
    config = json.loads((run_dir / "checkpoints" / "checkpoint-2" / "config.json").read_text())
    from u_nft.models.flux import DEFAULT_LORA_TARGETS

    assert tuple(config["lora"]["target_modules"]) == DEFAULT_LORA_TARGETS  # () resolved to FLUX's default
    assert config["sample"]["distilled_guidance"] == 3.5


def test_flux_lora_trains_and_the_old_policy_follows_the_decay_rule(flux_run):
    from u_nft.ema import old_policy_decay

    run_dir, _ = flux_run
    first, second = checkpoint(run_dir, 1), checkpoint(run_dir, 2)
    default, old1, old2 = second.tensors["lora_default"], first.tensors["lora_old"], second.tensors["lora_old"]
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in default.items())
    assert any("single_transformer_blocks" in k for k in default)  # single-stream blocks are trained too
    d = old_policy_decay(2, 1)
    for key in default:
        torch.testing.assert_close(old2[key], d * old1[key] + (1 - d) * default[key], rtol=0, atol=1e-6)


def test_flux_checkpoint_lora_loads_in_flux_pipeline_and_changes_the_image(flux_run, tiny_flux_dir):
    from diffusers import FluxPipeline

    from u_nft.lora import add_lora_adapters, load_lora_state, read_lora_file
    from u_nft.models.flux import FAMILY as FLUX, pack_latents
    from u_nft.rollout import initial_noise

    run_dir, _ = flux_run
    lora_dir = run_dir / "checkpoints" / "checkpoint-2" / "lora"
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    noise = pack_latents(initial_noise([0, 1], 16, 8, 8))

    def image():
        with torch.no_grad():
            return pipe(["a red square", "a small house"], latents=noise.clone(), num_inference_steps=4,
                        guidance_scale=3.5, height=64, width=64, max_sequence_length=32, output_type="pt").images

    base = image()
    pipe.load_lora_weights(lora_dir)
    with_lora = image()
    assert (with_lora - base).abs().max() > 1e-3

    ours = FLUX.load_pipeline(tiny_flux_dir, torch.float32, "cpu")  # our adapter on the same weights agrees
    add_lora_adapters(ours.transformer, rank=8, alpha=16, target_modules=list(FLUX.default_lora_targets))
    load_lora_state(ours.transformer, "default", read_lora_file(lora_dir))
    cond = FLUX.encode_prompts(ours, ["a red square"], 32, "cpu")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        torch.testing.assert_close(FLUX.predict_velocity(ours.transformer, x, sigma, cond),
                                   FLUX.predict_velocity(pipe.transformer, x, sigma, cond), rtol=1e-5, atol=1e-5)


def test_resumed_flux_run_matches_the_uninterrupted_run(flux_run, tiny_flux_dir):
    """A copy of the run as a kill after epoch 1 leaves it (checkpoint-2 gone), resumed from checkpoint-1,
    ends at the uninterrupted run's checkpoint-2 bit for bit (one process launch instead of two)."""
    import shutil

    run_dir, _ = flux_run
    killed = run_dir.parent / "killed"
    shutil.copytree(run_dir, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-2")
    run(SCRIPT, small_run_args(run_dir.parent, tiny_flux_dir, "killed", "--config.train.old_policy=merged",
                               f"--config.resume_from={killed / 'checkpoints' / 'checkpoint-1'}"))
    assert_same_checkpoint(checkpoint(run_dir, 2), checkpoint(killed, 2))


@pytest.mark.slow
def test_evaluation_script_runs_on_a_flux_checkpoint(flux_run, tmp_path):
    """scripts/evaluation.py reads the base model and its family from the checkpoint's config.json."""
    run_dir, _ = flux_run
    out = tmp_path / "eval"
    proc = run(REPO / "scripts" / "evaluation.py", [
        "--checkpoint_path", str(run_dir), "--dataset", "ocr", "--dataset_path",
        str(REPO / "tests" / "fixtures" / "prompts" / "ocr" / "test.txt"), "--max_prompts", "2",
        "--reward_fn", "jpeg_map", "--resolution", "64", "--num_steps", "2", "--mixed_precision", "no",
        "--batch_size", "2", "--max_sequence_length", "32", "--output_dir", str(out)])
    assert "family flux" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["samples"]) == 2


@pytest.mark.slow
def test_two_process_torchrun_on_flux(tmp_path, tiny_flux_dir):
    """gloo, 2 ranks on FLUX: the run completes; saving checks both ranks hold identical LoRA weights."""
    proc = run(SCRIPT, small_run_args(tmp_path, tiny_flux_dir, "ddp", epochs=1, batch=4), nproc=2)
    assert (tmp_path / "ddp" / "checkpoints" / "checkpoint-1" / "lora").is_dir()
    assert "world_size=2" in proc.stdout


@pytest.mark.slow
def test_flux_tiny_default_reward_rises_beyond_seed_noise(tmp_path, tiny_flux_dir):
    """The README's FLUX job (flux_tiny, 10 epochs) improves its reward: the last two epochs' mean train reward
    exceeds the first epoch's (the untrained policy) by 0.05, several times the epoch-to-epoch spread of
    prompts and noise, and the fixed-seed evaluation improves too."""
    from u_nft.run_logging import read_metrics

    run(SCRIPT, ["--config", CONFIG, f"--config.logdir={tmp_path}", "--config.run_name=learn",
                 f"--config.pretrained.model={tiny_flux_dir}", "--config.save_freq=0"])
    records = read_metrics(tmp_path / "learn")
    rewards = [r["reward/region_color_map"] for r in records if "reward/region_color_map" in r]
    evals = [r["eval/region_color_map/mean"] for r in records if "eval/region_color_map/mean" in r]
    assert len(rewards) == 10 and len(evals) == 3
    assert sum(rewards[-2:]) / 2 - rewards[0] > 0.05, rewards
    assert evals[-1] > evals[0] + 0.03, evals
