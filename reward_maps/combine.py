"""Several weighted scorers behind one call, each run in a worker pool (``config.reward_fn``).

The weighted sum itself (maps and scalars on the location grid) is :func:`u_nft.normalization.combine_rewards`;
this module only builds the scorers, runs them asynchronously and validates what they return.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Mapping

import torch

from reward_maps.base import RewardMapError, RewardOutput, RewardScorer, build_scorer, validate_output
from reward_maps.workers import AsyncScorer


class ScorerCache:
    """One scorer instance per (name, options, device, dtype), shared by every RewardSet given this cache.

    The train and eval reward sets name the same scorers with the same options (``sd3_multi_reward_map``:
    PickScore, HPS and CLIPScore in both), so without sharing each model would load once per set. Scorers
    keep no per-call state (see :mod:`reward_maps.workers`), so one instance serves both sets.
    """

    def __init__(self):
        self._scorers: dict[tuple, RewardScorer] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(name: str, options: Mapping[str, Any], device: str, dtype: torch.dtype) -> tuple:
        """Options compare by value (JSON form: tuples equal lists, key order does not matter)."""
        return name, json.dumps(dict(options), sort_keys=True, default=repr), str(device), str(dtype)

    def get(self, name: str, options: Mapping[str, Any], device: str, dtype: torch.dtype) -> RewardScorer:
        """The cached scorer, built with ``build_scorer(name, device, dtype, **options)`` on first use."""
        key = self.key(name, options, device, dtype)
        with self._lock:
            if key not in self._scorers:
                self._scorers[key] = build_scorer(name, device=str(device), dtype=dtype, **dict(options))
            return self._scorers[key]

    def __len__(self) -> int:
        return len(self._scorers)


class PendingRewards:
    """Futures of one batch's rewards; ``result()`` -> {name: validated RewardOutput}."""

    def __init__(self, futures: dict[str, Any], batch_size: int):
        self._futures = futures
        self._batch_size = batch_size

    def result(self) -> dict[str, RewardOutput]:
        return {name: validate_output(name, future.result(), self._batch_size) for name, future in self._futures.items()}


class RewardSet:
    """Build every scorer named in ``weights`` (registered name or ``"package.module:callable"``).

    weights: name -> weight; options: name -> dict of factory options; num_workers threads per scorer
    score chunks of a batch in parallel while the caller goes on (e.g. samples the next batch).
    timeout_s: seconds a scorer call may run (None / 0 = no limit; ``config.reward_timeout_s``).
    cache: a :class:`ScorerCache` shared with other sets, so a scorer with the same name and options is
    built once (the train and eval sets of :func:`train_and_eval_reward_sets`); None = a private one.
    """

    def __init__(self, weights: Mapping[str, float], options: Mapping[str, Mapping] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, num_workers: int = 1,
                 timeout_s: float | None = None, cache: ScorerCache | None = None):
        if not weights:
            raise RewardMapError("reward_fn is empty: name at least one reward scorer with a weight")
        options = dict(options or {})
        unknown = sorted(set(options) - set(weights))
        if unknown:
            raise RewardMapError(f"reward_options given for {unknown}, which are not in reward_fn {sorted(weights)}")
        self.weights = {name: float(w) for name, w in weights.items()}
        cache = ScorerCache() if cache is None else cache
        self._scorers = {
            name: AsyncScorer(cache.get(name, options.get(name, {}), str(device), dtype),
                              num_workers=num_workers, name=name, timeout_s=timeout_s)
            for name in self.weights
        }

    @property
    def scorers(self) -> dict[str, RewardScorer]:
        """name -> the scorer instance (shared with other sets built from the same cache)."""
        return {name: async_scorer.scorer for name, async_scorer in self._scorers.items()}

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict],
               label: str | None = None) -> PendingRewards:
        """label names the batch in a timeout error (e.g. "epoch 3 batch 1")."""
        images = images.detach().float().cpu()
        futures = {name: scorer.submit(images, list(prompts), list(metadata), label=label)
                   for name, scorer in self._scorers.items()}
        return PendingRewards(futures, images.shape[0])

    def names_with(self, method: str) -> list[str]:
        """Names of the scorers that have a callable ``method`` (``"score_cells"``: occlusion maps, which can
        score only the Monte Carlo locations, see ``u_nft/sampled_cells.py``)."""
        return [name for name, scorer in self._scorers.items() if callable(getattr(scorer.scorer, method, None))]

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, RewardOutput]:
        return self.submit(images, prompts, metadata).result()

    def close(self, wait: bool = True) -> None:
        """Shut the worker pools down; wait=False abandons running calls (after an error or Ctrl-C)."""
        for scorer in self._scorers.values():
            scorer.close(wait=wait)

    def __enter__(self) -> "RewardSet":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(wait=exc_type is None)


def train_and_eval_reward_sets(train_weights: Mapping[str, float], eval_weights: Mapping[str, float],
                               options: Mapping[str, Mapping] | None = None, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32, num_workers: int = 1,
                               timeout_s: float | None = None) -> tuple[RewardSet, RewardSet]:
    """The training and evaluation reward sets (``config.reward_fn`` / ``config.eval_reward_fn``), sharing
    one instance of each scorer they both name with the same options.

    options: ``config.reward_options`` as a dict, name -> factory options; it may declare options for
    scorers that neither set uses (the config declares every registered scorer's): only the named
    scorers' options are passed to their factories.
    """
    options = dict(options or {})
    cache = ScorerCache()

    def rewards(weights):
        return RewardSet(weights, {name: options[name] for name in weights if name in options}, device, dtype,
                         num_workers, timeout_s=timeout_s, cache=cache)

    train = rewards(train_weights)
    try:
        return train, rewards(eval_weights)
    except BaseException:
        train.close(wait=False)
        raise

