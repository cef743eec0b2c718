"""open_clip ViT checkpoint (e.g. HPS v2.1) -> a transformers ``CLIPModel`` folder that ``hps_map`` loads.

HPS v2.1 (tgxs002/HPSv2) is open_clip ``ViT-H-14`` fine-tuned; its file ``HPS_v2.1_compressed.pt`` holds
``{"state_dict": ...}`` with open_clip's key names. The config is read from open_clip's own model JSON
(``open_clip/model_configs/ViT-H-14.json``, shipped in open-clip-torch, read as a file: open_clip itself is
not imported, it needs torchvision), the weights are renamed by
:func:`reward_maps.clip_family.convert_open_clip_state_dict`, loaded strictly, and saved with CLIP's BPE
tokenizer:

    python scripts/convert_hps_to_transformers.py --checkpoint HPS_v2.1_compressed.pt --out models/hps_v2.1

Config mapping (open_clip -> transformers): vision width / layers / patch_size / image_size ->
hidden_size / num_hidden_layers / patch_size / image_size, heads = width // head_width, MLP width =
width * mlp_ratio (4); text width / heads / layers / context_length / vocab_size likewise; embed_dim ->
projection_dim; activation GELU (exact; ``quick_gelu`` only for ``-quickgelu`` configs or
``"quick_gelu": true``); LayerNorm eps 1e-5.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from reward_maps.base import RewardMapError
from reward_maps.clip_family import convert_open_clip_state_dict

__all__ = ["open_clip_model_config", "clip_config_from_open_clip", "load_open_clip_state_dict", "convert_open_clip_checkpoint"]


def open_clip_model_config(name: str) -> dict[str, Any]:
    """open_clip's JSON model config ``name`` (e.g. "ViT-H-14"), read from the installed package's files."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RewardMapError("open_clip model configs need open-clip-torch: pip install --no-deps open-clip-torch")
    path = Path(spec.origin).parent / "model_configs" / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("ViT-*.json"))[:12]
        raise RewardMapError(f"open_clip has no model config {name!r} ({path}); e.g. {available}")
    return json.loads(path.read_text())


def clip_config_from_open_clip(cfg: Mapping[str, Any], name: str = "", eos_token_id: int = 49407):
    """transformers ``CLIPConfig`` equivalent to an open_clip ViT model config (see the module docstring)."""
    from transformers import CLIPConfig

    vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    unsupported = [k for k in ("timm_model_name", "hf_model_name") if vision.get(k) or text.get(k)]
    if unsupported or isinstance(vision.get("layers"), (list, tuple)):
        raise RewardMapError(f"open_clip config {name!r}: only plain ViT towers convert to transformers CLIP ({unsupported})")
    act = "quick_gelu" if (cfg.get("quick_gelu") or name.endswith("-quickgelu")) else "gelu"
    v_width, t_width = int(vision["width"]), int(text["width"])
    head_width = int(vision.get("head_width", 64))
    vision_config = dict(
        hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=int(vision["layers"]), num_attention_heads=v_width // head_width,
        image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]), hidden_act=act,
        layer_norm_eps=1e-5, projection_dim=int(cfg["embed_dim"]),
    )
    text_config = dict(
        hidden_size=t_width, intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=int(text["layers"]), num_attention_heads=int(text["heads"]),
        max_position_embeddings=int(text.get("context_length", 77)), vocab_size=int(text.get("vocab_size", 49408)),
        hidden_act=act, layer_norm_eps=1e-5, projection_dim=int(cfg["embed_dim"]),
        eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1, pad_token_id=eos_token_id,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=int(cfg["embed_dim"]))


def load_open_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip checkpoint (``{"state_dict": ...}`` or bare), tensors only."""
    path = Path(path)
    if not path.is_file():
        raise RewardMapError(f"open_clip checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RewardMapError(f"{str(path)!r} holds no open_clip state dict")
    return dict(sd)


def convert_open_clip_checkpoint(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor], out_dir: str | os.PathLike,
                                 model_name: str = "ViT-H-14", model_config: Mapping[str, Any] | None = None) -> Path:
    """Convert and ``save_pretrained`` model + CLIP tokenizer to ``out_dir``; returns it (``hps_map`` ``model``)."""
    from transformers import CLIPModel, CLIPTokenizer

    from u_nft.tiny_models import write_clip_tokenizer

    state_dict = checkpoint if isinstance(checkpoint, Mapping) else load_open_clip_state_dict(checkpoint)
    out_dir = Path(out_dir)
    write_clip_tokenizer(out_dir)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    config = clip_config_from_open_clip(model_config or open_clip_model_config(model_name), model_name,
                                        eos_token_id=int(tokenizer.eos_token_id))
    converted = convert_open_clip_state_dict(state_dict)
    with torch.device("meta"):  # check names and shapes before allocating the real model
        own = CLIPModel(config).state_dict()
    missing = sorted(set(own) - set(converted))
    extra = sorted(set(converted) - set(own))
    wrong = [k for k in converted if k in own and converted[k].shape != own[k].shape]
    # transformers registers position_ids as a buffer in some versions; it is not a weight.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or extra or wrong:
        raise RewardMapError(f"open_clip checkpoint does not match {model_name!r}: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}, shape mismatch {wrong[:5]}")
    model = CLIPModel(config).eval()
    own = model.state_dict()
    model.load_state_dict({**{k: own[k] for k in own if k not in converted}, **converted}, strict=True)
    model.save_pretrained(out_dir)
    return out_dir
