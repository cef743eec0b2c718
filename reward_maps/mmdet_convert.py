"""Convert GenEval's OpenMMLab Mask2Former checkpoint to a transformers ``Mask2FormerForUniversalSegmentation``.

GenEval (djghosh13/geneval ``evaluation/download_models.sh``), DiffusionNFT (``flow_grpo/gen_eval.py``) and
Flow-GRPO's reward server all run the mmdet 2.x model ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco`` with
the weights ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth``. Those are not
the weights of ``facebook/mask2former-swin-small-coco-instance`` (a port of facebookresearch/Mask2Former's
detectron2 training). :func:`convert_mmdet_mask2former` renames the mmdet 2.x parameters into the
transformers layout, so ``geneval_map`` runs upstream's exact detector without mmcv / mmdet:

    python scripts/convert_geneval_detector.py --mmdet_ckpt mask2former_..._743b7d99.pth --out DIR

Mapping (mmdet 2.x names on the left; ``{B}`` = the transformers Swin backbone prefix):

    backbone.patch_embed.{projection,norm}            {B}embeddings.{patch_embeddings.projection,norm}
    backbone.stages.i.blocks.j.norm1 / norm2          {B}encoder.layers.i.blocks.j.layernorm_before / _after
      .attn.w_msa.qkv  (rows q, k, v)                  .attention.{q,k,v}_proj   (split in three)
      .attn.w_msa.proj                                 .attention.o_proj
      .attn.w_msa.relative_position_bias_table         .attention.relative_position_bias.relative_position_bias_table
      .ffn.layers.0.0 / .ffn.layers.1                  .mlp.fc1 / .mlp.fc2
    backbone.stages.i.downsample.{reduction,norm}     {B}encoder.layers.i.downsample.{reduction,norm}
                                                       (input channels reordered, see below)
    backbone.norm{i}                                   ...encoder.hidden_states_norms.stage{i+1}
    pixel_decoder.input_convs.i.{conv,gn}              pixel_level_module.decoder.input_projections.i.{0,1}
    pixel_decoder.level_encoding                       pixel_level_module.decoder.level_embed
    pixel_decoder.encoder.layers.i.attentions.0        ...decoder.encoder.layers.i.self_attn (same 4 Linear layers)
      .norms.0 / .ffns.0.layers.0.0 / .ffns.0.layers.1 / .norms.1
                                                       .self_attn_layer_norm / .fc1 / .fc2 / .final_layer_norm
    pixel_decoder.lateral_convs.0 / output_convs.0     ...decoder.adapter_1 / layer_1  ({conv,gn} -> {0,1})
    pixel_decoder.mask_feature                         ...decoder.mask_projection
    transformer_decoder.layers.i (order cross_attn, norm, self_attn, norm, ffn, norm)
      .attentions.0.attn (cross)                       transformer_module.decoder.layers.i.cross_attn (fused, as is)
      .attentions.1.attn.in_proj (self, rows q, k, v)  .self_attn.{q,k,v}_proj (split), .attn.out_proj -> .out_proj
      .norms.0 / .norms.1 / .norms.2                   .cross_attn_layer_norm / .self_attn_layer_norm / .final_layer_norm
      .ffns.0.layers.0.0 / .ffns.0.layers.1            .fc1 / .fc2
    transformer_decoder.post_norm                      transformer_module.decoder.layernorm
    query_embed / query_feat / level_embed             transformer_module.queries_embedder / queries_features / level_embed
    cls_embed                                          class_predictor
    mask_embed.{0,2,4}                                 transformer_module.decoder.mask_predictor.mask_embedder.{0,1,2}.0

Patch merging: mmdet's ``PatchMerging`` gathers each 2x2 neighbourhood with ``nn.Unfold`` (feature index
``c * 4 + 2 * di + dj``), transformers (like the original Swin) concatenates the four sub-grids
``(di, dj) = (0, 0), (1, 0), (0, 1), (1, 1)`` (index ``k * C + c``); :func:`unfold_to_concat_order`
permutes the reduction's input columns and the norm's parameters accordingly (the inverse of mmdet's
``swin_converter``).

Not converted, with the reason: ``backbone.stages.i.blocks.j.attn.w_msa.relative_position_index``
(a buffer transformers recomputes; checked equal by :func:`check_relative_position_index`). Target
parameters without an mmdet source keep transformers' initialisation, because inference does not read
them: ``criterion.empty_weight`` (loss weights) and, in transformers >= 5, the ``SwinModel`` final
``layernorm`` inside the backbone (the backbone returns the ``hidden_states_norms`` outputs).

Labels: mmdet's ``CocoDataset.CLASSES`` order (80 things, no stuff; class 80 of ``cls_embed`` is
"no object"), named as GenEval names them (:data:`reward_maps.geneval_rules.COCO_CLASSES`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from reward_maps.geneval_rules import COCO_CLASSES

__all__ = [
    "MMDET_COCO_CLASSES",
    "TARGET_KEYS_WITHOUT_SOURCE",
    "MmdetConversionError",
    "unfold_to_concat_order",
    "infer_architecture",
    "mask2former_config",
    "mmdet_to_transformers_key",
    "convert_mmdet_mask2former",
    "check_relative_position_index",
    "load_mmdet_state_dict",
    "build_converted_model",
    "convert_checkpoint",
]

# mmdet 2.x CocoDataset.CLASSES, in the label order of the checkpoint's cls_embed: COCO's order and
# spelling, which GenEval keeps except for three renamed classes.
_GENEVAL_RENAMES = {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}
MMDET_COCO_CLASSES = tuple(_GENEVAL_RENAMES.get(name, name) for name in COCO_CLASSES)

# Target (transformers) keys that no mmdet parameter fills, as regular expressions, with the reason.
TARGET_KEYS_WITHOUT_SOURCE = {
    r"^criterion\.empty_weight$": "training-loss class weights (buffer), unused at inference",
    r"^model\.pixel_level_module\.encoder\.swin\.layernorm\.(weight|bias)$":
        "transformers >= 5 SwinModel final norm; the backbone returns hidden_states_norms instead",
}
# mmdet keys that are not converted, with the reason.
SOURCE_KEYS_NOT_CONVERTED = {
    r"\.attn\.w_msa\.relative_position_index$": "buffer transformers recomputes (checked equal)",
}

_HEAD = "panoptic_head."
_PIXEL = "model.pixel_level_module.decoder."
_TRANSFORMER = "model.transformer_module."


class MmdetConversionError(ValueError):
    """A checkpoint that is not an mmdet 2.x Mask2Former with a Swin backbone, or a mapping that is incomplete."""


def unfold_to_concat_order(tensor: torch.Tensor, channels_in: int) -> torch.Tensor:
    """Reorder the last dimension (4·C features of a 2x2 patch merge) from mmdet's unfold order to concat order.

    unfold: index ``c * 4 + u`` with u = 2·di + dj; concat: index ``k * C + c`` with sub-grid k in
    (di, dj) = (0,0), (1,0), (0,1), (1,1), i.e. u = (0, 2, 1, 3)[k]. Works for the reduction weight
    (out, 4C) and the norm's weight / bias (4C,).
    """
    if tensor.shape[-1] != 4 * channels_in:
        raise MmdetConversionError(f"patch merging: last dimension {tensor.shape[-1]} is not 4 x {channels_in}")
    lead = tensor.shape[:-1]
    grouped = tensor.reshape(*lead, channels_in, 4)[..., (0, 2, 1, 3)]  # (..., C, k)
    return grouped.transpose(-1, -2).reshape(*lead, 4 * channels_in).contiguous()


def _indices(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in state_dict for m in [re.match(pattern, k)] if m}
    return sorted(found)


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture numbers read off the mmdet state dict's shapes (Swin-T/S/B/L all work).

    Returns embed_dim, depths, num_heads, window_size, num_queries, num_labels, hidden_dim,
    mask_feature_size, encoder_layers, encoder_feedforward_dim, decoder_layers (mmdet count),
    dim_feedforward, num_feature_levels.
    """
    required = ("backbone.patch_embed.projection.weight", _HEAD + "cls_embed.weight", _HEAD + "query_feat.weight",
                _HEAD + "pixel_decoder.mask_feature.weight", _HEAD + "level_embed.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise MmdetConversionError(
            f"not an mmdet 2.x Mask2Former (Swin) state dict: missing {missing}; expected GenEval's "
            "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco checkpoint (its 'state_dict' entry)")
    stages = _indices(state_dict, r"backbone\.stages\.(\d+)\.")
    depths = [len(_indices(state_dict, rf"backbone\.stages\.{s}\.blocks\.(\d+)\.")) for s in stages]
    heads = [int(state_dict[f"backbone.stages.{s}.blocks.0.attn.w_msa.relative_position_bias_table"].shape[1])
             for s in stages]
    table = int(state_dict["backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table"].shape[0])
    window = (round(table ** 0.5) + 1) // 2
    if (2 * window - 1) ** 2 != table:
        raise MmdetConversionError(f"relative_position_bias_table has {table} rows, not (2w-1)^2 for an integer window w")
    enc = _HEAD + "pixel_decoder.encoder.layers."
    dec = _HEAD + "transformer_decoder.layers."
    return dict(
        embed_dim=int(state_dict["backbone.patch_embed.projection.weight"].shape[0]),
        depths=depths,
        num_heads=heads,
        window_size=window,
        num_queries=int(state_dict[_HEAD + "query_feat.weight"].shape[0]),
        num_labels=int(state_dict[_HEAD + "cls_embed.weight"].shape[0]) - 1,
        hidden_dim=int(state_dict[_HEAD + "query_feat.weight"].shape[1]),
        mask_feature_size=int(state_dict[_HEAD + "pixel_decoder.mask_feature.weight"].shape[0]),
        feature_size=int(state_dict[_HEAD + "pixel_decoder.input_convs.0.conv.weight"].shape[0]),
        encoder_layers=len(_indices(state_dict, re.escape(enc) + r"(\d+)\.")),
        encoder_feedforward_dim=int(state_dict[enc + "0.ffns.0.layers.0.0.weight"].shape[0]),
        decoder_layers=len(_indices(state_dict, re.escape(dec) + r"(\d+)\.")),
        dim_feedforward=int(state_dict[dec + "0.ffns.0.layers.0.0.weight"].shape[0]),
        num_feature_levels=int(state_dict[_HEAD + "level_embed.weight"].shape[0]),
    )


