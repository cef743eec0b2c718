"""Log the input shapes an SD3 transformer sees, for checking a run against the real model's shapes.

Set ``U_NFT_SHAPE_LOG=/path/shapes.jsonl`` and every pipeline loaded by
:func:`u_nft.tiny_sd3.load_sd3_pipeline` (the train and evaluation scripts' loader) appends one JSON line
per distinct input signature of its transformer's forward:

    {"pid": 123, "rank": 0, "hidden_states": [B, 16, H, W], "encoder_hidden_states": [B, T, C],
     "pooled_projections": [B, P], "timestep": [B], "image_tokens": H * W / patch**2, "text_tokens": T}

A signature is written once per process, so the log stays a few lines long whatever the run length.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

ENV_VAR = "U_NFT_SHAPE_LOG"
_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")


def attach_shape_log(transformer, path: str | os.PathLike):
    """Register a forward pre-hook on ``transformer`` appending its distinct input shapes to ``path``
    (JSON lines, fields in the module doc). Returns the hook handle (``.remove()`` detaches it)."""
    path = Path(path)
    patch = int(transformer.config.patch_size)
    seen: set[str] = set()

    def record(module, args, kwargs):
        values = dict(zip(_INPUTS, args))
        values.update({k: v for k, v in kwargs.items() if k in _INPUTS})
        shapes = {k: list(v.shape) for k, v in values.items() if hasattr(v, "shape")}
        key = json.dumps(shapes, sort_keys=True)
        if key in seen:
            return
        seen.add(key)
        entry = {"pid": os.getpid(), "rank": int(os.environ.get("RANK", "0")), **shapes}
        if "hidden_states" in shapes:
            height, width = shapes["hidden_states"][-2:]
            entry["image_tokens"] = (height // patch) * (width // patch)
        if "encoder_hidden_states" in shapes:
            entry["text_tokens"] = shapes["encoder_hidden_states"][1]
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    return transformer.register_forward_pre_hook(record, with_kwargs=True)


def attach_shape_log_from_env(transformer):
    """:func:`attach_shape_log` to ``$U_NFT_SHAPE_LOG`` when it is set; otherwise nothing (returns None)."""
    path = os.environ.get(ENV_VAR)
    return attach_shape_log(transformer, path) if path else None


def read_shape_log(path: str | os.PathLike) -> list[dict]:
    """The entries of a shape log, in order."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
