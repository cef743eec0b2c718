"""LoRA adapters (default / old / disabled) on a tiny SD3 transformer, the EMA and the old-policy schedule."""
import math

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

from u_nft import lora
from u_nft.ema import EMA, ema_decay, old_policy_decay

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def tiny_transformer(seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
        caption_projection_dim=32, pooled_projection_dim=64,
    ).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(2, 16, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        pooled_projections=torch.randn(2, 64, generator=g),
        timestep=torch.tensor([500.0, 120.0]),
    )


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def perturb(model, adapter: str, seed: int, scale: float = 0.5) -> None:
    """Give an adapter non-zero B (gaussian init leaves B = 0, i.e. no effect)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in lora.lora_state_dict(model, adapter).items()}
    lora.load_lora_state(model, adapter, state)


@pytest.fixture()
def model():
    return lora.add_lora_adapters(tiny_transformer(), rank=4, alpha=12, target_modules=TARGETS)


def grad_flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


# LoRA ---------------------------------------------------------------------------------------------

def test_old_equals_default_after_init_and_base_is_frozen(model):
    default, old = lora.lora_state_dict(model, "default"), lora.lora_state_dict(model, "old")
    assert set(default) == set(old) and len(default) == 2 * (8 + 7)  # A and B; the last block (context_pre_only) lacks to_add_out
    assert all(torch.equal(default[k], old[k]) for k in default)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert len(lora.trainable_parameters(model)) == len(trainable)
    assert model.peft_config["default"].lora_alpha == 12 and model.peft_config["old"].r == 4


def test_adapter_switches_keep_only_default_trainable(model):
    before = grad_flags(model)
    with lora.use_adapter(model, "old"):
        assert model.active_adapters() == ["old"]
        assert grad_flags(model) == before
        with lora.adapters_disabled(model):
            assert grad_flags(model) == before
    assert model.active_adapters() == ["default"]
    assert grad_flags(model) == before


def test_adapters_switch_the_output(model, inputs):
    y_initial = forward(model, inputs)
    perturb(model, "default", seed=3)
    y_default = forward(model, inputs)
    with lora.use_adapter(model, "old"):
        y_old = forward(model, inputs)
    # "old" still holds the initial (B = 0) weights, "default" was moved.
    assert torch.equal(y_old, y_initial)
    assert (y_default - y_old).abs().max() > 1e-3
    assert torch.equal(forward(model, inputs), y_default)


def test_disabled_adapters_equal_base_model_output(inputs):
    y_base = forward(tiny_transformer(), inputs)
    model = lora.add_lora_adapters(tiny_transformer(), rank=4, alpha=12, target_modules=TARGETS)
    perturb(model, "default", seed=4)
    perturb(model, "old", seed=5)
    with lora.adapters_disabled(model):
        y_ref = forward(model, inputs)
    # Equal up to float32 rounding: the peft-wrapped to_add_out sees a contiguous copy of its (sliced)
    # input, so the matmul kernel may differ from the bare model's (observed max |diff| 2.4e-7).
    assert torch.allclose(y_ref, y_base, rtol=0, atol=1e-5)
    assert not torch.allclose(forward(model, inputs), y_base, atol=1e-3)


def test_gradient_reaches_only_default_adapter(model, inputs):
    perturb(model, "default", seed=6)
    perturb(model, "old", seed=7)
    model(**inputs).sample.square().mean().backward()
    for name, p in model.named_parameters():
        # (Some default grads are exactly 0: the last block's context queries feed no output.)
        assert (p.grad is not None) == (".default." in name), name
    assert sum(p.grad.abs().sum() for p in lora.trainable_parameters(model)) > 0


def test_soft_update_is_exact_fp32_mix(model):
    perturb(model, "default", seed=8)
    perturb(model, "old", seed=9)
    default, old = lora.lora_state_dict(model, "default"), lora.lora_state_dict(model, "old")
    lora.soft_update_old(model, 0.25)
    new_old = lora.lora_state_dict(model, "old")
    for k in old:
        assert torch.equal(new_old[k], 0.25 * old[k] + 0.75 * default[k])
    assert all(torch.equal(a, b) for a, b in zip(lora.lora_state_dict(model, "default").values(), default.values()))
    lora.soft_update_old(model, 0.0)
    assert all(torch.equal(lora.lora_state_dict(model, "old")[k], default[k]) for k in default)


def test_soft_update_rejects_decay_outside_unit_interval(model):
    with pytest.raises(ValueError, match="decay"):
        lora.soft_update_old(model, 1.5)


def test_load_lora_state_names_missing_keys(model):
    state = lora.lora_state_dict(model, "default")
    state.pop(next(iter(state)))
    with pytest.raises(KeyError, match="missing"):
        lora.load_lora_state(model, "old", state)
    with pytest.raises(ValueError, match="adapters present"):
        lora.lora_state_dict(model, "nope")


def test_unknown_init_is_rejected():
    with pytest.raises(ValueError, match="accepted"):
        lora.add_lora_adapters(tiny_transformer(), rank=4, alpha=4, target_modules=TARGETS, init="pissa")


def test_diffusers_export_reloads_with_alpha_and_same_output(model, inputs, tmp_path):
    perturb(model, "default", seed=10)
    y_default = forward(model, inputs)
    out = lora.save_lora_diffusers(model, "default", tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    # The transformer half of StableDiffusion3Pipeline.load_lora_weights(out), without building a pipeline.
    state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(out), return_lora_metadata=True)
    assert state and all("lora" in key and key.startswith("transformer.") for key in state)
    fresh = tiny_transformer()
    StableDiffusion3Pipeline.load_lora_into_transformer(state, transformer=fresh, adapter_name="loaded", metadata=metadata)
    # alpha (12) != rank (4): without the adapter metadata diffusers would fall back to alpha = rank.
    assert fresh.peft_config["loaded"].lora_alpha == 12
    assert fresh.peft_config["loaded"].r == 4
    assert torch.allclose(forward(fresh, inputs), y_default, atol=1e-6)


def test_init_lora_path_loads_into_default_and_old(model, inputs, tmp_path):
    perturb(model, "default", seed=11)
    y_default = forward(model, inputs)
    lora.save_lora_diffusers(model, "default", tmp_path / "lora")
    other = lora.add_lora_adapters(tiny_transformer(), rank=4, alpha=12, target_modules=TARGETS,
                                   init_lora_path=tmp_path / "lora")
    assert torch.allclose(forward(other, inputs), y_default, atol=1e-6)
    with lora.use_adapter(other, "old"):
        assert torch.allclose(forward(other, inputs), y_default, atol=1e-6)


# EMA ----------------------------------------------------------------------------------------------

def test_ema_decay_follows_upstream_formula():
    assert ema_decay(1) == pytest.approx(2 / 11)
    assert ema_decay(8) == pytest.approx(9 / 18)
    assert ema_decay(80) == pytest.approx(0.9)  # 81/90 = 0.9 exactly at the cap
    assert ema_decay(10_000) == 0.9
    assert ema_decay(3, max_decay=0.2) == 0.2


def test_ema_step_matches_closed_form():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p])
    expected = torch.zeros(3, dtype=torch.float64)
    for k, value in enumerate([1.0, -2.0, 4.0, 0.5], start=1):
        p.data.fill_(value)
        d = ema.step([p])
        assert d == pytest.approx((1 + k) / (10 + k))
        expected = expected + (1 - d) * (value - expected)
        assert torch.allclose(ema.shadow[0].double(), expected, atol=1e-6)
    assert ema.num_updates == 4


def test_ema_swap_round_trip_is_exact():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5).half())]
    ema = EMA(params)
    for _ in range(3):
        for p in params:
            p.data.add_(torch.randn_like(p))
        ema.step(params)
    live = [p.detach().clone() for p in params]
    ema.store(params)
    ema.copy_to(params)
    assert torch.equal(params[0], ema.shadow[0])
    assert torch.equal(params[1], ema.shadow[1].half())
    ema.restore(params)
    assert all(torch.equal(p, q) for p, q in zip(params, live))
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(params)


def test_ema_state_dict_round_trip_continues_identically():
    p = torch.nn.Parameter(torch.randn(6))
    a = EMA([p])
    a.step([p])
    b = EMA([torch.nn.Parameter(torch.zeros(6))])
    b.load_state_dict(a.state_dict())
    p.data.mul_(3)
    assert a.step([p]) == b.step([p])
    assert torch.equal(a.shadow[0], b.shadow[0])


# Old-policy schedule ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "decay_type, step, expected",
    [
        (0, 0, 0.0), (0, 1000, 0.0),
        (1, 0, 0.0), (1, 100, 0.1), (1, 500, 0.5), (1, 2000, 0.5),
        (2, 0, 0.0), (2, 74, 0.0), (2, 75, 0.0), (2, 175, 0.75), (2, 208, 0.9975), (2, 10_000, 0.999),
    ],
)
def test_old_policy_decay_types(decay_type, step, expected):
    assert math.isclose(old_policy_decay(step, decay_type), expected, abs_tol=1e-12)


def test_old_policy_decay_rejects_unknown_type():
    with pytest.raises(ValueError, match=r"accepted: \[0, 1, 2\]"):
        old_policy_decay(10, 3)
