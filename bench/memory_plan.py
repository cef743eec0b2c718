"""Per-rank GPU memory of LoRA RL training for SD3.5-M / SD3.5-L / FLUX.1-dev / Qwen-Image, DDP vs FSDP.

    python bench/memory_plan.py [--world 8] [--batch 9] [--resolutions 512 1024] [--gpu-gib 80] [--json OUT]

Parameters are counted on the ``meta`` device from each model's published configuration (the hub
config.json values are written out below, with their source). Saved activations are the bytes autograd
keeps for the backward pass of one training forward (the trained velocity v_theta; v_old and v_ref run
without grad), measured by running the real diffusers transformer, with both LoRA adapters of
``u_nft.lora`` on the family's default targets, under ``FakeTensorMode``: every op runs its shape
function only, so batch 9 at 1024 px costs no compute and no memory, and the bytes are those the real
kernels would save (checked against a real CPU forward in tests/test_fsdp.py). Each storage is counted
once; parameter storages are not activations. Frozen weights bf16, LoRA fp32, CPU bf16 autocast
(CUDA autocast's op lists differ slightly: the measured GPU point is bench/gpu_check.sh's).

Per rank (world size W, FSDP shards over all W ranks):
  weights      transformer bf16 (FSDP: / W, plus 2 all-gathered blocks: the running one and the prefetched one)
  text         frozen encoders bf16 (FSDP "auto": the >= 1 B ones / W); VAE fp32 (never sharded)
  LoRA state   6 fp32 copies of one adapter: "default", "old", its gradient, AdamW m and v, EMA (FSDP: / W)
  old policy   train.old_policy="merged" (DDP only): the merged target linears, bf16, sharing everything else;
               "adapter": nothing (the "old" LoRA is counted in the LoRA state)
  activations  saved for backward at --batch, per resolution; "ckpt" = train.gradient_checkpointing
               (block inputs + the outside-block saves + the largest block, recomputed one at a time)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

GIB = 2**30

# stabilityai/stable-diffusion-3.5-large transformer/config.json
SD35L_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                         attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                         caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                         qk_norm="rms_norm", dual_attention_layers=())
# black-forest-labs/FLUX.1-dev transformer/config.json (diffusers' FluxTransformer2DModel defaults + guidance)
FLUX1_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                             guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# Qwen/Qwen-Image transformer/config.json (diffusers' QwenImageTransformer2DModel defaults)
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))
# Qwen/Qwen-Image text_encoder/config.json = Qwen/Qwen2.5-VL-7B-Instruct
QWEN25_VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000,
                         rope_theta=1000000.0, rms_norm_eps=1e-6)
QWEN25_VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
SD3_TEXT_TOKENS = 77 + 128  # CLIP-L/bigG 77 + T5 max_sequence_length 128 (config/base.py, upstream NFT)


@dataclass
class ModelSpec:
    """One model: how to build its parts on the current default device, and how the trainer calls it."""

    name: str
    transformer: Callable[[], nn.Module]
    text_encoders: dict[str, Callable[[], nn.Module]]
    vae: Callable[[], nn.Module]
    lora_targets: tuple[str, ...]
    lora_rank: int
    text_tokens: int
    conditioning: Callable[[int, int, torch.dtype], dict]  # (batch, text tokens, dtype) -> cond
    velocity: Callable                                        # (model, x_t, sigma, cond) -> v
    latent_channels: int = 16
    notes: list[str] = field(default_factory=list)


def _sd3_text_encoders() -> dict:
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from u_nft.sd35m_shaped import CLIP_BIGG_TEXT, CLIP_L_TEXT, T5_XXL_ENCODER, _clip_text_config
    from u_nft.tiny_sd3 import t5_encoder_config

    return {
        "CLIP-L": lambda: CLIPTextModelWithProjection(_clip_text_config(49408, 49407, CLIP_L_TEXT, 12)),
        "OpenCLIP bigG": lambda: CLIPTextModelWithProjection(_clip_text_config(49408, 49407, CLIP_BIGG_TEXT, 32)),
        "T5-XXL": lambda: T5EncoderModel(t5_encoder_config(32128, num_layers=24, **T5_XXL_ENCODER)),
    }


def _sd3_vae():
    from diffusers import AutoencoderKL

    from u_nft.sd35m_shaped import SD35M_VAE

    return AutoencoderKL(**SD35M_VAE)


def _sd3_spec(name: str, transformer_kwargs: dict) -> ModelSpec:
    from diffusers import SD3Transformer2DModel

    from u_nft.models.sd3 import FAMILY

    def conditioning(batch, tokens, dtype):
        return {"prompt_embeds": torch.randn(batch, tokens, 4096, dtype=dtype), "pooled": torch.randn(batch, 2048, dtype=dtype)}

    return ModelSpec(name, lambda: SD3Transformer2DModel(**transformer_kwargs), _sd3_text_encoders(), _sd3_vae,
                     tuple(FAMILY.default_lora_targets), 32, SD3_TEXT_TOKENS, conditioning, FAMILY.predict_velocity)


def model_specs(flux_text_tokens: int = 128, qwen_text_tokens: int = 128) -> dict[str, ModelSpec]:
    from diffusers import AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel

    from u_nft.models import flux as flux_family
    from u_nft.models import qwen_image as qwen_family
    from u_nft.sd35m_shaped import SD35M_DUAL_ATTENTION_LAYERS, SD35M_NUM_LAYERS, SD35M_TRANSFORMER

    specs = {
        "SD3.5-M": _sd3_spec("SD3.5-M", dict(SD35M_TRANSFORMER, num_layers=SD35M_NUM_LAYERS,
                                              dual_attention_layers=SD35M_DUAL_ATTENTION_LAYERS)),
        "SD3.5-L": _sd3_spec("SD3.5-L", SD35L_TRANSFORMER),
    }
    sd3_text = _sd3_text_encoders()

    def flux_cond(batch, tokens, dtype):
        return {"prompt_embeds": torch.randn(batch, tokens, 4096, dtype=dtype), "pooled": torch.randn(batch, 768, dtype=dtype)}

    specs["FLUX.1-dev"] = ModelSpec(
        "FLUX.1-dev", lambda: FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER),
        {"CLIP-L": sd3_text["CLIP-L"], "T5-XXL": sd3_text["T5-XXL"]}, _sd3_vae,
        tuple(flux_family.DEFAULT_LORA_TARGETS), 64, flux_text_tokens, flux_cond,
        lambda model, x, sigma, cond: flux_family.predict_velocity(model, x, sigma, cond, guidance=3.5))

    def qwen_text_encoder():
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION, tie_word_embeddings=False))

    def qwen_cond(batch, tokens, dtype):
        return {"prompt_embeds": torch.randn(batch, tokens, 3584, dtype=dtype)}

    def qwen_velocity(model, x, sigma, cond):
        # u_nft.models.qwen_image.predict_velocity with every prompt token valid (mask None, as the pipeline
        # passes when nothing is padded): its padding trim reads the mask's values, which shape-only tensors lack
        b, _, h, w = x.shape
        embeds = cond["prompt_embeds"]
        kwargs = {"txt_seq_lens": [embeds.shape[1]] * b} if qwen_family.passes_text_lengths() else {}
        tokens = model(hidden_states=qwen_family.pack_latents(x.to(embeds.dtype)), timestep=sigma.to(embeds.dtype),
                       encoder_hidden_states=embeds, encoder_hidden_states_mask=None,
                       img_shapes=qwen_family.image_shapes(b, h, w), return_dict=False, **kwargs)[0]
        return qwen_family.unpack_latents(tokens, h, w).float()

    specs["Qwen-Image"] = ModelSpec(
        "Qwen-Image", lambda: QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER), {"Qwen2.5-VL-7B": qwen_text_encoder},
        lambda: AutoencoderKLQwenImage(), tuple(qwen_family.DEFAULT_LORA_TARGETS), 64, qwen_text_tokens, qwen_cond,
        qwen_velocity)
    return specs


# ---- counting ----------------------------------------------------------------------------------------

def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _add_adapters(transformer: nn.Module, rank: int, targets: tuple[str, ...]) -> None:
    """Adapters "default" (trainable) and "old", as u_nft.lora.add_lora_adapters (which also copies values)."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    for name in ("default", "old"):
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights="gaussian",
                                           target_modules=list(targets)), adapter_name=name)
    transformer.set_adapter("default")
    for n, p in transformer.named_parameters():
        p.requires_grad_(".default." in n)


