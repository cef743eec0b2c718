"""A user's first real run, on the SD3.5-Medium-shaped pipeline (u_nft.sd35m_shaped): SD3.5-M's widths,
three text encoders and the full SD3 VAE, two transformer blocks.

The real train script trains one epoch at 512 px with max_sequence_length 128 (sampling, scoring,
normalization, training, old-policy update, checkpoint), is resumed for a second epoch (then evaluates),
and the real evaluation script scores the final checkpoint. The transformer's inputs are logged by
``U_NFT_SHAPE_LOG`` (u_nft/shape_log.py) in every process and must be SD3.5-M's. Peak RSS and wall time of
each process are printed (run with ``-s``) and recorded in docs/sd35m.md.
``U_NFT_SD35M_SHAPED_DIR`` keeps the ~3.2 GB pipeline across runs.
"""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from u_nft.sd35m_shaped import SD35M_IMAGE_TOKENS_512PX, SD35M_TEXT_TOKENS, build_sd35m_shaped_pipeline
from u_nft.shape_log import ENV_VAR, read_shape_log
from u_nft.tiny_sd3 import matches_build

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "scripts" / "train_u_nft_sd3.py"
EVALUATE = REPO / "scripts" / "evaluation.py"
LORA_RANK, LORA_ALPHA = 32, 64  # upstream NFT's SD3.5-M LoRA


@pytest.fixture(scope="module")
def sd35m_dir(tmp_path_factory):
    cached = os.environ.get("U_NFT_SD35M_SHAPED_DIR")
    if cached and (matches_build(cached, kind="sd35m_shaped", seed=0, num_layers=2) or not Path(cached).exists()):
        return build_sd35m_shaped_pipeline(cached)
    return build_sd35m_shaped_pipeline(tmp_path_factory.mktemp("sd35m") / "pipeline")


