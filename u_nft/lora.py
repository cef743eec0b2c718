"""Two LoRA adapters on one diffusers transformer: the trained policy and the old policy.

DiffusionNFT (arXiv 2509.16117, Alg. 1) keeps three velocity fields on a single base model:
  v_theta = base + LoRA "default" (trained),
  v_old   = base + LoRA "old"     (frozen; rollouts and the implicit policies v+/v-),
  v_ref   = base with every adapter disabled (the KL term).
The adapters are injected with diffusers' ``PeftAdapterMixin.add_adapter`` so the model stays a
diffusers ``SD3Transformer2DModel`` (not a ``PeftModel`` wrapper) and saves/loads like any diffusers LoRA.

Invariant kept by every function here: only the "default" adapter's parameters require grad, always.
peft's ``set_adapter``/``enable_adapters`` flip ``requires_grad`` on whatever adapter becomes active;
letting that happen mid-step would change the parameter set an optimizer or DDP bucket was built on.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

TRAINABLE = "default"
OLD = "old"

_INIT_CHOICES = {"gaussian": "gaussian", "default": True}


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in unwrap(model).named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(unwrap(model), "peft_config", {}) or {})


def _require_adapter(model: nn.Module, adapter: str) -> None:
    names = _adapter_names(model)
    if adapter not in names:
        raise ValueError(f"LoRA adapter {adapter!r} is not on the model; adapters present: {names}")


def _adapter_params(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """Parameters of one adapter keyed like diffusers/peft exports: ``<module>.lora_A.weight``."""
    _require_adapter(model, adapter)
    params: dict[str, nn.Parameter] = {}
    for name, layer in _lora_layers(model):
        for part in ("lora_A", "lora_B"):
            sub = getattr(layer, part)
            if adapter in sub:
                for pname, p in sub[adapter].named_parameters():
                    params[f"{name}.{part}.{pname}"] = p
    return params


def _pin_trainable(model: nn.Module) -> None:
    """Re-establish the invariant: "default" params require grad, every other adapter is frozen."""
    for adapter in _adapter_names(model):
        for p in _adapter_params(model, adapter).values():
            p.requires_grad_(adapter == TRAINABLE)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer and the EMA see: the "default" adapter's, in a fixed order."""
    return list(_adapter_params(model, TRAINABLE).values())


def add_lora_adapters(
    transformer: nn.Module,
    rank: int,
    alpha: float,
    target_modules: list[str] | tuple[str, ...],
    init: str = "gaussian",
    init_lora_path: str | os.PathLike | None = None,
) -> nn.Module:
    """Add adapter "default" (trainable) and adapter "old" (frozen copy of "default").

    The LoRA update of a target linear W is ΔW = (alpha / rank) · B A (Hu et al. 2021), A: (rank, in),
    B: (out, rank). ``init="gaussian"`` draws A ~ N(0, 1/rank²) and sets B = 0 (peft), so both
    policies start equal to the base model, as upstream (docs/upstream_facts.md §F: r=32, alpha=64, gaussian).
    ``init_lora_path`` loads a saved LoRA (diffusers ``pytorch_lora_weights.safetensors`` or a peft
    ``adapter_model.safetensors``, a file or its folder) into "default" before copying it to "old".
    The base weights are frozen. Returns the same transformer, with "default" active.
    """
    from peft import LoraConfig

    model = unwrap(transformer)
    if init not in _INIT_CHOICES:
        raise ValueError(f"LoRA init {init!r} is not supported; accepted: {sorted(_INIT_CHOICES)}")
    if int(rank) < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not target_modules:
        raise ValueError("LoRA target_modules is empty; name the linear layers to adapt, e.g. ['attn.to_q']")
    present = _adapter_names(model)
    if TRAINABLE in present or OLD in present:
        raise ValueError(f"transformer already carries LoRA adapters {present}; add_lora_adapters runs once")

    model.requires_grad_(False)
    for name in (TRAINABLE, OLD):
        config = LoraConfig(
            r=int(rank),
            lora_alpha=alpha,
            init_lora_weights=_INIT_CHOICES[init],
            target_modules=list(target_modules),
        )
        with warnings.catch_warnings():
            # peft warns that a second adapter joins an existing peft_config: that is the point here.
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            model.add_adapter(config, adapter_name=name)
    if init_lora_path is not None:
        load_lora_state(model, TRAINABLE, read_lora_file(init_lora_path))
    load_lora_state(model, OLD, lora_state_dict(model, TRAINABLE))
    model.set_adapter(TRAINABLE)
    _pin_trainable(model)
    return transformer


def _is_disabled(model: nn.Module) -> bool:
    return any(layer.disable_adapters for _, layer in _lora_layers(model))


@contextlib.contextmanager
def use_adapter(transformer: nn.Module, name: str) -> Iterator[nn.Module]:
    """Run the transformer with adapter ``name`` active (e.g. "old" for rollouts and v_old).

    Restores the previously active adapter (and a disabled state) on exit; requires_grad flags are unchanged.
    """
    model = unwrap(transformer)
    _require_adapter(model, name)
    previous, was_disabled = model.active_adapters(), _is_disabled(model)
    if was_disabled:
        model.enable_adapters()
    model.set_adapter(name)
    _pin_trainable(model)
    try:
        yield transformer
    finally:
        model.set_adapter(previous)
        if was_disabled:
            model.disable_adapters()
        _pin_trainable(model)


