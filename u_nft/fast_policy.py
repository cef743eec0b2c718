"""Fast no-grad policies for the DiffusionNFT step: the old policy as a plain module with merged LoRA weights.

Each training micro-step needs three velocities on the same inputs (docs/contract.md §1):
  v_old   = base + LoRA "old"  (no grad; also what samples the rollouts),
  v_ref   = base, LoRA off     (no grad; only when kl_weight > 0),
  v_theta = base + LoRA "default" (grad).
Through peft every target linear of v_old pays two extra thin matmuls (x A^T, then B) and the adapter
bookkeeping; and it shares the trained model, so a compiled graph must be re-guarded at each switch.
:class:`MergedOldPolicy` instead holds the old policy as an ordinary transformer of the same class (any family:
``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ...) whose target linears carry the merged weight

    W_old = W + (alpha / r) · B_old A_old        W: (out, in), A_old: (r, in), B_old: (out, r)

(Hu et al. 2021, the LoRA update of adapter "old"), so v_old costs one plain base-model forward.
Every other tensor (FFNs, norms, embedders, the 0.9 GB positional table) is *shared* with the LoRA'd
model when the dtypes agree: those weights are frozen, and v_old uses them unchanged.

Memory (SD3.5-Medium, 2.24 B base parameters; LoRA targets = the 8 attention projections of the
24 joint blocks, 0.45 B parameters): a full merged copy costs 4.5 GB in bf16 (+0.45 GB positional
table), docs/benchmarks.md reference point; with sharing (source already bf16) only the merged targets are owned: 0.9 GB.
An fp32 source with a bf16 copy cannot share and owns the full 4.9 GB.

After ``soft_update_old`` changes the old LoRA, :meth:`MergedOldPolicy.refresh` recomputes the merged
target weights in place from the LoRA'd model's (frozen) base layers and the current old LoRA: no new
copy, and a compiled graph stays valid (the parameters are the same objects).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from u_nft.lora import OLD, unwrap

__all__ = [
    "MergedOldPolicy", "merged_weight",
    "raise_recompile_limit", "compile_in_place", "compile_enabled", "compile_policy_forwards",
]

# Dynamo's default of 8 graphs per code object is hit by SD3.5's dual-attention blocks (docs/benchmarks.md)
# and by a model that runs with float (training) and long (sampling) timesteps, and adapters on/off.
RECOMPILE_LIMIT = 64
_HALF = (torch.float16, torch.bfloat16)


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise dynamo's per-code-object graph limit to at least ``limit`` (``recompile_limit``;
    ``cache_size_limit`` on older torch)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(int(getattr(config, name)), int(limit)))


def compile_in_place(module: nn.Module, mode: str | None = None, cpu: bool = False) -> bool:
    """``module.compile(mode=mode)`` (whole-model ``torch.compile``, in place: the state dict keeps its
    names, and every holder of the module, e.g. ``pipeline.transformer``, runs the compiled forward)
    when the module lives on a CUDA device, or on the CPU too when ``cpu``; returns whether it compiled.
    By default CPU modules stay eager: inductor's compile time there outweighs the gain at test sizes."""
    first = next(module.parameters(), None)
    if first is None or (first.device.type != "cuda" and not (cpu and first.device.type == "cpu")):
        return False
    raise_recompile_limit()
    module.compile(mode=mode)
    return True


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``train.compile``: "on" -> True (CPU too), "off" -> False, "auto" -> ``device`` is CUDA."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"config.train.compile must be 'auto', 'on' or 'off', got {setting!r}")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


def compile_policy_forwards(transformer: nn.Module, old_policy: "MergedOldPolicy | None", setting: str,
                            device: torch.device, mode: str | None = None) -> bool:
    """Whole-model ``torch.compile`` of the three forwards of a training micro-step (``train.compile``).

    ``transformer`` (the LoRA'd model) serves v_theta (adapter "default") and v_ref (adapters disabled):
    one compiled module, a graph per adapter state (dynamo guards on peft's flags; recompile limit
    raised to :data:`RECOMPILE_LIMIT`). ``old_policy`` (a :class:`MergedOldPolicy`) serves v_old and the
    rollouts: its plain module is compiled separately, and :meth:`MergedOldPolicy.refresh` keeps its
    graphs valid (in-place weight updates). Compiling in place also covers the evaluation sampler,
    which calls ``pipeline.transformer`` (EMA weights are swapped in place, no recompile).
    Returns whether anything was compiled.
    """
    if not compile_enabled(setting, device):
        return False
    cpu = setting == "on"
    compiled = compile_in_place(transformer, mode, cpu=cpu)
    if old_policy is not None:
        old_policy.compiled = compile_in_place(old_policy.module, mode, cpu=cpu)
        compiled = compiled or old_policy.compiled
    return compiled


