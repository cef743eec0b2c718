"""scripts/evaluation.py end to end on the tiny SD3 pipeline with tiny offline scorers, plus its library parts.

The single-process runs are launched together (they are import-bound) in one module fixture; the
2-rank torchrun run (gloo, CPU) then checks that 5 prompts over 2 ranks give exactly the 1-process entries.
"""
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prompt_data import data_root
from u_nft.evaluation import (DEFAULT_BASE_MODEL, eval_seed, format_summary, load_eval_lora, map_statistics,
                              resolve_base_model, write_json_atomic)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluation.py"
DATA = data_root()  # the shipped fixtures, or the public sets with U_NFT_DATA (tests/prompt_data.py)
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
COMMON = ["--resolution", "64", "--num_steps", "2", "--mixed_precision", "no", "--batch_size", "2",
          "--mean_map_size", "4"]

def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def _run(args, out_dir, launcher=(sys.executable,)):
    cmd = [*launcher, str(SCRIPT), *args, "--output_dir", str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads((Path(out_dir) / "results.json").read_text()), proc.stdout


def _image(out_dir, stem):
    return np.asarray(Image.open(Path(out_dir) / "images" / f"{stem}.png"), dtype=np.int16)


def _lora_transformer(tiny_sd3_dir):
    """The tiny pipeline with our two adapters, adapter "default" given nonzero B (so it changes the model)."""
    from u_nft.lora import TRAINABLE, _adapter_params, add_lora_adapters
    from u_nft.tiny_sd3 import load_sd3_pipeline

    pipeline = load_sd3_pipeline(tiny_sd3_dir)
    add_lora_adapters(pipeline.transformer, 4, 8, LORA_TARGETS)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in _adapter_params(pipeline.transformer, TRAINABLE).items():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return pipeline


@pytest.fixture(scope="module")
def assets(tiny_sd3_dir, tmp_path_factory):
    """Tiny CLIP + Mask2Former dirs and a training-style run dir whose checkpoint holds a nonzero LoRA."""
    from reward_maps.geneval import build_tiny_mask2former
    from u_nft.checkpoint import TrainState, save_checkpoint
    from u_nft.lora import TRAINABLE, lora_state_dict, save_lora_diffusers
    from u_nft.tiny_models import build_tiny_clip

    root = tmp_path_factory.mktemp("eval_assets")
    clip, m2f = build_tiny_clip(root / "clip"), build_tiny_mask2former(root / "mask2former")
    pipeline = _lora_transformer(tiny_sd3_dir)
    transformer = pipeline.transformer
    run_dir = root / "run"
    # the saved config names the base model, as train_u_nft_sd3.py's checkpoints do
    ckpt = save_checkpoint(run_dir, TrainState(epoch=1, global_step=3),
                           {"lora_default": lora_state_dict(transformer, TRAINABLE)},
                           config={"pretrained": {"model": str(tiny_sd3_dir)}},
                           lora_dirs=lambda d: save_lora_diffusers(transformer, TRAINABLE, d / "lora"))
    return {"clip": str(clip), "mask2former": str(m2f), "run_dir": run_dir, "checkpoint": ckpt, "pipeline": pipeline}


def _pick_options(assets):
    return json.dumps({"pickscore_map": {"model": assets["clip"], "processor": assets["clip"]}})


@pytest.fixture(scope="module")
def runs(tiny_sd3_dir, assets, tmp_path_factory):
    """The single-process runs, three at a time: name -> (results.json, output dir)."""
    out = tmp_path_factory.mktemp("eval_runs")
    model = ["--model", str(tiny_sd3_dir)]
    pick = ["--dataset", "pickscore", "--dataset_path", str(DATA / "pickscore" / "test.txt"),
            "--scorer_options", _pick_options(assets)]
    geneval_options = {"geneval_map": {"detector": assets["mask2former"], "clip_model": assets["clip"],
                                       "threshold": 0.0, "counting_threshold": 0.0, "detector_short_edge": 64,
                                       "detector_long_edge": 96}}
    specs = {
        "pick_base": model + pick + COMMON + ["--max_prompts", "5", "--save_images"],
        # no --model: the checkpoint's base model (its config.json), not the SD3.5-M hub id
        "pick_lora": pick + COMMON + ["--max_prompts", "2", "--save_images", "--checkpoint_path", str(assets["run_dir"])],
        "ocr": model + COMMON + ["--dataset", "ocr", "--dataset_path", str(DATA / "ocr" / "test.txt"),
                                 "--max_prompts", "3", "--images_per_prompt", "2", "--batch_size", "4", "--save_maps",
                                 "--num_grid_images", "4", "--scorer_options",
                                 json.dumps({"ocr_map": {"num_workers": 1, "intra_op_threads": 1}})],
        "geneval": model + COMMON + ["--dataset", "geneval", "--dataset_path",
                                     str(DATA / "geneval" / "test_metadata.jsonl"), "--max_prompts", "6",
                                     "--batch_size", "3", "--scorer_options", json.dumps(geneval_options)],
        "drawbench": model + COMMON + ["--dataset", "drawbench", "--dataset_path", str(DATA / "drawbench" / "test.txt"),
                                       "--max_prompts", "2", "--scorer_options", _pick_options(assets),
                                       "--lora_hf_path", str(assets["checkpoint"] / "lora")],
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, args, out / name) for name, args in specs.items()}
        return {name: (f.result()[0], out / name) for name, f in futures.items()}