def mask2former_config(arch: Mapping[str, Any], class_names: tuple[str, ...] | None = None):
    """transformers ``Mask2FormerConfig`` of the mmdet model described by :func:`infer_architecture`.

    mmdet's test config (8 heads, pre_norm off, 4x common stride) is transformers' default; transformers
    counts the initial prediction as a decoder layer (``decoder_layers`` = mmdet layers + 1).
    """
    from transformers import Mask2FormerConfig, SwinConfig


    if class_names is None:
        if arch["num_labels"] != len(COCO_CLASSES):
            raise MmdetConversionError(f"checkpoint has {arch['num_labels']} classes, not the 80 COCO classes; "
                                       "pass class_names")
        class_names = COCO_CLASSES
    if len(class_names) != arch["num_labels"]:
        raise MmdetConversionError(f"{len(class_names)} class names for {arch['num_labels']} classes")
    backbone = SwinConfig(
        embed_dim=arch["embed_dim"], depths=list(arch["depths"]), num_heads=list(arch["num_heads"]),
        window_size=arch["window_size"], image_size=224, drop_path_rate=0.0,
        out_features=[f"stage{i + 1}" for i in range(len(arch["depths"]))],
    )
    return Mask2FormerConfig(
        backbone_config=backbone, num_queries=arch["num_queries"], hidden_dim=arch["hidden_dim"],
        feature_size=arch["feature_size"], mask_feature_size=arch["mask_feature_size"],
        encoder_layers=arch["encoder_layers"], encoder_feedforward_dim=arch["encoder_feedforward_dim"],
        decoder_layers=arch["decoder_layers"] + 1, dim_feedforward=arch["dim_feedforward"],
        num_attention_heads=8, common_stride=4, pre_norm=False,
        id2label=dict(enumerate(class_names)), label2id={n: i for i, n in enumerate(class_names)},
    )


