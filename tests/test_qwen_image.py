"""The Qwen-Image family adapter (u_nft/models/qwen_image.py) against diffusers' own QwenImagePipeline, on
the tiny offline pipeline (u_nft/tiny_qwen_image.py). Skipped where diffusers has no Qwen-Image (< 0.35)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "QwenImagePipeline"):
    pytest.skip(f"Qwen-Image needs diffusers >= 0.35 (have {diffusers.__version__})", allow_module_level=True)

from diffusers import QwenImagePipeline  # noqa: E402

from u_nft.models import family_for  # noqa: E402
from u_nft.models import qwen_image as qi  # noqa: E402
from u_nft.tiny_qwen_image import LATENT_RANGE, QWEN_SPECIAL_TOKENS, quadrant_latents  # noqa: E402

PROMPTS = ["a red cat", "a picture of a small yellow boat on a calm lake under the starry night sky"]


@pytest.fixture(scope="module")
def pipeline(tiny_qwen_image_dir):
    return qi.FAMILY.load_pipeline(tiny_qwen_image_dir, torch.float32, "cpu")


def test_family_is_read_from_model_index(tiny_qwen_image_dir):
    family = family_for(tiny_qwen_image_dir)
    assert family is qi.FAMILY and family.name == "qwen_image" and family.supports_cfg


def test_tokenizer_drops_exactly_the_template_and_has_the_chat_special_tokens(pipeline):
    tokenizer = pipeline.tokenizer
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert qi.template_drop_length(pipeline) == pipeline.prompt_template_encode_start_idx == 34
    ids = [tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS]
    assert len(set(ids)) == len(QWEN_SPECIAL_TOKENS) and tokenizer.unk_token_id not in ids
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<|endoftext|>", "<|im_end|>")
    templated = pipeline.prompt_template_encode.format("a red cat")
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(templated)["input_ids"])
    assert tokens[0] == tokens[31] == "<|im_start|>" and tokens[29] == "<|im_end|>"
    assert tokenizer.decode(tokenizer(templated)["input_ids"][34:]).startswith("a red cat<|im_end|>")


def test_prompt_embeddings_are_the_encoders_states_after_the_template_padded_with_a_mask(pipeline):
    cond = qi.FAMILY.encode_prompts(pipeline, PROMPTS, max_sequence_length=48, device="cpu")
    assert cond["prompt_embeds"].shape == (2, 48, 32) and cond["prompt_mask"].dtype == torch.long
    own, own_mask = pipeline.encode_prompt(PROMPTS, device="cpu", max_sequence_length=48)
    lengths = own_mask.sum(1)
    assert lengths[0] < lengths[1] < 48
    assert torch.equal(cond["prompt_mask"][:, :own.shape[1]], own_mask)
    assert cond["prompt_mask"][:, own.shape[1]:].sum() == 0
    torch.testing.assert_close(cond["prompt_embeds"][:, :own.shape[1]], own, rtol=0, atol=0)
    assert cond["prompt_embeds"][0, lengths[0]:].abs().sum() == 0
    # The kept states are the language model's last hidden states from token 34 on (the prompt itself).
    templated = [pipeline.prompt_template_encode.format(p) for p in PROMPTS]
    tokens = pipeline.tokenizer(templated, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = pipeline.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                       output_hidden_states=True).hidden_states[-1]
    for i, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(cond["prompt_embeds"][i, :length], states[i, 34:34 + length])
    with pytest.raises(ValueError, match="max_sequence_length"):
        qi.encode_prompts(pipeline, PROMPTS, max_sequence_length=1025)


def test_velocity_equals_the_pipelines_transformer_call_on_packed_latents(pipeline):
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 16, 8, 8, generator=generator)
    sigma = torch.tensor([0.83, 0.27])
    embeds, mask = pipeline.encode_prompt(PROMPTS, device="cpu", max_sequence_length=64)
    packed = QwenImagePipeline._pack_latents(x_t.unsqueeze(1), 2, 16, 8, 8)  # as prepare_latents: (B, 1, C, h, w)
    # diffusers 0.35-0.36 pipelines also pass the text lengths
    lengths = {"txt_seq_lens": mask.sum(dim=1).tolist()} if qi.passes_text_lengths() else {}
    with torch.no_grad():
        expected = pipeline.transformer(hidden_states=packed, timestep=(sigma * 1000) / 1000,
                                        encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                        img_shapes=[[(1, 4, 4)]] * 2, return_dict=False, **lengths)[0]
        expected = QwenImagePipeline._unpack_latents(expected, 64, 64, pipeline.vae_scale_factor)[:, :, 0]
        for length in (64, 200):  # the padding to max_sequence_length changes nothing
            cond = qi.FAMILY.encode_prompts(pipeline, PROMPTS, max_sequence_length=length, device="cpu")
            v = qi.FAMILY.predict_velocity(pipeline.transformer, x_t, sigma, cond, guidance=3.5, timestep_mode="long")
            torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
        if qi.honours_text_mask():  # a prompt alone gets the velocity it gets in a padded batch (diffusers >= 0.37)
            alone = qi.FAMILY.encode_prompts(pipeline, PROMPTS[:1], max_sequence_length=64, device="cpu")
            torch.testing.assert_close(qi.FAMILY.predict_velocity(pipeline.transformer, x_t[:1], sigma[:1], alone),
                                       expected[:1], rtol=1e-5, atol=1e-5)
    assert torch.equal(qi.unpack_latents(qi.pack_latents(x_t), 8, 8), x_t)


def test_sigmas_are_the_schedulers_dynamic_shift(pipeline):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

    sigmas = qi.FAMILY.sigmas(pipeline, 6, 64)
    config = pipeline.scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    retrieve_timesteps(pipeline.scheduler, 6, "cpu", sigmas=torch.linspace(1, 1 / 6, 6).tolist(), mu=mu)
    torch.testing.assert_close(sigmas, pipeline.scheduler.sigmas.float())
    assert sigmas.shape == (7,) and sigmas[0] == 1 and sigmas[-1] == 0
    assert sigmas[-2] == pytest.approx(config.shift_terminal, abs=1e-6)  # Qwen-Image's shift_terminal 0.02
    assert not torch.allclose(qi.FAMILY.sigmas(pipeline, 6, 256), sigmas)  # the shift grows with the image
    assert qi.FAMILY.latent_shape(pipeline, 64) == (16, 8, 8)
    with pytest.raises(ValueError, match="sample.resolution=72"):
        qi.FAMILY.latent_shape(pipeline, 72)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_the_loops_sampler_and_decode_reproduce_the_pipeline(pipeline, true_cfg_scale):
    """The generic sampler of the loop (u_nft.rollout.sample_conditioned, Euler) with the family's sigmas,
    velocity, negative prompt and true CFG, then the family's decode, give QwenImagePipeline.__call__'s latents and
    images from the same noise."""
    from u_nft.rollout import sample_conditioned

    if true_cfg_scale > 1 and not qi.honours_text_mask():
        pytest.skip("diffusers < 0.37 attends to padded text tokens: a doubled CFG batch pads differently")
    steps, batch = 4, 2
    noise = torch.randn(batch, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    call = dict(prompt=PROMPTS, height=64, width=64, num_inference_steps=steps, true_cfg_scale=true_cfg_scale,
                latents=qi.pack_latents(noise), max_sequence_length=64)
    if true_cfg_scale > 1:
        call["negative_prompt"] = [qi.NEGATIVE_PROMPT] * batch
    with torch.no_grad():
        images = pipeline(**call, output_type="pt").images
        packed = pipeline(**call, output_type="latent").images
        x0 = sample_conditioned(qi.FAMILY, pipeline.transformer, qi.FAMILY.encode_prompts(pipeline, PROMPTS, 64, "cpu"),
                                noise, qi.FAMILY.sigmas(pipeline, steps, 64), solver="flow",
                                guidance_scale=true_cfg_scale,
                                negative=qi.FAMILY.negative_conditioning(pipeline, 64, "cpu"), guidance=3.5)
        decoded = qi.FAMILY.decode(pipeline.vae, x0)
    torch.testing.assert_close(x0, qi.unpack_latents(packed, 8, 8), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoded, images, rtol=1e-4, atol=1e-4)
    assert decoded.shape == (batch, 3, 64, 64) and 0 <= decoded.min() and decoded.max() <= 1
    if true_cfg_scale > 1:  # the per-token norm rescaling is what the pipeline does, not plain CFG
        v_uncond, v_cond = torch.randn(2, batch, 16, 8, 8, generator=torch.Generator().manual_seed(4))
        rescaled = qi.FAMILY.combine_guidance(v_uncond, v_cond, true_cfg_scale)
        torch.testing.assert_close(qi.pack_latents(rescaled).norm(dim=-1), qi.pack_latents(v_cond).norm(dim=-1))
        assert not torch.allclose(rescaled, v_uncond + true_cfg_scale * (v_cond - v_uncond))


def test_decode_uses_the_vaes_per_channel_latent_mean_and_std(pipeline):
    """The transparent decoder shows z_0..2 as RGB only after x = z * latents_std + latents_mean, so the
    colours prove the de-normalisation; skipping it gives other colours."""
    latents = quadrant_latents(4, torch.Generator().manual_seed(1))
    images = qi.FAMILY.decode(pipeline.vae, latents)
    cells = images.reshape(4, 3, 8, 8, 8, 8).mean((3, 5))  # the pixel block of each latent cell
    expected = latents[:, :3] / LATENT_RANGE  # [-1, 1] -> monotone -> pixels
    assert torch.corrcoef(torch.stack([cells.flatten(), expected.flatten()]))[0, 1] > 0.99
    config = pipeline.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
    assert std.std() > 0.3 and mean.abs().max() > 1  # Qwen-Image's own 16 per-channel values
    with torch.no_grad():
        raw = pipeline.vae.decode(latents.unsqueeze(2), return_dict=False)[0][:, :, 0] / 2 + 0.5
    assert (raw.clamp(0, 1) - images).abs().mean() > 0.1


def test_default_lora_targets_adapt_every_block_and_the_mask_dtype_survives_casting(pipeline):
    names = [name for name, _ in pipeline.transformer.named_modules()]
    blocks = len(pipeline.transformer.transformer_blocks)
    for target in qi.FAMILY.lora_targets(()):
        assert sum(name.endswith(target) for name in names) == blocks, target
    from u_nft.models import conditioning_to

    cond = conditioning_to(qi.FAMILY.encode_prompts(pipeline, PROMPTS, 32, "cpu"), torch.bfloat16)
    assert cond["prompt_embeds"].dtype == torch.bfloat16 and cond["prompt_mask"].dtype == torch.long


def test_exported_lora_loads_in_qwen_image_pipeline_and_changes_the_image(tiny_qwen_image_dir, tmp_path):
    from u_nft.lora import TRAINABLE, add_lora_adapters, save_lora_diffusers, use_adapter

    trained = qi.FAMILY.load_pipeline(tiny_qwen_image_dir, torch.float32, "cpu")
    add_lora_adapters(trained.transformer, rank=4, alpha=8, target_modules=qi.FAMILY.lora_targets(()))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in trained.transformer.named_parameters():
            if f"lora_B.{TRAINABLE}" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    save_lora_diffusers(trained.transformer, TRAINABLE, tmp_path / "lora")

    fresh = QwenImagePipeline.from_pretrained(tiny_qwen_image_dir)
    fresh.set_progress_bar_config(disable=True)
    base = QwenImagePipeline.from_pretrained(tiny_qwen_image_dir)
    base.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path / "lora")
    x_t = torch.randn(2, 16, 8, 8, generator=generator)
    sigma = torch.tensor([0.6, 0.3])
    cond = qi.FAMILY.encode_prompts(fresh, PROMPTS, 32, "cpu")
    with torch.no_grad(), use_adapter(trained.transformer, TRAINABLE):
        v_trained = qi.FAMILY.predict_velocity(trained.transformer, x_t, sigma, cond)
    with torch.no_grad():
        v_loaded = qi.FAMILY.predict_velocity(fresh.transformer, x_t, sigma, cond)
        v_base = qi.FAMILY.predict_velocity(base.transformer, x_t, sigma, cond)
    torch.testing.assert_close(v_loaded, v_trained, rtol=1e-4, atol=1e-4)  # alpha / rank kept
    assert (v_loaded - v_base).abs().mean() > 1e-2
    call = dict(prompt=PROMPTS[:1], height=64, width=64, num_inference_steps=3, true_cfg_scale=1.0, output_type="pt")
    image = fresh(**call, generator=torch.Generator().manual_seed(0)).images
    base_image = base(**call, generator=torch.Generator().manual_seed(0)).images
    assert (image - base_image).abs().mean() > 1e-2


def test_merged_old_policy_of_qwen_image_equals_the_old_adapter(tiny_qwen_image_dir):
    """The GPU default old policy (a copy with the old LoRA merged) works for Qwen-Image, whose RoPE tables are
    plain tensor attributes rather than buffers, and gives the "old" adapter's velocity."""
    from u_nft.fast_policy import MergedOldPolicy
    from u_nft.lora import OLD, add_lora_adapters, use_adapter

    pipe = qi.FAMILY.load_pipeline(tiny_qwen_image_dir, torch.float32, "cpu")
    add_lora_adapters(pipe.transformer, rank=4, alpha=8, target_modules=qi.FAMILY.lora_targets(()))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if f"lora_B.{OLD}" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    merged = MergedOldPolicy(pipe.transformer, dtype=torch.float32)
    cond = qi.FAMILY.encode_prompts(pipe, PROMPTS, 32, "cpu")
    x_t, sigma = torch.randn(2, 16, 8, 8, generator=generator), torch.tensor([0.7, 0.2])
    with torch.no_grad(), use_adapter(pipe.transformer, OLD):
        v_old = qi.FAMILY.predict_velocity(pipe.transformer, x_t, sigma, cond)
    torch.testing.assert_close(qi.FAMILY.predict_velocity(merged, x_t, sigma, cond), v_old, rtol=1e-4, atol=1e-4)
