"""GenEval's mmdet Mask2Former -> transformers converter, proven on mmdet's own parameter table.

tests/fixtures/mmdet_mask2former_swin-s_coco_shapes.json is the key -> shape table of mmdet 2.28.2's
``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` (built once with random weights, mmcv 1.7.2) and mmdet's
``CocoDataset.CLASSES``. The real checkpoint is not needed: random values with those names and shapes.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from reward_maps.geneval import coco_label_names
from reward_maps.geneval_rules import COCO_CLASSES
from reward_maps.mmdet_convert import (
    MMDET_COCO_CLASSES,
    MmdetConversionError,
    TARGET_KEYS_WITHOUT_SOURCE,
    build_converted_model,
    convert_mmdet_mask2former,
    infer_architecture,
    mask2former_config,
    unfold_to_concat_order,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "mmdet_mask2former_swin-s_coco_shapes.json"


def mmdet_table() -> dict:
    return json.loads(FIXTURE.read_text())


def synthetic_state_dict(device: str = "meta", seed: int = 0) -> dict[str, torch.Tensor]:
    """mmdet's names and shapes; values random (integer buffers copied from a real Swin window layout)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in mmdet_table()["shapes"].items():
        if key.endswith("relative_position_index"):
            sd[key] = _mmdet_relative_position_index(int(round(shape[0] ** 0.5)))
        elif device == "meta":
            sd[key] = torch.empty(shape, device="meta")
        else:
            sd[key] = torch.randn(shape, generator=gen) * 0.02
    return sd


def _mmdet_relative_position_index(window: int) -> torch.Tensor:
    """mmdet WindowMSA's buffer, written as mmdet builds it (double_step_seq, sum with transpose, flip)."""
    seq1 = torch.arange(0, (2 * window - 1) * window, 2 * window - 1)
    seq2 = torch.arange(0, window)
    coords = (seq1[:, None] + seq2[None, :]).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()


def meta_transformers_state_dict() -> dict[str, torch.Tensor]:
    from transformers import Mask2FormerForUniversalSegmentation

    arch = infer_architecture(synthetic_state_dict())
    with torch.device("meta"):
        model = Mask2FormerForUniversalSegmentation(mask2former_config(arch))
    return model.state_dict()


def test_architecture_read_from_the_table_is_swin_s_mask2former_with_80_classes():
    arch = infer_architecture(synthetic_state_dict())
    assert arch["embed_dim"] == 96 and arch["depths"] == [2, 2, 18, 2] and arch["num_heads"] == [3, 6, 12, 24]
    assert arch["window_size"] == 7 and arch["num_queries"] == 100 and arch["num_labels"] == 80
    assert arch["encoder_layers"] == 6 and arch["decoder_layers"] == 9 and arch["num_feature_levels"] == 3


def test_every_transformers_parameter_is_filled_once_with_its_shape_and_every_mmdet_key_is_used():
    source = synthetic_state_dict()
    target = meta_transformers_state_dict()
    converted, skipped = convert_mmdet_mask2former(source, set(target))
    # Each target key is written at most once (convert raises on a second write), so count sources per key.
    without_source = {k for k in target if k not in converted}
    assert all(any(re.search(p, k) for p in TARGET_KEYS_WITHOUT_SOURCE) for k in without_source), without_source
    assert without_source == {"criterion.empty_weight"} | {k for k in target if ".encoder.swin.layernorm." in k}
    assert set(converted) <= set(target)
    bad = {k: (tuple(v.shape), tuple(target[k].shape)) for k, v in converted.items() if v.shape != target[k].shape}
    assert bad == {}
    # The only mmdet keys not converted are the 24 Swin relative_position_index buffers (2+2+18+2 blocks).
    assert len(skipped) == 24 and all(k.endswith("attn.w_msa.relative_position_index") for k in skipped)
    used_numel = sum(v.numel() for v in converted.values())
    source_numel = sum(v.numel() for k, v in source.items() if k not in skipped)
    assert used_numel == source_numel  # nothing dropped, nothing duplicated


def test_qkv_rows_split_into_q_k_v_in_order_and_merge_columns_reordered():
    source = synthetic_state_dict("cpu")
    converted, _ = convert_mmdet_mask2former(source, set(meta_transformers_state_dict()))
    qkv = source["backbone.stages.1.blocks.0.attn.w_msa.qkv.weight"]
    base = "model.pixel_level_module.encoder.swin.encoder.layers.1.blocks.0.attention."
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(converted[base + part + ".weight"], qkv[192 * i: 192 * (i + 1)])
    in_proj = source["panoptic_head.transformer_decoder.layers.3.attentions.1.attn.in_proj_bias"]
    assert torch.equal(converted["model.transformer_module.decoder.layers.3.self_attn.v_proj.bias"], in_proj[512:])
    cross = source["panoptic_head.transformer_decoder.layers.3.attentions.0.attn.in_proj_weight"]
    assert torch.equal(converted["model.transformer_module.decoder.layers.3.cross_attn.in_proj_weight"], cross)
    assert torch.equal(converted["class_predictor.weight"], source["panoptic_head.cls_embed.weight"])