def parameter_counts(spec: ModelSpec) -> dict:
    """Parameter counts (meta device): transformer, its blocks, LoRA (one adapter), merged targets, encoders, VAE."""
    from u_nft.sharding import repeated_blocks

    with torch.device("meta"):
        transformer = spec.transformer()
        blocks = repeated_blocks(transformer)
        counts = {"transformer": _count(transformer), "largest block": max(_count(b) for b in blocks),
                  "blocks": len(blocks), "transformer buffers": sum(b.numel() for b in transformer.buffers())}
        lora = copy.deepcopy(transformer)
        _add_adapters(lora, spec.lora_rank, spec.lora_targets)
        counts["LoRA (one adapter)"] = sum(p.numel() for n, p in lora.named_parameters() if ".default." in n)
        counts["LoRA target linears"] = sum(m.base_layer.weight.numel() for m in lora.modules()
                                            if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
        counts["text encoders"] = {name: _count(build()) for name, build in spec.text_encoders.items()}
        counts["VAE"] = _count(spec.vae())
    return counts


def _fake_from_meta(model: nn.Module) -> None:
    """Replace every parameter / buffer by a CPU FakeTensor of the same shape, dtype and requires_grad."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"),
                                                        requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device="cpu")
        for name, value in list(vars(module).items()):  # plain tensor attributes (Qwen-Image's rotary tables)
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                setattr(module, name, torch.zeros(value.shape, dtype=value.dtype, device="cpu"))


def saved_activations(spec: ModelSpec, batch: int, resolution: int, base_dtype=torch.bfloat16,
                      autocast_dtype: torch.dtype | None = torch.bfloat16, fake: bool = True,
                      transformer: nn.Module | None = None) -> dict:
    """Bytes autograd saves in one v_theta forward: {"total", "checkpointed", "per block" (max), "outside"}.

    fake=True: shape-only (FakeTensorMode) on a meta-built model; fake=False: a real CPU forward of
    ``transformer`` (for checking the method on small models).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from u_nft.sharding import repeated_blocks

    if transformer is None:
        with torch.device("meta"):
            transformer = spec.transformer()
        _add_adapters(transformer, spec.lora_rank, spec.lora_targets)
        for n, p in transformer.named_parameters():
            p.data = p.data.to(torch.float32 if "lora_" in n else base_dtype)
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode:
        if fake:
            _fake_from_meta(transformer)
        key = (lambda t: t.untyped_storage()._cdata) if fake else (lambda t: t.untyped_storage().data_ptr())
        params = {key(p) for p in transformer.parameters()}
        saved: dict[str, dict] = {}
        inputs: dict = {}
        where = ["outside"]

        def pack(t):
            k = key(t)
            if k not in params:
                saved.setdefault(where[-1], {})[k] = t.untyped_storage().nbytes()
            return t

        def enter(index):
            def hook(module, args, kwargs):
                where.append(f"block {index}")
                for value in list(args) + list(kwargs.values()):
                    for t in (value if isinstance(value, (tuple, list)) else (value,)):
                        if isinstance(t, torch.Tensor) and key(t) not in params:
                            inputs[key(t)] = t.untyped_storage().nbytes()
            return hook

        def leave(module, args, kwargs, output):
            where.pop()

        handles = []
        for i, block in enumerate(repeated_blocks(transformer)):
            handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
            handles.append(block.register_forward_hook(leave, with_kwargs=True))
        latent = resolution // 8
        x = torch.randn(batch, spec.latent_channels, latent, latent, dtype=torch.float32)
        sigma = torch.rand(batch)
        cond = spec.conditioning(batch, spec.text_tokens, base_dtype)
        ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            spec.velocity(transformer, x, sigma, cond)
        for h in handles:
            h.remove()
    per_block = {name: sum(v.values()) for name, v in saved.items() if name != "outside"}
    outside = sum(saved.get("outside", {}).values())
    largest = max(per_block.values()) if per_block else 0
    return {"total": outside + sum(per_block.values()), "outside": outside, "per block (max)": largest,
            "checkpointed": outside + sum(inputs.values()) + largest}


# ---- the plan ----------------------------------------------------------------------------------------

def plan(spec: ModelSpec, counts: dict, activations: dict, world: int) -> dict:
    """Per-rank GiB: ``components`` [(item, DDP, FSDP)] and ``rows`` (DDP with the old policy merged / as the
    adapter, FSDP) with the total at each resolution, with and without gradient checkpointing."""
    bf16, fp32 = 2, 4
    transformer = counts["transformer"] * bf16
    buffers = counts["transformer buffers"] * bf16  # e.g. SD3's positional table: FSDP shards parameters only
    encoders = counts["text encoders"]
    text_ddp = sum(encoders.values()) * bf16
    text_fsdp = sum(n * bf16 / (world if n >= 1_000_000_000 else 1) for n in encoders.values())
    vae = counts["VAE"] * fp32
    lora_state = 6 * counts["LoRA (one adapter)"] * fp32
    merged = counts["LoRA target linears"] * bf16
    gathered_blocks = 2 * counts["largest block"] * bf16
    fixed = {
        "DDP, old policy merged": transformer + buffers + text_ddp + vae + lora_state + merged,
        "DDP, old policy adapter": transformer + buffers + text_ddp + vae + lora_state,
        "FSDP (adapter)": transformer / world + buffers + gathered_blocks + text_fsdp + vae + lora_state / world,
    }
    components = [  # (item, DDP GiB, FSDP GiB)
        ("transformer weights (bf16)", (transformer + buffers) / GIB, (transformer / world + buffers) / GIB),
        ("FSDP: 2 all-gathered blocks (bf16)", 0.0, gathered_blocks / GIB),
        ("text encoders (bf16)", text_ddp / GIB, text_fsdp / GIB),
        ("VAE (fp32)", vae / GIB, vae / GIB),
        ("LoRA default + old + grad + Adam m, v + EMA (fp32)", lora_state / GIB, lora_state / world / GIB),
        ("old policy: merged copy (DDP) / adapter", merged / GIB, 0.0),
    ]
    rows = []
    for setup, base in fixed.items():
        row = {"setup": setup, "weights + LoRA state + old policy": base / GIB}
        for res, act in activations.items():
            row[f"{res} px"] = (base + act["total"]) / GIB
            row[f"{res} px ckpt"] = (base + act["checkpointed"]) / GIB
        rows.append(row)
    return {"components": components, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8, help="ranks (GPUs) FSDP shards over")
    parser.add_argument("--batch", type=int, default=9, help="training micro-batch (images per rank)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--gpu-gib", type=float, default=80 * 1e9 / GIB, help="usable memory per GPU (80 GB = 74.5 GiB)")
    parser.add_argument("--models", nargs="+", default=None, help="subset of SD3.5-M SD3.5-L FLUX.1-dev Qwen-Image")
    parser.add_argument("--json", default=None, help="also write every number here")
    args = parser.parse_args()
    specs = model_specs()
    out = {}
    for name, spec in specs.items():
        if args.models and name not in args.models:
            continue
        counts = parameter_counts(spec)
        acts = {res: saved_activations(spec, args.batch, res) for res in args.resolutions}
        result = plan(spec, counts, acts, args.world)
        rows = result["rows"]
        out[name] = {"counts": counts, "activations_bytes": acts, **result}
        enc = ", ".join(f"{k} {v / 1e9:.3f} B" for k, v in counts["text encoders"].items())
        print(f"\n### {name}\ntransformer {counts['transformer'] / 1e9:.3f} B + buffers "
              f"{counts['transformer buffers'] / 1e9:.3f} B ({counts['blocks']} blocks, largest "
              f"{counts['largest block'] / 1e9:.3f} B); LoRA r{spec.lora_rank} {counts['LoRA (one adapter)'] / 1e6:.1f} M "
              f"on {counts['LoRA target linears'] / 1e9:.3f} B of target weights; {enc}; VAE {counts['VAE'] / 1e6:.1f} M")
        for res, act in acts.items():
            print(f"saved activations, batch {args.batch}, {res} px: {act['total'] / GIB:.1f} GiB "
                  f"(checkpointed {act['checkpointed'] / GIB:.1f} GiB; largest block {act['per block (max)'] / GIB:.2f} GiB)")
        print("| per rank, GiB | DDP | FSDP |\n|---|---:|---:|")
        for item, ddp, fsdp in result["components"]:
            print(f"| {item} | {ddp:.2f} | {fsdp:.2f} |")
        for res, act in acts.items():
            print(f"| saved activations, {res} px (ckpt) | {act['total'] / GIB:.1f} ({act['checkpointed'] / GIB:.1f}) "
                  f"| {act['total'] / GIB:.1f} ({act['checkpointed'] / GIB:.1f}) |")
        cols = [c for c in rows[0] if c != "setup"]
        print("\n| setup | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
        for row in rows:
            cells = [f"**{row[c]:.1f}**" if row[c] > args.gpu_gib else f"{row[c]:.1f}" for c in cols]
            print(f"| {row['setup']} | " + " | ".join(cells) + " |")
    print(f"\nGiB per rank, {args.world} ranks, batch {args.batch}; bold: over {args.gpu_gib:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
    main()
