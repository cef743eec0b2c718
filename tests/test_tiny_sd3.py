"""The tiny random-weight SD3 pipeline (u_nft.tiny_sd3) and the pipeline loader."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from u_nft.tiny_sd3 import MARKER_NAME, _has_text_encoder_3, build_tiny_sd3_pipeline, load_sd3_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tiny_sd3_dir):
    return load_sd3_pipeline(tiny_sd3_dir)


def test_tiny_pipeline_has_the_sd35_structure(pipeline):
    from diffusers import (
        AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline,
    )

    assert isinstance(pipeline, StableDiffusion3Pipeline)
    assert isinstance(pipeline.transformer, SD3Transformer2DModel)
    assert isinstance(pipeline.vae, AutoencoderKL)
    assert isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
    # Three text encoders by default, as SD3.5: T5's width is the transformer's context width.
    assert type(pipeline.text_encoder_3).__name__ == "T5EncoderModel"
    assert type(pipeline.tokenizer_3).__name__ in ("T5TokenizerFast", "T5Tokenizer")  # 5.x: one class
    assert pipeline.text_encoder_3.config.d_model == pipeline.transformer.config.joint_attention_dim
    assert pipeline.text_encoder_3.config.feed_forward_proj == "gated-gelu"
    assert pipeline.scheduler.config.shift == 3.0 and pipeline.scheduler.config.num_train_timesteps == 1000
    vae = pipeline.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert len(vae.block_out_channels) == 4 and pipeline.vae_scale_factor == 8
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    tr = pipeline.transformer.config
    assert (tr.in_channels, tr.out_channels, tr.patch_size, tr.qk_norm) == (16, 16, 2, "rms_norm")
    hidden = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    projections = pipeline.text_encoder.config.projection_dim + pipeline.text_encoder_2.config.projection_dim
    assert tr.joint_attention_dim >= hidden
    assert tr.pooled_projection_dim == projections
    assert tr.caption_projection_dim == tr.num_attention_heads * tr.attention_head_dim
    # 256 px images are 16 x 16 patches; the positional table must cover them.
    assert tr.pos_embed_max_size * tr.patch_size * pipeline.vae_scale_factor >= 256


def test_clip_eos_token_ids_match_the_tokenizers(pipeline):
    pairs = ((pipeline.text_encoder, pipeline.tokenizer), (pipeline.text_encoder_2, pipeline.tokenizer_2))
    for encoder, tokenizer in pairs:
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert encoder.config.vocab_size == len(tokenizer)


def test_tiny_pipeline_generates_finite_nontrivial_images(pipeline):
    out = pipeline(["a cat"], num_inference_steps=2, guidance_scale=1.0, height=64, width=64,
                   output_type="pt", max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    images = out.images
    assert images.shape == (1, 3, 64, 64)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 1e-3


def test_rebuilding_reuses_a_complete_directory(tiny_sd3_dir):
    marker = tiny_sd3_dir / MARKER_NAME
    before = marker.stat().st_mtime_ns
    assert build_tiny_sd3_pipeline(tiny_sd3_dir, seed=0) == tiny_sd3_dir
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["seed"] == 0
    # No temporary build directories are left next to it.
    assert not [p for p in tiny_sd3_dir.parent.iterdir() if ".building-" in p.name]


def test_rebuilding_with_another_seed_is_refused(tiny_sd3_dir):
    with pytest.raises(ValueError, match="'seed': 0.*overwrite=True"):
        build_tiny_sd3_pipeline(tiny_sd3_dir, seed=1)


def test_building_into_a_foreign_nonempty_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path))):
        build_tiny_sd3_pipeline(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_local_model_error_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.pretrained\.model=.*does not exist"):
        load_sd3_pipeline(tmp_path / "nowhere" / "sd3")
    with pytest.raises(FileNotFoundError, match=r"config\.pretrained\.model=.*model_index\.json"):
        load_sd3_pipeline(tmp_path)


def test_t5_tokenizer_follows_t5_conventions(pipeline):
    tokenizer = pipeline.tokenizer_3
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) == pipeline.text_encoder_3.config.vocab_size
    assert "<extra_id_0>" in tokenizer.get_vocab() and "<extra_id_99>" in tokenizer.get_vocab()
    ids = tokenizer(["a red apple, watercolor"], padding="max_length", max_length=24).input_ids[0]
    n = ids.index(1) + 1  # the eos closes the prompt, then padding
    assert ids[n:] == [0] * (24 - n) and tokenizer.unk_token_id not in ids[:n]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red apple, watercolor"


def test_offline_t5_tokenizer_is_deterministic(tmp_path):
    from u_nft.tiny_models import write_t5_tokenizer

    first = (write_t5_tokenizer(tmp_path / "a") / "tokenizer.json").read_bytes()
    assert first == (write_t5_tokenizer(tmp_path / "b") / "tokenizer.json").read_bytes()


def test_two_encoder_build_has_no_t5_and_keeps_the_clip_weights(tmp_path, tiny_sd3_dir):
    clip_only = build_tiny_sd3_pipeline(tmp_path / "clip_only", pretrain_steps=5, text_encoder_3=False)
    with_t5 = build_tiny_sd3_pipeline(tmp_path / "with_t5", pretrain_steps=5)
    assert not _has_text_encoder_3(clip_only) and _has_text_encoder_3(with_t5)
    a, b = load_sd3_pipeline(clip_only), load_sd3_pipeline(with_t5)
    assert a.text_encoder_3 is None and a.tokenizer_3 is None
    for name in ("text_encoder", "text_encoder_2", "vae"):  # T5 is drawn last: the rest is identical
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    with pytest.raises(ValueError, match="'text_encoder_3': False"):
        build_tiny_sd3_pipeline(clip_only, pretrain_steps=5)


def test_text_encoder_3_is_kept_when_the_directory_has_one(tmp_path, tiny_sd3_dir):
    assert _has_text_encoder_3(tiny_sd3_dir)
    (tmp_path / "text_encoder_3").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"text_encoder_3": ["transformers", "T5EncoderModel"]}))
    assert _has_text_encoder_3(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"text_encoder_3": [None, None]}))
    assert not _has_text_encoder_3(tmp_path)


def test_seed_changes_the_weights_and_overwrite_rebuilds_identically(tmp_path):
    reference = build_tiny_sd3_pipeline(tmp_path / "seed0", seed=0, pretrain_steps=5)
    other = build_tiny_sd3_pipeline(tmp_path / "seed1", seed=1, pretrain_steps=5)
    a = load_sd3_pipeline(reference).transformer.state_dict()
    b = load_sd3_pipeline(other).transformer.state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(a["proj_out.weight"], b["proj_out.weight"])
    with pytest.raises(ValueError, match="pretrain_steps"):
        build_tiny_sd3_pipeline(other, seed=1, pretrain_steps=6)
    build_tiny_sd3_pipeline(other, seed=0, overwrite=True, pretrain_steps=5)
    c = load_sd3_pipeline(other).transformer.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_make_tiny_sd3_cli_builds_a_loadable_pipeline(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_sd3.py"), "--out", str(out),
                             "--pretrain_steps", "5"],
                            capture_output=True, text=True, check=True)
    assert str(out) in result.stdout
    assert (out / MARKER_NAME).is_file()
    assert load_sd3_pipeline(out).transformer.config.num_layers == 2
