"""When the loop evaluates, and when the old-policy decay ramp starts (pure functions of counters).

Upstream DiffusionNFT (NVlabs/DiffusionNFT scripts/train_nft_sd3.py) evaluates at the start of every
epoch with ``epoch % eval_freq == 0``, before that epoch's sampling: after 0, eval_freq, 2·eval_freq, …
completed epochs, so the first point of every curve is the base model. Here the same points are taken
after an epoch's training (and save), plus once after the last epoch.
"""
from __future__ import annotations

from u_nft.ema import old_policy_decay


def evaluation_due(completed_epochs: int, eval_freq: int, num_epochs: int, eval_at_start: bool = True) -> bool:
    """Whether to evaluate once ``completed_epochs`` epochs are trained (0 = before the first update).

    eval_freq = 0: never. 0 completed epochs: ``eval_at_start`` (upstream: yes). Otherwise every
    ``eval_freq`` completed epochs and after the last one (``completed_epochs == num_epochs``).
    """
    if completed_epochs < 0:
        raise ValueError(f"completed_epochs must be >= 0, got {completed_epochs}")
    if not eval_freq:
        return False
    if completed_epochs == 0:
        return bool(eval_at_start)
    return completed_epochs % eval_freq == 0 or completed_epochs == num_epochs


def first_decay_epoch(optimizer_steps_per_epoch: int, decay_type: int, max_epochs: int = 1_000_000) -> int | None:
    """0-based index of the first epoch after whose training the old-policy decay d(step) is > 0 (the old
    policy starts to lag the trained one), or None if it never is (type 0).

    After epoch e the optimizer has taken steps = optimizer_steps_per_epoch·(e + 1) and the old policy is
    updated with d = old_policy_decay(steps, decay_type) (u_nft.ema, upstream's return_decay).
    """
    if optimizer_steps_per_epoch < 1:
        raise ValueError(f"optimizer_steps_per_epoch must be >= 1, got {optimizer_steps_per_epoch}")
    if decay_type == 0:
        return None
    for epoch in range(max_epochs):
        if old_policy_decay(optimizer_steps_per_epoch * (epoch + 1), decay_type) > 0:
            return epoch
    return None
