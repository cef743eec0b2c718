"""End-to-end checks of scripts/train_u_nft_sd3.py on the offline tiny SD3 pipeline (real script, real models)."""
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_u_nft_sd3.py"
CONFIG = f"{REPO / 'config' / 'u_nft.py'}:tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_run_args(logdir, tiny_dir, name, *extra, epochs=2, batch=8):
    """The tiny config shrunk to 16 images per epoch, 4 sampling steps, an optimizer step per epoch."""
    return ["--config", CONFIG, f"--config.logdir={logdir}", f"--config.run_name={name}",
            f"--config.pretrained.model={tiny_dir}", f"--config.num_epochs={epochs}",
            "--config.sample.num_groups=4", "--config.sample.num_image_per_prompt=4",
            f"--config.sample.train_batch_size={batch}", f"--config.train.batch_size={batch}",
            "--config.sample.num_steps=4", "--config.sample.eval_num_steps=4",
            "--config.train.gradient_step_per_epoch=1", "--config.save_freq=1", "--config.eval_freq=2",
            "--config.dataset.max_test_prompts=4", "--config.logging.num_log_images=4", *extra]


def run_script(args, nproc=1, expect_ok=True, script=SCRIPT):
    """Run ``script`` (default the SD3 train script) with ``args``, as one process or ``nproc`` torchrun ranks;
    AssertionError with the output tails when it fails and ``expect_ok``."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{Path(script).name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def tiny_config():
    """config/u_nft.py:tiny, loaded by path as ml_collections' config flag does."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("u_nft_configs", REPO / "config" / "u_nft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny()


def checkpoint_tensors(run_dir, step):
    from u_nft.checkpoint import load_checkpoint

    return load_checkpoint(Path(run_dir) / "checkpoints" / f"checkpoint-{step}")


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory, tiny_sd3_dir):
    logdir = tmp_path_factory.mktemp("runs")
    run_script(small_run_args(logdir, tiny_sd3_dir, "full"))
    return logdir / "full"


def test_tiny_run_writes_finite_metrics_images_and_checkpoints(two_epoch_run):
    from u_nft.run_logging import read_metrics

    records = read_metrics(two_epoch_run)
    train = [r for r in records if "train/policy_loss" in r]
    assert [r["epoch"] for r in train] == [0, 1]
    for r in train:
        assert all(math.isfinite(v) for k, v in r.items() if isinstance(v, float))
        assert 0 < r["train/policy_loss"] and 0.0 <= r["train/mean_r"] <= 1.0
    assert any("eval/region_color_map/mean" in r for r in records)
    images = sorted(p.name for p in (two_epoch_run / "images").glob("*.png"))
    assert "epoch0000_train_r.png" in images and any("eval" in name for name in images)
    assert sorted(p.name for p in (two_epoch_run / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_run_evaluates_the_base_model_first_and_logs_upstream_diagnostics(two_epoch_run):
    """eval_freq=2 over 2 epochs: the base model (epochs_trained 0, step 0) and after the 2nd epoch, as upstream's
    epoch % eval_freq == 0; every epoch logs the collapse / hacking diagnostics (docs/upstream_parity.md)."""
    from u_nft.run_logging import read_metrics

    records = read_metrics(two_epoch_run)
    evals = [r for r in records if "eval/region_color_map/mean" in r]
    assert [(r["eval/epochs_trained"], r["step"]) for r in evals] == [(0, 0), (2, 2)]
    train = [r for r in records if "train/policy_loss" in r]
    for r in train:
        assert 0.0 <= r["diag/zero_std_ratio"] <= 1.0 and r["diag/reward_std_mean"] >= 0.0
        assert r["diag/reward_top10_mean"] >= r["diag/reward_top50_mean"] >= r["diag/reward_top100_mean"]
        assert r["diag/r_positive_area"] + r["diag/r_negative_area"] + r["diag/r_neutral_area"] == pytest.approx(1.0)
        assert r["diag/map_mean/region_color_map"] > 0 and r["train/x0_norm"] > 0
        assert r["train/old_deviate"] >= 0.0
    assert train[0]["train/old_deviate"] == pytest.approx(0.0, abs=1e-8)  # epoch 0: the old policy is the policy
    assert train[1]["train/old_deviate"] > 0.0
    assert (two_epoch_run / "images" / "start_eval_region_color_map.png").is_file()


def test_lora_trains_and_old_policy_follows_the_decay_rule(two_epoch_run):
    from u_nft.ema import old_policy_decay

    first, second = checkpoint_tensors(two_epoch_run, 1), checkpoint_tensors(two_epoch_run, 2)
    assert (second.state.epoch, second.state.global_step) == (2, 2)
    default, old1, old2 = second.tensors["lora_default"], first.tensors["lora_old"], second.tensors["lora_old"]
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in default.items())
    d = old_policy_decay(2, 1)
    for key in default:
        torch.testing.assert_close(old2[key], d * old1[key] + (1 - d) * default[key], rtol=0, atol=1e-6)


def test_checkpoint_lora_loads_in_diffusers_and_matches_our_adapter(two_epoch_run, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from u_nft.lora import add_lora_adapters, load_lora_state, read_lora_file
    from u_nft.tiny_sd3 import load_sd3_pipeline

    lora_dir = two_epoch_run / "checkpoints" / "checkpoint-2" / "lora"
    keys = load_file(lora_dir / "pytorch_lora_weights.safetensors").keys()
    assert keys and all("lora" in k for k in keys)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)  # three text encoders, as SD3.5
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, 8, 8), encoder_hidden_states=torch.randn(2, 109, pipe.transformer.config.joint_attention_dim),
                  pooled_projections=torch.randn(2, pipe.transformer.config.pooled_projection_dim),
                  timestep=torch.tensor([500.0, 900.0]), return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(lora_dir)
        diffusers_out = pipe.transformer(**inputs)[0]
    assert (diffusers_out - base).abs().max() > 1e-6

    ours = load_sd3_pipeline(tiny_sd3_dir).transformer
    from u_nft.models.sd3 import FAMILY as SD3

    add_lora_adapters(ours, rank=8, alpha=16, target_modules=list(SD3.lora_targets(tiny_config().lora.target_modules)))
    load_lora_state(ours, "default", read_lora_file(lora_dir))
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs)[0], diffusers_out, rtol=1e-5, atol=1e-5)


