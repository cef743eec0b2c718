"""The FLUX.1 adapter (u_nft/models/flux.py) against diffusers' FluxPipeline, on the tiny offline FLUX pipeline."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift

from u_nft import lora
from u_nft.fast_policy import MergedOldPolicy
from u_nft.loss import DenseLossOptions, u_nft_loss
from u_nft.models import family_for
from u_nft.models import flux
from u_nft.models.flux import FAMILY as FLUX
from u_nft.rollout import initial_noise
from u_nft.solvers import sample
from u_nft.tiny_flux import SCHEDULER_CONFIG
from upstream_reference import upstream_scalar_loss

RESOLUTION = 64  # 8x8 latents, 4x4 tokens


@pytest.fixture(scope="module")
def pipeline(tiny_flux_dir):
    return FLUX.load_pipeline(tiny_flux_dir, torch.float32, "cpu")


@pytest.fixture(scope="module")
def cond(pipeline):
    return FLUX.encode_prompts(pipeline, ["a red cat on a chair", "a blue house", "two dogs"], 32, "cpu")


def diffusers_call(transformer, x_t, sigma, cond, guidance):
    """The transformer call of FluxPipeline.__call__, written out with the pipeline's own helpers."""
    batch, channels, height, width = x_t.shape
    packed = FluxPipeline._pack_latents(x_t, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x_t.device, x_t.dtype)
    text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3)
    out = transformer(hidden_states=packed, timestep=(sigma * 1000) / 1000,
                      guidance=torch.full([1], guidance, dtype=torch.float32).expand(batch),
                      pooled_projections=cond["pooled"], encoder_hidden_states=cond["prompt_embeds"],
                      txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)


def test_family_is_read_from_the_pipeline_folder(tiny_flux_dir, pipeline):
    assert family_for(tiny_flux_dir) is FLUX
    assert family_for(pipeline) is FLUX
    assert FLUX.name == "flux" and not FLUX.supports_cfg


def test_packing_matches_flux_pipeline_and_unpacking_inverts_it():
    x = torch.randn(2, 16, 6, 10)
    packed = flux.pack_latents(x)
    assert packed.shape == (2, 15, 64)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(flux.unpack_latents(packed, 6, 10), x, rtol=0, atol=0)
    torch.testing.assert_close(flux.latent_image_ids(6, 10),
                               FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32), rtol=0, atol=0)
    # token (i, j) is the 2x2 patch of latent rows 2i..2i+1, cols 2j..2j+1: the location grid of cell_size 2
    token = packed[:, 1 * 5 + 3].view(2, 16, 2, 2)
    torch.testing.assert_close(token, x[:, :, 2:4, 6:8], rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        flux.pack_latents(torch.randn(1, 16, 5, 8))


@pytest.mark.parametrize("num_steps,image_seq_len", [(6, 16), (10, 1024), (28, 4096), (1, 256)])
def test_sigmas_equal_the_flux_scheduler(num_steps, image_seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    mu = diffusers_calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert flux.calculate_shift(image_seq_len) == pytest.approx(mu, abs=1e-12)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    ours = flux.flux_sigmas(num_steps, image_seq_len, scheduler.config)
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=0, atol=0)


def test_sigmas_shift_with_resolution(pipeline):
    small, large = FLUX.sigmas(pipeline, 10, 256), FLUX.sigmas(pipeline, 10, 1024)
    assert small[0] == large[0] == 1.0 and small[-1] == large[-1] == 0.0
    assert bool((large[1:-1] > small[1:-1]).all())  # more tokens, more time spent at high noise
    assert flux.calculate_shift(1024) == pytest.approx(0.63)  # 512 px on FLUX.1
    assert FLUX.latent_shape(pipeline, 512) == (16, 64, 64)
    with pytest.raises(ValueError, match=r"config.sample.resolution=72 must be a multiple of 16"):
        FLUX.latent_shape(pipeline, 72)


def test_velocity_equals_flux_pipelines_transformer_call(pipeline, cond):
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, 16, 8, 8, generator=g)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    with torch.no_grad():
        ours = FLUX.predict_velocity(pipeline.transformer, x_t, sigma, cond, guidance=3.5)
        reference = diffusers_call(pipeline.transformer, x_t, sigma, cond, 3.5)
        other_guidance = FLUX.predict_velocity(pipeline.transformer, x_t, sigma, cond, guidance=1.0)
        default_guidance = FLUX.predict_velocity(pipeline.transformer, x_t, sigma, cond)
        long_mode = FLUX.predict_velocity(pipeline.transformer, x_t, sigma, cond, timestep_mode="long")
    assert ours.shape == x_t.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    torch.testing.assert_close(default_guidance, ours, rtol=0, atol=0)  # None -> 3.5, FluxPipeline's default
    torch.testing.assert_close(long_mode, ours, rtol=0, atol=0)  # FLUX has no integer timesteps
    assert (other_guidance - ours).abs().max() > 1e-4  # the distilled guidance is a real input


