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
import inspect
from typing import Any, Callable, Protocol

import torch

__all__ = [
    "RewardOutput",
    "RewardScorer",
    "RewardMapError",
    "register",
    "registered_names",
    "build_scorer",
    "check_options",
    "option_defaults",
    "dataset_problems",
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
# validate(prompts, metadata, **options) -> [(sample index, why)]: checks a whole dataset before any model loads.
Validator = Callable[..., list[tuple[int, str]]]
_REGISTRY: dict[str, Factory] = {}
_VALIDATORS: dict[str, Validator] = {}


def register(name: str, validate: Validator | None = None) -> Callable[[Factory], Factory]:
    """Decorator: register a scorer factory under ``name`` (e.g. ``"ocr_map"``).

    validate: optional dataset check ``validate(prompts, metadata, **options) -> [(index, why)]`` that
    needs no model (see :func:`dataset_problems`). A plug-in factory offers one as ``factory.validate``.
    """

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise RewardMapError(f"reward scorer name {name!r} is registered twice")
        _REGISTRY[name] = factory
        if validate is not None:
            _VALIDATORS[name] = validate
        return factory

    return decorate


def dataset_problems(name: str, prompts: list[str], metadata: list[dict],
                     options: dict[str, Any] | None = None) -> list[tuple[int, str]]:
    """Every sample of a dataset that scorer ``name`` cannot score, as sorted [(index, why)].

    Runs the scorer's validator (registered with :func:`register`, or a plug-in factory's ``validate``
    attribute) with the scorer's factory options; no model is loaded. Scorers without one report nothing.
    """
    factory = resolve_factory(name)
    validator = _VALIDATORS.get(name) if ":" not in name else getattr(factory, "validate", None)
    if validator is None:
        return []
    problems = validator(list(prompts), list(metadata), **dict(options or {}))
    return sorted((int(i), str(why)) for i, why in problems)


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
        dotted = module_name.split(".")
        if not all(part.isidentifier() for part in dotted) or not attr.isidentifier():
            raise RewardMapError(
                f"reward scorer {name!r} is not a valid plug-in name; accepted: 'package.module:callable' "
                "(a dotted module path, one colon, a function name), e.g. 'reward_maps.examples:center_mask'"
            )
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise RewardMapError(f"reward scorer {name!r}: cannot import module {module_name!r}: {err}") from err
        if not hasattr(module, attr):
            raise RewardMapError(f"reward scorer {name!r}: module {module_name!r} has no attribute {attr!r}")
        if not callable(getattr(module, attr)):
            raise RewardMapError(f"reward scorer {name!r}: {module_name}.{attr} is not callable (expected a factory)")
        return getattr(module, attr)
    _import_builtin_scorers()
    if name not in _REGISTRY:
        raise RewardMapError(
            f"unknown reward scorer {name!r}; registered: {', '.join(sorted(_REGISTRY))} "
            "(or give 'package.module:callable')"
        )
    return _REGISTRY[name]


def factory_options(factory: Factory) -> dict[str, inspect.Parameter]:
    """The options a factory accepts: its parameters other than ``device`` and ``dtype``, in order
    (``**kwargs`` included as a VAR_KEYWORD parameter). Empty if its signature cannot be read."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins / C callables have no readable signature
        return {}
    return {n: p for n, p in parameters.items() if n not in ("device", "dtype") and p.kind != p.VAR_POSITIONAL}


_PLAIN_TYPES = (bool, int, float, str, tuple)


def option_defaults(name: str) -> dict[str, tuple[Any, type | None]]:
    """Every option of scorer ``name`` as ``{option: (default, value_type)}``, in signature order.

    default: the factory's default, lists turned into tuples (None for an option without default, e.g.
    ``occlusion_map``'s ``scorer``). value_type: the one plain type (bool, int, float, str or tuple) the
    option takes when its annotation is that type or absent; None when it takes several (``str | None``,
    ``int | Sequence[int]``, a list of dicts, ...). ``config.reward_options`` is declared from this.
    """
    out = {}
    for option, param in factory_options(resolve_factory(name)).items():
        if param.kind == param.VAR_KEYWORD:
            continue
        default = None if param.default is param.empty else param.default
        if isinstance(default, list):
            default = tuple(default)
        annotation = param.annotation
        annotation = "" if annotation is param.empty else getattr(annotation, "__name__", str(annotation))
        value_type = type(default) if type(default) in _PLAIN_TYPES else None
        if value_type is not None and annotation and annotation.split("[")[0] != value_type.__name__:
            value_type = None
        out[option] = (default, value_type)
    return out


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise :class:`RewardMapError` if scorer ``name``'s factory cannot take ``options`` (an unknown
    name, a missing required one), listing the options it accepts. Only binds; builds nothing."""
    factory = resolve_factory(name)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no readable signature: the call itself will tell
        return
    try:
        signature.bind(device="cpu", dtype=torch.float32, **options)
    except TypeError as err:
        accepted = ", ".join(factory_options(factory)) or "none"
        raise RewardMapError(
            f"reward scorer {name!r}: bad options {sorted(options)}: {err}; accepted options: {accepted}"
        ) from err


def build_scorer(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, **options) -> RewardScorer:
    """Build a scorer by registered name or ``"package.module:callable"``.

    Options that the factory's signature does not accept (unknown or missing names) raise
    :class:`RewardMapError` listing the accepted ones; any error raised *inside* the factory propagates
    unchanged, with a note naming the scorer.
    """
    factory = resolve_factory(name)
    check_options(name, options)
    try:
        return factory(device=device, dtype=dtype, **options)
    except Exception as err:
        if hasattr(err, "add_note"):  # Python >= 3.11
            err.add_note(f"(raised while building reward scorer {name!r} with options {sorted(options)})")
        raise


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