def test_killed_and_resumed_run_matches_uninterrupted_run(two_epoch_run, tiny_sd3_dir):
    logdir = two_epoch_run.parent
    run_script(small_run_args(logdir, tiny_sd3_dir, "resumed", "--stop_after_epochs=1"))
    assert not (logdir / "resumed" / "checkpoints" / "checkpoint-2").exists()
    run_script(small_run_args(logdir, tiny_sd3_dir, "resumed", f"--config.resume_from={logdir / 'resumed'}"))
    assert_same_checkpoint(checkpoint_tensors(two_epoch_run, 2), checkpoint_tensors(logdir / "resumed", 2))


def assert_two_epochs_trained(records):
    """metrics.jsonl of a two-epoch run of any family: finite metrics, positive policy loss, mean r in [0, 1],
    the old policy equal to the trained one at epoch 0 and moved by epoch 1, and an evaluation logged."""
    train = [r for r in records if "train/policy_loss" in r]
    assert [r["epoch"] for r in train] == [0, 1]
    for r in train:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["train/policy_loss"] > 0 and 0.0 <= r["train/mean_r"] <= 1.0
    assert train[0]["train/old_deviate"] == pytest.approx(0.0, abs=1e-8)
    assert train[1]["train/old_deviate"] > 0.0  # the old policy moved after the first update
    assert any("eval/region_color_map/mean" in r for r in records)


def assert_same_checkpoint(full, resumed):
    """Two loaded checkpoints hold the same TrainState and, bit for bit, the same LoRA, old LoRA, EMA,
    optimizer and scaler tensors."""
    assert full.state == resumed.state
    assert sorted(full.tensors) == sorted(resumed.tensors)
    for name in full.tensors:
        assert_identical(full.tensors[name], resumed.tensors[name], name)


