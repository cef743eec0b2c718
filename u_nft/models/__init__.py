"""Model families behind one seam (:class:`u_nft.models.base.ModelFamily`), found from the pipeline itself.

The family of a pipeline is read from its ``model_index.json`` (``_class_name``, the diffusers pipeline
class), never from a user flag::

    family = family_for("stabilityai/stable-diffusion-3.5-medium")   # or a local pipeline folder
    pipeline = family.load_pipeline(model, dtype, device)

Each family module defines ``FAMILY`` (its :class:`ModelFamily` instance) and is imported on first use,
so a diffusers without one family's classes still runs the others.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from u_nft.models.base import (Conditioning, ModelFamily, cat_conditioning, conditioning_batch_size,  # noqa: F401
                               conditioning_to, expand_conditioning, index_conditioning)

__all__ = ["FAMILIES", "FAMILY_NAMES", "Conditioning", "ModelFamily", "cat_conditioning", "conditioning_batch_size",
           "conditioning_to", "expand_conditioning", "family_for", "family_named", "family_of_class",
           "index_conditioning", "read_pipeline_class"]

# model_index.json _class_name -> the module holding that family's FAMILY
FAMILIES: dict[str, str] = {
    "StableDiffusion3Pipeline": "u_nft.models.sd3",
    "FluxPipeline": "u_nft.models.flux",
    "QwenImagePipeline": "u_nft.models.qwen_image",
}
# ModelFamily.name -> pipeline class (what config.pretrained.tiny_family names)
FAMILY_NAMES: dict[str, str] = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
                                "qwen_image": "QwenImagePipeline"}


def family_of_class(class_name: str, source: str = "") -> ModelFamily:
    """The family registered for a diffusers pipeline class name; ValueError naming it and the supported ones."""
    where = f" ({source})" if source else ""
    if class_name not in FAMILIES:
        raise ValueError(f"pipeline class {class_name!r}{where} is not a supported model family; supported: "
                         f"{sorted(FAMILIES)}")
    module_name = FAMILIES[class_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"the {class_name} family ({module_name}){where} cannot be imported: {err}") from err
    return module.FAMILY


def family_named(name: str, key: str = "config.pretrained.tiny_family") -> ModelFamily:
    """The family called ``name`` ("sd3" | "flux" | "qwen_image"); ValueError naming ``key`` otherwise."""
    if name not in FAMILY_NAMES:
        raise ValueError(f"{key}={name!r} is not a model family; accepted: {sorted(FAMILY_NAMES)}")
    return family_of_class(FAMILY_NAMES[name], key)


def read_pipeline_class(model: str | os.PathLike) -> tuple[str, str]:
    """(``_class_name`` of ``model``'s model_index.json, the file it was read from).

    ``model``: a local pipeline folder, or a hub id (its model_index.json through huggingface_hub's cache).
    Errors name the folder / id and what was expected.
    """
    from u_nft.tiny_sd3 import HUB_ID

    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        index = path / "model_index.json"
        if not path.is_dir() or not index.is_file():
            raise FileNotFoundError(f"{text!r} is a local path but not a diffusers pipeline folder (no "
                                    "model_index.json); give a hub id or a folder written by save_pretrained")
    elif HUB_ID.match(text):
        from huggingface_hub import hf_hub_download

        try:
            index = Path(hf_hub_download(text, "model_index.json"))
        except Exception as err:  # offline, gated, missing: say which model and why
            raise FileNotFoundError(f"cannot read model_index.json of the hub model {text!r}: {err}") from err
    else:
        raise FileNotFoundError(f"{text!r} is neither an existing pipeline folder nor a hub id 'owner/name'")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index} has no readable '_class_name' (a diffusers model_index.json): {err}") from err
    return str(class_name), str(index)


def family_for(model) -> ModelFamily:
    """The family of ``model``: a local pipeline folder or hub id (read from its model_index.json), or a
    loaded diffusers pipeline object (its class)."""
    if isinstance(model, (str, os.PathLike)):
        class_name, source = read_pipeline_class(model)
        return family_of_class(class_name, source)
    return family_of_class(type(model).__name__, "pipeline object")
