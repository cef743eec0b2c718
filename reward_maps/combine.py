"""Several weighted scorers behind one call, each run in a worker pool (``config.reward_fn``).

The weighted sum itself (maps and scalars on the location grid) is :func:`u_nft.normalization.combine_rewards`;
this module only builds the scorers, runs them asynchronously and validates what they return.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from reward_maps.base import RewardMapError, RewardOutput, build_scorer, validate_output
from reward_maps.workers import AsyncScorer


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
    """

    def __init__(self, weights: Mapping[str, float], options: Mapping[str, Mapping] | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, num_workers: int = 1):
        if not weights:
            raise RewardMapError("reward_fn is empty: name at least one reward scorer with a weight")
        options = dict(options or {})
        unknown = sorted(set(options) - set(weights))
        if unknown:
            raise RewardMapError(f"reward_options given for {unknown}, which are not in reward_fn {sorted(weights)}")
        self.weights = {name: float(w) for name, w in weights.items()}
        self._scorers = {
            name: AsyncScorer(build_scorer(name, device=str(device), dtype=dtype, **dict(options.get(name, {}))),
                              num_workers=num_workers, name=name)
            for name in self.weights
        }

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> PendingRewards:
        images = images.detach().float().cpu()
        futures = {name: scorer.submit(images, list(prompts), list(metadata)) for name, scorer in self._scorers.items()}
        return PendingRewards(futures, images.shape[0])

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, RewardOutput]:
        return self.submit(images, prompts, metadata).result()

    def close(self) -> None:
        for scorer in self._scorers.values():
            scorer.close()

    def __enter__(self) -> "RewardSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
