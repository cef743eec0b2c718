"""Evaluate a base model or a LoRA checkpoint on GenEval / OCR / PickScore / DrawBench prompts.

    torchrun --nproc_per_node=8 scripts/evaluation.py --checkpoint_path runs/sd3_ocr_map/checkpoints/checkpoint-1018 \
        --dataset ocr --guidance_scale 1.0 --num_steps 40 --resolution 512 --mixed_precision fp16 --save_images
    ... --lora_hf_path OWNER/NAME (a diffusers or peft LoRA, hub id or local)   ... no LoRA flag: the base model

Every (prompt, image) sample is generated once, on rank j % world_size, from a seed that depends only on
(--seed, prompt position, image index): checkpoints are compared on identical noise, and the numbers do not
depend on the number of GPUs or the batch size. Writes <output_dir>/results.json (per-sample scores,
benchmark metrics, reward-map statistics, the exact command and config) and prints a summary table.
"""
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from absl import app, flags

from reward_maps.combine import RewardSet
from u_nft import distributed as dist
from u_nft.data import load_prompts
from u_nft.evaluation import (DATASETS, checkpoint_lora_dir, evaluate_prompts, file_sha256, format_summary,
                              image_saver, load_eval_lora, resolve_base_model, reward_metrics, sample_records,
                              save_result_figures, write_json_atomic)
from u_nft.models import conditioning_to, family_for
from u_nft.solvers import SOLVERS
from u_nft.training import resolve_device, resolve_dtypes

REPO_ROOT = Path(__file__).resolve().parents[1]
FORMAT_VERSION = 1

flags.DEFINE_string("model", "", "Base pipeline: hub id or local directory. Default: with --checkpoint_path the base "
                    "model that checkpoint was trained on (its config.json), else stabilityai/stable-diffusion-3.5-medium.")
flags.DEFINE_string("checkpoint_path", "", "A checkpoint-K folder (its lora/ is loaded) or a run dir (latest checkpoint).")
flags.DEFINE_string("lora_hf_path", "", "A LoRA: hub id, folder or .safetensors file (diffusers or peft format).")
flags.DEFINE_enum("dataset", None, sorted(DATASETS), "Benchmark prompt set.")
flags.DEFINE_string("dataset_path", "", "Prompt file (.txt or GenEval .jsonl); default dataset/<name>/... in the repo.")
flags.DEFINE_integer("max_prompts", 0, "Evaluate the first N prompts of the file (0 = all).")
flags.DEFINE_integer("images_per_prompt", 1, "Images per prompt (4 for GenEval's 553-line evaluation_metadata.jsonl).")
flags.DEFINE_string("reward_fn", "", "Comma-separated scorers (registered names or pkg.module:callable); default per dataset.")
flags.DEFINE_string("scorer_options", "{}", "JSON {scorer: {option: value}} (or a path to such a file), e.g. local model dirs.")
flags.DEFINE_float("guidance_scale", 1.0, "CFG scale (1.0 = CFG-free, as DiffusionNFT models are trained).")
flags.DEFINE_float("distilled_guidance", 3.5, "Guidance value fed to guidance-distilled transformers (FLUX.1-dev; "
                   "diffusers FluxPipeline default 3.5); ignored by other families.")
flags.DEFINE_integer("num_steps", 40, "Solver steps (upstream evaluation: 40).")
flags.DEFINE_enum("solver", "flow", list(SOLVERS), "flow = deterministic Euler (upstream evaluation); dpm2 = DPM-Solver++ 2M.")
flags.DEFINE_integer("resolution", 512, "Image side in pixels (multiple of 16).")
flags.DEFINE_enum("mixed_precision", "fp16", ["no", "fp16", "bf16"], "Autocast dtype of the transformer.")
flags.DEFINE_enum("base_dtype", "auto", ["auto", "fp32", "bf16", "fp16"], "Frozen weights (auto: bf16 on GPU with autocast).")
flags.DEFINE_integer("batch_size", 16, "Images per rank per batch (does not change the results).")
flags.DEFINE_integer("max_sequence_length", 128, "T5 tokens (upstream 128).")
flags.DEFINE_integer("seed", 0, "Noise seed of the evaluation (>= 0).")
flags.DEFINE_string("device", "auto", "auto | cuda | cpu.")
flags.DEFINE_integer("reward_workers", 1, "Scoring threads per scorer (overlap with sampling).")
flags.DEFINE_string("output_dir", "", "Default: <checkpoint>/eval/<dataset>, else runs/eval/<dataset>_<model>.")
flags.DEFINE_bool("save_images", False, "Write images/<prompt>_<image>.png and grid_images.png.")
flags.DEFINE_bool("save_maps", False, "Write heatmap overlays maps/<reward>/*.png, grid_<reward>.png, mean_map_<reward>.png.")
flags.DEFINE_integer("num_grid_images", 16, "Samples shown in the grids.")
flags.DEFINE_integer("mean_map_size", 32, "Side of the mean reward map in results.json (0 = off).")
FLAGS = flags.FLAGS
_OWN_FLAGS = ("model", "checkpoint_path", "lora_hf_path", "dataset", "dataset_path", "max_prompts", "images_per_prompt",
              "reward_fn", "scorer_options", "guidance_scale", "distilled_guidance", "num_steps", "solver", "resolution", "mixed_precision",
              "base_dtype", "batch_size", "max_sequence_length", "seed", "device", "reward_workers", "output_dir",
              "save_images", "save_maps", "num_grid_images", "mean_map_size")


