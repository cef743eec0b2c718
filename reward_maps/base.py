"""The reward-map scorer boundary: what a scorer returns, how it is registered and built.

A scorer is a callable

    scorer(images, prompts, metadata) -> RewardOutput

    images   : (B, 3, H, W) float tensor in [0, 1]
    prompts  : list of B strings
    metadata : list of B dicts (GenEval clauses, user data; may be empty dicts)

Scorers are built by *factories* that all share one signature,

    factory(device: str = "cpu", dtype: torch.dtype = torch.float32, **options) -> scorer

and are registered by name with :func:`register`. A user's own factory plugs in from the config as
``"package.module:callable"`` (see :func:`build_scorer`).
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Protocol

import torch

__all__ = [
    "RewardOutput",
    "RewardScorer",
    "RewardMapError",
    "register",
    "registered_names",
    "build_scorer",
    "check_images",
    "validate_output",
]


class RewardMapError(ValueError):
    """Bad input to, or bad output from, a reward scorer. The message names the scorer."""


@dataclasses.dataclass
class RewardOutput:
    """What one scorer call returns for a batch of B images.

    maps:        (B, h, w) float32 raw reward map; any resolution (pooled to the U grid later).
    scores:      (B,) float32, the scalar the upstream scorer reports for each image (used in
                 scalar mode and for logging, so it must match upstream exactly).
    info:        B JSON-serialisable dicts of diagnostics (text found, per-clause verdicts, boxes, ...).
    value_range: the declared (low, high) range of map values, or None if unbounded; validated.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    info: list[dict[str, Any]]
    value_range: tuple[float, float] | None = (0.0, 1.0)


class RewardScorer(Protocol):
    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput: ...


Factory = Callable[..., RewardScorer]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register a scorer factory under ``name`` (e.g. ``"ocr_map"``)."""

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise RewardMapError(f"reward scorer name {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def _import_builtin_scorers() -> None:
    # Importing the package registers the built-in scorers (each module calls `register`).
    importlib.import_module("reward_maps")


def registered_names() -> list[str]:
    """Sorted names of all registered scorers."""
    _import_builtin_scorers()
    return sorted(_REGISTRY)


def resolve_factory(name: str) -> Factory:
    """Registered name, or ``"package.module:callable"`` for a user's own factory."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise RewardMapError(f"reward scorer {name!r}: cannot import module {module_name!r}: {err}") from err
        if not hasattr(module, attr):
            raise RewardMapError(f"reward scorer {name!r}: module {module_name!r} has no attribute {attr!r}")
        return getattr(module, attr)
    _import_builtin_scorers()
    if name not in _REGISTRY:
        raise RewardMapError(
            f"unknown reward scorer {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
            "(or give 'package.module:callable')"
        )
    return _REGISTRY[name]


def build_scorer(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, **options) -> RewardScorer:
    """Build a scorer by registered name or ``"package.module:callable"``."""
    factory = resolve_factory(name)
    try:
        return factory(device=device, dtype=dtype, **options)
    except TypeError as err:
        raise RewardMapError(f"reward scorer {name!r}: bad options {sorted(options)}: {err}") from err


def check_images(name: str, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None) -> None:
    """Validate a scorer's input batch; errors name the scorer."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RewardMapError(f"reward scorer {name!r}: images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise RewardMapError(f"reward scorer {name!r}: images must be float in [0, 1], got dtype {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1 or not torch.isfinite(images).all()):
        raise RewardMapError(
            f"reward scorer {name!r}: image values must be finite and in [0, 1], "
            f"got [{images.min().item():.4g}, {images.max().item():.4g}]"
        )
    if len(prompts) != images.shape[0]:
        raise RewardMapError(f"reward scorer {name!r}: {images.shape[0]} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != images.shape[0]:
        raise RewardMapError(f"reward scorer {name!r}: {images.shape[0]} images but {len(metadata)} metadata dicts")


def validate_output(name: str, out: RewardOutput, batch_size: int) -> RewardOutput:
    """Check a scorer's output; errors name the scorer and the first bad sample index."""
    if not isinstance(out, RewardOutput):
        raise RewardMapError(f"reward scorer {name!r} returned {type(out).__name__}, expected RewardOutput")
    maps, scores = out.maps, out.scores
    if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or maps.shape[0] != batch_size:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise RewardMapError(f"reward scorer {name!r}: maps must have shape ({batch_size}, h, w), got {shape}")
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (batch_size,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise RewardMapError(f"reward scorer {name!r}: scores must have shape ({batch_size},), got {shape}")
    if len(out.info) != batch_size:
        raise RewardMapError(f"reward scorer {name!r}: info has {len(out.info)} entries for {batch_size} images")
    for what, tensor in (("map", maps), ("score", scores)):
        bad = ~torch.isfinite(tensor.reshape(batch_size, -1)).all(dim=1)
        if bad.any():
            raise RewardMapError(f"reward scorer {name!r}: non-finite {what} at sample {int(bad.nonzero()[0])}")
    if out.value_range is not None and maps.numel():
        low, high = out.value_range
        flat = maps.reshape(batch_size, -1)
        tol = 1e-6 * max(1.0, abs(low), abs(high))
        bad = (flat.min(dim=1).values < low - tol) | (flat.max(dim=1).values > high + tol)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise RewardMapError(
                f"reward scorer {name!r}: map of sample {i} has values in "
                f"[{flat[i].min().item():.4g}, {flat[i].max().item():.4g}], outside the declared range {out.value_range}"
            )
    out.maps = maps.float()
    out.scores = scores.float()
    return out

