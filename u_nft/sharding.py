"""How the ranks share the model: data-parallel replicas ("ddp") or FSDP2 sharding ("fsdp").

``config.train.sharding`` picks one :class:`ShardingStrategy`; the train loop calls the same methods
whichever it is and never branches on the name:

    strategy = make_sharding(config.train.sharding, autocast_dtype, config.train.fsdp_text_encoders)
    strategy.prepare(transformer, text_encoders)        # after the LoRA adapters are added
    params = trainable_parameters(transformer)          # DTensor shards under "fsdp"
    ... backward ...
    strategy.reduce_gradients(params)                   # "ddp": all-reduce mean; "fsdp": already reduce-scattered
    grad_norm = strategy.clip_grad_norm(params, max_norm)
    strategy.save(run_dir, state, trained, config, keep_last)   /   strategy.load(checkpoint, trained)

"ddp" is what the trainer always did: every rank holds the whole model, gradients are averaged by hand
(``u_nft.distributed.average_gradients``; no DDP wrapper, so peft's adapter switching stays a plain module
call), checkpoints are single-process ``torch.save`` files written by the main rank.

"fsdp" shards with the engine PyTorch ships, ``torch.distributed.fsdp.fully_shard`` (FSDP2): every repeated
block of the transformer (each entry of its ``nn.ModuleList`` s: SD3's ``transformer_blocks``, FLUX's
``transformer_blocks`` and ``single_transformer_blocks``, Qwen-Image's ``transformer_blocks``) is one FSDP unit,
then the root; parameters become DTensors sharded on dim 0 across the ranks, each block is all-gathered for
its forward and freed after it, gradients are reduce-scattered in fp32 (``MixedPrecisionPolicy``:
compute in the autocast dtype, reduce in fp32). Both LoRA adapters live inside the sharded blocks, so the
three velocities of a micro-step stay the adapter path of ``u_nft.lora``: v_theta = adapter "default",
v_old = adapter "old" (``use_adapter``), v_ref = adapters off (``adapters_disabled``). The merged old-policy
copy (``u_nft.fast_policy.MergedOldPolicy``) is a second, unsharded transformer and is DDP-only.
The old-policy soft update and the EMA are elementwise, so they run on the local shards unchanged.
Large frozen text encoders (T5-XXL, Qwen2.5-VL: ``TEXT_ENCODER_MIN_PARAMS``) are sharded the same way.
Checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its shards; resharded on load),
inside the same atomic, checksummed folder as "ddp" (``u_nft.checkpoint.save_sharded_checkpoint``), plus
the full diffusers-format LoRA gathered from the shards (:meth:`ShardingStrategy.full_lora_state`).

Every rank must call the sharded model the same number of times (each forward is a collective).
Memory per rank of both strategies for SD3.5 / FLUX / Qwen-Image: docs/memory_plan.md.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from u_nft import distributed as dist
from u_nft.checkpoint import (CHECKPOINTS_DIR, Checkpoint, TrainState, capture_rng, checkpoint_name,
                              load_sharded_state, save_checkpoint, save_sharded_checkpoint)
from u_nft.ema import ema_weights
from u_nft.lora import OLD, TRAINABLE, _adapter_params, load_lora_state, lora_state_dict, save_lora_diffusers

SHARDING_CHOICES = ("ddp", "fsdp")
FSDP_TEXT_ENCODER_CHOICES = ("auto", "all", "none")
# "auto" shards a frozen text encoder from this many parameters on: T5-XXL (4.8 B) and Qwen2.5-VL-7B (8.3 B)
# are sharded, CLIP-L (0.12 B) and OpenCLIP bigG (0.69 B) stay replicated (docs/memory_plan.md).
TEXT_ENCODER_MIN_PARAMS = 1_000_000_000
LORA_EXPORT_DIR = "lora"  # the diffusers-format LoRA inside each checkpoint folder


@dataclasses.dataclass
class TrainedLoRA:
    """What a checkpoint holds besides the counters: the LoRA'd transformer and what trains it.

    params: ``u_nft.lora.trainable_parameters(transformer)`` taken after :meth:`ShardingStrategy.prepare`
    (the optimizer's and the EMA's list, in that order). ema: ``u_nft.ema.EMA`` or None.
    """

    transformer: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    ema: Any
    params: list[nn.Parameter]


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The entries of every outermost ``nn.ModuleList`` in ``module`` that hold parameters, in module order.

    For diffusers transformers these are the transformer blocks (SD3 / Qwen-Image ``transformer_blocks``,
    FLUX ``transformer_blocks`` + ``single_transformer_blocks``); for text encoders their layers
    (CLIP ``text_model.encoder.layers``, T5 ``encoder.block``, Qwen2.5-VL ``layers`` and vision ``blocks``).
    Lists nested inside a chosen block (e.g. an attention's ``to_out``) are part of that block.
    """
    blocks: list[nn.Module] = []
    taken: list[str] = []
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        entries = [m for m in child if _num_params(m) > 0]
        if entries:
            blocks.extend(entries)
            taken.append(name)
    return blocks