# ---- the script --------------------------------------------------------------------------------------

def test_ocr_entries_aggregates_maps_and_command(runs):
    data, out = runs["ocr"]
    samples = data["samples"]
    assert len(samples) == 3 * 2 and data["dataset"]["num_samples"] == 6
    assert [(s["prompt_index"], s["image_index"]) for s in samples] == [(i, k) for i in range(3) for k in range(2)]
    assert [s["seed"] for s in samples] == [eval_seed(0, i, k) for i in range(3) for k in range(2)]
    assert len({s["seed"] for s in samples}) == 6
    scores = [s["scores"]["ocr_map"] for s in samples]
    m = data["metrics"]["ocr_map"]
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(np.mean(scores)) and m["mean"] == pytest.approx(np.mean(scores))
    assert m["exact_match"] == pytest.approx(np.mean([v == 1.0 for v in scores]))
    first = (DATA / "ocr" / "test.txt").read_text(encoding="utf-8").splitlines()[0]
    assert samples[0]["info"]["ocr_map"]["target"] == first.split('"')[1]
    for key in ("map_mean", "map_std", "positive_area", "negative_area"):
        assert m["map"][key] == pytest.approx(np.mean([s["map_stats"]["ocr_map"][key] for s in samples]), abs=1e-6)
    mean_map = np.asarray(m["map"]["mean_map"])
    assert mean_map.shape == (4, 4) and mean_map.mean() == pytest.approx(m["map"]["map_mean"], abs=1e-5)
    assert "--dataset ocr" in data["command"] and data["command"].startswith("python scripts/evaluation.py")
    assert data["config"]["images_per_prompt"] == 2 and data["world_size"] == 1 and data["lora"] is None
    assert sorted(p.name for p in (out / "maps" / "ocr_map").iterdir()) == [f"{i:05d}_{k:02d}.png" for i in range(3)
                                                                          for k in range(2)]
    assert (out / "grid_ocr_map.png").is_file() and (out / "mean_map_ocr_map.png").is_file()


def test_geneval_reports_benchmark_overall_strict_and_partial(runs):
    from reward_maps.geneval_rules import summarize

    data, _ = runs["geneval"]
    samples = data["samples"]
    lines = [json.loads(l) for l in (DATA / "geneval" / "test_metadata.jsonl").read_text().splitlines()[:6]]
    assert [s["prompt"] for s in samples] == [l["prompt"] for l in lines]
    assert [s["tag"] for s in samples] == [l["tag"] for l in lines]
    m = data["metrics"]["geneval_map"]
    records = [{k: s["info"]["geneval_map"][k] for k in ("tag", "correct", "strict_correct", "score")} for s in samples]
    expected = summarize(records)
    assert m["per_tag"].keys() == expected["per_tag"].keys() and len(expected["per_tag"]) >= 2
    for tag, values in expected["per_tag"].items():
        assert m["per_tag"][tag] == pytest.approx(values)
    assert m["overall"] == pytest.approx(np.mean([v["accuracy"] for v in m["per_tag"].values()]))
    assert m["overall_strict"] == pytest.approx(np.mean([v["strict_accuracy"] for v in m["per_tag"].values()]))
    assert m["mean_score"] == pytest.approx(np.mean([s["scores"]["geneval_map"] for s in samples]))
    # thresholds 0 let the random detector's boxes through, so the verdicts are not all trivially empty
    assert any(s["info"]["geneval_map"]["detections"] for s in samples)


