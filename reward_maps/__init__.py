"""Black-box reward scorers that emit H×W reward maps (see :mod:`reward_maps.base`).

Importing the package registers every built-in scorer; heavy dependencies (ONNX runtimes,
transformers models) are imported only when a scorer is built.
"""
import importlib

from reward_maps.base import (
    RewardMapError,
    RewardOutput,
    build_scorer,
    register,
    registered_names,
)

_SCORER_MODULES = ("jpeg", "masks", "ocr", "geneval", "clip_family", "occlusion", "semantic_relative")
for _module in _SCORER_MODULES:
    importlib.import_module(f"reward_maps.{_module}")

__all__ = ["RewardMapError", "RewardOutput", "build_scorer", "register", "registered_names"]