@contextlib.contextmanager
def adapters_disabled(transformer: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model (v_ref of the KL term); re-enables the adapters on exit."""
    model = unwrap(transformer)
    was_disabled = _is_disabled(model)
    model.disable_adapters()
    _pin_trainable(model)
    try:
        yield transformer
    finally:
        if not was_disabled:
            model.enable_adapters()
        _pin_trainable(model)


@torch.no_grad()
def soft_update_old(transformer: nn.Module, decay: float) -> None:
    """old ← decay·old + (1 − decay)·default, computed in fp32 (docs/upstream_facts.md §F, upstream after each epoch).

    ``decay`` in [0, 1]; 0 copies "default" into "old" exactly.
    """
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"old-policy decay must lie in [0, 1], got {decay}")
    default = _adapter_params(transformer, TRAINABLE)
    old = _adapter_params(transformer, OLD)
    for key, p_old in old.items():
        mixed = float(decay) * p_old.float() + (1.0 - float(decay)) * default[key].float()
        p_old.copy_(mixed.to(p_old.dtype))


def lora_state_dict(transformer: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """Detached clones of one adapter's weights, keys ``<module>.lora_{A,B}.weight`` (no adapter name)."""
    return {k: p.detach().clone() for k, p in _adapter_params(transformer, adapter).items()}


@torch.no_grad()
def load_lora_state(transformer: nn.Module, adapter: str, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (keys as ``lora_state_dict``) into ``adapter``; keys and shapes must match exactly."""
    params = _adapter_params(transformer, adapter)
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"LoRA state does not fit adapter {adapter!r}: missing {missing[:3]} ({len(missing)} in all), "
            f"unexpected {unexpected[:3]} ({len(unexpected)} in all)"
        )
    for key, p in params.items():
        if tuple(state[key].shape) != tuple(p.shape):
            raise ValueError(
                f"LoRA tensor {key} of adapter {adapter!r} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(p.shape)} (rank mismatch?)"
            )
        p.copy_(state[key].to(device=p.device, dtype=p.dtype))


# Prefixes that saved LoRA files put before the module path: diffusers pipelines ("transformer."),
# peft's PeftModel ("base_model.model.").
_FILE_PREFIXES = ("transformer.", "base_model.model.")
# safetensors header key of files whose lora_B holds B * alpha / r (written where diffusers cannot store
# the adapter config, see save_lora_diffusers); read_lora_file divides it back out.
SCALE_FOLDED_KEY = "u_nft_lora_B_scale_folded"


def read_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a LoRA safetensors file (or a folder holding one) into ``lora_state_dict`` keys.

    Accepts diffusers exports (``pytorch_lora_weights.safetensors``, keys ``transformer.<m>.lora_A.weight``)
    and peft exports (``adapter_model.safetensors``, keys ``base_model.model.<m>.lora_A.weight``).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        candidates = [path / "pytorch_lora_weights.safetensors", path / "adapter_model.safetensors"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no LoRA weights in {path}: expected one of {[c.name for c in candidates]}"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA weights file {path} does not exist")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        folded = float((f.metadata() or {}).get(SCALE_FOLDED_KEY, 1.0))
    state = {}
    for key, value in load_file(str(path)).items():
        for prefix in _FILE_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value / folded if folded != 1.0 and ".lora_B." in key else value
    return state


def save_lora_diffusers(transformer: nn.Module, adapter: str, out_dir: str | os.PathLike,
                        state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``adapter`` as a diffusers LoRA that ``StableDiffusion3Pipeline.load_lora_weights(out_dir)`` reads.

    ``state``: the adapter's tensors keyed like :func:`lora_state_dict` (e.g. the full tensors gathered
    from an FSDP-sharded model, ``u_nft.sharding``); None reads them from the model.

    The peft config goes along as adapter metadata (``transformer_lora_adapter_metadata``); without it
    diffusers re-infers the config from the tensors and lora_alpha silently falls back to the rank.
    diffusers 0.33 has no adapter metadata: there alpha / r is folded into lora_B (exact delta W under
    the rank-as-alpha default it loads with) and recorded in the file header for :func:`read_lora_file`.
    Returns ``out_dir``.
    """
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    model = unwrap(transformer)
    _require_adapter(model, adapter)
    # On the base model (not a PeftModel wrapper) so the keys carry no "base_model.model." prefix.
    if state is None:
        state = get_peft_model_state_dict(model, adapter_name=adapter)
    else:
        expected = set(_adapter_params(model, adapter))
        if set(state) != expected:
            raise KeyError(f"LoRA state for {adapter!r} does not match the model's adapter keys: "
                           f"{sorted(set(state) ^ expected)[:3]}")
    layers = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    config = model.peft_config[adapter]
    out_dir = Path(out_dir)
    if "transformer_lora_adapter_metadata" in inspect.signature(StableDiffusion3Pipeline.save_lora_weights).parameters:
        StableDiffusion3Pipeline.save_lora_weights(out_dir, transformer_lora_layers=layers,
                                                   transformer_lora_adapter_metadata=config.to_dict())
        return out_dir
    # diffusers 0.33 neither stores the config nor reads one: it loads lora_alpha = r (scale 1). Folding
    # alpha / r into lora_B keeps delta W exact there; the header records it for read_lora_file.
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(f"adapter {adapter!r}: per-module rank/alpha patterns need diffusers >= 0.34 to export")
    scale = config.lora_alpha / config.r
    folded = {k: v * scale if ".lora_B." in k else v for k, v in layers.items()}
    StableDiffusion3Pipeline.save_lora_weights(out_dir, transformer_lora_layers=folded)
    if scale != 1.0:
        from safetensors.torch import load_file, save_file

        weights = out_dir / "pytorch_lora_weights.safetensors"
        save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", SCALE_FOLDED_KEY: repr(scale)})
    return out_dir