def test_pickscore_and_drawbench_report_pickscore_means(runs):
    for name in ("pick_base", "drawbench"):
        data, _ = runs[name]
        assert data["rewards"] == ["pickscore_map"]
        scores = [s["scores"]["pickscore_map"] for s in data["samples"]]
        assert data["metrics"]["pickscore_map"]["mean"] == pytest.approx(np.mean(scores))
        assert all(math.isfinite(v) for v in scores)
    lora = runs["drawbench"][0]["lora"]
    assert lora["format"] == "diffusers" and len(lora["weights_sha256"]) == 64


def test_lora_checkpoint_changes_images_on_identical_noise(runs, assets):
    base, base_dir = runs["pick_base"]
    tuned, tuned_dir = runs["pick_lora"]
    assert tuned["lora"]["path"] == str((assets["checkpoint"] / "lora").resolve())
    assert tuned["model"] == base["model"] and tuned["model_source"].endswith("config.json pretrained.model")
    assert [s["seed"] for s in tuned["samples"]] == [s["seed"] for s in base["samples"][:2]]
    assert [s["prompt"] for s in tuned["samples"]] == [s["prompt"] for s in base["samples"][:2]]
    for i in range(2):
        assert np.abs(_image(tuned_dir, f"{i:05d}_00") - _image(base_dir, f"{i:05d}_00")).max() > 10
    assert tuned["samples"][0]["scores"] != base["samples"][0]["scores"]


def test_uneven_split_over_two_ranks_matches_one_process(runs, tiny_sd3_dir, assets, tmp_path):
    base, base_dir = runs["pick_base"]
    args = ["--model", str(tiny_sd3_dir), "--dataset", "pickscore", "--dataset_path", str(DATA / "pickscore" / "test.txt"),
            "--scorer_options", _pick_options(assets), *COMMON, "--max_prompts", "5", "--save_images", "--batch_size", "3"]
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    out = tmp_path / "two_ranks"
    data, _ = _run(args, out, launcher)
    assert data["world_size"] == 2 and data["command"].startswith("torchrun --nproc_per_node=2 scripts/evaluation.py")
    assert len(data["samples"]) == 5 and [s["index"] for s in data["samples"]] == list(range(5))
    assert [s["seed"] for s in data["samples"]] == [s["seed"] for s in base["samples"]]
    for mine, ref in zip(data["samples"], base["samples"]):
        assert mine["prompt"] == ref["prompt"]
        assert mine["scores"]["pickscore_map"] == pytest.approx(ref["scores"]["pickscore_map"], abs=1e-5)
    assert data["metrics"]["pickscore_map"]["mean"] == pytest.approx(base["metrics"]["pickscore_map"]["mean"], abs=1e-5)
    # identical noise: the base model draws the same images in both runs (up to uint8 rounding of float noise)
    for i in range(5):
        assert np.abs(_image(out, f"{i:05d}_00") - _image(base_dir, f"{i:05d}_00")).max() <= 1


def test_bad_flags_name_the_flag(tiny_sd3_dir, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--model", str(tiny_sd3_dir), "--dataset", "ocr",
           "--dataset_path", str(tmp_path / "missing.txt")]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--dataset_path" in proc.stderr


# ---- library parts (in process) ------------------------------------------------------------------------

