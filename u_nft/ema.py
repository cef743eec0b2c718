"""Exponential moving averages: the EMA of the trained LoRA and the old-policy decay schedule.

Both follow DiffusionNFT (NVlabs/DiffusionNFT, train_nft_sd3.py; docs/upstream_facts.md §F):
  EMA (weights for eval and export), after optimizer step k (k counted after its increment):
      decay_k = min((1 + k) / (10 + k), max_decay),  max_decay = 0.9
      ema ← ema + (1 − decay_k) · (θ − ema)
  Old policy after each epoch: θ_old ← d · θ_old + (1 − d) · θ with d = old_policy_decay(step, type).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

OLD_POLICY_DECAY_TYPES = (0, 1, 2)


def ema_decay(step: int, max_decay: float = 0.9) -> float:
    """decay_k = min((1 + k) / (10 + k), max_decay), k = optimizer steps taken (≥ 1 at the first update)."""
    return min((1.0 + step) / (10.0 + step), max_decay)


def old_policy_decay(step: int, decay_type: int) -> float:
    """Old-policy decay d(step) of DiffusionNFT (docs/upstream_facts.md §F), step = optimizer steps so far.

    type 0: d = 0 (old ← θ every epoch)
    type 1: d = min(0.001 · step, 0.5)
    type 2: d = 0 for step < 75, else min(0.0075 · (step − 75), 0.999)
    """
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return min(0.001 * step, 0.5)
    if decay_type == 2:
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    raise ValueError(f"old-policy decay_type {decay_type!r} is not supported; accepted: {list(OLD_POLICY_DECAY_TYPES)}")


class EMA:
    """fp32 shadow copy of a fixed list of parameters, updated after each optimizer step.

    ``store``/``copy_to``/``restore`` swap the averaged weights into the live parameters for evaluation
    or export and back, bit-exactly. The parameter list must keep its order between calls
    (use ``u_nft.lora.trainable_parameters``).
    """

    def __init__(self, parameters: Iterable[nn.Parameter], max_decay: float = 0.9):
        self.shadow = [p.detach().float().clone() for p in parameters]
        self.max_decay = float(max_decay)
        self.num_updates = 0
        self._stored: list[torch.Tensor] | None = None

    def _check(self, params: list[torch.Tensor]) -> None:
        if len(params) != len(self.shadow):
            raise ValueError(f"EMA tracks {len(self.shadow)} parameters, got {len(params)}")
        for i, (s, p) in enumerate(zip(self.shadow, params)):
            if s.shape != p.shape:
                raise ValueError(f"EMA parameter {i} has shape {tuple(s.shape)}, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.Tensor]) -> float:
        """Count one optimizer step k and move the shadow toward θ with decay_k; returns decay_k."""
        params = list(parameters)
        self._check(params)
        self.num_updates += 1
        decay = ema_decay(self.num_updates, self.max_decay)
        for s, p in zip(self.shadow, params):
            s.add_((p.detach().to(s.device, torch.float32) - s) * (1.0 - decay))
        return decay

    @torch.no_grad()
    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of the live weights so ``restore`` can put them back after ``copy_to``."""
        self._stored = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def copy_to(self, parameters: Iterable[torch.Tensor]) -> None:
        """Overwrite the live weights with the EMA (cast to each parameter's dtype and device)."""
        params = list(parameters)
        self._check(params)
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Put back the weights saved by ``store``."""
        if self._stored is None:
            raise RuntimeError("EMA.restore called without a preceding EMA.store")
        params = list(parameters)
        self._check(params)
        for saved, p in zip(self._stored, params):
            p.copy_(saved)
        self._stored = None

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.shadow], "num_updates": self.num_updates, "max_decay": self.max_decay}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        self._check(shadow)
        device = self.shadow[0].device if self.shadow else "cpu"
        self.shadow = [s.detach().to(device=device, dtype=torch.float32).clone() for s in shadow]
        self.num_updates = int(state["num_updates"])
        self.max_decay = float(state["max_decay"])


class ema_weights:
    """Context: the EMA weights swapped into the trainable parameters ``params`` (EMA.store / copy_to on
    entry, a bit-exact restore on exit); a no-op when ``ema`` is None (no EMA)."""

    def __init__(self, ema: "EMA | None", params):
        self.ema, self.params = ema, params

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)
