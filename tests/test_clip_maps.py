"""PickScore / CLIPScore / HPS-style maps and the SRPO semantic-relative map, on a tiny random CLIP.

The tiny model is saved to a directory and loaded through the same ``from_pretrained`` calls as the hub
ids; scalars are checked against independent computations from the model's own outputs.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reward_maps import build_scorer, registered_names
from reward_maps.base import RewardMapError, validate_output
from reward_maps.clip_family import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Preprocess,
    _pooled,
    convert_open_clip_state_dict,
    encode_image,
    preprocess_images,
)
from u_nft.tiny_models import build_tiny_clip

PROMPTS = ["a red cube on a table", "a photo of a dog"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="module")
def pickscore(clip_dir):
    return build_scorer("pickscore_map", model=clip_dir, processor=clip_dir)


@pytest.fixture(scope="module")
def processor(clip_dir):
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(clip_dir)


def smooth_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A structured test image in [0.05, 0.9] (gradients, a sinusoid, a block), (3, h, w)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = float(torch.rand(1, generator=g)) * 6
    img = torch.stack([yy, xx, 0.5 + 0.5 * torch.sin(12 * xx + 7 * yy + phase)])
    img[:, h // 4:h // 2, w // 3:w // 2] = torch.rand(3, 1, 1, generator=g)
    return 0.05 + 0.85 * img


def uint8_batch(*shapes_and_seeds) -> torch.Tensor:
    """Images quantised to uint8 levels, so the PIL path and the tensor path see the same pixels."""
    imgs = [smooth_image(h, w, s) for h, w, s in shapes_and_seeds]
    return torch.stack([(im * 255).round() / 255 for im in imgs])


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())


# ------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("size", [(300, 400), (512, 512), (480, 260), (100, 150)])
def test_tensor_preprocessing_matches_clip_processor_within_two_grey_levels(processor, size):
    image = uint8_batch((*size, 3))
    reference = processor.image_processor(images=to_pil(image[0]), return_tensors="pt")["pixel_values"]
    ours = preprocess_images(image, Preprocess("shortest", 224, (224, 224)))
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    diff_levels = ((ours - reference) * std).abs() * 255  # in uint8 grey levels
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    # Measured: max 1.05-1.3 levels (uint8 rounding + PIL vs torch antialiased bicubic), mean ~0.25.
    assert diff_levels.max() <= 2.0 and diff_levels.mean() <= 0.5


def test_longest_side_preprocessing_pads_with_black_like_open_clip():
    image = uint8_batch((56, 112, 0))  # -> resized 112 x 224, padded 56 rows above and below
    pixels = preprocess_images(image, Preprocess("longest", 224, (224, 224)))
    black = (-torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD)).view(3, 1, 1)
    torch.testing.assert_close(pixels[0, :, :56], black.expand(3, 56, 224))
    torch.testing.assert_close(pixels[0, :, 168:], black.expand(3, 56, 224))
    pil = to_pil(image[0]).resize((224, 112), Image.BICUBIC)
    ref = (torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255 - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) \
        / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    assert ((pixels[0, :, 56:168] - ref).abs() * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)).max() * 255 <= 2.0


# ------------------------------------------------------------------------------------------ scalars


def independent_cosine(model, processor, images, prompts) -> torch.Tensor:
    """Upstream recipe: processor on PIL images, padding=True text, get_*_features, normalise, dot."""
    pixel = processor.image_processor(images=[to_pil(x) for x in images], return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = _pooled(model.get_image_features(pixel_values=pixel))
        txt = _pooled(model.get_text_features(**text))
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


def test_pickscore_scalar_is_logit_scale_times_cosine_over_26(pickscore, processor):
    images = uint8_batch((96, 80, 0), (96, 80, 1))
    out = validate_output("pickscore_map", pickscore(images, PROMPTS, [{}, {}]), 2)
    expected = pickscore.model.logit_scale.exp() * independent_cosine(pickscore.model, processor, images, PROMPTS) / 26
    # The two preprocessing paths differ by <= 2 grey levels; the formula itself is exact (next test).
    torch.testing.assert_close(out.scores, expected, rtol=0, atol=2e-3)
    pixels = preprocess_images(images[:1], pickscore.prep)
    with torch.no_grad():
        img = F.normalize(_pooled(pickscore.model.get_image_features(pixel_values=pixels)), dim=-1)
        tok = processor.tokenizer(PROMPTS[:1], padding=True, return_tensors="pt")
        txt = F.normalize(_pooled(pickscore.model.get_text_features(**tok)), dim=-1)
    exact = pickscore.model.logit_scale.exp() * (txt @ img.T).diag() / 26
    torch.testing.assert_close(out.scores[:1], exact, rtol=1e-5, atol=1e-6)


def test_clipscore_scalar_is_logits_per_image_diagonal_over_100(clip_dir, processor):
    scorer = build_scorer("clipscore_map", model=clip_dir)
    images = uint8_batch((64, 64, 2), (64, 64, 3))
    out = scorer(images, PROMPTS, [{}, {}])
    tok = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = scorer.model(pixel_values=preprocess_images(images, scorer.prep), **tok).logits_per_image
    torch.testing.assert_close(out.scores, logits.diag() / 100, rtol=1e-5, atol=1e-6)


def test_hps_scalar_is_plain_cosine_with_longest_side_pad(clip_dir, processor):
    scorer = build_scorer("hps_map", model=clip_dir)
    images = uint8_batch((48, 96, 4), (48, 96, 5))
    out = validate_output("hps_map", scorer(images, PROMPTS, [{}, {}]), 2)
    assert scorer.prep.resize == "longest"

    def open_clip_style(pil: Image.Image) -> torch.Tensor:  # ResizeMaxSize(224, fill=0) + ToTensor + Normalize
        w, h = pil.size
        scale = 224 / max(w, h)
        new_w, new_h = round(w * scale), round(h * scale)
        canvas = Image.new("RGB", (224, 224))
        canvas.paste(pil.resize((new_w, new_h), Image.BICUBIC), ((224 - new_w) // 2, (224 - new_h) // 2))
        x = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255
        return (x - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

    pixels = torch.stack([open_clip_style(to_pil(x)) for x in images])
    tok = processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = F.normalize(_pooled(scorer.model.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(_pooled(scorer.model.get_text_features(**tok)), dim=-1)
    torch.testing.assert_close(out.scores, (img * txt).sum(-1), rtol=0, atol=2e-3)
    assert out.value_range == (-1.0, 1.0)


# ------------------------------------------------------------------------------------------ patch-text maps


def test_global_embedding_of_the_single_pass_equals_get_image_features(pickscore):
    pixels = preprocess_images(uint8_batch((64, 80, 0), (64, 80, 1)), pickscore.prep)
    with torch.no_grad():
        global_embedding, patches = encode_image(pickscore.model, pixels)
        reference = _pooled(pickscore.model.get_image_features(pixel_values=pixels))
    torch.testing.assert_close(global_embedding, reference, rtol=1e-5, atol=1e-6)
    assert patches.shape == (2, 7, 7, pickscore.model.config.projection_dim)


def test_patch_embeddings_follow_the_maskclip_value_path(pickscore):
    model = pickscore.model
    pixels = preprocess_images(uint8_batch((64, 64, 0)), pickscore.prep)
    with torch.no_grad():
        _, patches = encode_image(model, pixels)
        hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # last block's input
        block = model.vision_model.encoder.layers[-1]
        attn = block.self_attn
        y = F.layer_norm(hidden[:, 1:], (hidden.shape[-1],), block.layer_norm1.weight, block.layer_norm1.bias, block.layer_norm1.eps)
        v = F.linear(F.linear(y, attn.v_proj.weight, attn.v_proj.bias), attn.out_proj.weight, attn.out_proj.bias)
        post = model.vision_model.post_layernorm
        expected = F.linear(F.layer_norm(v, (v.shape[-1],), post.weight, post.bias, post.eps), model.visual_projection.weight)
    torch.testing.assert_close(patches.reshape(1, 49, -1), expected, rtol=1e-5, atol=1e-6)


def test_square_image_map_is_the_value_path_score_grid(pickscore):
    images = uint8_batch((64, 64, 0), (64, 64, 1))
    out = validate_output("pickscore_map", pickscore(images, PROMPTS, [{}, {}]), 2)
    with torch.no_grad():
        _, patches = encode_image(pickscore.model, preprocess_images(images, pickscore.prep))
    text = pickscore.text_embeddings(PROMPTS)[:, 0]
    cos = torch.einsum("bhwd,bd->bhw", F.normalize(patches, dim=-1), text)
    torch.testing.assert_close(out.maps, pickscore.model.logit_scale.exp() * cos / 26, rtol=1e-5, atol=1e-6)
    bound = float(pickscore.model.logit_scale.exp()) / 26
    assert out.value_range == pytest.approx((-bound, bound))
    assert torch.isfinite(out.maps).all() and out.maps.shape == (2, 7, 7)


def test_cells_outside_the_centre_crop_get_the_global_score_or_the_edge_patch(pickscore):
    images = uint8_batch((64, 128, 0))  # crop keeps columns 32..96 of 128: map 7 x 14, crop cells 3..9
    out = pickscore(images, PROMPTS[:1], [{}])
    assert out.maps.shape == (1, 7, 14)
    outside = torch.cat([out.maps[0, :, :3], out.maps[0, :, 10:]], dim=1)
    torch.testing.assert_close(outside, out.scores[0].expand_as(outside))
    edge = copy.copy(pickscore)
    edge.outside_crop = "edge"
    edge_maps = edge(images, PROMPTS[:1], [{}]).maps
    torch.testing.assert_close(edge_maps[0, :, 3:10], out.maps[0, :, 3:10])
    torch.testing.assert_close(edge_maps[0, :, :3], edge_maps[0, :, 3:4].expand(7, 3))
    torch.testing.assert_close(edge_maps[0, :, 10:], edge_maps[0, :, 9:10].expand(7, 4))


# ------------------------------------------------------------------------------------------ grad x input


def test_grad_x_input_cell_equals_derivative_of_brightening_that_cell(pickscore):
    # Known answer: map[u] = d/de s(x + e * x * 1_u) at e = 0, so brightening cell u moves the score
    # by (approximately) e * map[u]; checked per cell by central differences, both signs present.
    # The dog prompt gives both signs under the seed-0 tiny CLIP of transformers 4.x and 5.x alike
    # (their random inits draw in different orders).
    scorer, prompt = copy.copy(pickscore), PROMPTS[1:]
    scorer.map_method, scorer.map_size = "grad_x_input", (4, 4)
    images = uint8_batch((64, 64, 0))
    out = validate_output("pickscore_map", scorer(images, prompt, [{}]), 1)
    assert out.value_range is None and out.maps.shape == (1, 4, 4)
    assert (out.maps > 0).any() and (out.maps < 0).any()
    eps = 1e-2
    for u in range(16):
        i, j = divmod(u, 4)
        mask = torch.zeros_like(images)
        mask[..., 16 * i:16 * (i + 1), 16 * j:16 * (j + 1)] = 1
        up = scorer.scalar(images * (1 + eps * mask), prompt)
        down = scorer.scalar(images * (1 - eps * mask), prompt)
        derivative = float(up - down) / (2 * eps)
        assert np.sign(derivative) == np.sign(float(out.maps[0, i, j])), u
        assert float(out.maps[0, i, j]) == pytest.approx(derivative, rel=0.05, abs=2e-5)
    whole = float(scorer.scalar(images * (1 + eps), prompt) - scorer.scalar(images * (1 - eps), prompt)) / (2 * eps)
    assert float(out.maps.sum()) == pytest.approx(whole, rel=0.05, abs=2e-5)


# ------------------------------------------------------------------------------------------ occlusion


def test_occlusion_method_and_score_cells_equal_brute_force_occlusion(pickscore):
    scorer = copy.copy(pickscore)
    scorer.map_method, scorer.map_size, scorer.occlusion_fill = "occlusion", (2, 2), 0.0
    images = uint8_batch((64, 64, 8))
    out = validate_output("pickscore_map", scorer(images, PROMPTS[:1], [{}]), 1)
    base = scorer.scalar(images, PROMPTS[:1])
    for u in range(4):
        i, j = divmod(u, 2)
        occluded = images.clone()
        occluded[..., 32 * i:32 * (i + 1), 32 * j:32 * (j + 1)] = 0.0
        expected = float(base - scorer.scalar(occluded, PROMPTS[:1]))
        assert float(out.maps[0, i, j]) == pytest.approx(expected, abs=1e-6)
    cells = torch.tensor([[3, 0]])
    sampled = scorer.score_cells(images, PROMPTS[:1], [{}], cells)
    torch.testing.assert_close(sampled, out.maps.reshape(1, -1)[:, [3, 0]], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ semantic relative


@pytest.fixture(scope="module")
def srpo(clip_dir):
    return build_scorer("semantic_relative_map", model=clip_dir, processor=clip_dir,
                        positive="realistic photo, {prompt}", negative="CG render, {prompt}")


def test_semantic_relative_is_positive_minus_negative_pickscore(srpo, pickscore):
    images = uint8_batch((64, 64, 0), (64, 64, 1))
    out = validate_output("semantic_relative_map", srpo(images, PROMPTS, [{}, {}]), 2)
    pos = pickscore(images, [f"realistic photo, {p}" for p in PROMPTS], [{}, {}])
    neg = pickscore(images, [f"CG render, {p}" for p in PROMPTS], [{}, {}])
    torch.testing.assert_close(out.scores, pos.scores - neg.scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.maps, pos.maps - neg.maps, rtol=1e-5, atol=1e-6)
    assert out.info[0]["texts"] == ["realistic photo, a red cube on a table", "CG render, a red cube on a table"]
    bound = 2 * float(pickscore.model.logit_scale.exp()) / 26
    assert out.value_range == pytest.approx((-bound, bound))


def test_semantic_relative_swapping_the_phrases_negates_map_and_score(srpo):
    swapped = copy.copy(srpo)
    swapped.texts = ((srpo.texts[1][0], 1.0), (srpo.texts[0][0], -1.0))
    swapped._text_cache = {}
    images = uint8_batch((64, 96, 2))
    a, b = srpo(images, PROMPTS[:1], [{}]), swapped(images, PROMPTS[:1], [{}])
    torch.testing.assert_close(a.maps, -b.maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.scores, -b.scores, rtol=1e-5, atol=1e-6)
    assert a.maps.abs().max() > 0


def test_semantic_relative_equal_phrases_cancel_everywhere(srpo):
    same = copy.copy(srpo)
    same.texts = (("{prompt}, photo", 1.0), ("{prompt}, photo", -1.0))
    same._text_cache = {}
    out = same(uint8_batch((64, 64, 3)), PROMPTS[:1], [{}])
    assert out.maps.abs().max() == 0 and out.scores.abs().max() == 0


# ------------------------------------------------------------------------------------------ options, conversion


def test_clip_family_names_are_registered():
    assert {"pickscore_map", "clipscore_map", "hps_map", "semantic_relative_map", "occlusion_map"} <= set(registered_names())


def test_bad_options_raise_errors_naming_scorer_and_choices(clip_dir):
    with pytest.raises(RewardMapError, match=r"pickscore_map.*map_method.*value_path.*maskclip"):
        build_scorer("pickscore_map", model=clip_dir, processor=clip_dir, map_method="saliency")
    with pytest.raises(RewardMapError, match=r"map_method='patch_text' was renamed 'value_path'"):
        build_scorer("pickscore_map", model=clip_dir, processor=clip_dir, map_method="patch_text")
    with pytest.raises(RewardMapError, match=r"hps_map.*scripts/convert_hps_to_transformers.py"):
        build_scorer("hps_map")
    with pytest.raises(RewardMapError, match=r"semantic_relative_map.*must contain '\{prompt\}'"):
        build_scorer("semantic_relative_map", model=clip_dir, processor=clip_dir, positive="realistic photo")
    with pytest.raises(RewardMapError, match=r"clipscore_map.*cannot load CLIPModel"):
        build_scorer("clipscore_map", model=str(clip_dir) + "_missing")


def to_open_clip_layout(model) -> dict[str, torch.Tensor]:
    """Write a transformers CLIPModel in open_clip's key layout (fused qkv, (width, out) projections)."""
    sd = model.state_dict()
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].T,
        "text_projection": sd["text_projection.weight"].T,
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "logit_scale": sd["logit_scale"],
        "attn_mask": torch.full((77, 77), float("-inf")).triu(1),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"visual.{ours}.{kind}"] = sd[f"vision_model.{theirs}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(len(getattr(model, tower).encoder.layers)):
            src, dst = f"{tower}.encoder.layers.{i}", f"{prefix}.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{kind}"] = torch.cat([sd[f"{src}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
                for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
                    out[f"{dst}.{a}.{kind}"] = sd[f"{src}.{b}.{kind}"]
    return {f"module.{k}": v for k, v in out.items()}


def test_open_clip_state_dict_converts_to_an_identical_transformers_model(pickscore):
    from transformers import CLIPModel

    model = pickscore.model
    fresh = CLIPModel(model.config).eval()
    fresh.load_state_dict(convert_open_clip_state_dict(to_open_clip_layout(model)), strict=True)
    pixels = preprocess_images(uint8_batch((64, 64, 0)), pickscore.prep)
    tok = pickscore.tokenizer(PROMPTS[:1], padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = model(pixel_values=pixels, **tok), fresh(pixel_values=pixels, **tok)
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image)
    with pytest.raises(RewardMapError, match="unknown parameter"):
        convert_open_clip_state_dict({"visual.trunk.stem.weight": torch.zeros(1)})
