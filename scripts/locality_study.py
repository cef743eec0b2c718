"""Evidence that holds up (issue 17): collateral drift, a prompt-conditioned layout, locality levers, ablations.

    python scripts/locality_study.py --stage main        # centre, quadrants, layout x dense, scalar, mc_uniform x 5 seeds
    python scripts/locality_study.py --stage levers      # anchor and LoRA-capacity levers (centre, layout, quadrants)
    python scripts/locality_study.py --stage levers_more # anchor 1, LoRA on ff + proj_out at rank 8, attention rank 2
    python scripts/locality_study.py --stage ablations   # cell size, beta, map scale, weighting, MC m and q (centre)
    python scripts/locality_study.py --stage report      # re-measure nothing: tables and plots from finished runs
    python scripts/locality_study.py --quick --runs_dir /tmp/q --docs_dir /tmp/q/docs   # the test variant
    python scripts/locality_study.py --measure RUN_DIR   # the drift probe of one finished run (the stages call it)

A run is ``scripts/train_u_nft_sd3.py --config config/experiments.py:OBJECTIVE_METHOD`` plus the
variant's overrides (config/experiments.py VARIANTS) and ``--config.seed=S``, saving the EMA LoRA after
every epoch. Runs of one seed share the initial model, the rollout noise and the optimizer steps per
epoch (equal budgets), so differences between methods are paired by seed. After training, the probe
(``--measure``) samples the held-out prompts (config: ``dataset.test``) from FIXED noise with the starting
model and with each epoch's EMA LoRA and writes ``drift.json`` in the run folder: the probe reward and the
collateral drift of every epoch (u_nft/drift.py: mean |Δpixel|, colour-histogram TV distance and
local-contrast change, outside vs inside the rewarded regions, and the function-space locality
|v_θ − v_ref| at the reference trajectory's x_t). Stages run ``--jobs`` runs at once, one thread each,
under ``nice``; a finished run (its drift.json present, same epochs) is reused.

Statistics (u_nft/study_stats.py): mean ± 95 % t interval over seeds; paired tests across seeds (exact
sign-flip permutation, with 5 seeds its smallest two-sided p is 1/16, and the paired t-test); epochs to
threshold per seed on the train reward, threshold = start + 0.5 × (best seed-mean of the main grid − start)
per objective. Outputs: docs/locality_study.md (every number and its command), docs/locality_*.png
(reward vs epoch, drift vs epoch, reward-vs-drift trade-off, lever and ablation bars) and
``RUNS_DIR/study.json`` (the numbers behind them).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from u_nft.study_stats import parse_seeds

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train_u_nft_sd3.py"
EXPERIMENTS_FILE = REPO_ROOT / "config" / "experiments.py"
DRIFT_FILE = "drift.json"
WALL_FILE = "wall.json"
NOTES_HEADING = "## Findings"
METRICS = ("pixel", "histogram", "contrast", "velocity", "increment")  # in drift.json, each _inside / _outside
METRIC_LABELS = {"pixel": "mean |Δpixel|", "histogram": "colour-histogram TV", "contrast": "local-contrast change",
                 "velocity": "|v_θ − v_ref| at the same x_t",
                 "increment": "|v_θ(e) − v_θ(e − 1)| at the same x_t (one epoch's change)"}
COLORS = {"dense": "C0", "scalar": "C1", "mc_uniform": "C2", "mc_focus": "C3",  # same colour in every figure
          "dense (outside)": "C0", "scalar (outside)": "C1", "mc_uniform (outside)": "C2",
          "dense (inside)": "#9ecae1", "scalar (inside)": "#fdae6b", "mc_uniform (inside)": "#a1d99b"}


def load_experiments():
    spec = importlib.util.spec_from_file_location("locality_study_experiments", EXPERIMENTS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the grid ------------------------------------------------------------------------------------------

def stage_arms(stage: str) -> list[tuple[str, str, str]]:
    """(objective, method, variant) arms of a stage (see the module doc)."""
    if stage == "main":
        return [(o, m, "base") for o in ("centre", "quadrants", "layout") for m in ("dense", "scalar", "mc_uniform")]
    if stage == "levers":  # in priority order (a stage stopped early keeps the first ones)
        return [("centre", "dense", "anchor10"), ("centre", "dense", "ff_out_r32"), ("centre", "scalar", "ff_out_r32"),
                ("centre", "dense", "ff_out_r32_anchor10"), ("layout", "dense", "ff_out_r32"),
                ("layout", "scalar", "ff_out_r32"), ("layout", "dense", "anchor10"),
                ("quadrants", "dense", "ff_out_r32"), ("quadrants", "scalar", "ff_out_r32")]
    if stage == "levers_more":  # the same question at other strengths and capacities
        return [("centre", "dense", "anchor1"), ("centre", "dense", "ff_out"), ("centre", "dense", "attn_r2"),
                ("centre", "scalar", "attn_r2")]
    if stage == "ablations":
        arms = [("centre", "dense", v) for v in ("cell2", "cell4", "beta0.1", "scale_location", "scale_group",
                                                 "adaptive_location")]
        arms += [("centre", "mc_uniform", v) for v in ("m4", "m16")]
        arms += [("centre", "mc_focus", v) for v in ("base", "m4", "m16")]
        arms += [("centre", "scalar", "beta0.1")]
        return arms
    if stage == "quick":
        return [("centre", "dense", "base"), ("centre", "scalar", "base")]
    raise SystemExit(f"--stage {stage!r}: accepted: main, levers, levers_more, ablations, report")


STAGE_SEEDS = {"main": 5, "levers": 3, "levers_more": 2, "ablations": 2, "quick": 1}


def run_name(objective, method, variant, seed):
    return f"{objective}_{method}_{variant}_s{seed}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="main", help="main | levers | ablations | report (default main)")
    parser.add_argument("--objectives", help="comma-separated: only the stage's arms on these objectives (default all)")
    parser.add_argument("--seeds", help="a count N (0..N-1) or comma-separated seeds (default: 5 main, 3 otherwise)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 10)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each (default 2)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the runs (default 10)")
    parser.add_argument("--probe_images", type=int, default=2, help="probe images per held-out prompt (default 2)")
    parser.add_argument("--runs_dir", default=str(REPO_ROOT / "runs" / "locality_study"))
    parser.add_argument("--docs_dir", default=str(REPO_ROOT / "docs"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: centre dense + scalar, 1 seed, 2 epochs, 2 prompt groups, 2 probe prompts")
    parser.add_argument("--measure", metavar="RUN_DIR", help="only write RUN_DIR/drift.json (the probe of one run)")
    parser.add_argument("--retries", type=int, default=2, help="retries of a failed run (default 2)")
    parser.add_argument("--retry_wait_s", type=float, default=60.0, help="seconds before a retry (default 60)")
    parser.add_argument("--kernel", metavar="OBJECTIVE",
                        help="only the one-gradient-step locality of each parametrization (writes RUNS_DIR/kernel_OBJECTIVE.json)")
    parser.add_argument("--max_probe_prompts", type=int, default=0, help="probe only the first N test prompts (0 = all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.stage = "quick"
        args.epochs = args.epochs or 2
        args.max_probe_prompts = args.max_probe_prompts or 2
    args.epochs = args.epochs or 10
    if args.epochs < 1 or args.jobs < 1 or args.probe_images < 1:
        parser.error("--epochs, --jobs and --probe_images must be >= 1")
    if args.stage != "report":
        stage_arms(args.stage)  # validates the name
    args.seeds = parse_seeds(args.seeds or str(STAGE_SEEDS.get(args.stage, 5)))
    return args


def quick_overrides(args):
    """Overrides every quick run takes (2 groups, 1 optimizer step per epoch)."""
    return ["sample.num_groups=2", "train.gradient_step_per_epoch=1", "logging.num_log_images=2"] if args.quick else []


def train_command(args, objective, method, variant, seed):
    """The train-script command line of one run (as the docs print it to reproduce it)."""
    experiments = load_experiments()
    epochs = args.epochs
    overrides = [*experiments.VARIANTS[variant], *quick_overrides(args)]
    return [sys.executable, str(TRAIN_SCRIPT.relative_to(REPO_ROOT)),
            f"--config={EXPERIMENTS_FILE.relative_to(REPO_ROOT)}:{objective}_{method}",
            f"--config.seed={seed}", f"--config.run_name={run_name(objective, method, variant, seed)}",
            f"--config.logdir={args.runs_dir}", f"--config.num_epochs={epochs}", "--config.eval_freq=0",
            "--config.save_freq=1", f"--config.checkpoints_total_limit={epochs}",
            f"--config.logging.image_every={max(epochs - 1, 1)}"] + [f"--config.{o}" for o in overrides]


def measure_command(args, run_dir):
    command = [sys.executable, str(Path(__file__).resolve().relative_to(REPO_ROOT)), "--measure", str(run_dir),
               f"--probe_images={args.probe_images}"]
    return command + ([f"--max_probe_prompts={args.max_probe_prompts}"] if args.max_probe_prompts else [])


def _display(command):
    """A command as a user would type it (repo-relative, ``python``)."""
    return "python " + " ".join(shlex.quote(str(a)).replace(str(REPO_ROOT) + os.sep, "") for a in command[1:])


def run_finished(run_dir, epochs):
    path = Path(run_dir) / DRIFT_FILE
    if not path.is_file():
        return False
    return json.loads(path.read_text(encoding="utf-8")).get("epochs_trained", [None])[-1] == epochs


def _environment():
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}


def train_and_measure(args, objective, method, variant, seed):
    """Train one run, then probe it, in subprocesses (nice, one thread); returns (name, seconds or 0 if reused)."""
    name = run_name(objective, method, variant, seed)
    run_dir = Path(args.runs_dir) / name
    if run_finished(run_dir, args.epochs):
        return name, 0.0
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: the logger appends to an existing metrics.jsonl
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{name}.log"
    prefix = ["nice", "-n", str(args.nice)] if args.nice and shutil.which("nice") else []
    times, load = {}, {"start": os.getloadavg()[0]}
    for attempt in range(1 + args.retries):
        with open(log_path, "w", encoding="utf-8") as log:
            for step, command in (("train", train_command(args, objective, method, variant, seed)),
                                  ("measure", measure_command(args, run_dir))):
                start = time.time()
                code = subprocess.call(prefix + command, cwd=REPO_ROOT, env=_environment(), stdout=log,
                                       stderr=subprocess.STDOUT)
                times[step] = time.time() - start
                if code != 0:
                    break
        if code == 0:
            break
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2500:]
        if attempt == args.retries:
            raise RuntimeError(f"run {name}: {step} failed (exit {code}); log {log_path}:\n{tail}")
        print(f"  {name}: {step} failed (exit {code}), retrying in {args.retry_wait_s:.0f} s; log tail:\n{tail[-600:]}",
              flush=True)
        time.sleep(args.retry_wait_s)
        shutil.rmtree(run_dir, ignore_errors=True)
    load["end"] = os.getloadavg()[0]
    (run_dir / WALL_FILE).write_text(json.dumps({"seconds": times, "load_average_1min": load}), encoding="utf-8")
    return name, sum(times.values())


def run_stage(args):
    """All arms x seeds of ``args.stage``, ``args.jobs`` at once; returns the wall seconds."""
    # seed-major: every arm gets its first seeds before any arm gets more (a stage stopped early stays balanced)
    arms = [arm for arm in stage_arms(args.stage) if not args.objectives or arm[0] in args.objectives.split(",")]
    jobs = [(o, m, v, s) for s in args.seeds for (o, m, v) in arms]
    print(f"stage {args.stage}: {len(jobs)} runs, {args.jobs} at once, into {args.runs_dir}", flush=True)
    start = time.time()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = [pool.submit(train_and_measure, args, *job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            name, seconds = future.result()
            print(f"  {name}: {'reused' if not seconds else f'{seconds:.0f} s'} "
                  f"({time.time() - start:.0f} s into the stage)", flush=True)
    finally:  # after a failure start nothing new (the runs under way finish)
        pool.shutdown(wait=True, cancel_futures=True)
    seconds = time.time() - start
    stages_file = Path(args.runs_dir) / "stages.json"
    stages = json.loads(stages_file.read_text(encoding="utf-8")) if stages_file.is_file() else {}
    label = f"{args.stage}{' ' + args.objectives if args.objectives else ''} (seeds {','.join(map(str, args.seeds))})"
    stages[label] = {"stage": args.stage, "objectives": args.objectives or "all", "wall_seconds": seconds, "runs": len(jobs), "jobs": args.jobs, "seeds": args.seeds,
                          "epochs": args.epochs, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                          "load_average_1min_end": os.getloadavg()[0], "cpus": os.cpu_count()}
    stages_file.write_text(json.dumps(stages, indent=1), encoding="utf-8")
    return seconds


# ---- the probe -----------------------------------------------------------------------------------------

def _probe_noise(seeds, channels, size):
    """x_T per probe image, each from its own CPU generator (independent of batch and device)."""
    return torch.cat([torch.randn((1, channels, size, size), generator=torch.Generator().manual_seed(s))
                      for s in seeds])


def swapped_layouts(metadata, metadata_key="regions"):
    """Per-prompt layouts with the region colours in reverse order (the prompt's twin), or None when the
    prompts carry no per-prompt layout of at least two regions."""
    out = []
    for meta in metadata:
        layout = meta.get(metadata_key) if isinstance(meta, dict) else None
        if not layout or len(layout) < 2:
            return None
        colors = [region["color"] for region in layout][::-1]
        out.append({**meta, metadata_key: [{**region, "color": c} for region, c in zip(layout, colors)]})
    return out


@torch.no_grad()
def measure_run(run_dir, probe_images=2, max_probe_prompts=0):
    """Probe one finished run: sample the held-out prompts from fixed noise with the starting model and each
    epoch's EMA LoRA, score them, and write drift.json (see the module doc and u_nft/drift.py)."""
    from reward_maps.combine import RewardSet
    from u_nft import drift
    from u_nft.checkpoint import list_checkpoints
    from u_nft.data import load_prompts
    from u_nft.lora import TRAINABLE, adapters_disabled, add_lora_adapters, load_lora_state, read_lora_file, use_adapter
    from u_nft.models import family_for
    from u_nft.solvers import sample

    torch.set_num_threads(1)
    run_dir = Path(run_dir)
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise SystemExit(f"--measure {run_dir}: no checkpoints (the study saves one per epoch)")
    config = json.loads((checkpoints[-1] / "config.json").read_text(encoding="utf-8"))
    states = [json.loads((c / "state.json").read_text(encoding="utf-8")) for c in checkpoints]
    epochs_trained = [s["state"]["epoch"] if "state" in s else s["epoch"] for s in states]
    family = family_for(config["pretrained"]["model"])  # any family: the probe goes through its adapter
    pipeline = family.load_pipeline(config["pretrained"]["model"], dtype=torch.float32, device="cpu")
    transformer = pipeline.transformer
    lora = config["lora"]
    add_lora_adapters(transformer, lora["rank"], lora["alpha"], list(lora["target_modules"]), lora["init"])
    transformer.eval()

    prompts, metadata = load_prompts(config["dataset"]["test"])
    if max_probe_prompts:
        prompts, metadata = prompts[:max_probe_prompts], metadata[:max_probe_prompts]
    prompts = [p for p in prompts for _ in range(probe_images)]
    metadata = [m for m in metadata for _ in range(probe_images)]
    seeds = [1_000_003 * (i + 1) + 17 for i in range(len(prompts))]  # fixed: the same noise for every run
    sample_cfg = config["sample"]
    resolution = sample_cfg["resolution"]
    channels, size, _ = family.latent_shape(pipeline, resolution)
    noise = _probe_noise(seeds, channels, size)
    # Local contrast over one transformer token's pixels (2 x 2 latent cells): the tiny VAE decodes each latent
    # cell to a nearly flat block, so smaller windows see no texture at all.
    contrast_window = 2 * (resolution // size)
    cond = family.encode_prompts(pipeline, prompts, sample_cfg["max_sequence_length"], "cpu")
    sigmas = family.sigmas(pipeline, sample_cfg["num_steps"], resolution)
    guidance = sample_cfg.get("distilled_guidance")

    def velocity(x, sigma):  # the rollouts' call: the sampler's ("long") timesteps, as the train script
        sigma_b = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[:1].expand(x.shape[0])
        return family.predict_velocity(transformer, x, sigma_b, cond, guidance=guidance, timestep_mode="long")

    def decode(latents):
        return family.decode(pipeline.vae, latents)

    def run_sampler(v):
        return sample(v, noise, sigmas, sample_cfg["solver"])

    name = next(iter(config["reward_fn"]))
    options = config.get("reward_options", {}).get(name, {})
    rewards = RewardSet({name: 1.0}, {name: options} if options else {}, "cpu", torch.float32, 1)
    if str(REPO_ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "scripts"))  # plug-in scorers of config/experiments.py live there
    try:
        with adapters_disabled(transformer):
            reference_latents, trajectory = drift.record_trajectory(run_sampler, velocity)
            reference_v = [velocity(x, s) for x, s in trajectory]
        reference = decode(reference_latents)
        height, width = reference.shape[-2:]
        try:
            inside = drift.rewarded_mask(metadata, height, width, options.get("regions"),
                                         options.get("metadata_key", "regions"))
        except Exception:  # a scorer without regions (e.g. the global control): no inside / outside split
            inside = torch.ones(reference.shape[0], height, width)
        start = rewards(reference, prompts, metadata)[name].scores
        # The same images scored against the twin prompt's layout (region colours in reverse order): a policy
        # that reads the prompt scores higher under its own layout; one that paints a fixed layout does not.
        swapped = swapped_layouts(metadata, options.get("metadata_key", "regions"))
        out = {"run": run_dir.name, "reward": name, "probe_prompts": len(prompts) // probe_images,
               "probe_images": len(prompts), "solver": sample_cfg["solver"], "steps": sample_cfg["num_steps"],
               "inside_fraction": float(inside.mean()), "contrast_window": contrast_window, "epochs_trained": [0],
               "probe_reward": [float(start.mean())]}
        if swapped is not None:
            out["probe_reward_swapped"] = [float(rewards(reference, prompts, swapped)[name].scores.mean())]
        for metric in METRICS:
            out[f"{metric}_inside"], out[f"{metric}_outside"] = [0.0], [0.0]
        previous_v = reference_v
        for checkpoint, epoch in zip(checkpoints, epochs_trained):
            load_lora_state(transformer, TRAINABLE, read_lora_file(checkpoint / "lora"))
            with use_adapter(transformer, TRAINABLE):
                images = decode(run_sampler(velocity))
                v_theta = [velocity(x, s) for x, s in trajectory]
            parts = {"pixel": drift.pixel_drift(images, reference, inside),
                     "histogram": drift.color_histogram_distance(images, reference, inside),
                     "contrast": drift.local_contrast_drift(images, reference, inside, contrast_window),
                     "velocity": drift.velocity_drift(torch.cat(v_theta), torch.cat(reference_v),
                                                      inside.repeat(len(trajectory), 1, 1)),
                     # this epoch's own change of the field (vs the previous epoch's EMA, same x_t): is each
                     # update local, with the non-locality accumulating, or is every update already global?
                     "increment": drift.velocity_drift(torch.cat(v_theta), torch.cat(previous_v),
                                                       inside.repeat(len(trajectory), 1, 1))}
            previous_v = v_theta
            out["epochs_trained"].append(int(epoch))
            out["probe_reward"].append(float(rewards(images, prompts, metadata)[name].scores.mean()))
            if swapped is not None:
                out["probe_reward_swapped"].append(float(rewards(images, prompts, swapped)[name].scores.mean()))
            for metric, part in parts.items():
                inside_mean, outside_mean = part.means()
                out[f"{metric}_inside"].append(inside_mean)
                out[f"{metric}_outside"].append(outside_mean)
    finally:
        rewards.close()
    (run_dir / DRIFT_FILE).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


# ---- the kernel diagnostic -----------------------------------------------------------------------------

KERNEL_PARAMETRIZATIONS = {  # name -> (LoRA rank, alpha, targets) or None for every transformer weight
    "attention LoRA r8 (the tiny default)": "base",
    "attention + ff + proj_out LoRA r32": "ff_out_r32",
    "proj_out LoRA r8 (the per-token output layer only)": "proj_out_only",
    "every transformer weight (full fine-tune)": None,
}


def kernel_locality(objective="centre", num_images=8, seed=0, epsilon=1e-3):
    """How local can ONE gradient step of each parametrization be? (the 'why' behind the drift ratios)

    At the starting model's own sampling states x_t (num_images probe images of ``objective``'s test prompts,
    every step), take J = sum over the cells INSIDE the rewarded regions of <v_theta(x_t), d>, with d one fixed
    random latent direction (the same at every inside cell: 'shift the colour there'), and step the trainable
    weights along its gradient, theta + epsilon g / |g|. Then |delta v| outside / inside at the same x_t is the
    locality of the first-order change any loss that asks only the inside to move can make: a
    gradient step moves v by the neural tangent kernel K(j, i) = <dv_j/dtheta, dv_i/dtheta> applied to the inside
    demand, so a ratio near 1 means K couples every location alike. LoRA starts from B = 0, so its step is the
    gradient with respect to B (as the first optimizer step of a run)."""
    from u_nft import drift
    from u_nft.data import load_prompts
    from u_nft.lora import add_lora_adapters
    from u_nft.models import cat_conditioning, family_for, family_named
    from u_nft.solvers import sample

    torch.set_num_threads(1)
    experiments = load_experiments()
    config = experiments.experiment(objective, "dense")
    family_named(config.pretrained.tiny_family).build_tiny(config.pretrained.model)
    family = family_for(config.pretrained.model)
    out = {"objective": objective, "num_images": num_images, "epsilon": epsilon, "rows": []}
    for label, variant in KERNEL_PARAMETRIZATIONS.items():
        pipeline = family.load_pipeline(config.pretrained.model, dtype=torch.float32, device="cpu")
        transformer = pipeline.transformer
        if variant is not None:
            overrides = dict(item.split("=", 1) for item in experiments.VARIANTS[variant])
            targets = eval(overrides["lora.target_modules"]) if "lora.target_modules" in overrides else \
                (tuple(config.lora.target_modules) or experiments.ATTENTION_TARGETS)  # () = SD3's default
            rank = int(overrides.get("lora.rank", config.lora.rank))
            alpha = float(overrides.get("lora.alpha", config.lora.alpha))
            torch.manual_seed(seed)  # LoRA A's random init: the same for every call
            add_lora_adapters(transformer, rank, alpha, list(targets), config.lora.init)
            params = [p for n, p in transformer.named_parameters() if "lora_B" in n and ".default" in n]
        else:
            params = list(transformer.parameters())
            for p in params:
                p.requires_grad_(True)
        prompts, metadata = load_prompts(config.dataset.test)
        prompts = (prompts * num_images)[:num_images]
        metadata = (metadata * num_images)[:num_images]
        cond = family.encode_prompts(pipeline, prompts, config.sample.max_sequence_length, "cpu")
        channels, size, _ = family.latent_shape(pipeline, config.sample.resolution)
        noise = _probe_noise([1_000_003 * (i + 1) + 17 for i in range(num_images)], channels, size)
        guidance = config.sample.distilled_guidance
        sigmas = family.sigmas(pipeline, config.sample.num_steps, config.sample.resolution)

        def velocity(x, sigma):  # the rollouts' call (the sampler's "long" timesteps)
            sigma_b = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[:1].expand(x.shape[0])
            return family.predict_velocity(transformer, x, sigma_b, cond, guidance=guidance, timestep_mode="long")

        with torch.no_grad():
            _, states = drift.record_trajectory(
                lambda v: sample(v, noise, sigmas, config.sample.solver), velocity)
        x_t = torch.cat([x for x, _ in states])
        sigma = torch.cat([s.reshape(1).expand(num_images) for _, s in states])
        states_cond = cat_conditioning([cond] * len(states))

        def field():  # training's call (float timesteps) at every recorded state
            return family.predict_velocity(transformer, x_t, sigma, states_cond, guidance=guidance)

        inside = drift.rewarded_mask(metadata * len(states), config.sample.resolution, config.sample.resolution,
                                     config.reward_options.region_color_map.regions)
        cells = drift.pool_mask(inside, (size, size))
        direction = torch.randn(channels, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            before = field()
        demand = (field() * direction.view(1, -1, 1, 1) * cells.unsqueeze(1)).sum()
        grads = torch.autograd.grad(demand, params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(epsilon * g / norm)
            after = field()
        parts = drift.velocity_drift(after, before, inside)
        inside_mean, outside_mean = parts.means()
        out["rows"].append({"parametrization": label, "trainable": sum(p.numel() for p in params),
                            "inside": inside_mean, "outside": outside_mean, "ratio": outside_mean / inside_mean})
        print(f"kernel locality, {label}: |dv| outside / inside = {outside_mean / inside_mean:.3f}", flush=True)
    return out


# ---- collecting and summarizing ------------------------------------------------------------------------

def _train_curve(run_dir):
    from u_nft.run_logging import read_metrics

    records = read_metrics(run_dir)
    keys = sorted({k for r in records for k in r if k.startswith("reward/")})
    if len(keys) != 1:
        raise RuntimeError(f"{run_dir}: expected one reward/ metric, found {keys}")
    return [r[keys[0]] for r in sorted((r for r in records if keys[0] in r), key=lambda r: r["epoch"])]


def _ratio(outside, inside):
    return outside / inside if inside and math.isfinite(inside) and math.isfinite(outside) else float("nan")


def collect(runs_dir, epochs):
    """{(objective, method, variant): {seed: record}} of every finished run under ``runs_dir``."""
    experiments = load_experiments()
    arms = {}
    for path in sorted(Path(runs_dir).glob(f"*/{DRIFT_FILE}")):
        run_dir = path.parent
        stem, _, seed = run_dir.name.rpartition("_s")
        parts = stem.split("_")
        objective = parts[0]
        rest = "_".join(parts[1:])
        method = next((m for m in sorted(experiments.METHODS, key=len, reverse=True) if rest.startswith(m + "_")), None)
        if method is None or not seed.isdigit():
            continue
        variant = rest[len(method) + 1:]
        probe = json.loads(path.read_text(encoding="utf-8"))
        if probe["epochs_trained"][-1] != epochs:
            continue
        wall = json.loads((run_dir / WALL_FILE).read_text(encoding="utf-8")) if (run_dir / WALL_FILE).is_file() else {}
        arms.setdefault((objective, method, variant), {})[int(seed)] = {
            "train": _train_curve(run_dir), "probe": probe, "wall": wall}
    return arms


def arm_statistics(seeds):
    """Per-arm statistics over seeds: final values, gains, drift ratios (t intervals) and curves."""
    from u_nft.study_stats import mean_interval

    order = sorted(seeds)
    records = [seeds[s] for s in order]
    probe = [r["probe"] for r in records]
    stats = {"seeds": order, "train_curves": [r["train"] for r in records],
             "probe_curves": [p["probe_reward"] for p in probe]}
    stats["train_final"] = mean_interval([c[-1] for c in stats["train_curves"]])
    stats["train_gain"] = mean_interval([c[-1] - c[0] for c in stats["train_curves"]])
    stats["probe_gain"] = mean_interval([c[-1] - c[0] for c in stats["probe_curves"]])
    stats["probe_final"] = mean_interval([c[-1] for c in stats["probe_curves"]])
    for metric in METRICS:
        if any(f"{metric}_inside" not in p for p in probe):  # measured by an older probe: absent
            for suffix in ("inside", "ratio_per_seed", "ratio", "outside", "curve_outside", "curve_inside"):
                stats[f"{metric}_{suffix}"] = None
            continue
        inside = [p[f"{metric}_inside"][-1] for p in probe]
        outside = [p[f"{metric}_outside"][-1] for p in probe]
        stats[f"{metric}_inside"] = mean_interval(inside)
        ratios = [_ratio(o, i) for o, i in zip(outside, inside)]
        stats[f"{metric}_ratio_per_seed"] = ratios
        stats[f"{metric}_ratio"] = mean_interval(ratios) if all(math.isfinite(x) for x in ratios) else None
        stats[f"{metric}_outside"] = (mean_interval(outside) if all(math.isfinite(x) for x in outside) else None)
        stats[f"{metric}_curve_outside"] = [sum(p[f"{metric}_outside"][e] for p in probe) / len(probe)
                                            for e in range(len(probe[0][f"{metric}_outside"]))]
        stats[f"{metric}_curve_inside"] = [sum(p[f"{metric}_inside"][e] for p in probe) / len(probe)
                                           for e in range(len(probe[0][f"{metric}_inside"]))]
    if stats.get("increment_curve_inside") is not None:  # one epoch's change, ratio averaged over the epochs
        per_seed = [sum(_ratio(o, i) for o, i in zip(p["increment_outside"][1:], p["increment_inside"][1:]))
                    / (len(p["increment_inside"]) - 1) for p in probe]
        stats["increment_epoch_ratio"] = (mean_interval(per_seed) if all(math.isfinite(x) for x in per_seed)
                                          else None)
    else:
        stats["increment_epoch_ratio"] = None
    stats["conditioning"] = None
    if all("probe_reward_swapped" in p for p in probe):  # own layout vs the twin's, same images
        own, twin = stats["probe_curves"], [p["probe_reward_swapped"] for p in probe]
        stats["conditioning"] = {
            "seeds": len(probe),
            "own_gain": mean_interval([c[-1] - c[0] for c in own]),
            "twin_gain": mean_interval([c[-1] - c[0] for c in twin]),
            "margin_start": mean_interval([o[0] - t[0] for o, t in zip(own, twin)]),
            "margin_end": mean_interval([o[-1] - t[-1] for o, t in zip(own, twin)]),
            "margin_change": mean_interval([(o[-1] - t[-1]) - (o[0] - t[0]) for o, t in zip(own, twin)])}
    seconds = [sum(r["wall"].get("seconds", {}).values()) for r in records if r["wall"]]
    stats["run_seconds"] = sum(seconds) / len(seconds) if seconds else float("nan")
    loads = [r["wall"]["load_average_1min"][k] for r in records if r["wall"] for k in ("start", "end")]
    stats["load_average"] = sum(loads) / len(loads) if loads else float("nan")
    return stats


def thresholds(arms, fraction=0.5):
    """Per objective, for the train reward and for the probe reward: start (mean epoch-0 value over the main
    grid's runs), best seed-mean of any main-grid method at any epoch, threshold = start + fraction (best - start).
    The probe starts from the same value in every run of an objective (fixed prompts and noise), the train
    reward from each seed's own first rollouts."""
    out = {}
    for objective in sorted({o for o, _, _ in arms}):
        main = [seeds for (o, _, v), seeds in arms.items() if o == objective and v == "base"]
        if not main:
            continue
        out[objective] = {}
        for which, get in (("train", lambda r: r["train"]), ("probe", lambda r: r["probe"]["probe_reward"])):
            curves = [get(r) for seeds in main for r in seeds.values()]
            start = sum(c[0] for c in curves) / len(curves)
            means = []
            for seeds in main:
                matrix = [get(r) for r in seeds.values()]
                means += [sum(c[e] for c in matrix) / len(matrix) for e in range(min(map(len, matrix)))]
            best = max(means)
            out[objective][which] = {"start": start, "best": best, "threshold": start + fraction * (best - start)}
    return out


def paired(arms, objective, a, b, key, variant_a="base", variant_b="base"):
    """Paired tests (sign flip, t) of per-seed ``key`` values of two arms over their common seeds."""
    from u_nft.study_stats import paired_t_test, sign_flip_test

    left, right = arms.get((objective, a, variant_a)), arms.get((objective, b, variant_b))
    if not left or not right:
        return None
    common = sorted(set(left) & set(right))
    if len(common) < 2:
        return None

    def value(record):
        if key == "probe_gain":
            return record["probe"]["probe_reward"][-1] - record["probe"]["probe_reward"][0]
        if key == "train_gain":
            return record["train"][-1] - record["train"][0]
        metric = key.removesuffix("_ratio")
        return _ratio(record["probe"][f"{metric}_outside"][-1], record["probe"][f"{metric}_inside"][-1])

    xs, ys = [value(left[s]) for s in common], [value(right[s]) for s in common]
    if not all(math.isfinite(v) for v in xs + ys):
        return None
    return {"n": len(common), "sign_flip": sign_flip_test(xs, ys), "t": paired_t_test(xs, ys)}


# ---- plots ---------------------------------------------------------------------------------------------

def _band(curves):
    """(x, mean, low, high) of per-seed curves with a t-interval band."""
    from u_nft.study_stats import mean_interval

    length = min(map(len, curves))
    intervals = [mean_interval([c[e] for c in curves]) for e in range(length)]
    finite = [iv if math.isfinite(iv.half_width) else None for iv in intervals]
    return (list(range(length)), [iv.mean for iv in intervals],
            [iv.low if f else iv.mean for iv, f in zip(intervals, finite)],
            [iv.high if f else iv.mean for iv, f in zip(intervals, finite)])


def plot_main(summary, arms, docs):
    """Reward and drift vs epoch per objective, and the reward-vs-drift trade-off (main grid)."""
    from u_nft.plotting import Panel, panels_plot

    objectives = [o for o in ("centre", "quadrants", "layout") if any(k[0] == o and k[2] == "base" for k in arms)]
    methods = [m for m in ("dense", "scalar", "mc_uniform") if any(k[1] == m and k[2] == "base" for k in arms)]
    reward_panels, drift_panels, trade_panels = [], [], []
    for objective in objectives:
        series_train = {m: _band(summary[(objective, m, "base")]["train_curves"]) for m in methods
                        if (objective, m, "base") in summary}
        reward_panels.append(Panel(kind="line", data=series_train, title=f"{objective}: train reward (rollouts)",
                                   xlabel="epoch (updates done)", ylabel="reward",
                                   options={"hlines": {"threshold": summary["_thresholds"][objective]["train"]["threshold"]}}))
        series_probe = {m: _band(summary[(objective, m, "base")]["probe_curves"]) for m in methods
                        if (objective, m, "base") in summary}
        reward_panels.append(Panel(kind="line", data=series_probe, title=f"{objective}: held-out probe reward (EMA)",
                                   xlabel="epochs trained", ylabel="reward",
                                   options={"hlines": {"threshold": summary["_thresholds"][objective]["probe"]["threshold"]}}))
        if summary[(objective, methods[0], "base")]["pixel_outside"] is None:
            continue  # the regions cover the whole image: no outside
        drift_series = {}
        for m in methods:
            records = arms[(objective, m, "base")]
            for part, style in (("outside", " (outside)"), ("inside", " (inside)")):
                curves = [r["probe"][f"pixel_{part}"] for r in records.values()]
                drift_series[f"{m}{style}"] = _band(curves)
        drift_panels.append(Panel(kind="line", data=drift_series, title=f"{objective}: mean |Δpixel| vs the start, "
                                  "outside / inside the regions", xlabel="epochs trained",
                                  ylabel="mean |Δpixel|"))
        velocity_series = {}
        for m in methods:
            records = arms[(objective, m, "base")]
            velocity_series[m] = _band([[o / i if i else 0.0 for o, i in zip(r["probe"]["velocity_outside"][1:],
                                                                               r["probe"]["velocity_inside"][1:])]
                                        for r in records.values()])
            velocity_series[m] = ([x + 1 for x in velocity_series[m][0]], *velocity_series[m][1:])
        drift_panels.append(Panel(kind="line", data=velocity_series,
                                  title=f"{objective}: function-space ratio |v_θ − v_ref| outside / inside",
                                  xlabel="epochs trained", ylabel="outside / inside",
                                  options={"hlines": {"1/3 target": 1 / 3}}))
        points = {}
        for m in methods:
            s = summary[(objective, m, "base")]
            x = s["pixel_curve_outside"]
            y = [sum(c[e] - c[0] for c in s["probe_curves"]) / len(s["probe_curves"]) for e in range(len(x))]
            points[m] = (x, y, None, None)
        trade_panels.append(Panel(kind="tradeoff", data=points, title=f"{objective}: reward gain vs drift outside "
                                  "(a point per epoch)", xlabel="mean |Δpixel| outside the regions",
                                  ylabel="probe reward gain"))
    paths = [panels_plot(reward_panels, docs / "locality_reward.png", ncols=2, panel_size=(620, 380), colors=COLORS)]
    if drift_panels:
        paths.append(panels_plot(drift_panels, docs / "locality_drift.png", ncols=2, panel_size=(620, 380),
                                 colors=COLORS))
    if trade_panels:
        paths.append(panels_plot(trade_panels, docs / "locality_tradeoff.png", ncols=len(trade_panels),
                                 panel_size=(620, 420), colors=COLORS))
    return paths


def plot_bars(summary, docs):
    """Lever and ablation bars: probe reward gain and the outside/inside pixel-drift ratio (95 % intervals)."""
    from u_nft.plotting import Panel, panels_plot

    def triple(iv):
        if iv is None:
            return None
        if not math.isfinite(iv.half_width):
            return (iv.mean, iv.mean, iv.mean)
        return (iv.mean, iv.low, iv.high)

    paths = []
    lever_objectives = {k[0] for k in summary if isinstance(k, tuple) and k[2] in LEVER_VARIANTS}
    for name, keep in (("levers", lambda k: k[2] in LEVER_VARIANTS or (k[2] == "base" and k[1] in ("dense", "scalar")
                                                                          and k[0] in lever_objectives)),
                       ("ablations", lambda k: k[0] == "centre" and (k[2] in ABLATION_VARIANTS or
                                                                     (k[2] == "base" and k[1] != "scalar")))):
        keys = [k for k in summary if isinstance(k, tuple) and keep(k)]
        if not any(k[2] != "base" for k in keys):
            continue
        panels = []
        for objective in sorted({k[0] for k in keys}):
            for quantity, label in (("probe_gain", "probe reward gain"), ("pixel_ratio", "|Δpixel| outside / inside"),
                                    ("velocity_ratio", "Δv outside / inside")):
                groups = {}
                for k in sorted(k for k in keys if k[0] == objective):
                    value = triple(summary[k][quantity])
                    if value is not None:
                        groups.setdefault(k[2], {})[k[1]] = value
                if groups:
                    options = {}
                    if quantity != "probe_gain":
                        options["hlines"] = {"1/3 target": 1 / 3}
                    panels.append(Panel(kind="bar", data=groups, title=f"{objective}: {label}", xlabel="variant",
                                        ylabel=label, options=options))
        paths.append(panels_plot(panels, docs / f"locality_{name}.png", ncols=3, panel_size=(560, 380), colors=COLORS))
    return paths


LEVER_VARIANTS = ("anchor1", "anchor10", "ff_out", "ff_out_r32", "ff_out_r32_anchor10", "attn_r2")
ABLATION_VARIANTS = ("cell2", "cell4", "beta0.1", "scale_group", "scale_location", "adaptive_location", "m4", "m16")


# ---- the report ----------------------------------------------------------------------------------------

def _iv(iv, digits=3):
    if iv is None:
        return "n/a"
    if not math.isfinite(iv.half_width):
        return f"{iv.mean:.{digits}f}"
    return iv.format(digits)


def _epochs(crossing, epochs, unused=None):
    """'median [min, max] (per seed)' of a crossing_summary; '>L' = never within a curve of ``epochs`` points."""
    per_seed = ", ".join(">" + str(epochs - 1) if e is None else str(e) for e in crossing["per_seed"])
    if not crossing["reached"]:
        return f">{epochs - 1} ({per_seed})"
    return f"{crossing['median']:g} [{crossing['min']}, {crossing['max']}] ({per_seed})"


def _p(test):
    if test is None:
        return "–"
    return f"{test['sign_flip']['mean_difference']:+.3f}, p = {test['sign_flip']['p']:.3f} / {test['t']['p']:.3f}"


def arm_row(key, s, info, epochs):
    from u_nft.study_stats import crossing_summary

    objective, method, variant = key
    crossing = crossing_summary(s["train_curves"], info["train"]["threshold"]) if info else None
    probe_crossing = crossing_summary(s["probe_curves"], info["probe"]["threshold"]) if info else None
    cells = [objective, method, variant, str(len(s["seeds"])),
             f"{sum(c[0] for c in s['train_curves']) / len(s['train_curves']):.3f}", _iv(s["train_final"]),
             _epochs(crossing, epochs) if crossing else "–",
             f"{sum(c[0] for c in s['probe_curves']) / len(s['probe_curves']):.3f}", _iv(s["probe_final"]),
             _epochs(probe_crossing, epochs + 1, "") if probe_crossing else "–",
             _iv(s["pixel_ratio"], 2), _iv(s["histogram_ratio"], 2), _iv(s["contrast_ratio"], 2),
             _iv(s["velocity_ratio"], 2), _iv(s["increment_epoch_ratio"], 2), f"{s['run_seconds']:.0f}"]
    return "| " + " | ".join(cells) + " |"


TABLE_HEADER = ["| objective | method | variant | seeds | train start | train epoch E−1 | train: epochs to threshold, "
                "median [min, max] (per seed) | probe start | probe end (EMA) | probe: epochs trained to threshold | "
                "Δpixel out/in | hist out/in | contrast out/in | Δv out/in | one epoch's Δv out/in | s per run |",
                "|" + "---|" * 16]


def write_report(args, arms, summary, stages, paths):
    docs = Path(args.docs_dir)
    path = docs / "locality_study.md"
    notes = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if NOTES_HEADING in old:
            notes = old[old.index(NOTES_HEADING):]
    epochs = args.epochs
    th = summary["_thresholds"]
    lines = ["# Collateral drift, prompt-conditioned layouts, levers and ablations (tiny SD3, CPU)", "",
             "Generated by `scripts/locality_study.py` (configs: `config/experiments.py`, variants: its `VARIANTS`). "
             f"{epochs} epochs per run, equal budgets per seed. Intervals are mean ± 95 % t intervals over seeds "
             "(n = the seeds column); ratios are outside / inside the rewarded regions, measured after the last epoch "
             "on the held-out probe (fixed noise, the EMA LoRA against the starting model); `n/a` = the regions "
             "cover the whole image. Epochs to threshold are on the train reward (threshold per objective below).", ""]
    for name in ("locality_reward.png", "locality_drift.png", "locality_tradeoff.png", "locality_levers.png",
                 "locality_ablations.png"):
        if any(Path(p).name == name for p in paths):
            lines += [f"![{name[9:-4]}]({name})", ""]
    lines += ["Thresholds = start + 0.5 × (best seed-mean of the main grid − start), train reward / probe reward: " +
              "; ".join(f"{o} {v['train']['start']:.3f} → {v['train']['threshold']:.3f} / {v['probe']['start']:.3f} → "
                        f"{v['probe']['threshold']:.3f}" for o, v in th.items()) +
              ". Train epoch e = the rollouts after e updates (0..E−1); probe = the EMA model after e epochs (0..E).", ""]
    for title, keep in (("Main grid", lambda k: k[2] == "base"),
                        ("Locality levers", lambda k: k[2] in LEVER_VARIANTS),
                        ("Ablations", lambda k: k[2] in ABLATION_VARIANTS)):
        keys = [k for k in summary if isinstance(k, tuple) and keep(k)]
        if not keys:
            continue
        lines += [f"## {title}", "", *TABLE_HEADER]
        lines += [arm_row(k, summary[k], th.get(k[0]), epochs) for k in sorted(keys, key=_arm_order)]
        lines.append("")
        if title == "Main grid":
            lines += ["Paired by seed (difference of means, p = exact sign-flip / paired t, two-sided):", "",
                      "| objective | comparison | probe reward gain | train reward gain | Δpixel out/in | Δv out/in |",
                      "|---|---|---|---|---|---|"]
            for objective in sorted({k[0] for k in keys}):
                for a, b in (("dense", "scalar"), ("mc_uniform", "scalar"), ("dense", "mc_uniform")):
                    tests = [paired(arms, objective, a, b, q) for q in ("probe_gain", "train_gain", "pixel_ratio",
                                                                         "velocity_ratio")]
                    if tests[0] is not None:
                        lines.append(f"| {objective} | {a} − {b} | " + " | ".join(_p(t) for t in tests) + " |")
            lines.append("")
        conditioned = [k for k in sorted(keys, key=_arm_order) if summary[k].get("conditioning")]
        if conditioned:
            lines += ["Prompt conditioning (the probe images scored against their own prompt's layout and against the "
                      "twin prompt's, colours swapped; a policy that reads the prompt raises the margin own − twin, one "
                      "that paints a fixed layout or shifts colours globally does not):", "",
                      "| objective | method | variant | seeds | own-layout gain | twin-layout gain | margin start | "
                      "margin end | margin change |", "|---|---|---|---|---|---|---|---|---|"]
            for k in conditioned:
                c = summary[k]["conditioning"]
                lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {c['seeds']} | {_iv(c['own_gain'])} | {_iv(c['twin_gain'])} | "
                             f"{_iv(c['margin_start'])} | {_iv(c['margin_end'])} | {_iv(c['margin_change'])} |")
            lines.append("")
        if title == "Locality levers":
            lines += ["Each lever against scalar (same LoRA variant where one was run, else the base scalar): the "
                      "target is outside/inside ≤ 1/3 with ≥ 2× scalar's probe reward gain.", "",
                      "| objective | variant | dense probe gain | scalar probe gain (variant) | gain ratio | Δpixel "
                      "out/in | Δv out/in | target met |", "|---|---|---|---|---|---|---|---|"]
            for key in sorted((k for k in keys if k[1] == "dense"), key=_arm_order):
                objective, _, variant = key
                scalar_key = (objective, "scalar", variant) if (objective, "scalar", variant) in summary else \
                    (objective, "scalar", "base")
                if scalar_key not in summary:
                    continue
                dense_gain, scalar_gain = summary[key]["probe_gain"].mean, summary[scalar_key]["probe_gain"].mean
                ratio = dense_gain / scalar_gain if scalar_gain > 0 else float("inf")
                pixel = summary[key]["pixel_ratio"]
                met = pixel is not None and pixel.mean <= 1 / 3 and ratio >= 2
                lines.append(f"| {objective} | {variant} | {_iv(summary[key]['probe_gain'])} | "
                             f"{_iv(summary[scalar_key]['probe_gain'])} ({scalar_key[2]}) | "
                             f"{ratio:.1f}× | {_iv(pixel, 2)} | {_iv(summary[key]['velocity_ratio'], 2)} | "
                             f"{'yes' if met else 'no'} |")
            lines.append("")
    kernels = sorted(Path(args.runs_dir).glob("kernel_*.json"))
    if kernels:
        lines += ["## One gradient step: how local can the change be?", "",
                  "For each parametrization, one normalized gradient step on a demand that asks ONLY the cells inside "
                  "the rewarded regions to move (a fixed latent direction there), at the starting model's own sampling "
                  "states; |Δv| outside / inside at the same x_t (`--kernel OBJECTIVE`, see `kernel_locality`). "
                  "A gradient step moves v by the neural tangent kernel applied to the demand, so this is the locality "
                  "of the first-order change ANY loss that rewards only the inside can make.", "",
                  "| objective | parametrization | trainable parameters | Δv out / in after one step |", "|---|---|---|---|"]
        for kernel_file in kernels:
            data = json.loads(kernel_file.read_text(encoding="utf-8"))
            for row in data["rows"]:
                lines.append(f"| {data['objective']} | {row['parametrization']} | {row['trainable']:,} | "
                             f"{row['ratio']:.2f} |")
        lines += ["", "Reproduce: " + ", ".join(f"`python scripts/locality_study.py --kernel "
                                                  f"{json.loads(k.read_text(encoding='utf-8'))['objective']}`"
                                                  for k in kernels) + ".", ""]
    lines += ["## Reproduce", "",
              "Each stage (runs are reused when finished): `python scripts/locality_study.py --stage main` "
              "(then `--stage levers`, `--stage ablations`; `--stage report` re-tabulates). One run and its probe, e.g.:", "",
              "```bash", _display(train_command(args, "centre", "dense", "base", 0)),
              _display(measure_command(args, Path(args.runs_dir) / run_name("centre", "dense", "base", 0))),
              "```", "",
              "A variant's run adds its overrides from `config/experiments.py` VARIANTS, e.g. `ff_out_r32`: " +
              " ".join(f"`--config.{o}`" for o in load_experiments().VARIANTS["ff_out_r32"]) + ".", "",
              "## Time and machine", "",
              f"{platform.node() or 'unknown'}, {platform.machine()}, {os.cpu_count()} CPU cores visible, torch "
              f"{torch.__version__}, {args.jobs} runs at once with 1 thread each under `nice -n {args.nice}`; "
              f"report {datetime.date.today().isoformat()}.", "",
              "Per stage, from each run's own wall time (train + probe, `wall.json`) and the 1-minute load average at "
              f"its start and end: the machine was shared, so runs under a load near {args.jobs} (just these runs) "
              "show the uncontended cost.", "",
              "| stage | finished runs | sum of run times | ≈ wall at 2 at once | s per run: median [min, max] | "
              "s per run at load ≤ 3 (runs) | mean load |", "|---|---|---|---|---|---|---|"]
    for stage in ("main", "levers", "levers_more", "ablations"):
        arms_of_stage = {tuple(a) for a in stage_arms(stage)}
        walls = [r["wall"] for key, seeds in arms.items() if key in arms_of_stage for r in seeds.values() if r["wall"]]
        if not walls:
            continue
        seconds = sorted(sum(w["seconds"].values()) for w in walls)
        loads = [sum(w["load_average_1min"].values()) / 2 for w in walls]
        quiet = [sum(w["seconds"].values()) for w, load in zip(walls, loads) if load <= 3]
        lines.append(f"| {stage} | {len(walls)} | {sum(seconds) / 60:.1f} min | {sum(seconds) / 60 / args.jobs:.1f} min | "
                     f"{seconds[len(seconds) // 2]:.0f} [{seconds[0]:.0f}, {seconds[-1]:.0f}] | "
                     + (f"{sum(quiet) / len(quiet):.0f} ({len(quiet)})" if quiet else "–")
                     + f" | {sum(loads) / len(loads):.1f} |")
    lines += ["", "Invocations (wall time of each `--stage` call; finished runs are reused, so a later call with more "
              "seeds only trains the new ones): " + "; ".join(f"`{label}` {info['wall_seconds'] / 60:.1f} min "
                                                             f"({info['runs']} runs)" for label, info in stages.items())
              + ".", ""]
    path.write_text("\n".join(lines) + ("\n" + notes if notes else ""), encoding="utf-8")
    return path


def _arm_order(key):
    objectives = ("centre", "quadrants", "layout")
    methods = ("dense", "scalar", "mc_uniform", "mc_focus")
    variants = ("base",) + LEVER_VARIANTS + ABLATION_VARIANTS
    return (objectives.index(key[0]) if key[0] in objectives else 9, variants.index(key[2]) if key[2] in variants else 99,
            methods.index(key[1]) if key[1] in methods else 9)


def _jsonable(summary):
    import dataclasses

    def convert(value):
        if dataclasses.is_dataclass(value):
            return {**dataclasses.asdict(value), "low": value.low, "high": value.high}
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return {("/".join(k) if isinstance(k, tuple) else k): convert(v) for k, v in summary.items()}


def report(args):
    """Tables and plots from every finished run under ``args.runs_dir``."""
    arms = collect(args.runs_dir, args.epochs)
    if not arms:
        raise SystemExit(f"no finished runs with {args.epochs} epochs under {args.runs_dir}")
    summary = {key: arm_statistics(seeds) for key, seeds in arms.items()}
    summary["_thresholds"] = thresholds(arms)
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    paths = plot_main(summary, arms, docs) + plot_bars(summary, docs)
    stages_file = Path(args.runs_dir) / "stages.json"
    stages = json.loads(stages_file.read_text(encoding="utf-8")) if stages_file.is_file() else {}
    paths.append(write_report(args, arms, summary, stages, paths))
    (Path(args.runs_dir) / "study.json").write_text(json.dumps(_jsonable(summary), indent=1), encoding="utf-8")
    print("wrote " + ", ".join(map(str, paths)), flush=True)
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.kernel:
        out = kernel_locality(args.kernel)
        Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.runs_dir) / f"kernel_{args.kernel}.json").write_text(json.dumps(out, indent=1), encoding="utf-8")
        return
    if args.measure:
        out = measure_run(args.measure, args.probe_images, args.max_probe_prompts)
        print(f"probe of {args.measure}: reward {out['probe_reward'][0]:.3f} -> {out['probe_reward'][-1]:.3f}, "
              f"pixel drift outside/inside {out['pixel_outside'][-1]:.4f}/{out['pixel_inside'][-1]:.4f}", flush=True)
        return
    if args.stage != "report":
        run_stage(args)
    report(args)


if __name__ == "__main__":
    main()
