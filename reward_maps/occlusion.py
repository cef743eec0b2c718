"""Occlusion maps: turn ANY scalar reward into a dense map by hiding one grid cell at a time.

For an image x split into a grid of cells u (gh rows x gw columns) and a scalar scorer s,

    map[u] = s(x) - s(x with cell u replaced by fill content)                         (Zeiler & Fergus 2014)

so a cell whose content raises the score gets a positive value. The fill content is

    "mean"  the image's own per-channel mean colour (a neutral, content-free patch),
    "blur"  the image itself Gaussian-blurred (keeps colour and layout, removes detail),
    float   a constant grey level in [0, 1] (0.0 = black).

Cells partition the pixels exactly: cell row i spans rows ``floor(i*H/gh) .. floor((i+1)*H/gh) - 1``
(likewise columns), so grids need not divide the image size. Flat cell index ``u = i * gw + j``.

One full map costs ``gh * gw`` occluded scorer calls per image. :meth:`OcclusionMap.score_cells`
evaluates only a requested subset of cells (the Monte Carlo location sampling of the loss), so an
expensive black-box scorer pays only for the locations actually used.

The trainer asks for that subset through the batch metadata: when every sample's metadata holds
``LOCATIONS_KEY`` = ``{"grid": [gh, gw], "cells": [flat indices on that location grid]}`` (the
locations U drawn before scoring, see ``u_nft/sampled_cells.py``), the call scores only the occlusion
cells covering those locations (:func:`covering_cells`): m locations cost at most m + 1 scorer
images per sample instead of ``gh * gw + 1``. The other cells of the returned map hold 0 and are
listed as unscored in ``info``; the trainer reads the map at the drawn locations only.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from reward_maps.base import RewardMapError, RewardOutput, build_scorer, check_images, register, validate_output

__all__ = [
    "ScalarFn",
    "cell_edges",
    "parse_grid",
    "check_fill",
    "gaussian_blur",
    "fill_content",
    "occlude_cells",
    "OcclusionMap",
    "occlusion_map",
    "LOCATIONS_KEY",
    "covering_cells",
]

ScalarFn = Callable[[torch.Tensor, list, list], torch.Tensor]
FILL_MODES = ("mean", "blur")
LOCATIONS_KEY = "u_nft_locations"  # per-sample metadata: {"grid": [gh, gw], "cells": [...]} to score only those


def cell_edges(size: int, parts: int) -> list[int]:
    """Pixel edges of ``parts`` cells along an axis of ``size`` pixels: ``[floor(i*size/parts)]``, i=0..parts.

    Consecutive edges bound cell i as ``edges[i]:edges[i+1]``; every pixel lies in exactly one cell.
    """
    if not 1 <= parts <= size:
        raise RewardMapError(f"occlusion grid: {parts} cells along an axis of {size} pixels (need 1 <= cells <= pixels)")
    return [(i * size) // parts for i in range(parts + 1)]


def parse_grid(grid: int | Sequence[int], owner: str = "occlusion_map") -> tuple[int, int]:
    """``8`` or ``(gh, gw)`` -> ``(gh, gw)`` positive ints; errors name ``owner``."""
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid, grid)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise RewardMapError(f"{owner}: grid must be a positive int or a pair (rows, cols) of them, got {grid!r}")
    return int(grid[0]), int(grid[1])


def check_fill(fill: Any, owner: str) -> None:
    """Accept "mean", "blur" or a number in [0, 1]; otherwise raise naming ``owner``."""
    if isinstance(fill, str):
        if fill not in FILL_MODES:
            raise RewardMapError(f"{owner}: fill must be one of {FILL_MODES} or a number in [0, 1], got {fill!r}")
    elif isinstance(fill, bool) or not isinstance(fill, (int, float)) or not 0.0 <= float(fill) <= 1.0:
        raise RewardMapError(f"{owner}: fill must be one of {FILL_MODES} or a number in [0, 1], got {fill!r}")


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding.

    images: (B, C, H, W); sigma in pixels. The kernel radius is ceil(3 sigma), capped at size-1 per
    axis (the limit of reflect padding); the kernel is renormalised, so a constant image stays constant.
    """
    if sigma <= 0:
        return images.clone()
    B, C, H, W = images.shape
    out = images.reshape(B * C, 1, H, W)
    for axis, size in ((2, H), (3, W)):
        radius = min(int(math.ceil(3.0 * sigma)), size - 1)
        if radius == 0:
            continue
        offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        if axis == 2:
            out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
        else:
            out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return out.reshape(B, C, H, W)