# ---- merging -----------------------------------------------------------------------------------------

def _lora_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, peft LoRA layer) pairs of ``model``; the name is the module path of the adapted layer."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _check_mergeable(name: str, layer: nn.Module, adapter: str) -> None:
    """Refuse LoRA variants whose effect is not W + s·B A on a plain linear."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear):
        raise TypeError(f"LoRA layer {name} is a {type(layer).__name__}; only nn.Linear targets can be merged")
    if adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
        raise ValueError(f"adapter {adapter!r} on {name} is a LoRA variant (DoRA, ...); merging supports plain LoRA")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"adapter {adapter!r} on {name} has lora_bias=True; merging supports plain LoRA")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"LoRA layer {name} has fan_in_fan_out=True; SD3's linears store (out, in)")
    if not isinstance(layer.lora_dropout[adapter], nn.Identity):
        raise ValueError(f"adapter {adapter!r} on {name} has LoRA dropout; merged weights cannot express it")


@torch.no_grad()
def merged_weight(layer: nn.Module, adapter: str = OLD, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W + scaling · B A of one peft LoRA linear, summed in fp32, returned in ``dtype`` (default W's).

    W = ``layer.base_layer.weight`` (out, in); A = ``lora_A[adapter].weight`` (r, in);
    B = ``lora_B[adapter].weight`` (out, r); scaling = ``layer.scaling[adapter]`` (alpha / r, or
    alpha / sqrt(r) with rslora). Returns (out, in).
    """
    weight = layer.base_layer.weight
    a = layer.lora_A[adapter].weight.float()
    b = layer.lora_B[adapter].weight.float()
    merged = weight.float() + float(layer.scaling[adapter]) * (b @ a)
    return merged.to(dtype or weight.dtype)


