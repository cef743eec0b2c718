"""MergedOldPolicy: the old LoRA merged into a frozen copy predicts, samples and trains like adapter "old"."""
import copy

import pytest
import torch
from diffusers import SD3Transformer2DModel

from u_nft import lora
from u_nft.fast_policy import MergedOldPolicy, merged_weight
from u_nft.loss import DenseLossOptions, u_nft_loss
from u_nft.rollout import sample_latents
from u_nft.solvers import sd3_sigmas
from u_nft.models.sd3 import FAMILY as SD3
from u_nft.training import policy_predictions

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def tiny_transformer(seed: int = 0, dual: tuple[int, ...] = ()) -> SD3Transformer2DModel:
    """The tests' tiny SD3 transformer (as tests/test_lora_ema.py), optionally with SD3.5 dual attention."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=64, dual_attention_layers=dual,
        qk_norm="rms_norm" if dual else None,
    ).eval()


def perturb(model, adapter: str, seed: int, scale: float = 0.1) -> None:
    """Give an adapter random non-zero A and B (gaussian init leaves B = 0, i.e. no effect)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in lora.lora_state_dict(model, adapter).items()}
    lora.load_lora_state(model, adapter, state)


def lora_model(dual: tuple[int, ...] = (0,)) -> SD3Transformer2DModel:
    model = lora.add_lora_adapters(tiny_transformer(dual=dual), rank=4, alpha=12, target_modules=TARGETS)
    perturb(model, lora.OLD, seed=1)
    perturb(model, lora.TRAINABLE, seed=2)
    return model


def make_inputs(seed: int = 3, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 16, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        timestep=torch.tensor([500.0, 120.0][:batch]),
    )


