"""bench/gpu_check.sh, the one prepared GPU command: valid bash, and its CPU dry run completes every stage."""
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def test_script_is_valid_bash_and_documents_the_device_call():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    header = SCRIPT.read_text()
    assert 'run(command="bash bench/gpu_check.sh", carry=[".whl", ".cache/tiny-sd3"]' in header
    assert "pip download" in header and "diffusers" in header and "ml_collections" in header


@pytest.mark.slow  # ~40 s: the tiny benchmark and two train-script runs on the CPU
def test_cpu_dry_run_completes_every_stage_and_writes_the_report(tmp_path, tiny_sd3_dir):
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path / "out"), "PRECISIONS": "bf16",
           "TRAIN_PIPELINE": str(tiny_sd3_dir), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    for stage in ("bench", "train_bf16_epoch1", "train_bf16_resume"):
        assert f"| {stage} | ok |" in report, report[:2000]
    assert "| upstream |" in report and "| ours-merged |" in report and "| ours-ckpt |" in report
    assert "Occlusion map over jpeg_map" in report and "waits" in report
    assert "resumed from" in report and "epoch 1:" in report and "eval after 2 epoch(s)" in report
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"gpu_check.md", "bench.log", "train_bf16_resume.log"}
