"""scripts/train_u_nft.py end to end on the tiny offline Qwen-Image pipeline (config/u_nft.py:qwen_image_tiny): the
real entry, diffusers' QwenImagePipeline, the merged old policy, resume, and the checkpoint LoRA in diffusers.
Skipped where diffusers has no Qwen-Image (< 0.35)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from test_train_e2e import assert_same_checkpoint, assert_two_epochs_trained, run_script
from test_train_e2e import checkpoint_tensors as checkpoint

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "QwenImagePipeline"):
    pytest.skip(f"Qwen-Image needs diffusers >= 0.35 (have {diffusers.__version__})", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_u_nft.py"
CONFIG = f"{REPO / 'config' / 'u_nft.py'}:qwen_image_tiny"


def small_run_args(logdir, tiny_dir, name, *extra):
    """qwen_image_tiny shrunk to 2 epochs of 8 images (2 prompts x 4), 3 sampling steps, one optimizer step per
    epoch, the merged old policy (the GPU default), evaluation (2 prompts) after the last epoch only."""
    return ["--config", CONFIG, f"--config.logdir={logdir}", f"--config.run_name={name}",
            f"--config.pretrained.model={tiny_dir}", "--config.num_epochs=2",
            "--config.sample.num_groups=2", "--config.sample.num_image_per_prompt=4",
            "--config.sample.train_batch_size=8", "--config.train.batch_size=8",
            "--config.sample.num_steps=3", "--config.sample.eval_num_steps=3",
            "--config.train.gradient_step_per_epoch=1", "--config.save_freq=1", "--config.eval_freq=2",
            "--config.eval_at_start=False", "--config.dataset.max_test_prompts=2",
            "--config.logging.num_log_images=4", "--config.train.old_policy=merged", *extra]


def run(args):
    return run_script(args, script=SCRIPT)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, tiny_qwen_image_dir):
    logdir = tmp_path_factory.mktemp("qwen_image_runs")
    run(small_run_args(logdir, tiny_qwen_image_dir, "full"))
    return logdir / "full"


def test_qwen_image_run_has_finite_losses_and_trains_the_qwen_lora_targets(qwen_run):
    from u_nft.models.qwen_image import DEFAULT_LORA_TARGETS
    from u_nft.run_logging import read_metrics

    assert_two_epochs_trained(read_metrics(qwen_run))
    config = json.loads((qwen_run / "checkpoints" / "checkpoint-2" / "config.json").read_text())
    assert tuple(config["lora"]["target_modules"]) == DEFAULT_LORA_TARGETS  # () resolved to Qwen-Image's default

    lora = checkpoint(qwen_run, 2).tensors["lora_default"]
    trained = {k for k, v in lora.items() if k.endswith("lora_B.weight") and v.abs().max() > 0}
    assert {next(t for t in DEFAULT_LORA_TARGETS if f".{t}.lora_B" in k) for k in trained} == set(DEFAULT_LORA_TARGETS)


def test_qwen_image_checkpoint_lora_loads_in_qwen_image_pipeline(qwen_run, tiny_qwen_image_dir):
    from diffusers import QwenImagePipeline

    from u_nft.lora import add_lora_adapters, load_lora_state, read_lora_file
    from u_nft.models.qwen_image import FAMILY as QWEN

    lora_dir = qwen_run / "checkpoints" / "checkpoint-2" / "lora"
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen_image_dir)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=["a red square"], height=64, width=64, num_inference_steps=3, true_cfg_scale=1.0,
                output_type="pt")
    base = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(lora_dir)
    assert (pipe(**call, generator=torch.Generator().manual_seed(0)).images - base).abs().max() > 1e-4

    ours = QWEN.load_pipeline(tiny_qwen_image_dir, torch.float32, "cpu")  # our adapter on the same LoRA agrees
    add_lora_adapters(ours.transformer, rank=8, alpha=16, target_modules=list(QWEN.default_lora_targets))
    load_lora_state(ours.transformer, "default", read_lora_file(lora_dir))
    cond = QWEN.encode_prompts(ours, ["a red square"], 32, "cpu")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(QWEN.predict_velocity(ours.transformer, x, torch.tensor([0.6]), cond),
                                   QWEN.predict_velocity(pipe.transformer, x, torch.tensor([0.6]), cond),
                                   rtol=1e-5, atol=1e-5)


def test_resumed_qwen_image_run_matches_the_uninterrupted_run(qwen_run, tiny_qwen_image_dir):
    """A copy of the run as a kill after epoch 1 leaves it (checkpoint-2 gone), resumed from checkpoint-1,
    ends at the uninterrupted run's checkpoint-2 bit for bit."""
    killed = qwen_run.parent / "killed"
    shutil.copytree(qwen_run, killed)
    shutil.rmtree(killed / "checkpoints" / "checkpoint-2")
    run(small_run_args(qwen_run.parent, tiny_qwen_image_dir, "killed",
                       f"--config.resume_from={killed / 'checkpoints' / 'checkpoint-1'}"))
    assert_same_checkpoint(checkpoint(qwen_run, 2), checkpoint(killed, 2))

