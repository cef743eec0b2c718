"""Speed and memory options keep the maths: torch.compile, gradient checkpointing, lean merged old-policy storage."""
from __future__ import annotations

import pytest
import torch

from test_fast_policy import adapter_old, lora_model, make_inputs, rel_err
from u_nft import lora
from u_nft.fast_policy import MergedOldPolicy, compile_enabled, compile_policy_forwards
from u_nft.loss import DenseLossOptions
from u_nft.models.sd3 import FAMILY as SD3
from u_nft.training import micro_step_loss


def step(model, policy, kl_weight=1e-2):
    """One micro-step of the trainer (old, reference, trained forwards; dense loss; backward).
    Returns (loss, gradients of the trainable LoRA)."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 16, 16, 16, generator=g)
    t, r = torch.tensor([0.7, 0.3]), torch.rand(2, 8, 8, generator=g)
    embeds, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g)
    params = lora.trainable_parameters(model)
    for p in params:
        p.grad = None
    loss, _ = micro_step_loss(SD3, model, x0, noise, t, r, {"prompt_embeds": embeds, "pooled": pooled},
                              DenseLossOptions(kl_weight=kl_weight), None,
                              old_policy=policy)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def max_rel_grad_diff(a, b) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


def to_bf16_base(model) -> None:
    """The trainer's GPU layout (``from_pretrained(torch_dtype=bf16)``, then LoRA in fp32): frozen weights and
    floating buffers bf16, both LoRAs fp32."""
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    for module in model.modules():
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_floating_point():
                module._buffers[key] = buf.to(torch.bfloat16)


def test_compile_setting_resolves_per_device():
    assert compile_enabled("auto", torch.device("cuda", 0)) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled("on", torch.device("cpu")) and not compile_enabled("off", torch.device("cuda", 0))
    with pytest.raises(ValueError, match="config.train.compile must be 'auto', 'on' or 'off'"):
        compile_enabled("yes", torch.device("cpu"))
    model = lora_model()
    assert not compile_policy_forwards(model, None, "auto", torch.device("cpu"))  # CPU stays eager on auto


@pytest.mark.slow  # inductor compiles three graphs on the CPU: ~2 min on 2 cores
def test_compiled_forwards_match_eager_loss_and_gradients():
    model = lora_model(dual=(0,))  # an SD3.5 dual-attention block included
    model.train()
    policy = MergedOldPolicy(model)
    eager_loss, eager_grads = step(model, policy)
    assert compile_policy_forwards(model, policy, "on", torch.device("cpu"))
    assert policy.compiled
    compiled_loss, compiled_grads = step(model, policy)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert max_rel_grad_diff(compiled_grads, eager_grads) < 1e-4
    # after an old-policy update the in-place refresh keeps the compiled copy right
    lora.soft_update_old(model, 0.5)
    policy.refresh(model)
    inputs = make_inputs()
    assert rel_err(policy(**inputs, return_dict=False)[0], adapter_old(model, inputs)) < 1e-5
    torch._dynamo.reset()


def test_gradient_checkpointing_recomputes_blocks_and_keeps_loss_and_gradients():
    model = lora_model(dual=(0,))
    model.train()
    policy = MergedOldPolicy(model)
    plain_loss, plain_grads = step(model, policy)
    calls = []
    # a pre-hook: the non-reentrant recomputation stops early, before a forward hook would run
    hook = model.transformer_blocks[0].register_forward_pre_hook(lambda *a: calls.append(torch.is_grad_enabled()))
    step(model, policy)
    plain_calls = len(calls)
    calls.clear()
    model.enable_gradient_checkpointing()
    ckpt_loss, ckpt_grads = step(model, policy)
    hook.remove()
    # v_old (merged copy, its own module) adds no call here; v_ref and v_theta do, and checkpointing
    # re-runs the block of v_theta once more in the backward pass
    assert plain_calls == 2 and len(calls) == 3
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=1e-6, atol=1e-7)
    assert max_rel_grad_diff(ckpt_grads, plain_grads) < 1e-5
    assert not any(p.requires_grad for p in policy.module.parameters())


def test_bf16_merged_copy_owns_only_the_lora_targets_and_shares_storage():
    model = lora_model()
    to_bf16_base(model)
    policy = MergedOldPolicy(model, dtype=torch.bfloat16)
    source = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]}
    source_ptrs = {t.data_ptr() for t in source.values()}
    targets = {f"{name}.weight" for name in policy.target_names}
    owned = 0
    for name, t in [*policy.module.named_parameters(), *policy.module.named_buffers()]:
        if name in targets:
            assert t.data_ptr() not in source_ptrs, name
            assert t.dtype == torch.bfloat16
            owned += t.nbytes
        else:
            assert t.data_ptr() in source_ptrs, f"{name} is a copy, not the LoRA'd model's tensor"
    assert policy.owned_bytes == owned
    total = sum(t.nbytes for name, t in source.items() if "lora_" not in name)
    assert owned < 0.5 * total  # the tiny model's attention projections; SD3.5-M: 0.9 of 4.9 GB
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "timestep" else v
              for k, v in make_inputs().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = adapter_old(model, inputs)
    got = policy(**inputs, return_dict=False)[0]
    assert rel_err(got.float(), expected.float()) < 2e-2  # bf16 rounding of W + s B A vs the adapter path
