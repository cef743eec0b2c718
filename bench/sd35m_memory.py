"""Memory arithmetic of the full SD3.5-Medium on one GPU, from counted parameters and measured activations.

    python bench/sd35m_memory.py --pipeline DIR_OF_THE_SD35M_SHAPED_BUILD [--batch 9]

Parameters: every component built on the ``meta`` device with SD3.5-M's full depth (24 transformer
blocks, the first 13 with dual attention; CLIP-L 12 layers; OpenCLIP bigG 32 layers; T5-XXL 24 blocks with
its 32,128-piece vocabulary), and the trainer's LoRA (u_nft.lora.add_lora_adapters, r 32, upstream's
targets) counted on it. Activations: bytes autograd saves for the backward pass, measured (saved-tensor
hooks, each storage counted once) on the SD3.5-M-shaped build (u_nft/sd35m_shaped.py) at batch 1,
512 px, 205 text tokens, per dual and per plain block, then scaled to ``--batch`` and 24 blocks.
"""
import argparse
import copy

import torch

GIB = 2**30


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def full_model_counts() -> dict:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from u_nft.lora import add_lora_adapters
    from u_nft.sd35m_shaped import (CLIP_BIGG_TEXT, CLIP_L_TEXT, SD35M_DUAL_ATTENTION_LAYERS, SD35M_NUM_LAYERS,
                                    SD35M_TRANSFORMER, SD35M_VAE, T5_XXL_ENCODER, _clip_text_config)
    from u_nft.tiny_sd3 import t5_encoder_config

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(num_layers=SD35M_NUM_LAYERS, dual_attention_layers=SD35M_DUAL_ATTENTION_LAYERS,
                                            **SD35M_TRANSFORMER)
        counts = {
            "transformer": count(transformer),
            "pos_embed (in transformer)": transformer.pos_embed.pos_embed.numel(),
            "CLIP-L text": count(CLIPTextModelWithProjection(_clip_text_config(49408, 49407, CLIP_L_TEXT, 12))),
            "OpenCLIP bigG text": count(CLIPTextModelWithProjection(_clip_text_config(49408, 49407, CLIP_BIGG_TEXT, 32))),
            "T5-XXL encoder": count(T5EncoderModel(t5_encoder_config(32128, num_layers=24, **T5_XXL_ENCODER))),
            "VAE": count(AutoencoderKL(**SD35M_VAE)),
        }
        targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                   "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
        lora = copy.deepcopy(transformer)
        add_lora_adapters(lora, rank=32, alpha=64, target_modules=targets)
        counts["LoRA r32 (one adapter)"] = sum(p.numel() for n, p in lora.named_parameters()
                                               if "lora_" in n and ".default." in n)
    return counts


def saved_bytes_per_block(pipeline_dir: str) -> dict:
    """Autograd-saved bytes per transformer block (fp32, batch 1, 512 px, 205 tokens), with LoRA r 32."""
    from u_nft.lora import add_lora_adapters
    from u_nft.tiny_sd3 import load_sd3_pipeline

    transformer = load_sd3_pipeline(pipeline_dir).transformer
    add_lora_adapters(transformer, rank=32, alpha=64, target_modules=[
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"])
    transformer.requires_grad_(False)
    for name, p in transformer.named_parameters():
        if "lora_" in name and ".default." in name:
            p.requires_grad_(True)
    blocks = transformer.transformer_blocks
    result = {}
    hidden = torch.randn(1, 1024, 1536)
    context = torch.randn(1, 205, 1536)
    temb = torch.randn(1, 1536)
    for index, name in ((0, "dual block"), (len(blocks) - 1, "plain last block")):
        seen: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            blocks[index](hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        result[name] = sum(seen.values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="an SD3.5-M-shaped build (u_nft/sd35m_shaped.py)")
    parser.add_argument("--batch", type=int, default=9, help="training micro-batch (images)")
    args = parser.parse_args()
    counts = full_model_counts()
    print("| component | parameters | bf16 GiB |\n|---|---:|---:|")
    for name, n in counts.items():
        print(f"| {name} | {n / 1e9:.3f} B | {2 * n / GIB:.2f} |")
    saved = saved_bytes_per_block(args.pipeline)
    for name, b in saved.items():
        print(f"saved activations, {name}, fp32, batch 1: {b / GIB:.3f} GiB")
    per_image = 13 * saved["dual block"] + 11 * saved["plain last block"]
    print(f"saved activations, 24 blocks (13 dual), batch {args.batch}, fp32: {args.batch * per_image / GIB:.1f} GiB; "
          f"bf16/fp16 autocast (about half): {args.batch * per_image / 2 / GIB:.1f} GiB")


if __name__ == "__main__":
    main()