def check_flags() -> None:
    """Errors name the flag and the accepted values."""
    if FLAGS.checkpoint_path and FLAGS.lora_hf_path:
        raise app.UsageError("give at most one of --checkpoint_path and --lora_hf_path")
    for name, low in (("max_prompts", 0), ("images_per_prompt", 1), ("num_steps", 1), ("batch_size", 1), ("seed", 0),
                      ("reward_workers", 1), ("num_grid_images", 0), ("mean_map_size", 0), ("max_sequence_length", 1)):
        if FLAGS[name].value < low:
            raise app.UsageError(f"--{name}={FLAGS[name].value} must be >= {low}")
    if FLAGS.resolution < 16 or FLAGS.resolution % 16:
        raise app.UsageError(f"--resolution={FLAGS.resolution} must be a positive multiple of 16 (VAE x8, patch 2)")


def scorer_options() -> dict:
    text = FLAGS.scorer_options
    if os.path.isfile(text):
        text = Path(text).read_text(encoding="utf-8")
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise app.UsageError(f"--scorer_options is neither a JSON object nor a JSON file: {err}") from err
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise app.UsageError('--scorer_options must be {"scorer": {"option": value}}, e.g. {"pickscore_map": {"model": "DIR"}}')
    return options


def dataset_file() -> Path:
    spec = DATASETS[FLAGS.dataset]
    path = Path(FLAGS.dataset_path) if FLAGS.dataset_path else REPO_ROOT / "dataset" / spec.file
    if not path.is_file():
        raise app.UsageError(
            f"prompt file {path} does not exist: pass --dataset_path, or copy flow_grpo's dataset/ folder "
            f"(github.com/yifan123/flow_grpo, dataset/{spec.file}) to {REPO_ROOT / 'dataset'}"
        )
    return path


def run_label() -> str:
    source = FLAGS.lora_hf_path or FLAGS.checkpoint_path
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source.strip("/")).strip("_")[-80:] if source else "base"


def launch_command() -> str:
    """The command line as launched (torchrun's own arguments reconstructed from its environment)."""
    argv = [os.path.relpath(sys.argv[0], REPO_ROOT) if sys.argv[0].startswith(str(REPO_ROOT)) else sys.argv[0]]
    argv += sys.argv[1:]
    if dist.world_size() == 1:
        return shlex.join(["python", *argv])
    nodes = dist.world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size()))
    launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', dist.world_size())}"]
    return shlex.join(launcher + ([f"--nnodes={nodes}"] if nodes > 1 else []) + argv)


