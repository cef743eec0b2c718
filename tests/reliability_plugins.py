"""Fault-injection plug-ins for tests/test_reliability.py: scorers that fail or hang, and configs using them.

Used as ``--config tests/reliability_plugins.py:VARIANT`` with ``PYTHONPATH=tests`` so the train script
imports the scorers by their plug-in names (``"reliability_plugins:..."``).
"""
import importlib.util
import os
import threading

import ml_collections
import torch

from reward_maps.base import RewardOutput, check_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def constant_half(device="cpu", dtype=torch.float32):
    """A well-behaved scorer: the neutral map 0.5 everywhere."""

    def scorer(images, prompts, metadata):
        check_images("constant_half", images, prompts, metadata)
        maps = torch.full((images.shape[0], 8, 8), 0.5)
        return RewardOutput(maps, maps.mean(dim=(1, 2)), [{} for _ in prompts])

    return scorer


def raises_always(device="cpu", dtype=torch.float32):
    """An evaluation scorer that fails on every batch (a broken scorer at the last epoch)."""

    def scorer(images, prompts, metadata):
        raise RuntimeError("injected evaluation failure")

    return scorer


def hangs_on_rank_one(device="cpu", dtype=torch.float32):
    """Scores normally on rank 0; on rank 1 every call blocks forever (a stuck scorer on one rank)."""
    good = constant_half(device, dtype)
    rank = int(os.environ.get("RANK", "0"))

    def scorer(images, prompts, metadata):
        if rank == 1:
            threading.Event().wait()  # never set
        return good(images, prompts, metadata)

    return scorer


def _tiny():
    spec = importlib.util.spec_from_file_location("u_nft_configs_rel", os.path.join(REPO, "config", "u_nft.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny()


def get_config(variant):
    config = _tiny()
    if variant == "eval_fails":
        config.eval_reward_fn = ml_collections.ConfigDict({"reliability_plugins:raises_always": 1.0})
        config.eval_at_start = False  # the failure under test is the last epoch's evaluation, after training
    elif variant == "hang_rank1":
        config.reward_fn = ml_collections.ConfigDict({"reliability_plugins:hangs_on_rank_one": 1.0})
        config.eval_reward_fn = ml_collections.ConfigDict({"reliability_plugins:constant_half": 1.0})
        config.reward_options = ml_collections.ConfigDict()
        config.eval_freq = 0
    else:
        raise ValueError(f"unknown variant {variant!r}; accepted: eval_fails, hang_rank1")
    return config
