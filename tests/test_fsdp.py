"""train.sharding="fsdp" (u_nft/sharding.py, FSDP2 fully_shard) on 2 gloo CPU ranks against "ddp", on the tiny SD3.

One torchrun launch of tests/fsdp_worker.py (about 15 s) trains the same LoRA steps under both strategies
(adapter switching for v_old / v_ref, gradient accumulation, clipping, AdamW, EMA, old-policy soft update),
saves a sharded checkpoint mid-run, reloads it into fresh objects and continues, and exports the LoRA.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fsdp_worker.py"
# DDP all-reduces the gradients, FSDP reduce-scatters them: the sums are ordered differently, so fp32 results
# differ by rounding. Measured after 4 steps: 2.1e-7, against LoRA weights of size ~1e-2 that moved ~1e-2.
DDP_FSDP_ATOL = 2e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory, tiny_sd3_dir):
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(WORKER), str(tiny_sd3_dir), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"fsdp worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fsdp_shards_the_lora_parameters_as_dtensors(worker_out):
    report = json.loads((worker_out / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["ddp_param_type"] == "Parameter" and report["fsdp_param_type"] == "DTensor"


def test_fsdp_training_matches_ddp_within_rounding(worker_out):
    ddp, fsdp = torch.load(worker_out / "ddp.pt"), torch.load(worker_out / "fsdp.pt")
    report = json.loads((worker_out / "report.json").read_text())
    # clipping acted (norms above CLIP) and the global norms agree: FSDP's norm covers every rank's shard
    assert max(report["ddp_grad_norms"]) > 0.0045
    assert report["fsdp_grad_norms"] == pytest.approx(report["ddp_grad_norms"], rel=1e-5)
    moved = max(float(v.abs().max()) for k, v in ddp["default"].items() if ".lora_B." in k)  # B starts at 0
    assert moved > 5e-3  # the steps changed the weights far beyond the tolerance
    for part in ("default", "old", "ema"):
        assert _max_diff(ddp[part], fsdp[part]) < DDP_FSDP_ATOL, part
    assert ddp["ema_num_updates"] == fsdp["ema_num_updates"] == 4
    for a, b in zip(ddp["exp_avg_sq"], fsdp["exp_avg_sq"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-12)
    # the old policy was soft-updated away from its start (equal to the trained init) and from "default"
    assert _max_diff(fsdp["old"], fsdp["default"]) > 1e-3


def test_fsdp_resume_from_a_sharded_checkpoint_is_exact(worker_out):
    uninterrupted = torch.load(worker_out / "fsdp.pt")
    resumed = torch.load(worker_out / "fsdp_resumed.pt")
    for part in ("default", "old", "ema"):
        assert _max_diff(uninterrupted[part], resumed[part]) == 0.0, part
    assert resumed["ema_num_updates"] == uninterrupted["ema_num_updates"]
    for a, b in zip(uninterrupted["exp_avg_sq"], resumed["exp_avg_sq"]):
        assert torch.equal(a, b)


def test_sharded_checkpoint_is_one_checksummed_folder_per_step(worker_out):
    from u_nft.checkpoint import verify_checkpoint

    report = json.loads((worker_out / "report.json").read_text())
    path = Path(report["checkpoint"])
    assert path.name == "checkpoint-2" and not list(path.parent.glob(".tmp-*"))
    files = set(report["checkpoint_files"])
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "state.json",
            "lora/pytorch_lora_weights.safetensors", "rng.pt", "scaler.pt"} <= files
    manifest = verify_checkpoint(path)
    assert manifest["sharded"] == "sharded" and "sharded/__1_0.distcp" in manifest["files"]
    assert "train.sharding='fsdp'" in report["ddp_load_error"]


def test_fsdp_exported_lora_loads_in_diffusers_sd3_pipeline(worker_out, tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from u_nft.lora import TRAINABLE, add_lora_adapters, load_lora_state, read_lora_file

    trained = torch.load(worker_out / "fsdp.pt")["default"]
    assert _max_diff(read_lora_file(worker_out / "fsdp_lora"), trained) == 0.0
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.load_lora_weights(worker_out / "fsdp_lora")
    # the same LoRA on an unsharded model, by our own loader: diffusers must compute the same velocity
    torch.manual_seed(0)
    reference = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    add_lora_adapters(reference, rank=4, alpha=8, target_modules=["attn.to_q", "attn.to_k", "attn.to_v",
                                                                  "attn.to_out.0"])
    load_lora_state(reference, TRAINABLE, trained)
    g = torch.Generator().manual_seed(3)
    x, embeds, pooled = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 7, 64, generator=g), torch.randn(1, 64, generator=g)
    t = torch.tensor([600.0])
    with torch.no_grad():
        v_diffusers = pipe.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                       timestep=t, return_dict=False)[0]
        v_ours = reference(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                           return_dict=False)[0]
        pipe.transformer.disable_lora()
        v_base = pipe.transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled,
                                  timestep=t, return_dict=False)[0]
    torch.testing.assert_close(v_diffusers, v_ours, rtol=1e-5, atol=1e-6)
    assert float((v_diffusers - v_base).abs().max()) > 1e-4  # the LoRA is active, not a no-op
    # the checkpoint's lora/ folder (the EMA weights) loads too
    ckpt_lora = Path(json.loads((worker_out / "report.json").read_text())["checkpoint"]) / "lora"
    StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir).load_lora_weights(ckpt_lora)


def test_fsdp_sharded_text_encoder_encodes_as_before(worker_out):
    report = json.loads((worker_out / "report.json").read_text())["text_encoder"]
    assert report["weight_type"] == "DTensor"
    assert any("T5EncoderModel" in line and "2 blocks" in line for line in report["lines"])
    assert report["max_diff"] < 1e-5


def test_make_sharding_names_the_accepted_values():
    from u_nft.sharding import FullyShardedDataParallel, make_sharding

    assert make_sharding("ddp").name == "ddp" and not make_sharding("ddp").shards_parameters
    assert isinstance(make_sharding("fsdp", torch.bfloat16), FullyShardedDataParallel)
    with pytest.raises(ValueError, match=r"train.sharding must be one of \['ddp', 'fsdp'\], got 'zero3'"):
        make_sharding("zero3")
    with pytest.raises(ValueError, match="fsdp_text_encoders"):
        make_sharding("fsdp", None, "some")
    with pytest.raises(ValueError, match="old_policy='merged'.*train.sharding='ddp'"):
        make_sharding("fsdp").resolve_old_policy("merged", torch.device("cpu"))
    use_merged, note = make_sharding("fsdp").resolve_old_policy("auto", torch.device("cuda"))
    assert use_merged is False and "adapter 'old'" in note
    assert make_sharding("ddp").resolve_old_policy("auto", torch.device("cuda")) == (True, None)
    assert make_sharding("ddp").resolve_old_policy("auto", torch.device("cpu")) == (False, None)


def test_repeated_blocks_are_the_transformer_blocks(tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel

    from u_nft.sharding import repeated_blocks

    model = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    assert repeated_blocks(model) == list(model.transformer_blocks)


def _tiny_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("u_nft_configs", REPO / "config" / "u_nft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny()


def test_validate_config_checks_the_sharding_keys():
    from u_nft.config_utils import ConfigError, validate_config

    config = _tiny_config()
    assert config.train.sharding == "ddp"
    config.train.sharding = "zero3"
    with pytest.raises(ConfigError, match=r"config.train.sharding must be one of \['ddp', 'fsdp'\], got 'zero3'"):
        validate_config(config, 1)
    config.train.sharding, config.train.old_policy = "fsdp", "merged"
    with pytest.raises(ConfigError, match="config.train.old_policy='merged'.*config.train.sharding='ddp'"):
        validate_config(config, 1)
    config.train.old_policy, config.train.fsdp_text_encoders = "auto", "t5"
    with pytest.raises(ConfigError, match="config.train.fsdp_text_encoders must be one of"):
        validate_config(config, 1)
    config.train.fsdp_text_encoders = "all"
    validate_config(config, 1)


def test_memory_plan_shape_only_activations_equal_a_real_forward(tiny_sd3_dir):
    """bench/memory_plan.py counts saved activations under FakeTensorMode; on the tiny SD3 (bf16 weights,
    fp32 LoRA, CPU bf16 autocast, batch 2) the bytes equal those a real forward saves."""
    import importlib.util
    import json as json_module

    from diffusers import SD3Transformer2DModel

    from u_nft.models.sd3 import FAMILY

    spec_module = importlib.util.spec_from_file_location("memory_plan", REPO / "bench" / "memory_plan.py")
    plan = importlib.util.module_from_spec(spec_module)
    sys.modules.setdefault("memory_plan", plan)  # dataclasses resolve their module through sys.modules
    spec_module.loader.exec_module(plan)
    config = json_module.loads((Path(tiny_sd3_dir) / "transformer" / "config.json").read_text())
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}

    def conditioning(batch, tokens, dtype):
        return {"prompt_embeds": torch.randn(batch, tokens, 64, dtype=dtype), "pooled": torch.randn(batch, 64, dtype=dtype)}

    spec = plan.ModelSpec("tiny", lambda: SD3Transformer2DModel(**kwargs), {}, lambda: None,
                          tuple(FAMILY.default_lora_targets), 4, 12, conditioning, FAMILY.predict_velocity)
    real = SD3Transformer2DModel(**kwargs)
    plan._add_adapters(real, spec.lora_rank, spec.lora_targets)
    for n, p in real.named_parameters():
        p.data = p.data.to(torch.float32 if "lora_" in n else torch.bfloat16)
    measured = plan.saved_activations(spec, batch=2, resolution=128, fake=False, transformer=real)
    shape_only = plan.saved_activations(spec, batch=2, resolution=128)
    assert measured["total"] > 0 and measured["per block (max)"] > 0
    assert shape_only == measured