def environment() -> dict:
    import diffusers
    import numpy
    import peft
    import transformers

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "numpy": numpy.__version__, "python": sys.version.split()[0], "git_commit": commit,
            "git_dirty": None if status is None else bool(status),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main(_):
    check_flags()
    dist.init_distributed()
    is_main = dist.is_main()
    device = resolve_device(FLAGS.device)
    base_dtype, autocast_dtype = resolve_dtypes(FLAGS.mixed_precision, FLAGS.base_dtype, device)

    # Prompts and scorers
    path = dataset_file()
    prompts, metadata = load_prompts(path)
    if FLAGS.max_prompts:
        prompts, metadata = prompts[:FLAGS.max_prompts], metadata[:FLAGS.max_prompts]
    names = [n.strip() for n in FLAGS.reward_fn.split(",") if n.strip()] or list(DATASETS[FLAGS.dataset].rewards)
    rewards = RewardSet({n: 1.0 for n in names}, scorer_options(), device, torch.float32, FLAGS.reward_workers)

    # Model and LoRA (the main rank downloads first, the others then read the cache)
    pipeline = None
    lora = None
    lora_source = str(checkpoint_lora_dir(FLAGS.checkpoint_path)) if FLAGS.checkpoint_path else FLAGS.lora_hf_path
    try:
        model, model_source = resolve_base_model(FLAGS.model, Path(lora_source).parent if FLAGS.checkpoint_path else None)
    except FileNotFoundError as err:
        raise app.UsageError(f"--checkpoint_path {FLAGS.checkpoint_path}: {err}") from err
    for turn in (True, False):  # the family from the model's model_index.json (main rank downloads first)
        if is_main == turn:
            family = family_for(model)
        dist.barrier()
    try:
        family.check_guidance_scale(FLAGS.guidance_scale, "--guidance_scale")
    except ValueError as err:
        raise app.UsageError(str(err)) from err
    if is_main:
        print(f"base model: {model} (from {model_source}), family {family.name}", flush=True)
    for turn in (True, False):
        if is_main == turn:
            pipeline = family.load_pipeline(model, dtype=base_dtype, device=device)  # VAE in fp32, as upstream
            if lora_source:
                lora = load_eval_lora(pipeline, lora_source)
        dist.barrier()
    pipeline.transformer.eval()

    def encode(batch_prompts):
        return conditioning_to(family.encode_prompts(pipeline, batch_prompts, FLAGS.max_sequence_length, device),
                               base_dtype)

    negative = (family.negative_conditioning(pipeline, FLAGS.max_sequence_length, device)
                if FLAGS.guidance_scale != 1.0 else None)
    output_dir = Path(FLAGS.output_dir) if FLAGS.output_dir else (
        Path(lora_source).parent / "eval" / FLAGS.dataset if FLAGS.checkpoint_path
        else REPO_ROOT / "runs" / "eval" / f"{FLAGS.dataset}_{run_label()}")
    if is_main:
        print(f"evaluating {lora_source or model} on {FLAGS.dataset} ({len(prompts)} prompts x "
              f"{FLAGS.images_per_prompt} images, {dist.world_size()} ranks) -> {output_dir}", flush=True)

    # Generate and score
    saver = image_saver(output_dir, FLAGS.images_per_prompt, FLAGS.save_images, FLAGS.save_maps) \
        if FLAGS.save_images or FLAGS.save_maps else None
    result = evaluate_prompts(
        family, pipeline, encode, prompts, metadata, rewards, seed=FLAGS.seed, resolution=FLAGS.resolution,
        sigmas=family.sigmas(pipeline, FLAGS.num_steps, FLAGS.resolution), solver=FLAGS.solver,
        guidance_scale=FLAGS.guidance_scale, guidance=FLAGS.distilled_guidance,
        negative=negative, batch_size=FLAGS.batch_size, autocast_dtype=autocast_dtype,
        keep_images=FLAGS.num_grid_images if FLAGS.save_images or FLAGS.save_maps else 0, on_batch=saver,
        images_per_prompt=FLAGS.images_per_prompt,
        mean_map_size=(FLAGS.mean_map_size,) * 2 if FLAGS.mean_map_size else None)
    rewards.close()

    # Report
    if is_main:
        metrics = reward_metrics(result)
        report = {
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": launch_command(), "argv": sys.argv, "world_size": dist.world_size(),
            "config": {name: FLAGS[name].value for name in _OWN_FLAGS},
            "model": model, "model_source": model_source, "family": family.name, "lora": lora, "environment": environment(),
            "dataset": {"name": FLAGS.dataset, "path": str(path.resolve()), "sha256": file_sha256(path),
                        "num_prompts": len(prompts), "images_per_prompt": FLAGS.images_per_prompt,
                        "num_samples": len(result.prompts), "note": DATASETS[FLAGS.dataset].note},
            "rewards": names, "metrics": metrics, "samples": sample_records(result, metadata),
        }
        written = write_json_atomic(output_dir / "results.json", report)
        save_result_figures(result, output_dir, FLAGS.save_images, FLAGS.save_maps)
        print(format_summary(metrics), flush=True)
        print(f"wrote {written}", flush=True)
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    flags.mark_flag_as_required("dataset")
    app.run(main)
