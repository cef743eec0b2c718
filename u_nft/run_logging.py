"""Run-directory logging: metrics as JSONL (always), wandb (offline by default), image grids with heatmaps.

Only the main rank creates a :class:`RunLogger`; the train script decides that.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")


class RunLogger:
    """Appends ``{"step": ..., "epoch": ..., **metrics}`` lines to ``run_dir/metrics.jsonl`` and mirrors
    them to wandb unless ``wandb_mode == "disabled"`` (or the env var WANDB_MODE=disabled)."""

    def __init__(self, run_dir: str | os.PathLike, config: Any = None, wandb_mode: str = "offline",
                 project: str = "u-diffusionnft", run_name: str = ""):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"config.logging.wandb_mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
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