def fill_content(images: torch.Tensor, fill: str | float, grid: tuple[int, int],
                 blur_sigma: float | None = None) -> torch.Tensor:
    """What an occluded cell shows, per image: (B, 3, H, W) (broadcast views for "mean" and constants).

    "mean": per-image, per-channel mean colour. "blur": Gaussian blur with ``blur_sigma`` pixels,
    by default half the larger cell side (the cell's detail is gone, its colour and context stay).
    A number: that constant value in every channel.
    """
    B, C, H, W = images.shape
    if fill == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand(B, C, H, W)
    if fill == "blur":
        sigma = blur_sigma if blur_sigma is not None else 0.5 * max(H / grid[0], W / grid[1])
        return gaussian_blur(images, float(sigma))
    return torch.full((1, 1, 1, 1), float(fill), dtype=images.dtype, device=images.device).expand(B, C, H, W)


def occlude_cells(images: torch.Tensor, content: torch.Tensor, image_index: torch.Tensor, cells: torch.Tensor,
                  grid: tuple[int, int]) -> torch.Tensor:
    """Copies of ``images[image_index[k]]`` with flat cell ``cells[k]`` replaced by that image's ``content``.

    images, content: (B, 3, H, W); image_index, cells: (n,) long. Returns (n, 3, H, W).
    """
    H, W = images.shape[-2:]
    rows, cols = cell_edges(H, grid[0]), cell_edges(W, grid[1])
    out = images[image_index].clone()
    for k, (b, u) in enumerate(zip(image_index.tolist(), cells.tolist())):
        i, j = divmod(u, grid[1])
        r0, r1, c0, c1 = rows[i], rows[i + 1], cols[j], cols[j + 1]
        out[k, :, r0:r1, c0:c1] = content[b, :, r0:r1, c0:c1]
    return out