def run_measured(cmd, shape_log: Path) -> dict:
    """Run ``cmd`` to completion; its output, wall seconds and peak RSS (GiB, from wait4)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": os.environ.get("U_NFT_SD35M_THREADS", "2"), ENV_VAR: str(shape_log)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[1]} failed ({proc.returncode}):\n{output[-6000:]}")
    peak_gib = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    print(f"\n{Path(cmd[1]).name} {' '.join(cmd[2:4])}...: {seconds:.0f} s, peak RSS {peak_gib:.2f} GiB")
    return {"output": output, "seconds": seconds, "peak_rss_gib": peak_gib}


def train_args(logdir, model, *extra):
    """config/u_nft.py:tiny at SD3.5-M's settings (512 px, 128 T5 tokens, LoRA r 32) cut to one group of
    2 images per epoch, 2 solver steps, one optimizer step; evaluation on 1 prompt after the last epoch."""
    return [sys.executable, str(TRAIN), "--config", f"{REPO / 'config' / 'u_nft.py'}:tiny",
            f"--config.logdir={logdir}", "--config.run_name=sd35m", f"--config.pretrained.model={model}",
            "--config.pretrained.build_tiny_if_missing=False", "--config.num_epochs=2",
            "--config.sample.resolution=512", "--config.sample.max_sequence_length=128",
            f"--config.lora.rank={LORA_RANK}", f"--config.lora.alpha={LORA_ALPHA}",
            "--config.sample.num_groups=1", "--config.sample.num_image_per_prompt=2",
            "--config.sample.train_batch_size=2", "--config.train.batch_size=2", "--config.sample.test_batch_size=1",
            "--config.sample.num_steps=2", "--config.sample.eval_num_steps=2",
            "--config.train.gradient_step_per_epoch=1", "--config.save_freq=1", "--config.eval_freq=2",
            "--config.eval_at_start=False", "--config.dataset.max_test_prompts=1",
            "--config.logging.num_log_images=1", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sd35m_dir):
    """Epoch 1 (killed after it), the resumed epoch 2 with evaluation, then scripts/evaluation.py."""
    root = tmp_path_factory.mktemp("sd35m_runs")
    shapes = root / "shapes.jsonl"
    first = run_measured(train_args(root, sd35m_dir, "--stop_after_epochs=1"), shapes)
    resumed = run_measured(train_args(root, sd35m_dir, f"--config.resume_from={root / 'sd35m'}"), shapes)
    prompts = root / "ocr_prompts.txt"
    prompts.write_text('a shop sign that says "open"\n', encoding="utf-8")
    evaluation = run_measured(
        [sys.executable, str(EVALUATE), "--model", str(sd35m_dir),
         "--checkpoint_path", str(root / "sd35m" / "checkpoints" / "checkpoint-2"), "--dataset", "ocr",
         "--dataset_path", str(prompts), "--resolution", "512", "--max_sequence_length", "128", "--num_steps", "2",
         "--mixed_precision", "no", "--batch_size", "1", "--mean_map_size", "4", "--output_dir", str(root / "eval")],
        shapes)
    return {"root": root, "run": root / "sd35m", "shapes": read_shape_log(shapes), "first": first,
            "resumed": resumed, "evaluation": evaluation}


def test_saved_pipeline_has_sd35m_widths_and_cut_depth(sd35m_dir):
    def config(component):
        return json.loads((sd35m_dir / component / "config.json").read_text())

    index = json.loads((sd35m_dir / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"] and index["_class_name"] == "StableDiffusion3Pipeline"
    tr = config("transformer")
    assert {k: tr[k] for k in ("num_attention_heads", "attention_head_dim", "caption_projection_dim",
                               "joint_attention_dim", "pooled_projection_dim", "pos_embed_max_size", "sample_size",
                               "patch_size", "in_channels", "out_channels", "qk_norm")} == {
        "num_attention_heads": 24, "attention_head_dim": 64, "caption_projection_dim": 1536,
        "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "sample_size": 128,
        "patch_size": 2, "in_channels": 16, "out_channels": 16, "qk_norm": "rms_norm"}
    assert tr["num_layers"] == 2 and list(tr["dual_attention_layers"]) == [0]  # one dual block, one plain
    vae = config("vae")
    assert (vae["block_out_channels"], vae["layers_per_block"], vae["latent_channels"], vae["norm_num_groups"]) == (
        [128, 256, 512, 512], 2, 16, 32)
    assert (vae["scaling_factor"], vae["shift_factor"], vae["use_quant_conv"], vae["use_post_quant_conv"]) == (
        1.5305, 0.0609, False, False)
    clip_l, clip_g, t5 = config("text_encoder"), config("text_encoder_2"), config("text_encoder_3")
    assert (clip_l["hidden_size"], clip_l["projection_dim"], clip_l["num_attention_heads"], clip_l["num_hidden_layers"]) == (768, 768, 12, 1)
    assert (clip_g["hidden_size"], clip_g["projection_dim"], clip_g["num_attention_heads"], clip_g["num_hidden_layers"]) == (1280, 1280, 20, 1)
    assert (t5["d_model"], t5["d_ff"], t5["num_heads"], t5["d_kv"], t5["num_layers"], t5["feed_forward_proj"]) == (
        4096, 10240, 64, 64, 1, "gated-gelu")
    assert clip_l["hidden_size"] + clip_g["hidden_size"] == tr["pooled_projection_dim"] <= t5["d_model"] == tr["joint_attention_dim"]


def test_transformer_sees_sd35m_shapes_in_training_and_evaluation(runs):
    entries = runs["shapes"]
    assert len({e["pid"] for e in entries}) == 3  # both train processes and the evaluation process logged
    for e in entries:
        batch = e["hidden_states"][0]
        assert e["hidden_states"] == [batch, 16, 64, 64] and e["image_tokens"] == SD35M_IMAGE_TOKENS_512PX == 1024
        assert e["encoder_hidden_states"] == [batch, SD35M_TEXT_TOKENS, 4096] and e["text_tokens"] == 205
        assert e["pooled_projections"] == [batch, 2048]
    assert {e["hidden_states"][0] for e in entries} == {1, 2}  # rollouts / training batches of 2, eval of 1


def test_first_epoch_checkpoints_and_resumed_epoch_trains_evaluates_and_checkpoints(runs):
    from u_nft.checkpoint import load_checkpoint
    from u_nft.ema import old_policy_decay
    from u_nft.run_logging import read_metrics

    run = runs["run"]
    train = [r for r in read_metrics(run) if "train/policy_loss" in r]
    assert [r["epoch"] for r in train] == [0, 1]
    for r in train:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float))
        assert r["train/policy_loss"] > 0 and 0.0 <= r["train/r_mean"] <= 1.0 and r["train/grad_norm"] > 0
        # group-wise normalization of the region-colour maps gave both signs of the advantage
        assert r["diag/r_positive_area"] > 0 and r["diag/r_negative_area"] > 0
    evals = [r for r in read_metrics(run) if "eval/region_color_map/mean" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["eval/region_color_map/mean"] <= 1.0
    first, second = load_checkpoint(run / "checkpoints" / "checkpoint-1"), load_checkpoint(run / "checkpoints" / "checkpoint-2")
    assert (first.state.epoch, second.state.epoch, second.state.global_step) == (1, 2, 2)
    default, old1, old2 = second.tensors["lora_default"], first.tensors["lora_old"], second.tensors["lora_old"]
    d = old_policy_decay(2, 1)  # the old-policy update after the resumed epoch
    for key in default:
        torch.testing.assert_close(old2[key], d * old1[key] + (1 - d) * default[key], rtol=0, atol=1e-6)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in default.items())


def test_checkpoint_lora_loads_in_diffusers_sd3_pipeline_and_matches_our_adapter(runs, sd35m_dir):
    from diffusers import StableDiffusion3Pipeline

    from u_nft.lora import add_lora_adapters, load_lora_state, read_lora_file
    from u_nft.tiny_sd3 import load_sd3_pipeline

    lora_dir = runs["run"] / "checkpoints" / "checkpoint-2" / "lora"
    pipe = StableDiffusion3Pipeline.from_pretrained(sd35m_dir)
    assert pipe.text_encoder_3 is not None
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, 64), encoder_hidden_states=torch.randn(1, 205, 4096),
                  pooled_projections=torch.randn(1, 2048), timestep=torch.tensor([700.0]), return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(lora_dir)
        diffusers_out = pipe.transformer(**inputs)[0]
    assert (diffusers_out - base).abs().max() > 1e-6
    del pipe

    config = json.loads((runs["run"] / "checkpoints" / "checkpoint-2" / "config.json").read_text())
    ours = load_sd3_pipeline(sd35m_dir).transformer
    add_lora_adapters(ours, rank=LORA_RANK, alpha=LORA_ALPHA, target_modules=list(config["lora"]["target_modules"]))
    load_lora_state(ours, "default", read_lora_file(lora_dir))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs)[0], diffusers_out, rtol=1e-4, atol=1e-4)


def test_evaluation_script_scores_the_checkpoint_with_ocr(runs):
    data = json.loads((runs["root"] / "eval" / "results.json").read_text())
    assert len(data["samples"]) == 1 and data["lora"] is not None
    score = data["samples"][0]["scores"]["ocr_map"]
    assert math.isfinite(score) and 0.0 <= score <= 1.0
    assert data["config"]["resolution"] == 512 and data["config"]["max_sequence_length"] == 128

