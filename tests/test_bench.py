"""bench/bench_train_step.py: its FLOP formula matches torch's counter, and the CPU smoke run completes.

No timing assertions: the numbers come from the GPU run (docs/benchmarks.md).
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from u_nft import lora

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_train_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_flop_formula_matches_torch_flop_counter():
    bench = load_bench()
    device = torch.device("cpu")
    batch = bench.make_batch("tiny", 2, 128, 4, device, seed=0)
    model = bench.build_transformer("tiny", device, seed=0)
    inputs = dict(hidden_states=batch.x0, encoder_hidden_states=batch.embeds, pooled_projections=batch.pooled,
                  timestep=batch.t * 1000)
    config = bench.SHAPES["tiny"]["config"]
    tokens = dict(image_tokens=(16 // 2) ** 2, text_tokens=bench.SHAPES["tiny"]["text_tokens"])
    with lora.adapters_disabled(model):
        base = bench.counted_forward_flops(model, inputs)
    with_lora = bench.counted_forward_flops(model, inputs)  # adapter "default" active
    assert bench.forward_flops(config, 2, **tokens) == base
    assert bench.lora_flops(config, 2, **tokens) == with_lora - base


def test_sd35_medium_forward_is_20_tflop_at_batch_9():
    """docs/benchmarks.md reference point: one SD3.5-M forward at batch 9, 512 px, with a r=32 LoRA = 20.2 TFLOP."""
    bench = load_bench()
    config = bench.SHAPES["sd3.5-medium"]["config"]
    total = bench.forward_flops(config, 9, 1024, 205) + bench.lora_flops(config, 9, 1024, 205)
    assert abs(total / 1e12 - 20.2) < 0.05


def test_cpu_smoke_run_prints_the_tables(tmp_path):
    out = tmp_path / "benchmarks.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--batch", "2", "--steps", "2",
         "--warmup", "0", "--repeats", "1", "--grad-ckpt", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout
    for path in ("upstream", "ours-adapters", "ours-merged", "ours-ckpt"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {path} |")]
        assert len(rows) == 2, path  # one row in the measurements table, one in the ratios table
    assert "ours-compiled" not in text  # CPU runs stay eager
    assert "matmul ceiling" in text and "TFLOP counted" in text and "Epoch model" in text
    assert "the sampler then waits" in text and "drawn before scoring" in text  # overlap and sampled-cell saving
    assert "bench/bench_train_step.py --shape tiny --device cpu" in text