def _base_name(lora_name: str) -> str | None:
    """Parameter/buffer name of the LoRA'd model -> the same tensor's name in a plain model (None: LoRA-only).

    ``blocks.0.attn.to_q.base_layer.weight`` -> ``blocks.0.attn.to_q.weight``; ``...lora_A.old.weight`` -> None.
    """
    parts = lora_name.split(".")
    if any(p.startswith("lora_") for p in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, is_parameter: bool) -> None:
    """Put ``tensor`` at dotted ``name`` of ``root`` as is (no copy; no requires_grad change)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if is_parameter:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        owner._parameters[leaf] = tensor
    else:
        owner._buffers[leaf] = tensor


class MergedOldPolicy:
    """The old policy (adapter ``adapter`` of a LoRA'd diffusers transformer) as a frozen plain module.

    ``MergedOldPolicy(transformer, dtype=torch.bfloat16)`` builds ``type(transformer)(**config)`` on the
    meta device and fills it: each LoRA target linear gets its own weight ``merged_weight(layer, adapter)``
    (in ``dtype``); every other parameter and buffer is the LoRA'd model's own tensor when
    ``share_frozen`` and its dtype equals ``dtype`` (else a converted copy, as ``module.to(dtype)``).
    Nothing here requires grad and nothing here is a parameter of ``transformer``.

    Call it like the transformer (``policy(hidden_states=..., encoder_hidden_states=...,
    pooled_projections=..., timestep=..., return_dict=False)``): it runs under ``torch.no_grad`` and,
    when its weights are half precision and the caller set no autocast, under autocast in its dtype.
    It has ``config`` (the transformer's), so a family's ``predict_velocity`` (keyword arguments only) and
    ``u_nft.rollout.sample_conditioned`` use it in place of the transformer.

    ``compile=True`` whole-model compiles the copy (dynamo recompile limit raised to 64, docs/benchmarks.md)
    only when it lives on CUDA; ``self.compiled`` says whether it did.

    Memory: see the module docstring (SD3.5-M: 0.9 GB owned when sharing a bf16 base, 4.9 GB otherwise).
    """

    def __init__(self, transformer: nn.Module, dtype: torch.dtype | None = None, adapter: str = OLD,
                 share_frozen: bool = True, compile: bool = False, compile_mode: str | None = None):
        source = unwrap(transformer)
        adapters = list(getattr(source, "peft_config", {}) or {})
        if adapter not in adapters:
            raise ValueError(f"LoRA adapter {adapter!r} is not on the transformer; adapters present: {adapters}")
        self.adapter = adapter
        self.dtype = dtype or self._source_dtype(source)
        self.config = source.config
        self.module = self._build(source, share_frozen)
        self.target_names = sorted(self._targets)
        self.compiled = compile_in_place(self.module, compile_mode) if compile else False

    # -- construction --

    @staticmethod
    def _source_dtype(source: nn.Module) -> torch.dtype:
        for name, p in source.named_parameters():
            if _base_name(name) is not None:
                return p.dtype
        raise ValueError(f"{type(source).__name__} has no base parameters to take a dtype from")

    def _build(self, source: nn.Module, share_frozen: bool) -> nn.Module:
        with torch.device("meta"):
            module = type(source).from_config(source.config)
        layers = dict(_lora_linears(source))
        self._targets = {}
        for name, layer in layers.items():
            _check_mergeable(name, layer, self.adapter)
            if self.adapter in layer.lora_A:
                self._targets[name] = layer
        owned = {f"{name}.weight" for name in self._targets}

        self.owned_bytes = 0  # bytes of the tensors this policy holds itself (merged targets, unshared copies)

        def own(tensor: torch.Tensor) -> torch.Tensor:
            self.owned_bytes += tensor.numel() * tensor.element_size()
            return tensor

        def place(tensor: torch.Tensor) -> torch.Tensor:
            floating = tensor.is_floating_point()
            if share_frozen and (not floating or tensor.dtype == self.dtype):
                return tensor
            return own(tensor.detach().to(self.dtype if floating else tensor.dtype, copy=True))

        for name, p in source.named_parameters():
            base = _base_name(name)
            if base is None:
                continue
            if base in owned:
                weight = merged_weight(source.get_submodule(base.rpartition(".")[0]), self.adapter, self.dtype)
                _set_tensor(module, base, own(weight), is_parameter=True)
            else:
                if p.requires_grad:
                    raise ValueError(f"base parameter {name} requires grad; the old policy shares frozen weights only")
                _set_tensor(module, base, place(p), is_parameter=True)
        for name, b in source.named_buffers():
            base = _base_name(name)
            if base is not None:
                _set_tensor(module, base, place(b), is_parameter=False)
        # Plain tensor attributes (neither parameter nor buffer, e.g. Qwen-Image's RoPE tables, kept out of the
        # state dict on purpose) were built on the meta device too: share the source's.
        for name, submodule in module.named_modules():
            for attribute, value in list(vars(submodule).items()):
                if isinstance(value, torch.Tensor) and value.is_meta:
                    setattr(submodule, attribute, getattr(source.get_submodule(name), attribute))
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"merged old policy: {len(left)} tensors found no source tensor, e.g. {left[:3]} "
                               f"(the LoRA'd model's names do not map onto {type(source).__name__})")
        module.requires_grad_(False)
        return module.eval()

    # -- use --

    @torch.no_grad()
    def refresh(self, transformer: nn.Module) -> None:
        """Re-merge the target weights from ``transformer``'s base layers and its current old LoRA
        (after ``soft_update_old``). In place: the parameters stay the same objects."""
        source = unwrap(transformer)
        layers = {name: layer for name, layer in _lora_linears(source) if self.adapter in layer.lora_A}
        if set(layers) != set(self._targets):
            missing, extra = sorted(set(self._targets) - set(layers)), sorted(set(layers) - set(self._targets))
            raise ValueError(f"refresh: the transformer's LoRA targets changed since the merged policy was built "
                             f"(missing {missing[:3]}, new {extra[:3]})")
        for name, layer in layers.items():
            target = self.module.get_submodule(name).weight
            target.copy_(merged_weight(layer, self.adapter, torch.float32))
        self._targets = layers

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, **transformer_kwargs):
        device_type = self.device.type
        with torch.no_grad():
            if self.dtype in _HALF and not torch.is_autocast_enabled(device_type):
                with torch.autocast(device_type, dtype=self.dtype):
                    return self.module(**transformer_kwargs)
            return self.module(**transformer_kwargs)


# ---- the three velocities of a training micro-step ---------------------------------------------------