def test_base_model_is_the_flag_else_the_checkpoints_else_the_default(tmp_path, tiny_sd3_dir):
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    assert resolve_base_model("", ckpt) == (DEFAULT_BASE_MODEL, "default (no --model and no checkpoint config naming one)")
    (ckpt / "config.json").write_text(json.dumps({"pretrained": {"model": str(tiny_sd3_dir)}}))
    assert resolve_base_model("", ckpt)[0] == str(tiny_sd3_dir)
    assert resolve_base_model("owner/other-model", ckpt) == ("owner/other-model", "--model")
    assert resolve_base_model("", None)[0] == DEFAULT_BASE_MODEL
    (ckpt / "config.json").write_text(json.dumps({"pretrained": {"model": str(tmp_path / "moved_away")}}))
    with pytest.raises(FileNotFoundError, match=r"moved_away.*pretrained.model.*--model"):
        resolve_base_model("", ckpt)


def test_eval_seed_depends_only_on_seed_prompt_and_image():
    seeds = {(s, i, k): eval_seed(s, i, k) for s in (0, 1) for i in range(50) for k in range(4)}
    assert len(set(seeds.values())) == len(seeds) and min(seeds.values()) >= 0
    assert eval_seed(0, 7, 2) == eval_seed(0, 7, 2)
    with pytest.raises(ValueError, match="seed"):
        eval_seed(-1, 0, 0)


def test_lora_formats_load_to_the_same_model(tiny_sd3_dir, assets, tmp_path):
    """Our checkpoint's diffusers folder, its .safetensors file and a peft export all give the trained adapter."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from u_nft.lora import TRAINABLE, unwrap, use_adapter
    from u_nft.tiny_sd3 import load_sd3_pipeline

    transformer = assets["pipeline"].transformer
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    state = get_peft_model_state_dict(unwrap(transformer), adapter_name=TRAINABLE)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()}, str(peft_dir / "adapter_model.safetensors"))
    unwrap(transformer).peft_config[TRAINABLE].save_pretrained(str(peft_dir))

    g = torch.Generator().manual_seed(1)
    x, enc, pooled = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 205, 64, generator=g), torch.randn(1, 64, generator=g)

    def velocity(model):
        return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                     timestep=torch.tensor([500]), return_dict=False)[0]

    with torch.no_grad(), use_adapter(transformer, TRAINABLE):
        expected = velocity(transformer)
    lora_dir = assets["checkpoint"] / "lora"
    for source, fmt in ((lora_dir, "diffusers"), (lora_dir / "pytorch_lora_weights.safetensors", "diffusers"),
                        (peft_dir, "peft")):
        pipeline = load_sd3_pipeline(tiny_sd3_dir)
        with torch.no_grad():
            base = velocity(pipeline.transformer)
        info = load_eval_lora(pipeline, source)
        assert info["format"] == fmt
        with torch.no_grad():
            got = velocity(pipeline.transformer)
        assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        load_eval_lora(load_sd3_pipeline(tiny_sd3_dir), tmp_path)


def test_map_statistics_shares_and_spread():
    maps = torch.tensor([[[0.0, 1.0], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    a, b = map_statistics(maps, (0.0, 1.0))
    assert a == pytest.approx({"map_mean": 0.5, "map_std": math.sqrt(0.125), "positive_area": 0.25, "negative_area": 0.25})
    assert b == pytest.approx({"map_mean": 0.5, "map_std": 0.0, "positive_area": 0.0, "negative_area": 0.0})
    assert set(map_statistics(maps, None)[0]) == {"map_mean", "map_std"}


def test_json_is_written_atomically_and_strict(tmp_path):
    path = tmp_path / "r" / "results.json"
    write_json_atomic(path, {"a": float("nan"), "b": np.float32(1.5), "c": torch.tensor([1, 2]), "d": (1, 2)})
    assert json.loads(path.read_text()) == {"a": None, "b": 1.5, "c": [1, 2], "d": [1, 2]}
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["results.json"]
    table = format_summary({"ocr_map": {"n": 2, "accuracy": 0.5, "map": {"map_mean": 0.4, "mean_map": [[0.4]]}}})
    assert "accuracy" in table and "0.5000" in table and "mean_map" not in table
