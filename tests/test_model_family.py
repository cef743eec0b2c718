"""The model-family seam: the family comes from model_index.json, conditioning is handled generically,
and the SD3 adapter reproduces the transformer call the loop made before the seam."""
from __future__ import annotations

import json

import pytest
import torch

from u_nft.models import (FAMILIES, cat_conditioning, conditioning_batch_size, conditioning_to, expand_conditioning,
                          family_for, family_named, index_conditioning)
from u_nft.models.sd3 import FAMILY as SD3, SD3_LORA_TARGETS


def write_index(folder, class_name):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.35.0"}))
    return folder


def test_family_is_read_from_model_index_class_name(tmp_path):
    assert family_for(write_index(tmp_path / "p", "StableDiffusion3Pipeline")) is SD3
    assert family_for(str(tmp_path / "p")) is SD3


def test_unknown_pipeline_class_errors_naming_it_and_the_supported_ones(tmp_path):
    folder = write_index(tmp_path / "sdxl", "StableDiffusionXLPipeline")
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline") as err:
        family_for(folder)
    assert str(folder / "model_index.json") in str(err.value)
    assert all(name in str(err.value) for name in FAMILIES)


def test_folder_without_model_index_and_missing_paths_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no model_index.json"):
        family_for(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither an existing pipeline folder nor a hub id"):
        family_for(str(tmp_path / "no" / "such" / "dir"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="_class_name"):
        family_for(tmp_path / "bad")


def test_family_named_accepts_the_three_names_and_rejects_others():
    assert family_named("sd3") is SD3
    with pytest.raises(ValueError, match=r"config.pretrained.tiny_family='sdxl'.*\['flux', 'qwen_image', 'sd3'\]"):
        family_named("sdxl")


def test_family_of_the_tiny_pipeline_folder_and_object(tiny_sd3_dir):
    from u_nft.tiny_sd3 import load_sd3_pipeline

    assert family_for(tiny_sd3_dir) is SD3
    assert family_for(load_sd3_pipeline(tiny_sd3_dir)) is SD3


def test_conditioning_cats_indexes_and_casts_whatever_its_keys():
    a = {"prompt_embeds": torch.arange(12.).view(2, 3, 2), "prompt_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    b = {"prompt_embeds": torch.arange(12., 18.).view(1, 3, 2), "prompt_mask": torch.tensor([[1, 1, 1]])}
    both = cat_conditioning([a, b])
    assert conditioning_batch_size(both) == 3
    assert torch.equal(both["prompt_embeds"][2], b["prompt_embeds"][0])
    picked = index_conditioning(both, torch.tensor([2, 0]))
    assert torch.equal(picked["prompt_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert torch.equal(picked["prompt_embeds"][1], a["prompt_embeds"][0])
    half = conditioning_to(both, torch.float16)
    assert half["prompt_embeds"].dtype == torch.float16 and half["prompt_mask"].dtype == torch.int64  # masks kept
    wide = expand_conditioning(b, 4)
    assert wide["prompt_embeds"].shape == (4, 3, 2) and torch.equal(wide["prompt_mask"][3], b["prompt_mask"][0])


def test_conditioning_errors_name_the_mismatch():
    with pytest.raises(ValueError, match="disagree on the batch size"):
        conditioning_batch_size({"x": torch.zeros(2, 1), "y": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="keys"):
        cat_conditioning([{"x": torch.zeros(1)}, {"y": torch.zeros(1)}])


def test_sd3_lora_targets_default_when_none_are_configured():
    assert SD3.lora_targets(()) == SD3_LORA_TARGETS and len(SD3_LORA_TARGETS) == 8
    assert SD3.lora_targets(["attn.to_q"]) == ("attn.to_q",)
    SD3.check_guidance_scale(4.5, "config.sample.guidance_scale")  # SD3 has CFG: no error


def test_sd3_velocity_is_the_transformer_called_with_sigma_times_1000(tiny_sd3_dir):
    """The seam's SD3 velocity equals the direct transformer call (float timestep in training, truncated
    integer timestep in rollouts, as upstream)."""
    from u_nft.tiny_sd3 import load_sd3_pipeline

    pipe = load_sd3_pipeline(tiny_sd3_dir)
    cond = SD3.encode_prompts(pipe, ["a cat", "a dog"], 16, "cpu")
    assert set(cond) == {"prompt_embeds", "pooled"} and conditioning_batch_size(cond) == 2
    channels, h, w = SD3.latent_shape(pipe, 64)
    x = torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9137, 0.25])
    with torch.no_grad():
        got = SD3.predict_velocity(pipe.transformer, x, sigma, cond)
        want = pipe.transformer(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                                pooled_projections=cond["pooled"], timestep=sigma * 1000, return_dict=False)[0]
        got_long = SD3.predict_velocity(pipe.transformer, x, sigma, cond, timestep_mode="long")
        want_long = pipe.transformer(hidden_states=x, encoder_hidden_states=cond["prompt_embeds"],
                                     pooled_projections=cond["pooled"], timestep=torch.tensor([913, 250]),
                                     return_dict=False)[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_long, want_long)
    assert (got - got_long).abs().max() > 0  # 913.7 vs 913: the modes differ
    sigmas = SD3.sigmas(pipe, 10, 64)
    assert sigmas.shape == (11,) and sigmas[0] == 1 and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[1], torch.tensor(0.9601), atol=1e-4, rtol=0)