def covering_cells(cells: Sequence[int], location_grid: Sequence[int], grid: tuple[int, int],
                   owner: str = "occlusion_map") -> list[int]:
    """The occlusion cells (flat, sorted, unique) whose values the location cells ``cells`` read.

    ``cells``: flat indices ``i * lw + j`` on ``location_grid`` (lh, lw). The occlusion map of ``grid``
    (gh, gw) reaches the location grid as :func:`u_nft.normalization.pool_to_grid` takes it there:
    equal grids map one to one; a coarser occlusion grid (lh a multiple of gh) by nearest expansion,
    so location (i, j) reads cell (i // (lh/gh), j // (lw/gw)); a finer one (gh a multiple of lh) by
    block averages, so it reads the whole (gh/lh) x (gw/lw) block. Other grids are refused, as there.
    """
    lh, lw = (int(x) for x in location_grid)
    gh, gw = grid
    if any(isinstance(u, bool) or not 0 <= int(u) < lh * lw for u in cells):
        raise RewardMapError(f"{owner}: location cells must be ints in [0, {lh * lw}) for the location grid "
                             f"{(lh, lw)}, got {list(cells)[:8]}")
    if (lh, lw) == (gh, gw):
        blocks = None
    elif lh % gh == 0 and lw % gw == 0:
        fh, fw = lh // gh, lw // gw
        return sorted({(int(u) // lw // fh) * gw + (int(u) % lw) // fw for u in cells})
    elif gh % lh == 0 and gw % lw == 0:
        blocks = (gh // lh, gw // lw)
    else:
        raise RewardMapError(f"{owner}: grid {grid} neither divides nor is a multiple of the location grid "
                             f"{(lh, lw)}; pick an occlusion grid that does (or a train.cell_size that does)")
    if blocks is None:
        return sorted({int(u) for u in cells})
    bh, bw = blocks
    out = set()
    for u in cells:
        i, j = divmod(int(u), lw)
        out.update((i * bh + a) * gw + j * bw + b for a in range(bh) for b in range(bw))
    return sorted(out)


class OcclusionMap:
    """Occlusion map of a scalar scorer; itself a reward-map scorer (see :mod:`reward_maps.base`).

    scalar_fn(images (n,3,H,W) in [0,1], prompts, metadata) -> (n,) scores, higher = better.
    grid: (gh, gw) cells; fill: "mean" | "blur" | float in [0, 1]; batch: occluded images per
    scalar_fn call (bounds memory); blur_sigma: pixels for fill="blur" (default: half a cell side).

    Calling it returns maps (B, gh, gw) with ``map[u] = s(x) - s(x with u occluded)`` and scores
    ``s(x)``; value_range is None (score differences are unbounded in general).
    """

    def __init__(self, scalar_fn: ScalarFn, grid: int | Sequence[int] = (4, 4), fill: str | float = "mean",
                 batch: int = 16, blur_sigma: float | None = None, name: str = "occlusion_map"):
        self.name = name
        self.grid = parse_grid(grid, name)
        check_fill(fill, name)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise RewardMapError(f"{name}: batch must be a positive int, got {batch!r}")
        if blur_sigma is not None and not (isinstance(blur_sigma, (int, float)) and blur_sigma > 0):
            raise RewardMapError(f"{name}: blur_sigma must be a positive number of pixels or None, got {blur_sigma!r}")
        self.scalar_fn = scalar_fn
        self.fill = fill
        self.batch = batch
        self.blur_sigma = blur_sigma

    @property
    def num_cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def _scores(self, images: torch.Tensor, prompts: list, metadata: list) -> torch.Tensor:
        scores = self.scalar_fn(images, prompts, metadata)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (images.shape[0],):
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise RewardMapError(f"{self.name}: scalar scorer must return shape ({images.shape[0]},), got {shape}")
        return scores.detach().float()

    def _check_cells(self, cells: torch.Tensor, batch_size: int) -> torch.Tensor:
        if not isinstance(cells, torch.Tensor) or cells.ndim != 2 or cells.shape[0] != batch_size:
            shape = tuple(cells.shape) if isinstance(cells, torch.Tensor) else type(cells).__name__
            raise RewardMapError(f"{self.name}: cells must be a ({batch_size}, m) LongTensor of flat indices, got {shape}")
        if cells.dtype not in (torch.int64, torch.int32):
            raise RewardMapError(f"{self.name}: cells must hold integer flat cell indices, got dtype {cells.dtype}")
        if cells.numel() and (cells.min() < 0 or cells.max() >= self.num_cells):
            raise RewardMapError(
                f"{self.name}: cell indices must lie in [0, {self.num_cells}) for grid {self.grid}, "
                f"got [{int(cells.min())}, {int(cells.max())}]"
            )
        return cells.long().cpu()

    def score_cells(self, images: torch.Tensor, prompts: list, metadata: list | None, cells: torch.Tensor,
                    base_scores: torch.Tensor | None = None) -> torch.Tensor:
        """``s(x_b) - s(x_b with cell cells[b, k] occluded)`` for the requested cells only.

        images (B,3,H,W) in [0,1]; cells (B, m) flat indices ``i * gw + j``; base_scores (B,) if already
        known (saves B scorer calls). Returns (B, m) float32 on the images' device. Costs B*m scorer
        evaluations (plus B for the base), in chunks of ``batch``.
        """
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        check_images(self.name, images, prompts, metadata)
        B = images.shape[0]
        cells = self._check_cells(cells, B)
        m = cells.shape[1]
        with torch.no_grad():
            if base_scores is None:
                base_scores = self._scores(images, prompts, metadata)
            occluded = self._occluded_scores(images, prompts, metadata, torch.arange(B).repeat_interleave(m),
                                             cells.reshape(-1))
        return (base_scores.float().cpu().view(B, 1) - occluded.view(B, m)).to(images.device)

    def _occluded_scores(self, images: torch.Tensor, prompts: list, metadata: list, flat_image: torch.Tensor,
                         flat_cell: torch.Tensor) -> torch.Tensor:
        """s(images[flat_image[k]] with cell flat_cell[k] occluded) for every k, (n,) float32 on the CPU,
        scored in chunks of ``batch`` images."""
        content = fill_content(images, self.fill, self.grid, self.blur_sigma)
        occluded = torch.empty(len(flat_image), dtype=torch.float32)
        for start in range(0, len(flat_image), self.batch):
            idx = flat_image[start:start + self.batch]
            batch_images = occlude_cells(images, content, idx, flat_cell[start:start + self.batch], self.grid)
            occluded[start:start + len(idx)] = self._scores(
                batch_images, [prompts[b] for b in idx.tolist()], [metadata[b] for b in idx.tolist()]
            ).cpu()
        return occluded

    def _requested_cells(self, metadata: list) -> list[list[int]] | None:
        """Per sample, the occlusion cells covering the locations in ``metadata[b][LOCATIONS_KEY]``;
        None when no sample asks (score every cell). Some samples asking and others not is an error."""
        asks = [isinstance(md, dict) and LOCATIONS_KEY in md for md in metadata]
        if not any(asks):
            return None
        if not all(asks):
            raise RewardMapError(f"{self.name}: metadata[{LOCATIONS_KEY!r}] is set for {sum(asks)} of "
                                 f"{len(asks)} samples; set it for all of them or for none")
        requested = []
        for md in metadata:
            spec = md[LOCATIONS_KEY]
            if not isinstance(spec, dict) or "grid" not in spec or "cells" not in spec:
                raise RewardMapError(f"{self.name}: metadata[{LOCATIONS_KEY!r}] must be "
                                     f"{{'grid': [rows, cols], 'cells': [flat indices]}}, got {spec!r}")
            location_grid = parse_grid(tuple(spec["grid"]), f"{self.name} metadata[{LOCATIONS_KEY!r}]")
            requested.append(covering_cells(spec["cells"], location_grid, self.grid, self.name))
        return requested

    def __call__(self, images: torch.Tensor, prompts: list, metadata: list | None = None) -> RewardOutput:
        """Full maps, or, when the metadata asks (``LOCATIONS_KEY``, module docstring), maps scored only at
        the cells covering the requested locations (0 elsewhere; ``info[b]["scored_cells"]`` lists them)."""
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        check_images(self.name, images, prompts, metadata)
        requested = self._requested_cells(metadata)
        metadata = [{k: v for k, v in md.items() if k != LOCATIONS_KEY} for md in metadata]  # the inner scorer's
        B = images.shape[0]
        base = self._scores(images, prompts, metadata)
        if requested is None:
            all_cells = torch.arange(self.num_cells).expand(B, -1)
            maps = self.score_cells(images, prompts, metadata, all_cells, base_scores=base).view(B, *self.grid)
        else:
            flat_image = torch.tensor([b for b, cells in enumerate(requested) for _ in cells], dtype=torch.long)
            flat_cell = torch.tensor([u for cells in requested for u in cells], dtype=torch.long)
            with torch.no_grad():
                occluded = self._occluded_scores(images, prompts, metadata, flat_image, flat_cell)
            maps = torch.zeros(B, self.num_cells)
            maps[flat_image, flat_cell] = base.float().cpu()[flat_image] - occluded
            maps = maps.view(B, *self.grid).to(images.device)
        info = [
            {"score": float(base[b]), "grid": list(self.grid),
             "fill": self.fill if isinstance(self.fill, str) else float(self.fill)}
            for b in range(B)
        ]
        if requested is not None:
            for b, cells in enumerate(requested):
                info[b]["scored_cells"] = cells
        return RewardOutput(maps=maps.float(), scores=base.to(images.device), info=info, value_range=None)


@register("occlusion_map")
def occlusion_map(device: str = "cpu", dtype: torch.dtype = torch.float32, *, scorer: str,
                  scorer_options: dict | None = None, grid: int | Sequence[int] = (4, 4),
                  fill: str | float = "mean", batch: int = 16, blur_sigma: float | None = None) -> OcclusionMap:
    """Occlusion map of any scorer's scalar ``scores``.

    scorer: a registered name (see ``reward_maps.registered_names()``) or ``"package.module:callable"``;
    scorer_options: that scorer's factory options; grid, fill, batch, blur_sigma: see :class:`OcclusionMap`.
    The returned object also has ``score_cells(images, prompts, metadata, cells)`` for sampled locations.
    """
    if not isinstance(scorer, str) or not scorer:
        raise RewardMapError(f"occlusion_map: option 'scorer' must be a registered name or 'package.module:callable', got {scorer!r}")
    inner = build_scorer(scorer, device=device, dtype=dtype, **(scorer_options or {}))

    def scalar_fn(images: torch.Tensor, prompts: list, metadata: list) -> torch.Tensor:
        return validate_output(scorer, inner(images, prompts, metadata), images.shape[0]).scores

    return OcclusionMap(scalar_fn, grid=grid, fill=fill, batch=batch, blur_sigma=blur_sigma,
                        name=f"occlusion_map[{scorer}]")
