"""Draw the Monte Carlo locations U before scoring, so a scorer that pays per location scores only those.

With ``train.estimator="monte_carlo"`` the loss reads r at m locations per sample. An occlusion map
(``reward_maps/occlusion.py``) costs one scorer call per cell, so scoring the whole grid and reading m
cells wastes ``|U| - m`` calls per image. With a proposal that does not depend on r
(``train.proposal="uniform"``: q = p, uniform over the location grid) U can be drawn first:

  1. :meth:`SampledCellScoring.draw` draws m cells per sample, uniformly with replacement (the
     distribution of the loss's own draw), the SAME cells for every image of a prompt group on every
     rank: the generator is seeded by (run seed, epoch, the prompt's text), so no communication is needed
     and the group-wise elementwise normalization has all K values at each drawn cell.
  2. :meth:`attach` writes them into each sample's metadata (``reward_maps.occlusion.LOCATIONS_KEY``);
     an occlusion scorer then scores only the covering cells: m cells cost at most m + 1 scorer images
     per sample instead of ``|U| + 1``. Scorers that compute whole maps anyway ignore the key.
  3. :meth:`compact` reads the raw grid at the drawn cells, (B, gh, gw) -> (B, 1, m); the
     normalization (``u_nft.training.rewards_to_r``) runs on these compact maps unchanged: entry k of
     every map of a group is the same cell, so group means are per cell as before, and the global std
     is taken over the drawn cells (an estimate of the std over all cells).
  4. :meth:`expand` puts r back on the grid, 1/2 (neutral) at cells not drawn, and the loss gets the
     drawn cells as ``locations`` (``u_nft.loss.u_nft_loss``): the same U is used for scoring and for
     the loss, for every training timestep of the sample. Each sample's U is still a draw from p, so
     the estimator stays unbiased (the timesteps share one draw instead of drawing each).

A disabled plan (``enabled=False``) passes everything through unchanged, so the train loop calls the
same four methods either way.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import torch

from reward_maps.occlusion import LOCATIONS_KEY

__all__ = ["SampledCellScoring", "sampled_cell_scoring", "NEUTRAL_R"]

NEUTRAL_R = 0.5  # r at cells no sample drew: neither pushes towards v+ nor v- (never read by the loss)


class SampledCellScoring:
    """Draw-before-scoring plan for one run (see the module docstring).

    grid: (gh, gw) location grid of U; num_locations: m per sample; seed: the run seed.
    """

    def __init__(self, enabled: bool, grid: tuple[int, int], num_locations: int, seed: int):
        if enabled and (not isinstance(num_locations, int) or num_locations < 1):
            raise ValueError(f"train.num_locations must be a positive int, got {num_locations!r}")
        self.enabled = bool(enabled)
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_locations = num_locations
        self.seed = int(seed)

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def draw(self, epoch: int, prompts: Sequence[str]) -> torch.Tensor | None:
        """(B, m) long flat cell indices ``i * gw + j``, uniform with replacement; equal prompts (a group)
        get equal cells, on every rank. None when disabled."""
        if not self.enabled:
            return None
        rows = []
        for prompt in prompts:
            key = (self.seed * 1_000_003 + int(epoch)) * 4_294_967_311 + zlib.crc32(str(prompt).encode("utf-8"))
            g = torch.Generator().manual_seed(key % (2 ** 63))
            rows.append(torch.randint(self.num_cells, (self.num_locations,), generator=g))
        return torch.stack(rows) if rows else torch.zeros(0, self.num_locations, dtype=torch.long)

    def attach(self, metadata: Sequence[dict], cells: torch.Tensor | None) -> list[dict]:
        """Copies of the metadata dicts asking scorers for ``cells`` (unchanged when ``cells`` is None)."""
        if cells is None:
            return list(metadata)
        if len(metadata) != cells.shape[0]:
            raise ValueError(f"{len(metadata)} metadata dicts but {cells.shape[0]} rows of drawn cells")
        return [{**md, LOCATIONS_KEY: {"grid": list(self.grid), "cells": row.tolist()}}
                for md, row in zip(metadata, cells)]

    def compact(self, raw_grid: torch.Tensor, cells: torch.Tensor | None) -> torch.Tensor:
        """Raw rewards at the drawn cells: (B, gh, gw) -> (B, 1, m); unchanged when ``cells`` is None."""
        if cells is None:
            return raw_grid
        if tuple(raw_grid.shape[1:]) != self.grid or raw_grid.shape[0] != cells.shape[0]:
            raise ValueError(f"raw reward grid {tuple(raw_grid.shape)} does not match {cells.shape[0]} samples "
                             f"on the location grid {self.grid}")
        return raw_grid.flatten(1).gather(1, cells.to(raw_grid.device)).unsqueeze(1)

    def expand(self, r_compact: torch.Tensor, cells: torch.Tensor | None) -> torch.Tensor:
        """r at the drawn cells (B, 1, m) -> r on the grid (B, gh, gw), ``NEUTRAL_R`` elsewhere."""
        if cells is None:
            return r_compact
        b = cells.shape[0]
        out = torch.full((b, self.num_cells), NEUTRAL_R, dtype=r_compact.dtype, device=r_compact.device)
        out.scatter_(1, cells.to(r_compact.device), r_compact.reshape(b, -1))
        return out.view(b, *self.grid)

    @staticmethod
    def concat(cells: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        """The epoch's drawn cells in sample order, (N, m); None when disabled."""
        if not cells or cells[0] is None:
            return None
        return torch.cat(list(cells))


def sampled_cell_scoring(enabled: bool, estimator: str, proposal: str, scalar_mode: bool,
                         cell_scorers: Sequence[str], grid: tuple[int, int], num_locations: int,
                         seed: int) -> tuple[SampledCellScoring, str | None]:
    """The run's plan and a note saying why it is off (None when on, or when nothing could use it).

    On when ``enabled`` (``train.score_sampled_cells``), ``estimator == "monte_carlo"``, ``proposal ==
    "uniform"`` (a focused proposal needs r before it can draw), not ``scalar_mode`` and at least one
    scorer can score single cells (``cell_scorers``: names of scorers with ``score_cells``).
    """
    why = None
    if cell_scorers and enabled and estimator == "monte_carlo" and not scalar_mode and proposal != "uniform":
        why = (f"train.proposal={proposal!r} depends on r, so U cannot be drawn before scoring: "
               f"{list(cell_scorers)} score every cell (use train.proposal='uniform' to score only the drawn ones)")
    on = bool(enabled and cell_scorers and estimator == "monte_carlo" and proposal == "uniform" and not scalar_mode)
    return SampledCellScoring(on, grid, num_locations, seed), why
