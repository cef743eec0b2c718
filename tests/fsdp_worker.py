"""Run by tests/test_fsdp.py under torchrun (2 gloo CPU ranks): the same LoRA training steps under
train.sharding "ddp" and "fsdp" (u_nft.sharding), a sharded checkpoint save / load / continue, and the
LoRA export. Writes what the test asserts on to OUT_DIR (argv[2]); the tiny SD3 pipeline is argv[1].

Each optimizer step: two micro-batches (this rank's inputs seeded by (step, micro, rank)), the three
velocity fields of a DiffusionNFT step on one model (v_old: adapter "old", v_ref: adapters off, both no-grad;
v_theta: adapter "default" with grad), loss = mean((v_theta - (v_old + target)) ** 2) + 0.1 mean((v_theta - v_ref) ** 2),
gradient accumulation, strategy.reduce_gradients, clip_grad_norm, AdamW, EMA, and every second step the
old-policy soft update (decay 0.5).
"""
import json
import sys
from pathlib import Path

import torch

from u_nft import distributed as dist
from u_nft.checkpoint import TrainState, load_checkpoint
from u_nft.ema import EMA
from u_nft.lora import (OLD, TRAINABLE, adapters_disabled, add_lora_adapters, soft_update_old, trainable_parameters,
                        use_adapter)
from u_nft.sharding import TrainedLoRA, make_sharding

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
STEPS = 4          # optimizer steps of the DDP / FSDP comparison and of the uninterrupted FSDP run
SAVE_AFTER = 2     # the resumed run: checkpoint after this many steps, reload in fresh objects, continue
MICRO = 2
CLIP = 0.0045     # below most steps' gradient norm, so clipping acts


def build(tiny_dir: str, sharding: str):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)  # identical LoRA initialisation on every rank, as the train script
    transformer = SD3Transformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    add_lora_adapters(transformer, rank=4, alpha=8, target_modules=TARGETS)
    strategy = make_sharding(sharding)
    strategy.prepare(transformer)
    params = trainable_parameters(transformer)
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    trained = TrainedLoRA(transformer, optimizer, strategy.grad_scaler(False, "cpu"), EMA(params), params)
    return strategy, trained


def velocity(transformer, inputs):
    x, t, embeds, pooled = inputs
    return transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t * 1000,
                       return_dict=False)[0]


def micro_inputs(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + dist.rank())
    return (torch.randn(2, 16, 16, 16, generator=g), torch.rand(2, generator=g),
            torch.randn(2, 7, 64, generator=g), torch.randn(2, 64, generator=g),
            torch.randn(2, 16, 16, 16, generator=g))


def train_steps(strategy, trained: TrainedLoRA, start: int, stop: int) -> list[float]:
    norms = []
    model = trained.transformer
    for step in range(start, stop):
        for micro in range(MICRO):
            x, t, embeds, pooled, target = micro_inputs(step, micro)
            inputs = (x, t, embeds, pooled)
            with torch.no_grad():
                with use_adapter(model, OLD):
                    v_old = velocity(model, inputs)
                with adapters_disabled(model):
                    v_ref = velocity(model, inputs)
            v_theta = velocity(model, inputs)
            loss = (v_theta - (v_old + target)).square().mean() + 0.1 * (v_theta - v_ref).square().mean()
            (loss / MICRO).backward()
        strategy.reduce_gradients(trained.params)
        norms.append(float(strategy.clip_grad_norm(trained.params, CLIP)))
        trained.optimizer.step()
        trained.optimizer.zero_grad(set_to_none=True)
        trained.ema.step(trained.params)
        if step % 2 == 1:
            soft_update_old(model, 0.5)
    return norms


def full_states(strategy, trained: TrainedLoRA) -> dict:
    out = {"default": strategy.full_lora_state(trained.transformer, TRAINABLE),
           "old": strategy.full_lora_state(trained.transformer, OLD)}
    ema_params = dict(zip(out["default"], trained.ema.shadow))
    out["ema"] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).cpu().clone() for k, v in ema_params.items()}
    out["ema_num_updates"] = trained.ema.num_updates
    exp_avg = [trained.optimizer.state[p]["exp_avg_sq"] for p in trained.params]
    out["exp_avg_sq"] = [(v.full_tensor() if hasattr(v, "full_tensor") else v).cpu().clone() for v in exp_avg]
    return out


def sharded_text_encoder_check(tiny_dir: str) -> dict:
    """Shard the tiny T5 encoder with fsdp_text_encoders="all" and compare its output to the unsharded one."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(tiny_dir, subfolder="text_encoder_3").eval()
    ids = torch.randint(2, 100, (2, 9), generator=torch.Generator().manual_seed(dist.rank()))
    with torch.no_grad():
        before = encoder(ids).last_hidden_state
    transformer = SD3Transformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    lines = make_sharding("fsdp", None, "all").prepare(transformer, [encoder])
    with torch.no_grad():
        after = encoder(ids).last_hidden_state
    return {"lines": lines, "max_diff": float((after - before).abs().max()),
            "weight_type": type(encoder.encoder.block[0].layer[0].SelfAttention.q.weight).__name__}


def main(tiny_dir: str, out_dir: str) -> None:
    dist.init_distributed()
    out = Path(out_dir)
    report = {"world_size": dist.world_size()}
    for sharding in ("ddp", "fsdp"):
        strategy, trained = build(tiny_dir, sharding)
        report[f"{sharding}_grad_norms"] = train_steps(strategy, trained, 0, STEPS)
        report[f"{sharding}_param_type"] = type(trained.params[0]).__name__
        states = full_states(strategy, trained)
        if dist.is_main():
            torch.save(states, out / f"{sharding}.pt")
        if sharding == "fsdp":  # also export the trained LoRA (not the EMA) the way the loop does
            strategy.export_lora(trained.transformer, TRAINABLE, out / "fsdp_lora")

    # Kill-and-resume under FSDP: save after SAVE_AFTER steps, rebuild everything, load, continue to STEPS.
    strategy, trained = build(tiny_dir, "fsdp")
    train_steps(strategy, trained, 0, SAVE_AFTER)
    path = strategy.save(out / "run", TrainState(epoch=1, global_step=SAVE_AFTER), trained, config={"seed": 0})
    del strategy, trained
    strategy, trained = build(tiny_dir, "fsdp")
    ckpt = load_checkpoint(path)
    strategy.load(ckpt, trained)
    train_steps(strategy, trained, SAVE_AFTER, STEPS)
    resumed = full_states(strategy, trained)
    report["checkpoint"] = str(path)
    report["checkpoint_files"] = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    # The refused cross-strategy resume
    try:
        make_sharding("ddp").load(ckpt, trained)
        report["ddp_load_error"] = None
    except ValueError as err:
        report["ddp_load_error"] = str(err)
    report["text_encoder"] = sharded_text_encoder_check(tiny_dir)
    if dist.is_main():
        torch.save(resumed, out / "fsdp_resumed.pt")
        (out / "report.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