def test_euler_sampling_and_decoding_reproduce_flux_pipeline(pipeline, cond):
    """Our schedule + velocity + Euler solver + decode == FluxPipeline(guidance_scale=3.5) on the same noise."""
    steps = 4
    noise = initial_noise([1, 2, 3], 16, 8, 8)
    with torch.no_grad():
        images = pipeline(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled"],
                          latents=flux.pack_latents(noise), num_inference_steps=steps, guidance_scale=3.5,
                          height=RESOLUTION, width=RESOLUTION, output_type="pt").images
        sigmas = FLUX.sigmas(pipeline, steps, RESOLUTION)
        latents = sample(lambda x, s: FLUX.predict_velocity(pipeline.transformer, x, torch.full((3,), float(s)),
                                                            cond, guidance=3.5), noise, sigmas, "flow")
        ours = FLUX.decode(pipeline.vae, latents)
    torch.testing.assert_close(ours, images, rtol=0, atol=1e-5)
    # decode applies FLUX.1's VAE normalisation, x = z / 0.3611 + 0.1159
    assert (pipeline.vae.config.scaling_factor, pipeline.vae.config.shift_factor) == (0.3611, 0.1159)
    manual = pipeline.vae.decode(latents / 0.3611 + 0.1159, return_dict=False)[0]
    torch.testing.assert_close(ours, (manual / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


def test_classifier_free_guidance_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"config.sample.guidance_scale=4.5: FluxPipeline is guidance-distilled"):
        FLUX.check_guidance_scale(4.5, "config.sample.guidance_scale")
    FLUX.check_guidance_scale(1.0, "config.sample.guidance_scale")


def lora_transformer(tiny_flux_dir, targets=()):
    transformer = FluxPipeline.from_pretrained(tiny_flux_dir).transformer
    return lora.add_lora_adapters(transformer, rank=4, alpha=8, target_modules=FLUX.lora_targets(targets))


def perturb(model, adapter, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in lora.lora_state_dict(model, adapter).items()}
    lora.load_lora_state(model, adapter, state)


def test_default_lora_targets_cover_double_and_single_blocks(tiny_flux_dir):
    model = lora_transformer(tiny_flux_dir)
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    double = {n.split(".", 2)[2] for n in adapted if n.startswith("transformer_blocks.")}
    single = {n.split(".", 2)[2] for n in adapted if n.startswith("single_transformer_blocks.")}
    assert double == set(flux.DEFAULT_LORA_TARGETS)  # attention and both FFNs of every double-stream block
    assert single == {"attn.to_q", "attn.to_k", "attn.to_v"}  # the single-stream blocks' attention
    assert len([n for n in adapted if n.startswith("single_transformer_blocks.")]) == 3 * 2  # both single blocks


def test_merged_old_policy_predicts_like_the_old_adapter(tiny_flux_dir, cond):
    model = lora_transformer(tiny_flux_dir)
    perturb(model, lora.OLD, seed=1)
    x_t = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.8, 0.4, 0.2])
    policy = MergedOldPolicy(model)
    with torch.no_grad(), lora.use_adapter(model, lora.OLD):
        expected = FLUX.predict_velocity(model, x_t, sigma, cond)
    merged = FLUX.predict_velocity(policy, x_t, sigma, cond)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    # after an old-policy update, refresh() re-merges in place and still agrees
    perturb(model, lora.TRAINABLE, seed=3)
    lora.soft_update_old(model, decay=0.5)
    policy.refresh(model)
    with torch.no_grad(), lora.use_adapter(model, lora.OLD):
        updated = FLUX.predict_velocity(model, x_t, sigma, cond)
    torch.testing.assert_close(FLUX.predict_velocity(policy, x_t, sigma, cond), updated, rtol=1e-5, atol=1e-5)
    assert (updated - expected).abs().max() > 1e-4


