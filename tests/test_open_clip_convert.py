"""HPS v2.1 conversion: an open_clip-layout checkpoint (open_clip key names) -> a transformers CLIP folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reward_maps import build_scorer
from reward_maps.base import RewardMapError
from reward_maps.open_clip_convert import clip_config_from_open_clip, open_clip_model_config

ROOT = Path(__file__).resolve().parents[1]
# open_clip's ViT-H-14 JSON at a small width (same fields; head_width 8 instead of 80).
SMALL_VIT_H = {"embed_dim": 16, "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "head_width": 8, "patch_size": 14},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 3, "layers": 2}}


def open_clip_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under open_clip's VisionTransformer / TextTransformer key names and shapes
    (open_clip transformer.py: conv1, class_embedding, ln_pre, transformer.resblocks.i.{ln_1, attn.in_proj_*,
    attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post, proj; text: token_embedding, positional_embedding,
    ln_final, text_projection, attn_mask; logit_scale)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    v, t, d = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, grid = v["width"], t["width"], v["image_size"] // v["patch_size"]
    sd = {"visual.conv1.weight": r(vw, 3, v["patch_size"], v["patch_size"]), "visual.class_embedding": r(vw),
          "visual.positional_embedding": r(grid * grid + 1, vw), "visual.proj": r(vw, d),
          "token_embedding.weight": r(t["vocab_size"], tw), "positional_embedding": r(t["context_length"], tw),
          "text_projection": r(tw, d), "logit_scale": torch.tensor(4.6052),
          "attn_mask": torch.full((77, 77), float("-inf")).triu(1)}
    for name, width in (("visual.ln_pre", vw), ("visual.ln_post", vw), ("ln_final", tw)):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(width), r(width)
    for prefix, width, layers in (("visual.transformer", vw, v["layers"]), ("transformer", tw, t["layers"])):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}."
            sd.update({b + "attn.in_proj_weight": r(3 * width, width), b + "attn.in_proj_bias": r(3 * width),
                       b + "attn.out_proj.weight": r(width, width), b + "attn.out_proj.bias": r(width),
                       b + "mlp.c_fc.weight": r(4 * width, width), b + "mlp.c_fc.bias": r(4 * width),
                       b + "mlp.c_proj.weight": r(width, 4 * width), b + "mlp.c_proj.bias": r(width)})
            for ln in ("ln_1", "ln_2"):
                sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = 1 + r(width), r(width)
    return sd


def test_vit_h_14_config_is_read_from_open_clip_and_maps_to_transformers():
    cfg = open_clip_model_config("ViT-H-14")
    config = clip_config_from_open_clip(cfg, "ViT-H-14")
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size) == (1280, 32, 16, 5120, 14)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (1024, 24, 16, 4096)
    assert config.projection_dim == 1024 and v.hidden_act == t.hidden_act == "gelu"
    assert clip_config_from_open_clip(cfg, "ViT-H-14-quickgelu").vision_config.hidden_act == "quick_gelu"


def test_converter_turns_open_clip_names_into_a_folder_hps_map_loads(tmp_path):
    sd = open_clip_state_dict(SMALL_VIT_H)
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": sd}, ckpt)
    from reward_maps.open_clip_convert import convert_open_clip_checkpoint

    # The small config stands in for ViT-H-14's JSON; everything else (load, rename, strict load, save) is real.
    out = convert_open_clip_checkpoint(ckpt, tmp_path / "hps", model_config=SMALL_VIT_H)
    scorer = build_scorer("hps_map", model=str(out))
    model = scorer.model
    torch.testing.assert_close(model.visual_projection.weight, sd["visual.proj"].T)
    q, k, vv = sd["visual.transformer.resblocks.1.attn.in_proj_weight"].chunk(3)
    torch.testing.assert_close(model.vision_model.encoder.layers[1].self_attn.v_proj.weight, vv)
    # The image feature equals open_clip's visual forward written out by hand on the open_clip tensors.
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].view(1, 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (32,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(2):
        b = f"visual.transformer.resblocks.{i}."
        h = F.layer_norm(x, (32,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        attn, _ = F.multi_head_attention_forward(
            h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), 32, 4, sd[b + "attn.in_proj_weight"],
            sd[b + "attn.in_proj_bias"], None, None, False, 0.0, sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"],
            need_weights=False)
        x = x + attn.transpose(0, 1)
        h = F.layer_norm(x, (32,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])), sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    expected = F.layer_norm(x[:, 0], (32,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixels)
    feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_script_reports_a_checkpoint_that_is_not_vit_h_14(tmp_path):
    ckpt = tmp_path / "small.pt"
    torch.save({"state_dict": open_clip_state_dict(SMALL_VIT_H)}, ckpt)
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_hps_to_transformers.py"), "--checkpoint", str(ckpt),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "does not match 'ViT-H-14'" in run.stderr
    with pytest.raises(RewardMapError, match="no model config 'ViT-Z-99'"):
        open_clip_model_config("ViT-Z-99")
