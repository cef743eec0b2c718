"""Training checkpoints: everything the loop reads, written atomically.

Layout of a run directory::

    <run_dir>/checkpoints/checkpoint-<K>/      K = TrainState.global_step
        state.json        TrainState, the list of tensor files and the byte size + sha256 of every other file
                          in the folder (written last: its presence = complete)
        <name>.pt         one torch.save per entry of ``tensors`` (LoRA default, LoRA old, EMA, optimizer, ...)
        rng.pt            python / numpy / torch (and CUDA) generator states, if given
        config.json       the run's config (``ConfigDict.to_json_best_effort``), if given
        <anything the lora_dirs callback writes, e.g. a diffusers LoRA folder>
        sharded/          train.sharding="fsdp" only: torch.distributed.checkpoint files (every rank's shards of
                          the LoRAs, EMA and optimizer; :func:`save_sharded_checkpoint`), checksummed like the rest

Each checkpoint is first written to ``checkpoints/.tmp-checkpoint-<K>`` and then renamed, so a crash
mid-write never leaves a folder that looks complete. Counters are read back from state.json, never
parsed from the folder name (upstream DiffusionNFT parsed ``global_step`` from it).

Integrity: loading checks every file against the size and sha256 recorded at save time, so a truncated
or bit-flipped file is an error naming that file (:class:`CheckpointCorruptError`), never silently wrong
weights. Loading from a *run directory* takes the newest checkpoint that passes and reports the damaged
newer ones it skipped (``Checkpoint.skipped``); a checkpoint whose state.json is unreadable is listed as
damaged and left alone by rotation (docs/reliability.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
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

FORMAT_VERSION = 2          # 2: per-file sizes and sha256 in state.json
READABLE_VERSIONS = (1, 2)  # 1: before checksums (loaded without verification)
STATE_FILE = "state.json"
RNG_FILE = "rng.pt"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
SHARDED_DIR = "sharded"      # torch.distributed.checkpoint folder of a sharded (FSDP) training state
_PREFIX = "checkpoint-"
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_HASH_CHUNK = 1 << 20


class CheckpointCorruptError(ValueError):
    """A checkpoint file that exists but is damaged (truncated, altered, unreadable); the message names it."""


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
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer damaged checkpoints passed over
    sharded: Path | None = None  # the torch.distributed.checkpoint folder of a sharded save (read with load_sharded_state)


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
    _check_save_arguments(tensors, keep_last)
    tmp = _begin_checkpoint(run_dir, state.global_step)
    return _commit_checkpoint(run_dir, tmp, state, tensors, rng, config, keep_last, lora_dirs)


def save_sharded_checkpoint(
    run_dir: str | os.PathLike,
    state: TrainState,
    sharded_state: dict[str, Any],
    tensors: dict[str, Any],
    rng: Any = None,
    config: Any = None,
    keep_last: int | None = None,
    lora_dirs: Callable[[Path], None] | None = None,
) -> Path:
    """``save_checkpoint`` with a sharded part; collective: every rank calls it with its own shards.

    sharded_state: a nested state dict of DTensors (e.g. FSDP2 parameters and
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``), tensors and plain values,
        written by every rank through ``torch.distributed.checkpoint.save`` into ``checkpoint-<K>/sharded/``
        (one ``.distcp`` file per rank plus a ``.metadata`` file; the ranks must share the run folder's filesystem).
    tensors, rng, config, keep_last, lora_dirs: as :func:`save_checkpoint`, written by the main rank only.
    Atomic in the same way: everything goes to ``.tmp-checkpoint-<K>`` first; the main rank writes
    state.json (with the size and sha256 of every shard file) last and renames the folder.
    Returns the final path on every rank.
    """
    import torch.distributed.checkpoint as dcp

    from u_nft import distributed as dist

    _check_save_arguments(tensors, keep_last)
    if dist.is_main():
        _begin_checkpoint(run_dir, state.global_step)
    dist.barrier()
    tmp = _tmp_folder(run_dir, state.global_step)
    dcp.save(sharded_state, checkpoint_id=str(tmp / SHARDED_DIR))
    dist.barrier()  # every rank's shard file is complete before the main rank checksums and renames
    if dist.is_main():
        _commit_checkpoint(run_dir, tmp, state, tensors, rng, config, keep_last, lora_dirs, sharded=True)
    dist.barrier()
    return Path(run_dir) / CHECKPOINTS_DIR / checkpoint_name(state.global_step)


def load_sharded_state(checkpoint: "Checkpoint", sharded_state: dict[str, Any]) -> None:
    """Fill ``sharded_state`` (the same nesting as saved; DTensors receive this rank's shards, in place)
    from ``checkpoint``'s ``sharded/`` folder with ``torch.distributed.checkpoint.load``; collective.

    The shards are re-split to the current world size and mesh (DCP reshards on load). Plain values
    (ints, floats) are replaced in ``sharded_state``.
    """
    import torch.distributed.checkpoint as dcp

    if checkpoint.sharded is None:
        raise ValueError(f"checkpoint {checkpoint.path} holds no sharded state (it was written with "
                         f"train.sharding='ddp'); its tensors are {sorted(checkpoint.tensors)}")
    dcp.load(sharded_state, checkpoint_id=str(checkpoint.sharded))


def _check_save_arguments(tensors: dict[str, Any], keep_last: int | None) -> None:
    if keep_last is not None and int(keep_last) < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    for name in tensors:
        if not _NAME_RE.match(name) or name in (Path(STATE_FILE).stem, Path(RNG_FILE).stem, SHARDED_DIR):
            raise ValueError(
                f"checkpoint tensor name {name!r} must match [A-Za-z0-9_.-]+ and not be 'state', 'rng' "
                f"or {SHARDED_DIR!r}"
            )


def _tmp_folder(run_dir: str | os.PathLike, global_step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"{_TMP_PREFIX}{checkpoint_name(global_step)}"


def _begin_checkpoint(run_dir: str | os.PathLike, global_step: int) -> Path:
    """Create an empty ``checkpoints/.tmp-checkpoint-<K>`` (replacing a crashed save's) and return it."""
    tmp = _tmp_folder(run_dir, global_step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _commit_checkpoint(run_dir: str | os.PathLike, tmp: Path, state: TrainState, tensors: dict[str, Any], rng: Any,
                       config: Any, keep_last: int | None, lora_dirs: Callable[[Path], None] | None,
                       sharded: bool = False) -> Path:
    """Write the single-process files into ``tmp``, then state.json (checksums of everything in ``tmp``,
    a sharded subfolder included) and rename ``tmp`` to ``checkpoint-<K>``; rotate; return the final path."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(state.global_step)
    for name, value in tensors.items():
        torch.save(value, tmp / f"{name}.pt")
    if rng is not None:
        torch.save(rng, tmp / RNG_FILE)
    if config is not None:
        (tmp / CONFIG_FILE).write_text(_config_to_json(config), encoding="utf-8")
    if lora_dirs is not None:
        lora_dirs(tmp)
    manifest = {"format_version": FORMAT_VERSION, "state": state.to_dict(), "tensors": sorted(tensors),
                "rng": rng is not None, "files": _file_digests(tmp)}
    if sharded:
        manifest["sharded"] = SHARDED_DIR
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


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digests(folder: Path) -> dict[str, dict]:
    """{relative posix path: {"bytes": size, "sha256": hex}} of every file under ``folder`` except state.json."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() != STATE_FILE:
            out[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return out


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
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointCorruptError(f"checkpoint state file {state_file} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_VERSIONS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointCorruptError(
            f"checkpoint {state_file} has format_version {version!r}; this code reads {list(READABLE_VERSIONS)}"
        )
    state = manifest.get("state")
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointCorruptError(f"checkpoint state file {state_file} has no integer state.global_step")
    return manifest


def scan_checkpoints(run_dir: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints oldest first, [(folder, why)] of folders whose state.json cannot be read).

    Complete = a ``checkpoint-*`` folder with a readable state.json (``.tmp-*`` and folders without
    state.json are in-progress leftovers, not listed). Ordered by the global_step stored in state.json.
    File contents are not hashed here (see :func:`verify_checkpoint`).
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return [], []
    found, damaged = [], []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(_PREFIX) and (path / STATE_FILE).is_file():
            try:
                found.append((_read_manifest(path)["state"]["global_step"], path.name, path))
            except (CheckpointCorruptError, OSError) as err:
                damaged.append((path, str(err)))
    return [path for _, _, path in sorted(found)], sorted(damaged)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (``.tmp-*``, folders without state.json and folders whose state.json
    is unreadable skipped), oldest first, ordered by the global_step stored in each state.json."""
    return scan_checkpoints(run_dir)[0]


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
    checkpoints, damaged = scan_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(_none_found(run_dir, damaged))
    return checkpoints[-1]


def _none_found(run_dir: Path, damaged: list[tuple[Path, str]]) -> str:
    message = (f"no complete checkpoint under {Path(run_dir) / CHECKPOINTS_DIR} "
               f"(expected {CHECKPOINTS_DIR}/{_PREFIX}<global_step>/{STATE_FILE})")
    if damaged:
        message += "; damaged: " + "; ".join(f"{p.name}: {why}" for p, why in damaged)
    return message


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint folder against its state.json and return the manifest.

    Every file recorded at save time must exist with the recorded byte size and sha256; the tensor
    and RNG files listed must exist. Raises FileNotFoundError (missing file) or
    :class:`CheckpointCorruptError` (wrong size = truncated, wrong sha256 = altered), naming the file.
    Format-1 checkpoints carry no checksums; only presence is checked.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    required = [f"{name}.pt" for name in manifest.get("tensors", [])] + ([RNG_FILE] if manifest.get("rng") else [])
    for name in required:
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} listed in {STATE_FILE} is missing")
    for name, record in sorted(manifest.get("files", {}).items()):
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} listed in {STATE_FILE} is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise CheckpointCorruptError(
                f"checkpoint file {file} is damaged: {size} bytes, {STATE_FILE} recorded {record['bytes']} "
                f"at save time ({'truncated' if size < record['bytes'] else 'grown'})"
            )
        digest = file_sha256(file)
        if digest != record["sha256"]:
            raise CheckpointCorruptError(
                f"checkpoint file {file} is damaged: its sha256 {digest[:16]}... differs from "
                f"{record['sha256'][:16]}... recorded in {STATE_FILE} at save time"
            )
    return manifest


def _torch_load(file: Path, map_location) -> Any:
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a damaged file; name it
        raise CheckpointCorruptError(f"cannot read checkpoint file {file}: {type(err).__name__}: {err}") from err


def _load_folder(path: Path, map_location) -> Checkpoint:
    manifest = verify_checkpoint(path)
    tensors = {name: _torch_load(path / f"{name}.pt", map_location) for name in manifest["tensors"]}
    rng = _torch_load(path / RNG_FILE, "cpu") if manifest["rng"] else None
    config_file = path / CONFIG_FILE
    config = None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointCorruptError(f"checkpoint file {config_file} is not valid JSON: {err}") from err
    sharded = None
    if manifest.get("sharded"):
        sharded = path / manifest["sharded"]
        if not (sharded / ".metadata").is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: its sharded state {sharded} has no .metadata")
    return Checkpoint(path=path, state=TrainState.from_dict(manifest["state"]), tensors=tensors, rng=rng, config=config,
                      sharded=sharded)


def load_checkpoint(path_or_run_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint folder, or the newest intact checkpoint of a run directory.

    A checkpoint folder given directly must be intact (errors name the damaged file). From a run
    directory, damaged checkpoints (unreadable state.json, missing / truncated / altered files) are
    skipped newest first and reported in ``Checkpoint.skipped`` as (folder, why); if none is intact
    the FileNotFoundError lists them all.
    """
    path = Path(path_or_run_dir)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint or run directory {path} does not exist")
    if (path / STATE_FILE).is_file() or path.name.startswith(_PREFIX) or path.name.startswith(_TMP_PREFIX):
        return _load_folder(resolve_checkpoint(path), map_location)
    run_dir = path.parent if path.name == CHECKPOINTS_DIR else path
    checkpoints, skipped = scan_checkpoints(run_dir)
    for candidate in reversed(checkpoints):
        try:
            ckpt = _load_folder(candidate, map_location)
        except (CheckpointCorruptError, OSError) as err:
            skipped.append((candidate, str(err)))
            continue
        ckpt.skipped = skipped
        return ckpt
    raise FileNotFoundError(_none_found(run_dir, skipped))


# Resume reports ----------------------------------------------------------------------------------

def rng_restore_note(saved_world_size: int | None, world_size: int) -> str | None:
    """None when the saved per-rank RNG states can be restored, else what skipping them changes.

    saved_world_size: len of the checkpoint's per-rank RNG list (None: no RNG saved).
    """
    if saved_world_size == world_size:
        return None
    saved = "no RNG states" if saved_world_size is None else f"RNG states of {saved_world_size} ranks"
    return (f"not restoring the global RNG states: the checkpoint holds {saved}, this run has {world_size} "
            f"rank(s). Prompts, rollout noise, timesteps and shuffles come from generators seeded by "
            f"(seed, epoch, sample index / rank) and do not depend on it, but the per-rank batches change with "
            f"the world size and anything drawing from python/numpy/torch's global generators starts from "
            f"seed + rank: the run continues, but not bit-identically to one that kept {saved_world_size} ranks")


# Keys that name where a run lives or how it was started, not what it trains.
CONFIG_DIFF_IGNORED = ("resume_from",)


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for key in value:
            _flatten(f"{prefix}.{key}" if prefix else str(key), value[key], out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value


def config_differences(saved: dict | None, current: dict,
                       ignored: tuple[str, ...] = CONFIG_DIFF_IGNORED) -> list[tuple[str, Any, Any]]:
    """[(dotted key, saved value, current value)] for every leaf that differs, sorted by key.

    Both are plain dicts (the checkpoint's config.json and the running config's JSON form); tuples
    equal lists. A key present on one side only is reported with ``"<absent>"`` on the other.
    """
    if saved is None:
        return []
    a, b = {}, {}
    _flatten("", saved, a)
    _flatten("", current, b)
    absent = "<absent>"
    return [(key, a.get(key, absent), b.get(key, absent)) for key in sorted(set(a) | set(b))
            if key not in ignored and a.get(key, absent) != b.get(key, absent)]