def test_constant_map_equals_scalar_diffusionnft_on_flux_predictions(tiny_flux_dir, cond):
    """A constant reward map gives upstream DiffusionNFT's loss and LoRA gradient on FLUX's own velocities."""
    model = lora_transformer(tiny_flux_dir)
    perturb(model, lora.TRAINABLE, seed=4)
    perturb(model, lora.OLD, seed=5)
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    t = torch.tensor([0.7, 0.45, 0.2])
    r = torch.tensor([0.9, 0.2, 0.5])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        with lora.use_adapter(model, lora.OLD):
            v_old = FLUX.predict_velocity(model, x_t, t, cond)
        with lora.adapters_disabled(model):
            v_ref = FLUX.predict_velocity(model, x_t, t, cond)
    params = lora.trainable_parameters(model)

    def loss_and_grads(dense: bool):
        v_theta = FLUX.predict_velocity(model, x_t, t, cond)
        if dense:  # cell_size 2: one cell per FLUX token (4x4 tokens)
            options = DenseLossOptions(beta=0.5, kl_weight=1e-2, cell_size=2)
            loss, _ = u_nft_loss(v_theta, v_old, x0, t, r.view(3, 1, 1).expand(3, 4, 4), options, noise=noise,
                                 v_ref=v_ref)
        else:
            loss = upstream_scalar_loss(v_theta, v_old, v_ref, x0, noise, t, r, 0.5, kl_weight=1e-2, adv_clip_max=5.0)
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), grads

    dense_loss, dense_grads = loss_and_grads(True)
    scalar_loss, scalar_grads = loss_and_grads(False)
    assert dense_loss > 0
    torch.testing.assert_close(dense_loss, scalar_loss, rtol=1e-5, atol=1e-7)
    norm = torch.sqrt(sum(g.square().sum() for g in scalar_grads))
    assert norm > 0
    for ours, upstream in zip(dense_grads, scalar_grads):
        torch.testing.assert_close(ours, upstream, rtol=1e-4, atol=1e-6 * float(norm))


def test_exported_lora_loads_in_flux_pipeline_and_changes_the_image(tiny_flux_dir, cond, tmp_path):
    model = lora_transformer(tiny_flux_dir)
    perturb(model, lora.TRAINABLE, seed=7)
    lora.save_lora_diffusers(model, lora.TRAINABLE, tmp_path / "lora")
    x_t = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(8))
    sigma = torch.tensor([0.9, 0.6, 0.3])
    with torch.no_grad():
        ours = FLUX.predict_velocity(model, x_t, sigma, cond)
    fresh = FluxPipeline.from_pretrained(tiny_flux_dir)
    with torch.no_grad():
        base = FLUX.predict_velocity(fresh.transformer, x_t, sigma, cond)
        fresh.load_lora_weights(tmp_path / "lora")
        loaded = FLUX.predict_velocity(fresh.transformer, x_t, sigma, cond)
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-5)
    assert (loaded - base).abs().max() > 1e-3


def flux_configs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("u_nft_configs", Path(__file__).parents[1] / "config" / "u_nft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: module.get_config(name) for name in
            ("flux_ocr_map", "flux_scalar_baseline", "flux_geneval_map", "flux_pickscore_map", "flux_tiny")}


def test_flux_configs_validate_and_carry_the_upstream_flux_recipe():
    from u_nft.config_utils import validate_config

    configs = flux_configs()
    fixtures = Path(__file__).parent / "fixtures" / "prompts"
    for name, config in configs.items():
        if name != "flux_tiny":  # the public prompt sets are not in the repo: the same formats from the fixtures
            folder = Path(config.dataset.train).parent.name
            config.dataset.train = config.dataset.test = str(next((fixtures / folder).glob("test*")))
        validate_config(config, world_size=1 if name == "flux_tiny" else 8)
        assert config.sample.distilled_guidance == 3.5
        assert config.sample.guidance_scale == config.sample.eval_guidance_scale == 1.0  # no CFG on FLUX.1-dev
        assert tuple(config.lora.target_modules) == ()  # -> flux.DEFAULT_LORA_TARGETS
        FLUX.check_guidance_scale(config.sample.guidance_scale, "config.sample.guidance_scale")
    full = configs["flux_pickscore_map"]
    assert full.pretrained.model == "black-forest-labs/FLUX.1-dev"
    assert (full.lora.rank, full.lora.alpha, full.train.learning_rate, full.train.kl_weight, full.train.beta) == \
        (64, 128, 3e-4, 0.0, 1.0)
    assert (full.sample.num_steps, full.sample.eval_num_steps, full.sample.resolution) == (8, 28, 512)
    assert full.mixed_precision == "bf16" and configs["flux_scalar_baseline"].train.scalar_mode
    tiny = configs["flux_tiny"]
    assert tiny.pretrained.tiny_family == "flux" and tiny.pretrained.build_tiny_if_missing