def test_patch_merge_reorder_makes_transformers_merge_equal_mmdet_unfold_merge():
    from transformers.models.swin.modeling_swin import SwinPatchMerging

    torch.manual_seed(0)
    channels, height, width = 8, 6, 10
    unfold, norm, reduction = nn.Unfold(2, stride=2), nn.LayerNorm(4 * channels), nn.Linear(4 * channels, 2 * channels, bias=False)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, height * width, channels)
    # mmdet PatchMerging: (B, L, C) -> (B, C, H, W) -> Unfold(2, 2) -> (B, L', 4C) -> norm -> reduction
    grid = x.transpose(1, 2).reshape(2, channels, height, width)
    expected = reduction(norm(unfold(grid).transpose(1, 2)))
    import inspect

    takes_resolution = "input_resolution" in inspect.signature(SwinPatchMerging.__init__).parameters  # transformers 4.x
    merge = SwinPatchMerging((height, width), channels) if takes_resolution else SwinPatchMerging(channels)
    with torch.no_grad():
        merge.norm.weight.copy_(unfold_to_concat_order(norm.weight, channels))
        merge.norm.bias.copy_(unfold_to_concat_order(norm.bias, channels))
        merge.reduction.weight.copy_(unfold_to_concat_order(reduction.weight, channels))
    assert torch.allclose(merge(x, (height, width)), expected, atol=1e-5)


def test_mmdet_relative_position_index_equals_transformers_buffer():
    from transformers import SwinConfig
    from transformers.models.swin.modeling_swin import SwinBackbone

    backbone = SwinBackbone(SwinConfig(embed_dim=16, depths=[1], num_heads=[1], window_size=7, out_features=["stage1"]))
    buffer = next(b for n, b in backbone.named_buffers() if n.endswith("relative_position_index"))
    assert torch.equal(buffer.flatten(), _mmdet_relative_position_index(7).flatten())


def test_labels_are_mmdet_coco_order_named_as_geneval():
    assert tuple(mmdet_table()["classes"]) == MMDET_COCO_CLASSES
    config = mask2former_config(infer_architecture(synthetic_state_dict()))
    names = coco_label_names(config.id2label)
    assert [names[i] for i in range(80)] == list(COCO_CLASSES)
    renamed = {i: (a, b) for i, (a, b) in enumerate(zip(MMDET_COCO_CLASSES, COCO_CLASSES)) if a != b}
    assert renamed == {64: ("mouse", "computer mouse"), 65: ("remote", "tv remote"), 66: ("keyboard", "computer keyboard")}


def test_unknown_mmdet_key_and_foreign_checkpoint_are_named():
    source = synthetic_state_dict()
    source["panoptic_head.extra_head.weight"] = torch.empty(3, device="meta")
    with pytest.raises(MmdetConversionError, match=r"panoptic_head\.extra_head\.weight"):
        convert_mmdet_mask2former(source)
    with pytest.raises(MmdetConversionError, match="not an mmdet 2.x Mask2Former"):
        convert_mmdet_mask2former({"backbone.conv1.weight": torch.empty(1, device="meta")})


@pytest.mark.slow
def test_cli_converts_a_synthetic_checkpoint_that_loads_strictly_and_runs(tmp_path):
    """Real tensors with mmdet's names: the CLI's folder loads in transformers and detects on an image."""
    from transformers import Mask2FormerForUniversalSegmentation

    ckpt = tmp_path / "mask2former_swin-s.pth"
    torch.save({"state_dict": synthetic_state_dict("cpu"), "meta": {"CLASSES": MMDET_COCO_CLASSES}}, ckpt)
    out = tmp_path / "converted"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_geneval_detector.py"),
                          "--mmdet_ckpt", str(ckpt), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    model, loading = Mask2FormerForUniversalSegmentation.from_pretrained(out, output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    source = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(model.model.transformer_module.queries_features.weight, source["panoptic_head.query_feat.weight"])
    with torch.no_grad():
        outputs = model.eval()(pixel_values=torch.randn(1, 3, 64, 96))
    assert tuple(outputs.class_queries_logits.shape) == (1, 100, 81)
    assert tuple(outputs.masks_queries_logits.shape) == (1, 100, 16, 24)
    assert torch.isfinite(outputs.masks_queries_logits).all()


def test_build_converted_model_rejects_other_class_lists():
    with pytest.raises(MmdetConversionError, match="CLASSES"):
        build_converted_model(synthetic_state_dict(), {"CLASSES": ("cat", "dog")})