# (mmdet regex, transformers template) for the one-to-one renames; {B} = Swin backbone prefix.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"backbone\.patch_embed\.projection\.(weight|bias)", "{B}embeddings.patch_embeddings.projection.{0}"),
    (r"backbone\.patch_embed\.norm\.(weight|bias)", "{B}embeddings.norm.{0}"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm1\.(weight|bias)", "{B}encoder.layers.{0}.blocks.{1}.layernorm_before.{2}"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.norm2\.(weight|bias)", "{B}encoder.layers.{0}.blocks.{1}.layernorm_after.{2}"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.proj\.(weight|bias)", "{B}encoder.layers.{0}.blocks.{1}.attention.o_proj.{2}"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_bias_table",
     "{B}encoder.layers.{0}.blocks.{1}.attention.relative_position_bias.relative_position_bias_table"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", "{B}encoder.layers.{0}.blocks.{1}.mlp.fc1.{2}"),
    (r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)", "{B}encoder.layers.{0}.blocks.{1}.mlp.fc2.{2}"),
    (r"backbone\.norm(\d+)\.(weight|bias)", "model.pixel_level_module.encoder.hidden_states_norms.stage{0+1}.{1}"),
    (r"panoptic_head\.pixel_decoder\.input_convs\.(\d+)\.conv\.(weight|bias)", _PIXEL + "input_projections.{0}.0.{1}"),
    (r"panoptic_head\.pixel_decoder\.input_convs\.(\d+)\.gn\.(weight|bias)", _PIXEL + "input_projections.{0}.1.{1}"),
    (r"panoptic_head\.pixel_decoder\.level_encoding\.weight", _PIXEL + "level_embed"),
    (r"panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.attentions\.0\."
     r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)", _PIXEL + "encoder.layers.{0}.self_attn.{1}.{2}"),
    (r"panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.norms\.0\.(weight|bias)", _PIXEL + "encoder.layers.{0}.self_attn_layer_norm.{1}"),
    (r"panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.norms\.1\.(weight|bias)", _PIXEL + "encoder.layers.{0}.final_layer_norm.{1}"),
    (r"panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(weight|bias)", _PIXEL + "encoder.layers.{0}.fc1.{1}"),
    (r"panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(weight|bias)", _PIXEL + "encoder.layers.{0}.fc2.{1}"),
    (r"panoptic_head\.pixel_decoder\.lateral_convs\.0\.conv\.weight", _PIXEL + "adapter_1.0.weight"),
    (r"panoptic_head\.pixel_decoder\.lateral_convs\.0\.gn\.(weight|bias)", _PIXEL + "adapter_1.1.{0}"),
    (r"panoptic_head\.pixel_decoder\.output_convs\.0\.conv\.weight", _PIXEL + "layer_1.0.weight"),
    (r"panoptic_head\.pixel_decoder\.output_convs\.0\.gn\.(weight|bias)", _PIXEL + "layer_1.1.{0}"),
    (r"panoptic_head\.pixel_decoder\.mask_feature\.(weight|bias)", _PIXEL + "mask_projection.{0}"),
    (r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.attentions\.0\.attn\.(in_proj_weight|in_proj_bias)",
     _TRANSFORMER + "decoder.layers.{0}.cross_attn.{1}"),
    (r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.attentions\.0\.attn\.out_proj\.(weight|bias)",
     _TRANSFORMER + "decoder.layers.{0}.cross_attn.out_proj.{1}"),
    (r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.attentions\.1\.attn\.out_proj\.(weight|bias)",
     _TRANSFORMER + "decoder.layers.{0}.self_attn.out_proj.{1}"),
    (r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.0\.(weight|bias)", _TRANSFORMER + "decoder.layers.{0}.cross_attn_layer_norm.{1}"),
    (r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.1\.(weight|bias)", _TRANSFORMER + "decoder.layers.{0}.self_attn_layer_norm.{1}"),
    (r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.2\.(weight|bias)", _TRANSFORMER + "decoder.layers.{0}.final_layer_norm.{1}"),
    (r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.(weight|bias)", _TRANSFORMER + "decoder.layers.{0}.fc1.{1}"),
    (r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.(weight|bias)", _TRANSFORMER + "decoder.layers.{0}.fc2.{1}"),
    (r"panoptic_head\.transformer_decoder\.post_norm\.(weight|bias)", _TRANSFORMER + "decoder.layernorm.{0}"),
    (r"panoptic_head\.query_embed\.weight", _TRANSFORMER + "queries_embedder.weight"),
    (r"panoptic_head\.query_feat\.weight", _TRANSFORMER + "queries_features.weight"),
    (r"panoptic_head\.level_embed\.weight", _TRANSFORMER + "level_embed.weight"),
    (r"panoptic_head\.cls_embed\.(weight|bias)", "class_predictor.{0}"),
    (r"panoptic_head\.mask_embed\.(0|2|4)\.(weight|bias)", _TRANSFORMER + "decoder.mask_predictor.mask_embedder.{0//2}.0.{1}"),
)
_COMPILED = tuple((re.compile(p + "$"), t) for p, t in _RENAMES)
_QKV_BACKBONE = re.compile(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.qkv\.(weight|bias)$")
_QKV_DECODER = re.compile(r"panoptic_head\.transformer_decoder\.layers\.(\d+)\.attentions\.1\.attn\.in_proj_(weight|bias)$")
_MERGE = re.compile(r"backbone\.stages\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$")

# transformers 4.x spelling of the Swin block (transformers 5 renamed these; its conversion_mapping.py "swin").
_LEGACY_SWIN = (
    ("attention.q_proj.", "attention.self.query."), ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."), ("attention.o_proj.", "attention.output.dense."),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("mlp.fc1.", "intermediate.dense."), ("mlp.fc2.", "output.dense."),
)


def _fill(template: str, groups: tuple[str, ...], backbone: str) -> str:
    def sub(match: re.Match) -> str:
        expr = match.group(1)
        if expr == "B":
            return backbone
        m = re.fullmatch(r"(\d+)(?:([+]|//)(\d+))?", expr)
        value = groups[int(m.group(1))]
        if m.group(2) == "+":
            return str(int(value) + int(m.group(3)))
        if m.group(2) == "//":
            return str(int(value) // int(m.group(3)))
        return value

    return re.sub(r"\{([^}]*)\}", sub, template)


def mmdet_to_transformers_key(key: str, backbone_prefix: str = "model.pixel_level_module.encoder.swin.") -> str | None:
    """The transformers key of a one-to-one renamed mmdet key (transformers-5 spelling), else None."""
    for pattern, template in _COMPILED:
        m = pattern.match(key)
        if m:
            return _fill(template, m.groups(), backbone_prefix)
    return None


def _legacy(key: str) -> str:
    key = key.replace("model.pixel_level_module.encoder.swin.", "model.pixel_level_module.encoder.")
    if ".blocks." in key:
        for new, old in _LEGACY_SWIN:
            key = key.replace(new, old)
    return key


def convert_mmdet_mask2former(state_dict: Mapping[str, torch.Tensor], target_keys: set[str] | None = None
                              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """mmdet 2.x Mask2Former (Swin) state dict -> (transformers state dict, {mmdet key: reason} not converted).

    ``target_keys``: the installed transformers model's state-dict keys; if they use the transformers-4
    Swin spelling (``attention.self.query`` ...), the output does too. Raises
    :class:`MmdetConversionError` naming any mmdet key the mapping does not know, and any key that would be
    written twice.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    arch = infer_architecture(sd)
    legacy = target_keys is not None and not any(".encoder.swin." in k for k in target_keys)
    out: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    embed = arch["embed_dim"]

    def put(name: str, value: torch.Tensor, source: str) -> None:
        name = _legacy(name) if legacy else name
        if name in out:
            raise MmdetConversionError(f"{source!r} maps to {name!r}, which another mmdet key already filled")
        out[name] = value.detach().clone().contiguous()

    backbone = "model.pixel_level_module.encoder.swin."
    for key, value in sd.items():
        if any(re.search(p, key) for p in SOURCE_KEYS_NOT_CONVERTED):
            skipped[key] = next(r for p, r in SOURCE_KEYS_NOT_CONVERTED.items() if re.search(p, key))
            continue
        target = mmdet_to_transformers_key(key, backbone)
        if target is not None:
            put(target, value, key)
            continue
        m = _QKV_BACKBONE.match(key)
        if m:
            stage, block, kind = m.groups()
            base = f"{backbone}encoder.layers.{stage}.blocks.{block}.attention."
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                put(f"{base}{part}.{kind}", chunk, key)
            continue
        m = _QKV_DECODER.match(key)
        if m:
            layer, kind = m.groups()
            base = f"{_TRANSFORMER}decoder.layers.{layer}.self_attn."
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                put(f"{base}{part}.{kind}", chunk, key)
            continue
        m = _MERGE.match(key)
        if m:
            stage, part = int(m.group(1)), m.group(2)
            channels = embed * 2 ** stage  # input channels of stage `stage`'s merge
            put(f"{backbone}encoder.layers.{stage}.downsample.{part}", unfold_to_concat_order(value, channels), key)
            continue
        raise MmdetConversionError(f"mmdet key {key!r} has no transformers counterpart in this converter "
                                   "(only mmdet 2.x Mask2Former with a Swin backbone is supported)")
    return out, skipped


def check_relative_position_index(state_dict: Mapping[str, torch.Tensor], model) -> None:
    """Raise unless every mmdet ``relative_position_index`` buffer equals the transformers model's."""
    buffers = {n: b for n, b in model.named_buffers() if n.endswith("relative_position_index")}
    pattern = re.compile(r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_index$")
    for key, value in state_dict.items():
        m = pattern.match(key.removeprefix("module."))
        if not m:
            continue
        stage, block = m.groups()
        name = next((n for n in buffers if f"encoder.layers.{stage}.blocks.{block}.attention." in n), None)
        if name is None:
            raise MmdetConversionError(f"no transformers relative_position_index for {key!r}")
        if not torch.equal(buffers[name].to(value.device).long().flatten(), value.long().flatten()):
            raise MmdetConversionError(f"{key!r} differs from transformers' {name!r}: the window layout does not match")


def load_mmdet_state_dict(path: str | os.PathLike, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, meta) of an mmdet ``.pth`` (``{"state_dict": ..., "meta": ...}``) or a bare state dict.

    Loads with ``weights_only=True``; ``trust_pickle`` allows full unpickling for a file you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise MmdetConversionError(f"mmdet checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # pickle errors have many types
        hint = "" if trust_pickle else " (if you trust the file, retry with --trust_pickle)"
        raise MmdetConversionError(f"cannot read {str(path)!r}: {err}{hint}") from err
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        return dict(ckpt["state_dict"]), dict(ckpt.get("meta") or {})
    if isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt), {}
    raise MmdetConversionError(f"{str(path)!r} holds neither an mmdet checkpoint nor a state dict")


def _class_names(meta: Mapping[str, Any], num_labels: int) -> tuple[str, ...]:
    """GenEval's names in the checkpoint's label order; checks the checkpoint's own CLASSES if it has them."""

    classes = meta.get("CLASSES")
    if classes is not None and tuple(classes) != MMDET_COCO_CLASSES:
        raise MmdetConversionError(f"checkpoint meta CLASSES {tuple(classes)[:4]}... are not mmdet's COCO classes "
                                   "in mmdet's order; this converter labels outputs with GenEval's COCO names")
    if num_labels != len(COCO_CLASSES):
        raise MmdetConversionError(f"checkpoint predicts {num_labels} classes, not the 80 COCO classes")
    return COCO_CLASSES


def build_converted_model(state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None):
    """A ``Mask2FormerForUniversalSegmentation`` holding the converted weights (strict load), in eval mode.

    Returns (model, report) with report = {"arch", "not_converted" (mmdet key -> reason),
    "kept_initialisation" (transformers key -> reason)}.
    """
    from transformers import Mask2FormerForUniversalSegmentation

    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    arch = infer_architecture(sd)
    config = mask2former_config(arch, _class_names(meta or {}, arch["num_labels"]))
    model = Mask2FormerForUniversalSegmentation(config).eval()
    own = model.state_dict()
    converted, skipped = convert_mmdet_mask2former(sd, set(own))
    kept = {}
    for key in own:
        if key in converted:
            continue
        reason = next((r for p, r in TARGET_KEYS_WITHOUT_SOURCE.items() if re.search(p, key)), None)
        if reason is None:
            raise MmdetConversionError(f"transformers parameter {key!r} has no mmdet source")
        kept[key] = reason
        converted[key] = own[key]
    for key, value in converted.items():
        if key not in own:
            raise MmdetConversionError(f"converted key {key!r} is not a parameter of transformers' Mask2Former")
        if tuple(value.shape) != tuple(own[key].shape):
            raise MmdetConversionError(f"{key!r}: converted shape {tuple(value.shape)} != transformers' {tuple(own[key].shape)}")
    model.load_state_dict(converted, strict=True)
    check_relative_position_index(sd, model)
    return model, {"arch": arch, "not_converted": skipped, "kept_initialisation": kept}


def convert_checkpoint(mmdet_ckpt: str | os.PathLike, out_dir: str | os.PathLike, trust_pickle: bool = False) -> dict:
    """Convert an mmdet ``.pth`` and ``save_pretrained`` it to ``out_dir`` (a ``geneval_map`` ``detector``)."""
    state_dict, meta = load_mmdet_state_dict(mmdet_ckpt, trust_pickle)
    model, report = build_converted_model(state_dict, meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    report["out_dir"] = str(out_dir)
    report["source"] = str(mmdet_ckpt)
    return report