class ShardingStrategy(abc.ABC):
    """One way of spreading the trained model over the ranks; see the module docstring."""

    name: str
    shards_parameters: bool       # True: parameters are DTensor shards, not replicas
    lockstep_forwards: bool       # True: every rank must run the model the same number of times

    @abc.abstractmethod
    def prepare(self, transformer: nn.Module, text_encoders: Sequence[nn.Module] = ()) -> list[str]:
        """Shard (or not) the LoRA'd ``transformer`` and frozen ``text_encoders`` in place, after the
        adapters are added and before the optimizer is built; returns a line per sharded module."""

    @abc.abstractmethod
    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Make every ``p.grad`` the mean over ranks (of this rank's part of it)."""

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` over all ranks' gradients; returns the pre-clip total norm, a plain 0-dim tensor."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @abc.abstractmethod
    def grad_scaler(self, enabled: bool, device: torch.device):
        """The fp16 loss scaler for these gradients (disabled = identity)."""

    @abc.abstractmethod
    def resolve_old_policy(self, setting: str, device: torch.device) -> tuple[bool, str | None]:
        """``train.old_policy`` -> (use the merged copy, a note to log or None)."""

    @abc.abstractmethod
    def check_in_sync(self, params: list[nn.Parameter]) -> None:
        """Raise if the ranks' trained weights disagree (a no-op where there is one sharded copy)."""

    @abc.abstractmethod
    def full_lora_state(self, transformer: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
        """The whole of ``adapter``'s tensors on the CPU, keys as ``u_nft.lora.lora_state_dict``; collective."""

    @abc.abstractmethod
    def _save(self, run_dir, state: TrainState, trained: TrainedLoRA, rngs: list, config, keep_last, write_lora):
        ...

    @abc.abstractmethod
    def _load(self, checkpoint: Checkpoint, trained: TrainedLoRA) -> None:
        ...

    def export_lora(self, transformer: nn.Module, adapter: str, out_dir: str | Path) -> Path:
        """Write ``adapter`` as one diffusers-format LoRA folder (main rank writes; collective). Returns out_dir."""
        full = self.full_lora_state(transformer, adapter)
        if dist.is_main():
            save_lora_diffusers(transformer, adapter, out_dir, state=full)
        dist.barrier()
        return Path(out_dir)

    def save(self, run_dir: str | Path, state: TrainState, trained: TrainedLoRA, config: Any = None,
             keep_last: int | None = None) -> Path:
        """Checkpoint the training state (both LoRAs, optimizer, scaler, EMA, every rank's RNG, counters,
        config) atomically as ``run_dir/checkpoints/checkpoint-<global_step>``, with the EMA weights as a
        diffusers LoRA in its ``lora/`` subfolder; collective. Returns the folder."""
        self.check_in_sync(trained.params)
        rngs = dist.all_gather_object(capture_rng())
        with ema_weights(trained.ema, trained.params):  # the export is the EMA weights (what evaluation uses)
            export = self.full_lora_state(trained.transformer, TRAINABLE)

        def write_lora(folder: Path) -> None:
            save_lora_diffusers(trained.transformer, TRAINABLE, folder / LORA_EXPORT_DIR, state=export)

        path = self._save(run_dir, state, trained, rngs, config, keep_last, write_lora)
        dist.barrier()
        return path

    def load(self, checkpoint: Checkpoint, trained: TrainedLoRA) -> None:
        """Restore both LoRAs, optimizer, scaler and EMA from ``checkpoint`` (``u_nft.checkpoint.load_checkpoint``
        on every rank); collective. RNG states and counters are the caller's (``checkpoint.rng`` / ``.state``)."""
        written_by = "fsdp" if checkpoint.sharded is not None else "ddp"
        if written_by != self.name:
            raise ValueError(f"checkpoint {checkpoint.path} was written with train.sharding={written_by!r}, this "
                             f"run has {self.name!r}: resume it with --config.train.sharding={written_by}")
        self._load(checkpoint, trained)
        trained.scaler.load_state_dict(checkpoint.tensors["scaler"])


class DataParallel(ShardingStrategy):
    """Replicas on every rank, gradients averaged with one all-reduce per dtype (``train.sharding="ddp"``)."""

    name = "ddp"
    shards_parameters = False
    lockstep_forwards = False

    def prepare(self, transformer, text_encoders=()):
        return []

    def reduce_gradients(self, params):
        dist.average_gradients(params)

    def grad_scaler(self, enabled, device):
        return torch.amp.GradScaler(torch.device(device).type, enabled=enabled)

    def resolve_old_policy(self, setting, device):
        return setting == "merged" or (setting == "auto" and torch.device(device).type == "cuda"), None

    def check_in_sync(self, params):
        dist.check_replicas_equal(params, "LoRA weights")

    def full_lora_state(self, transformer, adapter):
        return {k: v.cpu() for k, v in lora_state_dict(transformer, adapter).items()}

    def _save(self, run_dir, state, trained, rngs, config, keep_last, write_lora):
        if dist.is_main():
            tensors = {"lora_default": lora_state_dict(trained.transformer, TRAINABLE),
                       "lora_old": lora_state_dict(trained.transformer, OLD),
                       "optimizer": trained.optimizer.state_dict(), "scaler": trained.scaler.state_dict()}
            if trained.ema is not None:
                tensors["ema"] = trained.ema.state_dict()
            save_checkpoint(run_dir, state, tensors, rngs, config, keep_last, write_lora)
        return Path(run_dir) / CHECKPOINTS_DIR / checkpoint_name(state.global_step)

    def _load(self, checkpoint, trained):
        tensors = checkpoint.tensors
        load_lora_state(trained.transformer, TRAINABLE, tensors["lora_default"])
        load_lora_state(trained.transformer, OLD, tensors["lora_old"])
        trained.optimizer.load_state_dict(tensors["optimizer"])
        if trained.ema is not None:
            trained.ema.load_state_dict(tensors["ema"])


class FullyShardedDataParallel(ShardingStrategy):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) per transformer block (``train.sharding="fsdp"``).

    mixed_precision_dtype: the autocast dtype (bf16 / fp16) the sharded blocks are all-gathered and run in,
    gradients reduce-scattered in fp32; None keeps each parameter's own dtype (fp32 runs).
    text_encoders: "auto" shards those with >= ``TEXT_ENCODER_MIN_PARAMS`` parameters, "all", "none".
    """

    name = "fsdp"
    shards_parameters = True
    lockstep_forwards = True

    def __init__(self, mixed_precision_dtype: torch.dtype | None = None, text_encoders: str = "auto",
                 text_encoder_min_params: int = TEXT_ENCODER_MIN_PARAMS):
        if text_encoders not in FSDP_TEXT_ENCODER_CHOICES:
            raise ValueError(f"config.train.fsdp_text_encoders must be one of {list(FSDP_TEXT_ENCODER_CHOICES)}, "
                             f"got {text_encoders!r}")
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
        except ImportError as err:
            raise RuntimeError(f"train.sharding='fsdp' needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); "
                               f"this is torch {torch.__version__}: use train.sharding='ddp' or upgrade") from err
        self.mixed_precision_dtype = mixed_precision_dtype
        self.text_encoders = text_encoders
        self.text_encoder_min_params = int(text_encoder_min_params)

    def _policy(self, for_training: bool) -> dict:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if self.mixed_precision_dtype is None:
            return {}
        # cast_forward_inputs=False: the loop's autocast decides input dtypes, so the float timestep
        # (sigma * 1000) keeps fp32 precision into the sinusoidal embedding.
        return {"mp_policy": MixedPrecisionPolicy(param_dtype=self.mixed_precision_dtype,
                                                  reduce_dtype=torch.float32 if for_training else None,
                                                  cast_forward_inputs=False)}

    def _shard(self, module: nn.Module, for_training: bool) -> int:
        from torch.distributed.fsdp import fully_shard

        blocks = repeated_blocks(module)
        for block in blocks:
            fully_shard(block, **self._policy(for_training))
        fully_shard(module, **self._policy(for_training))
        return len(blocks)

    def prepare(self, transformer, text_encoders=()):
        if not torch.distributed.is_initialized():
            raise RuntimeError("train.sharding='fsdp' needs a process group: launch with torchrun "
                               "(one process works too: torchrun --nproc_per_node=1)")
        lines = [f"fsdp: {type(transformer).__name__} sharded as {self._shard(transformer, True)} blocks + root "
                 f"over {dist.world_size()} ranks ({_num_params(transformer) / 1e6:.4g} M parameters)"]
        for encoder in text_encoders:
            if encoder is None:
                continue
            n = _num_params(encoder)
            if self.text_encoders == "all" or (self.text_encoders == "auto" and n >= self.text_encoder_min_params):
                lines.append(f"fsdp: text encoder {type(encoder).__name__} ({n / 1e6:.4g} M parameters) sharded as "
                             f"{self._shard(encoder, False)} blocks + root")
        return lines

    def reduce_gradients(self, params):
        """Nothing to do: FSDP reduce-scattered (mean over ranks) each backward into the local shards."""

    def grad_scaler(self, enabled, device):
        # found-inf must agree across ranks, each seeing only its gradient shards: the sharded scaler all-reduces it
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=torch.device(device).type, enabled=enabled)

    def resolve_old_policy(self, setting, device):
        if setting == "merged":
            raise ValueError("config.train.old_policy='merged' keeps an unsharded copy of the transformer and "
                             "needs train.sharding='ddp'; under 'fsdp' use 'adapter' (or 'auto')")
        note = ("train.old_policy='auto' under train.sharding='fsdp': the old policy is the LoRA adapter 'old' "
                "of the sharded model (the merged copy is DDP-only)") if setting == "auto" else None
        return False, note

    def check_in_sync(self, params):
        """One sharded copy: the ranks cannot disagree."""

    def full_lora_state(self, transformer, adapter):
        out = {}
        for key, p in _adapter_params(transformer, adapter).items():
            value = p.detach()
            out[key] = (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu().clone()
        return out

    @staticmethod
    def _sharded_state(trained: TrainedLoRA) -> dict:
        """The nested state dict DCP writes and fills: DTensor shards (live tensors, loaded in place)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        sharded = {"lora_default": dict(_adapter_params(trained.transformer, TRAINABLE)),
                   "lora_old": dict(_adapter_params(trained.transformer, OLD)),
                   "optimizer": get_optimizer_state_dict(trained.transformer, trained.optimizer)}
        if trained.ema is not None:
            keys = list(sharded["lora_default"])
            sharded["ema"] = {"shadow": dict(zip(keys, trained.ema.shadow)),
                              "num_updates": trained.ema.num_updates, "max_decay": trained.ema.max_decay}
        return sharded

    def _save(self, run_dir, state, trained, rngs, config, keep_last, write_lora):
        with torch.no_grad():
            sharded = self._sharded_state(trained)
        return save_sharded_checkpoint(run_dir, state, sharded, {"scaler": trained.scaler.state_dict()}, rngs,
                                       config, keep_last, write_lora)

    def _load(self, checkpoint, trained):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        sharded = self._sharded_state(trained)
        with torch.no_grad():
            load_sharded_state(checkpoint, sharded)
        set_optimizer_state_dict(trained.transformer, trained.optimizer, sharded["optimizer"])
        if trained.ema is not None:
            trained.ema.num_updates = int(sharded["ema"]["num_updates"])
            trained.ema.max_decay = float(sharded["ema"]["max_decay"])


def make_sharding(name: str, mixed_precision_dtype: torch.dtype | None = None,
                  text_encoders: str = "auto") -> ShardingStrategy:
    """``train.sharding`` -> its strategy. mixed_precision_dtype: the autocast dtype (FSDP's compute dtype)."""
    if name == "ddp":
        return DataParallel()
    if name == "fsdp":
        return FullyShardedDataParallel(mixed_precision_dtype, text_encoders)
    raise ValueError(f"config.train.sharding must be one of {list(SHARDING_CHOICES)}, got {name!r}")


def text_encoders_of(pipeline) -> list[nn.Module]:
    """The pipeline's text encoders (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``; absent ones skipped)."""
    found: Iterable = (getattr(pipeline, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    return [m for m in found if m is not None]
