"""Training checkpoints: everything the loop reads, written atomically.

Layout of a run directory::

    <run_dir>/checkpoints/checkpoint-<K>/      K = TrainState.global_step
        state.json        TrainState + the list of tensor files (written last: its presence = complete)
        <name>.pt         one torch.save per entry of ``tensors`` (LoRA default, LoRA old, EMA, optimizer, ...)
        rng.pt            python / numpy / torch (and CUDA) generator states, if given
        config.json       the run's config (``ConfigDict.to_json_best_effort``), if given
        <anything the lora_dirs callback writes, e.g. a diffusers LoRA folder>

Each checkpoint is first written to ``checkpoints/.tmp-checkpoint-<K>`` and then renamed, so a crash
mid-write never leaves a folder that looks complete. Counters are read back from state.json, never
parsed from the folder name (upstream DiffusionNFT parsed ``global_step`` from it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

FORMAT_VERSION = 1
STATE_FILE = "state.json"
RNG_FILE = "rng.pt"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class TrainState:
    """The loop's counters; small and JSON serialisable.

    epoch: the next epoch to run. global_step: optimizer steps taken so far.
    sampler: ``KRepeatSampler.state_dict()``. extra: any other JSON-able values the loop needs back.
    """

    epoch: int = 0
    global_step: int = 0
    sampler: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"TrainState got unknown fields {unknown}; accepted: {sorted(known)}")
        return cls(**data)


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns. ``rng`` is whatever ``save_checkpoint`` was given (or None)."""

    path: Path
    state: TrainState
    tensors: dict[str, Any]
    rng: Any
    config: dict | None


# RNG ---------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """States of python ``random``, numpy's legacy global generator, torch CPU and every CUDA device.

    Stored with plain types and tensors only, so ``torch.load(weights_only=True)`` reads it back.
    """
    np_state = np.random.get_state(legacy=False)
    rng = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    """Inverse of ``capture_rng``: the next random numbers equal those drawn after the capture.

    CUDA states are restored when both the capture and this process have CUDA; the device count must match.
    """
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    np_rng = rng["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_rng["bit_generator"],
            "state": {"key": np_rng["key"].numpy().astype(np.uint32), "pos": np_rng["pos"]},
            "has_gauss": np_rng["has_gauss"],
            "gauss": np_rng["gauss"],
        }
    )
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        if len(rng["cuda"]) != torch.cuda.device_count():
            raise ValueError(
                f"saved RNG has {len(rng['cuda'])} CUDA device states, this process sees "
                f"{torch.cuda.device_count()} devices"
            )
        torch.cuda.set_rng_state_all(rng["cuda"])


# Saving ------------------------------------------------------------------------------------------

def _config_to_json(config: Any) -> str:
    if hasattr(config, "to_json_best_effort"):
        return config.to_json_best_effort(indent=2, sort_keys=True)
    return json.dumps(config, indent=2, sort_keys=True, default=repr)


def checkpoint_name(global_step: int) -> str:
    return f"{_PREFIX}{int(global_step)}"


def save_checkpoint(
    run_dir: str | os.PathLike,
    state: TrainState,
    tensors: dict[str, Any],
    rng: Any = None,
    config: Any = None,
    keep_last: int | None = None,
    lora_dirs: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/checkpoint-<global_step>`` atomically and return its path.

    tensors: name -> state dict (torch.save-able, e.g. ``{"lora_default": ..., "optimizer": opt.state_dict()}``);
        names are file stems ([A-Za-z0-9_.-]).
    rng: ``capture_rng()``, or a list of them indexed by rank (gathered with ``all_gather_object``).
    config: a ``ml_collections.ConfigDict`` (saved with ``to_json_best_effort``) or a JSON-able dict.
    keep_last: keep only the newest N complete checkpoints (by saved global_step); None keeps all.
    lora_dirs: called with the (temporary) checkpoint folder to add e.g. a diffusers LoRA subfolder.
    Call it from one process only; it also deletes ``.tmp-*`` leftovers of earlier crashed saves.
    """
    if keep_last is not None and int(keep_last) < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    for name in tensors:
        if not _NAME_RE.match(name) or name in (Path(STATE_FILE).stem, Path(RNG_FILE).stem):
            raise ValueError(
                f"checkpoint tensor name {name!r} must match [A-Za-z0-9_.-]+ and not be 'state' or 'rng'"
            )
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.global_step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    for name, value in tensors.items():
        torch.save(value, tmp / f"{name}.pt")
    if rng is not None:
        torch.save(rng, tmp / RNG_FILE)
    if config is not None:
        (tmp / CONFIG_FILE).write_text(_config_to_json(config), encoding="utf-8")
    if lora_dirs is not None:
        lora_dirs(tmp)
    manifest = {"format_version": FORMAT_VERSION, "state": state.to_dict(), "tensors": sorted(tensors), "rng": rng is not None}
    _write_json_synced(tmp / STATE_FILE, manifest)

    if final.exists():
        # Same global_step saved twice (e.g. a final save right after a periodic one): swap, then drop.
        trash = root / f"{_TRASH_PREFIX}{final.name}"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)

    for leftover in root.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[: -int(keep_last)]:
            shutil.rmtree(old)
    return final


def _write_json_synced(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Loading -----------------------------------------------------------------------------------------

def _read_manifest(path: Path) -> dict:
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    try:
        manifest = json.loads(state_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint state file {state_file} is not valid JSON: {err}") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {state_file} has format_version {manifest.get('format_version')!r}; "
            f"this code reads {FORMAT_VERSION}"
        )
    return manifest


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (``.tmp-*`` and folders without state.json skipped), oldest first.

    Ordered by the global_step stored in each state.json.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(_PREFIX) and (path / STATE_FILE).is_file():
            found.append((_read_manifest(path)["state"]["global_step"], path.name, path))
    return [path for _, _, path in sorted(found)]


def resolve_checkpoint(path_or_run_dir: str | os.PathLike) -> Path:
    """A checkpoint folder as given, or the latest complete checkpoint of a run directory."""
    path = Path(path_or_run_dir)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint or run directory {path} does not exist")
    if (path / STATE_FILE).is_file():
        return path
    if path.name.startswith(_PREFIX) or path.name.startswith(_TMP_PREFIX):
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    run_dir = path.parent if path.name == CHECKPOINTS_DIR else path
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(
            f"no complete checkpoint under {run_dir / CHECKPOINTS_DIR} "
            f"(expected {CHECKPOINTS_DIR}/{_PREFIX}<global_step>/{STATE_FILE})"
        )
    return checkpoints[-1]


def load_checkpoint(path_or_run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder, or the latest complete one of a run directory."""
    path = resolve_checkpoint(path_or_run_dir)
    manifest = _read_manifest(path)
    tensors = {}
    for name in manifest["tensors"]:
        file = path / f"{name}.pt"
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {file.name} listed in {STATE_FILE} is missing")
        tensors[name] = torch.load(file, map_location=map_location, weights_only=True)
    rng = None
    if manifest["rng"]:
        rng_file = path / RNG_FILE
        if not rng_file.is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {RNG_FILE} is missing")
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    config_file = path / CONFIG_FILE
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    return Checkpoint(path=path, state=TrainState.from_dict(manifest["state"]), tensors=tensors, rng=rng, config=config)
