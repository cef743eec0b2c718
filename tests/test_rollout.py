"""Rollouts on the tiny SD3 pipeline (u_nft.rollout): shapes, determinism, batch independence,
and agreement with the diffusers pipeline's own sampler."""
import pytest
import torch

from u_nft.rollout import (
    decode_latents, encode_prompts, initial_noise, negative_embeddings, rollout, sample_latents,
    step_noise_generators,
)
from u_nft.solvers import SOLVERS, sd3_sigmas
from u_nft.tiny_sd3 import load_sd3_pipeline

PROMPTS = ["a red cube on a table", "two cats", "the word HELLO"]
LATENT = 8  # 64 px images: fast, and 16 image tokens still exercise the patching


@pytest.fixture(scope="module")
def pipeline(tiny_sd3_dir):
    return load_sd3_pipeline(tiny_sd3_dir)


@pytest.fixture(scope="module")
def embeds(pipeline):
    return encode_prompts(pipeline, PROMPTS)


class CountingTransformer(torch.nn.Module):
    """The real transformer, recording each call's batch size and timestep."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.calls = []

    def forward(self, **kwargs):
        self.calls.append((kwargs["hidden_states"].shape[0], kwargs["timestep"].clone()))
        return self.transformer(**kwargs)


def test_encode_prompts_gives_clip_plus_t5_tokens(pipeline, embeds):
    prompt_embeds, pooled = embeds
    width = pipeline.transformer.config.joint_attention_dim
    assert prompt_embeds.shape == (3, 77 + 128, width)
    assert pooled.shape == (3, pipeline.transformer.config.pooled_projection_dim)
    # The default tiny pipeline has T5: both the CLIP part and the T5 part carry the prompt.
    assert pipeline.text_encoder_3 is not None
    for part in (prompt_embeds[:, :77], prompt_embeds[:, 77:]):
        assert part.abs().sum() > 0 and not torch.allclose(part[0], part[1])
    # CLIP states are zero-padded from 2 x 32 channels up to the T5 width.
    hidden = pipeline.text_encoder.config.hidden_size + pipeline.text_encoder_2.config.hidden_size
    assert torch.count_nonzero(prompt_embeds[:, :77, hidden:]) == 0
    assert not torch.allclose(pooled[0], pooled[1])
    short, _ = encode_prompts(pipeline, PROMPTS[:1], max_sequence_length=16)
    assert short.shape == (1, 77 + 16, width)
    assert torch.allclose(short[0, :77], prompt_embeds[0, :77])


def test_encode_prompts_without_t5_fills_the_t5_tokens_with_zeros(tmp_path):
    from u_nft.tiny_sd3 import build_tiny_sd3_pipeline

    clip_only = load_sd3_pipeline(build_tiny_sd3_pipeline(tmp_path / "clip_only", pretrain_steps=1,
                                                          text_encoder_3=False))
    assert clip_only.text_encoder_3 is None
    prompt_embeds, _ = encode_prompts(clip_only, PROMPTS[:2], max_sequence_length=16)
    # diffusers 0.33 pads 77 zero tokens (tokenizer_max_length); recent releases (0.42) max_sequence_length.
    assert prompt_embeds.shape[1] in (77 + 16, 77 + 77)
    assert torch.count_nonzero(prompt_embeds[:, 77:]) == 0 and prompt_embeds[:, :77].abs().sum() > 0


def test_negative_embeddings_are_the_empty_prompt_repeated(pipeline):
    neg, neg_pooled = negative_embeddings(pipeline, 3)
    empty, empty_pooled = encode_prompts(pipeline, [""])
    assert neg.shape == (3, *empty.shape[1:]) and neg_pooled.shape == (3, empty_pooled.shape[1])
    assert all(torch.equal(neg[i], empty[0]) and torch.equal(neg_pooled[i], empty_pooled[0]) for i in range(3))


def test_initial_noise_depends_only_on_each_samples_seed():
    batch = initial_noise([3, 7, 11], 16, LATENT, LATENT)
    assert batch.shape == (3, 16, LATENT, LATENT) and batch.dtype == torch.float32
    assert torch.equal(batch[1:2], initial_noise([7], 16, LATENT, LATENT))
    assert not torch.allclose(batch[0], batch[2])
    big = initial_noise([0], 16, 64, 64)
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02
    assert initial_noise([7], 16, LATENT, LATENT, torch.bfloat16).dtype == torch.bfloat16


def test_step_noise_is_independent_of_the_initial_noise():
    draw = step_noise_generators([7])[0]
    step = torch.randn((1, 16, LATENT, LATENT), generator=draw)
    assert not torch.allclose(step, initial_noise([7], 16, LATENT, LATENT))


@pytest.mark.parametrize("solver", SOLVERS)
def test_rollout_shapes_range_and_determinism(pipeline, embeds, solver):
    prompt_embeds, pooled = embeds
    args = (pipeline, prompt_embeds[:2], pooled[:2], [0, 1], 8 * LATENT, sd3_sigmas(4), solver)
    latents, images = rollout(*args)
    assert latents.shape == (2, 16, LATENT, LATENT) and torch.isfinite(latents).all()
    assert images.shape == (2, 3, 8 * LATENT, 8 * LATENT) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 1e-3
    again_latents, again_images = rollout(*args)
    assert torch.equal(latents, again_latents) and torch.equal(images, again_images)
    other, _ = rollout(pipeline, prompt_embeds[:2], pooled[:2], [5, 6], 8 * LATENT, sd3_sigmas(4), solver)
    assert not torch.allclose(latents, other)


@pytest.mark.parametrize("solver, eta", [("flow", 0.0), ("dpm2", 0.0), ("flow", 0.7)])
def test_a_sample_does_not_depend_on_its_batch(pipeline, embeds, solver, eta):
    prompt_embeds, pooled = embeds
    sigmas = sd3_sigmas(4)
    batched, _ = rollout(pipeline, prompt_embeds, pooled, [10, 11, 12], 8 * LATENT, sigmas, solver, eta)
    alone, _ = rollout(pipeline, prompt_embeds[1:2], pooled[1:2], [11], 8 * LATENT, sigmas, solver, eta)
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


def test_euler_with_float_timesteps_reproduces_the_diffusers_pipeline(pipeline, embeds):
    """Same noise, same prompts, 6 Euler steps: equal to float32 round-off (measured: bit-identical)."""
    prompt_embeds, pooled = embeds
    noise = initial_noise([0, 1], 16, LATENT, LATENT)
    ours = sample_latents(pipeline.transformer, prompt_embeds[:2], pooled[:2], noise, sd3_sigmas(6),
                          solver="flow", timestep_mode="float")
    reference = pipeline(PROMPTS[:2], num_inference_steps=6, guidance_scale=1.0, latents=noise.clone(),
                         height=8 * LATENT, width=8 * LATENT, output_type="latent", max_sequence_length=128).images
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)
    # Upstream's truncated integer timesteps are a (slightly) different model input.
    truncated = sample_latents(pipeline.transformer, prompt_embeds[:2], pooled[:2], noise, sd3_sigmas(6),
                               solver="flow", timestep_mode="long")
    assert not torch.allclose(truncated, reference, atol=1e-6)


def test_cfg_free_sampling_makes_one_forward_per_step_with_truncated_timesteps(pipeline, embeds):
    prompt_embeds, pooled = embeds
    counting = CountingTransformer(pipeline.transformer)
    sample_latents(counting, prompt_embeds[:2], pooled[:2], initial_noise([0, 1], 16, LATENT, LATENT), sd3_sigmas(10))
    assert [b for b, _ in counting.calls] == [2] * 10
    first = [t[0].item() for _, t in counting.calls]
    assert first == [1000, 960, 913, 857, 790, 707, 602, 464, 278, 8]
    assert all(t.dtype == torch.long and torch.equal(t, t[:1].expand(2)) for _, t in counting.calls)


def test_cfg_doubles_the_batch_and_is_neutral_for_identical_negatives(pipeline, embeds):
    prompt_embeds, pooled = embeds
    noise = initial_noise([0, 1], 16, LATENT, LATENT)
    args = (prompt_embeds[:2], pooled[:2], noise, sd3_sigmas(3), "dpm2")
    counting = CountingTransformer(pipeline.transformer)
    plain = sample_latents(counting, *args)
    guided_same = sample_latents(counting, *args, guidance_scale=4.5, negative_embeds=prompt_embeds[:2],
                                 negative_pooled=pooled[:2])
    assert [b for b, _ in counting.calls] == [2] * 3 + [4] * 3
    torch.testing.assert_close(guided_same, plain, atol=1e-5, rtol=1e-5)
    neg, neg_pooled = negative_embeddings(pipeline, 2)
    guided = sample_latents(pipeline.transformer, *args, guidance_scale=4.5, negative_embeds=neg,
                            negative_pooled=neg_pooled)
    assert not torch.allclose(guided, plain, atol=1e-3)


def test_cfg_without_negative_embeddings_is_an_error(pipeline, embeds):
    prompt_embeds, pooled = embeds
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs negative_embeds"):
        sample_latents(pipeline.transformer, prompt_embeds[:1], pooled[:1], initial_noise([0], 16, LATENT, LATENT),
                       sd3_sigmas(2), guidance_scale=3.0)


def test_decode_latents_matches_the_pipelines_decode(pipeline):
    latents = initial_noise([4, 5], 16, LATENT, LATENT)
    ours = decode_latents(pipeline.vae, latents)
    raw = pipeline.vae.decode(latents / 1.5305 + 0.0609, return_dict=False)[0]
    reference = pipeline.image_processor.postprocess(raw.detach(), output_type="pt")
    assert ours.shape == (2, 3, 8 * LATENT, 8 * LATENT)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_rollout_rejects_a_resolution_off_the_patch_grid(pipeline, embeds):
    prompt_embeds, pooled = embeds
    with pytest.raises(ValueError, match="resolution 72 must be a multiple of 16"):
        rollout(pipeline, prompt_embeds[:1], pooled[:1], [0], 72, sd3_sigmas(2))


def test_rollout_batch_broadcasts_the_empty_prompt_for_cfg(pipeline):
    """rollout_batch takes the empty prompt's batch-1 embeddings (any dtype) and broadcasts them for CFG."""
    from u_nft.models.sd3 import FAMILY as SD3
    from u_nft.training import rollout_batch

    def encode(prompts):
        return SD3.encode_prompts(pipeline, prompts, max_sequence_length=32)

    neg_embeds, neg_pooled = (x.double() for x in negative_embeddings(pipeline, 1, max_sequence_length=32))
    negative = {"prompt_embeds": neg_embeds, "pooled": neg_pooled}
    args = (SD3, pipeline, encode, [0, 1], PROMPTS[:2], [{}, {}], [3, 4], 64, sd3_sigmas(3), "flow", 0.0)
    guided = rollout_batch(*args, 4.5, None, negative, adapter=None)
    cond = encode(PROMPTS[:2])
    expected = sample_latents(pipeline.transformer, cond["prompt_embeds"], cond["pooled"],
                              initial_noise([3, 4], 16, 8, 8), sd3_sigmas(3), "flow", guidance_scale=4.5,
                              negative_embeds=neg_embeds.float().expand(2, -1, -1),
                              negative_pooled=neg_pooled.float().expand(2, -1))
    torch.testing.assert_close(guided.latents, expected)
    plain = rollout_batch(*args, 1.0, None, None, adapter=None)
    assert (guided.latents - plain.latents).abs().max() > 1e-4