def adapter_old(model, inputs) -> torch.Tensor:
    with torch.no_grad(), lora.use_adapter(model, lora.OLD):
        return model(**inputs, return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fp64_old(model, inputs) -> torch.Tensor:
    """Adapter-"old" prediction of a float64 copy: the reference both precisions are measured against."""
    model64 = copy.deepcopy(model).double()
    return adapter_old(model64, {k: v.double() for k, v in inputs.items()})


@pytest.mark.parametrize("dual", [(), (0,)])
def test_merged_fp32_equals_old_adapter(dual):
    model = lora_model(dual)
    inputs = make_inputs()
    policy = MergedOldPolicy(model)
    expected = adapter_old(model, inputs)
    assert not torch.equal(expected, lora_model_default(model, inputs))  # old and default really differ
    got = policy(**inputs, return_dict=False)[0]
    assert got.dtype == torch.float32
    assert rel_err(got, expected) < 1e-5


def lora_model_default(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_merged_bf16_within_stated_tolerance_of_fp64():
    """bf16 merged copy: relative error to the fp64 adapter-"old" prediction at most 2e-2, and at most
    twice what the trainer's bf16 adapter path (bf16 base, fp32 LoRA, bf16 autocast) gets."""
    model = lora_model()
    inputs = make_inputs()
    reference = fp64_old(model, inputs)
    merged = MergedOldPolicy(model, dtype=torch.bfloat16)(**inputs, return_dict=False)[0]
    bf16_model = copy.deepcopy(model)
    for name, p in bf16_model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapter_bf16 = adapter_old(bf16_model, inputs)
    shared = MergedOldPolicy(bf16_model)(**inputs, return_dict=False)[0]
    assert merged.dtype == torch.bfloat16  # ran under its own autocast: no caller context needed
    for got in (merged, shared):
        assert rel_err(got, reference) < 2e-2
        assert rel_err(got, reference) < 2 * rel_err(adapter_bf16, reference)


def test_merged_weight_is_w_plus_scaled_ba():
    model = lora_model()
    layer = model.transformer_blocks[0].attn.to_q
    scaling = 12 / 4
    expected = layer.base_layer.weight + scaling * layer.lora_B["old"].weight @ layer.lora_A["old"].weight
    torch.testing.assert_close(merged_weight(layer, "old"), expected, rtol=1e-6, atol=1e-6)


def test_refresh_follows_soft_update_in_place():
    model = lora_model()
    inputs = make_inputs()
    policy = MergedOldPolicy(model)
    params_before = [id(p) for p in policy.module.parameters()]
    stale = policy(**inputs, return_dict=False)[0]
    lora.soft_update_old(model, decay=0.3)
    expected = adapter_old(model, inputs)
    assert rel_err(stale, expected) > 1e-3  # without refresh the copy is out of date
    policy.refresh(model)
    assert rel_err(policy(**inputs, return_dict=False)[0], expected) < 1e-5
    assert [id(p) for p in policy.module.parameters()] == params_before  # compiled graphs stay valid


def test_frozen_weights_are_shared_and_nothing_requires_grad():
    model = lora_model()
    policy = MergedOldPolicy(model)
    source = {id(p) for p in model.parameters()}
    targets = {f"{name}.weight" for name in policy.target_names}
    for name, p in policy.module.named_parameters():
        assert not p.requires_grad
        assert (id(p) in source) == (name not in targets), name
    assert len(policy.target_names) == 2 * 8 - 1  # the last, context-pre-only block has no to_add_out
    target_bytes = sum(policy.module.get_submodule(n).weight.nbytes for n in policy.target_names)
    assert policy.owned_bytes == target_bytes
    assert MergedOldPolicy(model, share_frozen=False).owned_bytes > target_bytes


def test_sampling_with_merged_copy_equals_sampling_with_adapter():
    model = lora_model()
    inputs = make_inputs()
    sigmas = sd3_sigmas(4)
    args = (inputs["encoder_hidden_states"], inputs["pooled_projections"], inputs["hidden_states"], sigmas, "dpm2")
    with lora.use_adapter(model, lora.OLD):
        expected = sample_latents(model, *args)
    policy = MergedOldPolicy(model)
    assert policy.config.in_channels == 16
    got = sample_latents(policy, *args)
    assert rel_err(got, expected) < 1e-5


def loss_and_grads(model, predictions, inputs, r):
    x0 = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(9))
    t = inputs["timestep"] / 1000
    t4 = t.view(-1, 1, 1, 1)
    x_t = (1 - t4) * x0 + t4 * inputs["hidden_states"]
    v_theta, v_old, v_ref = predictions(x_t, t)
    loss, _ = u_nft_loss(v_theta, v_old, x0, t, r, DenseLossOptions(kl_weight=0.1), x_t=x_t, v_ref=v_ref)
    params = lora.trainable_parameters(model)
    for p in params:
        p.grad = None
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def test_trainable_gradients_unchanged_by_merged_old_policy():
    model = lora_model()
    model.train()
    inputs = make_inputs()
    r = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(4))
    cond = {"prompt_embeds": inputs["encoder_hidden_states"], "pooled": inputs["pooled_projections"]}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    loss_a, grads_a = loss_and_grads(
        model, lambda x_t, t: policy_predictions(SD3, model, x_t, t, cond, need_ref=True), inputs, r)
    policy = MergedOldPolicy(model)
    loss_b, grads_b = loss_and_grads(
        model, lambda x_t, t: policy_predictions(SD3, model, x_t, t, cond, need_ref=True, old_policy=policy),
        inputs, r)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.active_adapters() == [lora.TRAINABLE]
    assert abs(float(loss_a - loss_b)) <= 1e-5 * abs(float(loss_a))
    assert all(p.grad is None for p in policy.module.parameters())
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_reference_velocity_is_the_base_model():
    model = lora_model()
    inputs = make_inputs()
    t = inputs["timestep"] / 1000
    policy = MergedOldPolicy(model)
    cond = {"prompt_embeds": inputs["encoder_hidden_states"], "pooled": inputs["pooled_projections"]}
    with torch.no_grad():
        _, v_old, v_ref = policy_predictions(SD3, model, inputs["hidden_states"], t, cond, True, old_policy=policy)
        _, _, no_ref = policy_predictions(SD3, model, inputs["hidden_states"], t, cond, False, old_policy=policy)
    with torch.no_grad(), lora.adapters_disabled(model):
        expected_ref = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(v_ref, expected_ref)
    assert rel_err(v_old, adapter_old(model, inputs)) < 1e-5
    assert no_ref is None


def test_errors_name_the_culprit():
    plain = tiny_transformer()
    with pytest.raises(ValueError, match="adapter 'old' is not on the transformer"):
        MergedOldPolicy(plain)
    from peft import LoraConfig

    with_dropout = tiny_transformer()
    with_dropout.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.1, target_modules=["attn.to_q"]),
                             adapter_name="old")
    with pytest.raises(ValueError, match="LoRA dropout"):
        MergedOldPolicy(with_dropout)
