"""CLIPScore preprocessing as flow_grpo's torchvision transform; the value-path and MaskCLIP patch maps by hand."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reward_maps import build_scorer
from reward_maps.base import RewardMapError
from reward_maps.clip_family import encode_image, placement, preprocess_images
from u_nft.tiny_models import build_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny_clip_upstream")))


@pytest.fixture(scope="module")
def clipscore(clip_dir):
    return build_scorer("clipscore_map", model=clip_dir)


def torchvision_reference(image: np.ndarray, size: int, crop: int, mean, std) -> np.ndarray:
    """flow_grpo's T.Compose([Resize(size), CenterCrop(crop), Normalize]) on a float (3, H, W) image, rebuilt
    with PIL: PIL's float ("F" mode) bilinear resize is the antialiased triangle filter torchvision >= 0.17
    applies to tensors; torchvision's size rule int(size * long / short) and CenterCrop's round((new-crop)/2)."""
    _, h, w = image.shape
    if h <= w:
        new_h, new_w = size, int(size * w / h)
    else:
        new_h, new_w = int(size * h / w), size
    if (new_h, new_w) != (h, w):
        image = np.stack([np.asarray(Image.fromarray(ch.astype(np.float32), mode="F").resize((new_w, new_h), Image.BILINEAR))
                          for ch in image])
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    image = image[:, top:top + crop, left:left + crop]
    return (image - np.asarray(mean).reshape(3, 1, 1)) / np.asarray(std).reshape(3, 1, 1)


@pytest.mark.parametrize("size", [(512, 693), (224, 227), (300, 400), (640, 480), (512, 512)])
def test_clipscore_preprocessing_equals_torchvision_resize_bilinear_antialias_and_centercrop(clipscore, size):
    rng = np.random.default_rng(sum(size))
    image = rng.random((3, *size)).astype(np.float32)  # float pixels, not uint8 levels: no rounding upstream
    ours = preprocess_images(torch.from_numpy(image)[None], clipscore.prep)[0].numpy()
    ref = torchvision_reference(image, 224, 224, clipscore.prep.mean, clipscore.prep.std)
    assert ours.shape == ref.shape == (3, 224, 224)
    # Measured max difference 1e-6-scale (float32 filter weights), far below one grey level (~0.015 here).
    assert np.abs(ours - ref).max() < 1e-4


def test_clipscore_prep_is_bilinear_unclamped_with_rounded_crop_offset_while_pickscore_keeps_the_processor(clip_dir, clipscore):
    prep = clipscore.prep
    assert (prep.interpolation, prep.clamp, prep.crop_offset) == ("bilinear", False, "round")
    assert placement(512, 693, prep).left == 40  # round(79 / 2) = round(39.5) = 40 (half to even); floor gives 39
    pick = build_scorer("pickscore_map", model=clip_dir, processor=clip_dir).prep
    assert (pick.interpolation, pick.clamp, pick.crop_offset) == ("bicubic", True, "floor")


def test_clipscore_scalar_equals_upstream_logits_per_image_over_100_on_reference_pixels(clipscore):
    rng = np.random.default_rng(0)
    images = rng.random((2, 3, 240, 320)).astype(np.float32)
    prompts = ["a red cube", "a photo of a dog on grass"]
    ref = np.stack([torchvision_reference(im, 224, 224, clipscore.prep.mean, clipscore.prep.std) for im in images])
    tokens = clipscore.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        upstream = clipscore.model(pixel_values=torch.from_numpy(ref).float(), **tokens).logits_per_image.diagonal() / 100
    out = clipscore(torch.from_numpy(images), prompts, [{}, {}])
    torch.testing.assert_close(out.scores, upstream, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ patch paths


def _layer_with_mask(layer, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:  # transformers 4.x
        out = layer(hidden, mask, None)
    else:
        out = layer(hidden, mask)
    return out[0] if isinstance(out, tuple) else out


def test_maskclip_patches_are_the_last_block_run_with_self_only_attention(clipscore):
    """MaskCLIP = the unmodified last block (residual + MLP kept) where each token attends only to itself."""
    model = clipscore.model
    pixels = preprocess_images(torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3)), clipscore.prep)
    vision = model.vision_model
    with torch.no_grad():
        hidden = vision.pre_layrnorm(vision.embeddings(pixels))
        for layer in vision.encoder.layers[:-1]:
            hidden = _layer_with_mask(layer, hidden, None)
        tokens = hidden.shape[1]
        self_only = torch.full((tokens, tokens), torch.finfo(hidden.dtype).min).fill_diagonal_(0.0)
        last = _layer_with_mask(vision.encoder.layers[-1], hidden, self_only.expand(2, 1, tokens, tokens))
        expected = model.visual_projection(vision.post_layernorm(last[:, 1:]))
        _, maskclip = encode_image(model, pixels, "maskclip")
        _, value_path = encode_image(model, pixels, "value_path")
    torch.testing.assert_close(maskclip.reshape(2, -1, maskclip.shape[-1]), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(maskclip, value_path, atol=1e-3)  # the residual and the MLP do change the map


def test_maskclip_map_method_gives_the_maskclip_cosine_grid(clip_dir):
    scorer = build_scorer("clipscore_map", model=clip_dir, map_method="maskclip")
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    out = scorer(images, ["a red square"], [{}])
    with torch.no_grad():
        _, patches = encode_image(scorer.model, preprocess_images(images, scorer.prep), "maskclip")
    cos = torch.einsum("bhwd,bd->bhw", F.normalize(patches, dim=-1), scorer.text_embeddings(["a red square"])[:, 0])
    torch.testing.assert_close(out.maps, scorer.model.logit_scale.exp() * cos / 100, rtol=1e-5, atol=1e-6)
    assert out.info[0]["map_method"] == "maskclip"
    with pytest.raises(RewardMapError, match="patch_path"):
        encode_image(scorer.model, preprocess_images(images, scorer.prep), "patch_text")
