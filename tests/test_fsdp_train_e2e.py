"""scripts/train_u_nft_sd3.py with train.sharding="fsdp" on 2 gloo CPU ranks, against "ddp" (tiny SD3, real script).

Four torchrun launches of the tiny config shrunk as tests/test_train_e2e.py does (16 images per epoch, 4 solver
steps, one optimizer step per epoch, 2 epochs): DDP, FSDP, and FSDP killed after epoch 1 (--stop_after_epochs)
then resumed from its sharded checkpoint. Evaluation runs on 3 test prompts with test batch 1, so the ranks
need different numbers of sampling batches (2 and 1): FSDP's lockstep evaluation must keep them together.
"""
import json

import pytest
import torch

from test_train_e2e import assert_identical, checkpoint_tensors, run_script, small_run_args

# four 2-rank launches: 90 s wall on a 2-core machine (215 s when other jobs share it)
pytestmark = pytest.mark.slow

# DDP all-reduces, FSDP reduce-scatters: fp32 sums in another order, and the next epoch's rollouts come from
# an old policy that differs by that rounding. Measured after 2 epochs: max |difference| 1.6e-6 (trained and
# old LoRA) and 1.2e-6 (the EMA export), against LoRA B weights that start at 0 and reach 2e-2.
DDP_FSDP_ATOL = 1e-5
FSDP = ("--config.train.sharding=fsdp", "--config.train.fsdp_text_encoders=all")
SMALL_EVAL = ("--config.dataset.max_test_prompts=3", "--config.sample.test_batch_size=1", "--config.dist_timeout_s=300")


def _whole_sharded_state(ckpt) -> dict:
    """A checkpoint's sharded/ folder as one unsharded state dict (torch.distributed.checkpoint's converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = ckpt.path.parent / f"{ckpt.path.name}-whole.pt"
    dcp_to_torch_save(ckpt.sharded, target)
    try:
        return torch.load(target, weights_only=False)
    finally:
        target.unlink()


def _args(logdir, tiny_dir, name, *extra):
    return small_run_args(logdir, tiny_dir, name, *SMALL_EVAL, *extra, batch=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sd3_dir):
    logdir = tmp_path_factory.mktemp("fsdp_runs")
    outputs = {
        "ddp": run_script(_args(logdir, tiny_sd3_dir, "ddp"), nproc=2).stdout,
        "fsdp": run_script(_args(logdir, tiny_sd3_dir, "fsdp", *FSDP), nproc=2).stdout,
        "killed": run_script(_args(logdir, tiny_sd3_dir, "resumed", *FSDP, "--stop_after_epochs=1"), nproc=2).stdout,
    }
    outputs["resumed"] = run_script(_args(logdir, tiny_sd3_dir, "resumed", *FSDP,
                                          f"--config.resume_from={logdir / 'resumed'}"), nproc=2).stdout
    return logdir, outputs


def test_fsdp_run_shards_the_transformer_and_text_encoders(runs):
    _, out = runs
    assert "fsdp: SD3Transformer2DModel sharded as 2 blocks + root over 2 ranks" in out["fsdp"]
    assert out["fsdp"].count("fsdp: text encoder") == 3  # CLIP-L, CLIP-G and T5 roles, fsdp_text_encoders=all
    assert "fsdp:" not in out["ddp"]
    assert "world_size=2" in out["fsdp"]


def test_fsdp_run_matches_the_ddp_run(runs):
    logdir, _ = runs
    ddp, fsdp = checkpoint_tensors(logdir / "ddp", 2), checkpoint_tensors(logdir / "fsdp", 2)
    assert ddp.state == fsdp.state
    from u_nft.lora import read_lora_file

    # the diffusers LoRA (EMA weights) of both runs
    a, b = read_lora_file(ddp.path / "lora"), read_lora_file(fsdp.path / "lora")
    assert sorted(a) == sorted(b)
    moved = max(float(v.abs().max()) for k, v in a.items() if ".lora_B." in k)
    assert moved > 1e-4
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < DDP_FSDP_ATOL
    # the trained and old LoRA: DDP's torch.save files against FSDP's sharded state read back whole
    whole = _whole_sharded_state(fsdp)
    for name in ("lora_default", "lora_old"):
        assert sorted(ddp.tensors[name]) == sorted(whole[name])
        assert max(float((v - whole[name][k]).abs().max()) for k, v in ddp.tensors[name].items()) < DDP_FSDP_ATOL
    # and the per-epoch training metrics
    from u_nft.run_logging import read_metrics

    def losses(run):
        return [r["train/policy_loss"] for r in read_metrics(logdir / run) if "train/policy_loss" in r]

    assert losses("fsdp") == pytest.approx(losses("ddp"), rel=1e-4)


def test_fsdp_killed_and_resumed_run_matches_uninterrupted_run(runs):
    logdir, out = runs
    assert "resumed from" in out["resumed"]
    full, resumed = checkpoint_tensors(logdir / "fsdp", 2), checkpoint_tensors(logdir / "resumed", 2)
    assert full.state == resumed.state and resumed.sharded is not None
    assert_identical(full.tensors, resumed.tensors, "tensors")  # scaler
    # the sharded state, read back whole by torch.distributed.checkpoint, bit for bit
    states = [_whole_sharded_state(ckpt) for ckpt in (full, resumed)]
    assert sorted(states[0]) == ["ema", "lora_default", "lora_old", "optimizer"]
    assert_identical(states[0], states[1], "sharded")
    for name in ("lora", "rng.pt"):
        assert (resumed.path / name).exists()


def test_fsdp_run_evaluates_every_test_prompt_once(runs):
    logdir, _ = runs
    from u_nft.run_logging import read_metrics

    evals = [r for r in read_metrics(logdir / "fsdp") if "eval/region_color_map/mean" in r]
    ddp_evals = [r for r in read_metrics(logdir / "ddp") if "eval/region_color_map/mean" in r]
    assert len(evals) == len(ddp_evals) == 2  # at start and after epoch 2
    assert evals[0]["eval/region_color_map/mean"] == pytest.approx(ddp_evals[0]["eval/region_color_map/mean"],
                                                                   abs=1e-5)
    config = json.loads((logdir / "fsdp" / "checkpoints" / "checkpoint-2" / "config.json").read_text())
    assert config["train"]["sharding"] == "fsdp"