def assert_identical(a, b, where):
    """Equal trees (dicts / lists of tensors and plain values): tensors by dtype and every bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_merged_old_policy_trains_like_the_old_adapter(two_epoch_run, tiny_sd3_dir):
    """train.old_policy=merged (the GPU default) follows the adapter path up to float rounding."""
    logdir = two_epoch_run.parent
    run_script(small_run_args(logdir, tiny_sd3_dir, "merged", "--config.train.old_policy=merged"))
    adapter, merged = checkpoint_tensors(two_epoch_run, 2), checkpoint_tensors(logdir / "merged", 2)
    for name in ("lora_default", "lora_old"):
        for key, value in adapter.tensors[name].items():
            torch.testing.assert_close(merged.tensors[name][key], value, rtol=1e-3, atol=1e-4)


def test_two_process_torchrun_ranks_agree(tmp_path, tiny_sd3_dir):
    """gloo, 2 ranks: the run completes; saving checks that both ranks hold identical LoRA weights."""
    proc = run_script(small_run_args(tmp_path, tiny_sd3_dir, "ddp", epochs=1, batch=4), nproc=2)
    assert (tmp_path / "ddp" / "checkpoints" / "checkpoint-1" / "lora").is_dir()
    assert "world_size=2" in proc.stdout


def _normalize_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK="0")
    import torch.distributed

    from u_nft import distributed as dist
    from u_nft.training import rewards_to_r

    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    raw = torch.arange(24, dtype=torch.float32).view(2, 3, 4) * (rank + 1) ** 2
    prompts = ["a", "b"] if rank == 0 else ["b", "a"]
    r = rewards_to_r(raw, prompts, "group", 5.0, "global", 1e-2, 1.0)
    torch.save(r, Path(out_dir) / f"r{dist.rank()}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_normalize_over_the_gathered_groups(tmp_path):
    import torch.multiprocessing as mp

    from u_nft.normalization import group_ids_from_keys, normalize_reward_maps

    method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_normalize_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    raw = torch.cat([torch.arange(24, dtype=torch.float32).view(2, 3, 4) * (k + 1) ** 2 for k in range(2)])
    expected = normalize_reward_maps(raw, group_ids_from_keys(["a", "b", "b", "a"]))
    got = torch.cat([torch.load(tmp_path / f"r{k}.pt") for k in range(2)])
    torch.testing.assert_close(got, expected)


def test_scalar_mode_step_equals_handwritten_diffusion_nft(tiny_sd3_dir):
    """Scalar mode (constant maps through combine -> normalize -> dense loss) gives upstream's gradient."""
    from upstream_reference import upstream_advantage_r, upstream_scalar_loss

    from reward_maps.base import RewardOutput
    from u_nft.lora import OLD, adapters_disabled, add_lora_adapters, trainable_parameters, use_adapter
    from u_nft.loss import DenseLossOptions
    from u_nft.models.sd3 import FAMILY as SD3
    from u_nft.tiny_sd3 import load_sd3_pipeline
    from u_nft.training import micro_step_loss, raw_reward_grid, rewards_to_r

    torch.manual_seed(0)
    pipe = load_sd3_pipeline(tiny_sd3_dir)
    transformer = pipe.transformer
    add_lora_adapters(transformer, rank=4, alpha=8, target_modules=["attn.to_q", "attn.to_v", "attn.to_out.0"])
    params = trainable_parameters(transformer)
    with torch.no_grad():  # make trained, old and reference policies all differ
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["a cat", "a cat", "a dog", "a dog", "a dog", "a cat"]
    scores = torch.tensor([0.3, 0.9, 0.2, 0.25, 0.8, 0.5])
    outputs = {"score": RewardOutput(torch.rand(6, 64, 64), scores, [{}] * 6)}
    r = rewards_to_r(raw_reward_grid(outputs, {"score": 2.0}, (4, 4), scalar_mode=True), prompts,
                     "group", 5.0, "global", 1e-2, 1.0)
    cond = SD3.encode_prompts(pipe, prompts, 32, "cpu")
    x0, noise = torch.randn(6, 16, 8, 8), torch.randn(6, 16, 8, 8)
    t = torch.tensor([1.0, 0.9, 0.7, 0.5, 0.3, 0.1])
    options = DenseLossOptions(beta=0.5, kl_weight=0.1, cell_size=2)

    loss, _ = micro_step_loss(SD3, transformer, x0, noise, t, r, cond, options, None)
    loss.backward()
    ours = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        with use_adapter(transformer, OLD):
            v_old = SD3.predict_velocity(transformer, x_t, t, cond)
        with adapters_disabled(transformer):
            v_ref = SD3.predict_velocity(transformer, x_t, t, cond)
    v_theta = SD3.predict_velocity(transformer, x_t, t, cond)
    r_upstream = torch.tensor(upstream_advantage_r(prompts, (2.0 * scores).numpy()), dtype=torch.float32)
    expected = upstream_scalar_loss(v_theta, v_old, v_ref, x0, noise, t, r_upstream, 0.5, 0.1, 5.0)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    for got, p in zip(ours, params):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("override,message", [
    ("--config.sample.num_groups=3", "sample.num_groups"),
    ("--config.train.cell_size=3", "config.train.cell_size"),
    ("--config.dataset.train=/nonexistent/prompts.txt", "config.dataset.train"),
    ("--config.sample.solver=euler", "config.sample.solver"),
])
def test_bad_config_fails_fast_naming_the_key(tmp_path, override, message):
    proc = run_script(["--config", CONFIG, f"--config.logdir={tmp_path}", override], expect_ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "tiny").exists()


def test_unknown_reward_name_lists_the_registered_scorers():
    import ml_collections

    from u_nft.config_utils import ConfigError, validate_config

    config = tiny_config()
    config.reward_fn = ml_collections.ConfigDict({"no_such_reward": 1.0})
    with pytest.raises(ConfigError, match="config.reward_fn: unknown reward scorer 'no_such_reward'; registered: .*ocr_map"):
        validate_config(config, world_size=1)


@pytest.mark.slow
def test_tiny_default_reward_rises_beyond_seed_noise(tmp_path, tiny_sd3_dir):
    """The README's main job (tiny config, 10 epochs) improves its reward: the last two epochs' mean train
    reward exceeds the first epoch's (the untrained policy) by 0.05, several times the epoch-to-epoch
    spread of prompts and noise (~0.01-0.02 measured), and the fixed-seed evaluation improves too."""
    from u_nft.run_logging import read_metrics

    run_script(["--config", CONFIG, f"--config.logdir={tmp_path}", "--config.run_name=learn",
                f"--config.pretrained.model={tiny_sd3_dir}", "--config.save_freq=0"])
    records = read_metrics(tmp_path / "learn")
    rewards = [r["reward/region_color_map"] for r in records if "reward/region_color_map" in r]
    evals = [r["eval/region_color_map/mean"] for r in records if "eval/region_color_map/mean" in r]
    assert len(rewards) == 10 and len(evals) == 3  # the base model (before the first update), epochs 5 and 10
    assert sum(rewards[-2:]) / 2 - rewards[0] > 0.05, rewards
    assert evals[-1] > evals[0], evals
