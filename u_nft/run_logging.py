"""Run-directory logging: metrics as JSONL (always), wandb (offline by default), image grids with heatmaps.

Only the main rank creates a :class:`RunLogger`; the train script decides that. The run folder itself is
chosen by :func:`choose_run_dir`, which refuses a fresh run in a folder that holds checkpoints.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"


class RunDirError(ValueError):
    """A run folder that a run must not write into; the message says why and the ways out."""


def choose_run_dir(logdir: str | os.PathLike, run_name: str, resume_from: str | os.PathLike = "",
                   now: datetime.datetime | None = None) -> Path:
    """The folder a run writes to; no side effects.

    Resuming (``resume_from`` = a run folder or one of its ``checkpoints/checkpoint-K``): that run folder.
    Fresh: ``logdir/run_name`` (``run_name`` "" = the timestamp ``now`` as YYYYmmdd_HHMMSS). A fresh run
    never writes into a folder that holds checkpoints (they would be replaced step by step, metrics.jsonl
    would interleave both runs and a later resume would pick the old run's newest checkpoint): raises
    RunDirError naming the folder and the two ways out, ``--config.resume_from`` or a new ``--config.run_name``.
    """
    if resume_from:
        path = Path(os.path.abspath(resume_from))
        if path.parent.name == "checkpoints":  # <run>/checkpoints/checkpoint-K
            return path.parent.parent
        return path.parent if path.name == "checkpoints" else path
    name = run_name or (now or datetime.datetime.now()).strftime("%Y%m%d_%H%M%S")
    path = Path(os.path.abspath(os.path.join(logdir, name)))
    root = path / "checkpoints"
    saved = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if saved:
        shown = ", ".join(saved[:3]) + (f" and {len(saved) - 3} more" if len(saved) > 3 else "")
        raise RunDirError(
            f"run folder {path} already holds checkpoints ({shown}); a fresh run would overwrite them. "
            f"Resume it with --config.resume_from={path}, or start a new run with a new "
            f"--config.run_name (config.run_name={run_name!r}, config.logdir={str(logdir)!r})"
        )
    return path


def supersede_metrics(run_dir: str | os.PathLike, from_epoch: int) -> int:
    """Move the records of ``run_dir/metrics.jsonl`` with epoch >= ``from_epoch`` to metrics.superseded.jsonl.

    Called when a run (re)starts at ``from_epoch``: records a killed run wrote after its last checkpoint
    would otherwise appear twice. The moved records gain ``"superseded": true`` and are appended to
    metrics.superseded.jsonl (nothing is deleted); metrics.jsonl is rewritten atomically with the rest.
    Returns the number of records moved. Unparseable lines (a write cut by a kill) are moved too.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    kept, moved = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            moved.append(json.dumps({"superseded": True, "unparsed": line}))
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] < from_epoch:
            kept.append(line)
        else:
            moved.append(json.dumps({**record, "superseded": True} if isinstance(record, dict) else
                                    {"superseded": True, "unparsed": line}))
    if not moved:
        return 0
    with open(Path(run_dir) / SUPERSEDED_FILE, "a", encoding="utf-8") as f:
        f.write("".join(m + "\n" for m in moved))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(moved)


class RunLogger:
    """Appends ``{"step": ..., "epoch": ..., **metrics}`` lines to ``run_dir/metrics.jsonl`` and mirrors
    them to wandb unless ``wandb_mode == "disabled"`` (or the env var WANDB_MODE=disabled).

    start_epoch: the epoch this process starts at (0 fresh, the checkpoint's epoch on resume); earlier
    records with epoch >= start_epoch are moved out first (:func:`supersede_metrics`, count in ``superseded``).
    """

    def __init__(self, run_dir: str | os.PathLike, config: Any = None, wandb_mode: str = "offline",
                 project: str = "u-diffusionnft", run_name: str = "", start_epoch: int = 0):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"config.logging.wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.superseded = supersede_metrics(self.run_dir, start_epoch)
        self._wandb = None
        if os.environ.get("WANDB_MODE") == "disabled":
            wandb_mode = "disabled"
        if wandb_mode != "disabled":
            import wandb

            config_dict = config.to_dict() if hasattr(config, "to_dict") else config
            self._wandb = wandb.init(project=project, name=run_name or self.run_dir.name, dir=str(self.run_dir),
                                     mode=wandb_mode, config=config_dict, resume="allow",
                                     id=_wandb_id(self.run_dir))

    def log(self, metrics: dict[str, float], step: int, epoch: int) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else v)
                 for k, v in metrics.items()}
        record = {"time": time.time(), "step": int(step), "epoch": int(epoch), **clean}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({**clean, "epoch": epoch}, step=step)

    def log_image(self, key: str, path: str | os.PathLike, step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    id_file = run_dir / ".wandb_id"
    if not id_file.exists():
        import uuid

        id_file.write_text(uuid.uuid4().hex[:12], encoding="utf-8")
    return id_file.read_text(encoding="utf-8").strip()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
