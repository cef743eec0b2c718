"""Dense maps vs scalar rewards on localized objectives (issue 8): train a grid, plot, tabulate.

    python scripts/dense_vs_scalar.py                      # full study: 3 objectives x 4 methods x 3 seeds
    python scripts/dense_vs_scalar.py --quick --runs_dir /tmp/q --docs_dir /tmp/q/docs   # the test variant
    python scripts/dense_vs_scalar.py --reuse              # re-plot / re-tabulate finished runs

Every run is ``scripts/train_u_nft_sd3.py --config config/experiments.py:OBJECTIVE_METHOD`` with
``--config.seed=S``; all methods of one seed see the same initial model, the same rollout noise and
take the same optimizer steps per epoch (equal budgets). ``--jobs`` runs go at once, each with one
thread. Outputs (``--docs_dir``): dense_vs_scalar.png (train reward vs epoch, mean over seeds with a
min-max band, one panel per objective), dense_vs_scalar_samples.png (held-out samples with their
reward-map heatmaps: the initial model, then each method's final EMA model, seed ``--seeds[0]``) and
dense_vs_scalar.md (the table, the command, the machine and date; a "## Findings" section already in
the file is kept when it is rewritten).

Definitions. Epoch e's train reward is the mean scalar reward of the rollouts that start epoch e
(after e epochs of updates; e = 0 is the initial model). Per objective, start = the mean epoch-0
reward; achievable = the best seed-mean reward that any method reaches at any epoch; threshold =
start + ``--fraction`` x (achievable - start). Epochs to threshold = the first e whose seed-mean
reward is >= threshold (per seed too; ">E" when never). Held-out = the evaluation on the test
prompts (config/prompts/tiny_test.txt, none of which is a training prompt) with fixed seeds, before
training and after the last epoch (EMA weights).

This module also defines the control objective's scorer, ``global_color_map`` (a plug-in named
``dense_vs_scalar:global_color_map`` in config/experiments.py): the train script's folder is on
sys.path when it runs, so importing this module there must stay cheap (no work at import).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
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
NOTES_HEADING = "## Findings"


# ---- the control scorer ------------------------------------------------------------------------------


def global_color_map(device="cpu", dtype=torch.float32, color=(1.0, 0.6, 0.1)):
    """Control scorer: closeness of the image-MEAN colour to ``color`` (reward_maps.masks.color_match),
    broadcast to a constant (B, H, W) map, so a dense map carries no more than the scalar."""
    from reward_maps.base import RewardMapError, RewardOutput, check_images
    from reward_maps.masks import color_match

    if not (isinstance(color, (list, tuple)) and len(color) == 3 and all(0 <= float(c) <= 1 for c in color)):
        raise RewardMapError(f"reward scorer 'global_color_map': color {color!r}; accepted: [r, g, b] in [0, 1]")
    target = tuple(float(c) for c in color)

    def scorer(images, prompts, metadata):
        check_images("global_color_map", images, prompts, metadata)
        means = images.float().mean(dim=(2, 3))  # (B, 3)
        scores = torch.stack([color_match(m.reshape(3, 1, 1), target)[0, 0] for m in means])
        maps = scores.reshape(-1, 1, 1).expand(-1, images.shape[-2], images.shape[-1]).contiguous()
        return RewardOutput(maps=maps, scores=scores, info=[{"mean_rgb": m.tolist()} for m in means])

    return scorer


# ---- options and the run grid ------------------------------------------------------------------------


def load_experiments():
    """config/experiments.py as a module (loaded by path, like ml_collections does)."""
    spec = importlib.util.spec_from_file_location("dense_vs_scalar_experiments", EXPERIMENTS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv=None):
    """Command-line options; ``--quick`` shrinks everything not given explicitly (the test variant)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", help="comma-separated (default: all of config/experiments.py)")
    parser.add_argument("--methods", help="comma-separated (default: all of config/experiments.py)")
    parser.add_argument("--seeds", help="comma-separated seeds, or a count N for 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 10)")
    parser.add_argument("--fraction", type=float, default=0.5, help="threshold fraction of start -> achievable")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--runs_dir", default=str(REPO_ROOT / "runs" / "dense_vs_scalar"), help="run folders")
    parser.add_argument("--docs_dir", default=str(REPO_ROOT / "docs"), help="where the PNGs and the .md go")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs (same epochs) instead of retraining")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: objective centre, methods dense+scalar, 1 seed, 2 epochs, 2 prompt groups")
    parser.add_argument("--override", action="append", default=[],
                        help="extra --config.KEY=VALUE for every run (repeatable), e.g. train.beta=0.1")
    args = parser.parse_args(argv)
    experiments = load_experiments()
    quick = args.quick
    args.objectives = _choices("objective", args.objectives or ("centre" if quick else ",".join(experiments.OBJECTIVES)),
                               experiments.OBJECTIVES)
    args.methods = _choices("method", args.methods or ("dense,scalar" if quick else ",".join(experiments.METHODS)),
                            experiments.METHODS)
    args.seeds = parse_seeds(args.seeds or ("1" if quick else "3"))
    args.epochs = args.epochs or (2 if quick else 10)
    if args.epochs < 1 or args.jobs < 1 or not 0 < args.fraction <= 1:
        parser.error(f"--epochs {args.epochs} and --jobs {args.jobs} must be >= 1, --fraction {args.fraction} in (0, 1]")
    # The published study evaluates with the rollout solver and measures the initial model in baseline_eval,
    # not in each run (the train script's defaults since then: Euler and an epoch-0 evaluation, as upstream).
    args.override = ["sample.eval_solver=dpm2", "eval_at_start=False"] + args.override
    if quick:  # 2 groups x 4 images, 1 optimizer step per epoch, 2 held-out prompts
        args.override = ["sample.num_groups=2", "train.gradient_step_per_epoch=1", "dataset.max_test_prompts=2",
                         "logging.num_log_images=2"] + args.override
    args.localized = tuple(o for o in experiments.LOCALIZED if o in args.objectives)
    return args


def _choices(kind, text, known):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--{kind}s {text!r}: unknown {unknown}; defined in config/experiments.py: {', '.join(known)}")
    return names


def run_name(objective, method, seed):
    return f"{objective}_{method}_s{seed}"


def train_command(args, objective, method, seed):
    """The train-script command line of one run (what the docs print to reproduce it)."""
    epochs = args.epochs
    command = [sys.executable, str(TRAIN_SCRIPT.relative_to(REPO_ROOT)),
               f"--config={EXPERIMENTS_FILE.relative_to(REPO_ROOT)}:{objective}_{method}",
               f"--config.seed={seed}", f"--config.run_name={run_name(objective, method, seed)}",
               f"--config.logdir={args.runs_dir}", f"--config.num_epochs={epochs}",
               f"--config.eval_freq={epochs}", "--config.save_freq=0",
               f"--config.logging.image_every={max(epochs - 1, 1)}"]
    return command + [f"--config.{o}" for o in args.override]


def run_complete(run_dir, epochs):
    """True when ``run_dir``'s metrics reach the last epoch and hold its held-out evaluation."""
    records = _records(run_dir)
    return any(r.get("epoch") == epochs - 1 and any(k.startswith("eval/") for k in r) for r in records)


def _records(run_dir):
    from u_nft.run_logging import read_metrics

    return read_metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").exists() else []


def train_one(args, objective, method, seed):
    """Train one run in a subprocess (one thread, wandb off); returns (name, seconds). Raises on failure."""
    name = run_name(objective, method, seed)
    run_dir = Path(args.runs_dir) / name
    if args.reuse and run_complete(run_dir, args.epochs):
        return name, 0.0
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run: the logger appends to an existing metrics.jsonl
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "TQDM_DISABLE": "1"}
    log_path = run_dir.parent / f"{name}.log"
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.call(train_command(args, objective, method, seed), cwd=REPO_ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not run_complete(run_dir, args.epochs):
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"run {name} failed (exit {code}); log {log_path}:\n{tail}")
    seconds = time.time() - start
    (run_dir / "wall_seconds.txt").write_text(f"{seconds:.1f}\n", encoding="utf-8")
    return name, seconds


def train_grid(args):
    """All (objective, method, seed) runs, ``args.jobs`` at once; returns the total wall time in seconds."""
    jobs = [(o, m, s) for o in args.objectives for m in args.methods for s in args.seeds]
    start = time.time()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = [pool.submit(train_one, args, *job) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            name, seconds = future.result()
            print(f"  {name}: {'reused' if not seconds else f'{seconds:.0f} s'}", flush=True)
    finally:  # on a failure, start no further runs (the ones under way finish)
        pool.shutdown(wait=True, cancel_futures=True)
    return time.time() - start


# ---- held-out evaluation of the initial model ----------------------------------------------------------


def baseline_eval(args, objective, seed, keep_images=0):
    """Held-out evaluation of the initial model (no LoRA update yet), exactly as the train script
    evaluates (test prompts, seed, solver, steps, batch size). Returns (mean score, images, maps)."""
    from reward_maps.combine import RewardSet
    from u_nft.data import load_prompts
    from u_nft.evaluation import evaluate_prompts
    from u_nft.models import family_for, family_named

    config = load_experiments().experiment(objective, args.methods[0])
    for item in args.override:
        _apply_override(config, item)
    if config.pretrained.build_tiny_if_missing:
        family_named(config.pretrained.tiny_family).build_tiny(config.pretrained.model)
    family = family_for(config.pretrained.model)
    pipeline = family.load_pipeline(config.pretrained.model, dtype=torch.float32, device="cpu")
    prompts, metadata = load_prompts(config.dataset.test)
    if config.dataset.max_test_prompts:
        prompts, metadata = prompts[:config.dataset.max_test_prompts], metadata[:config.dataset.max_test_prompts]
    name = next(iter(config.eval_reward_fn))
    rewards = RewardSet({name: 1.0}, {name: config.reward_options[name].to_dict()}, "cpu", torch.float32, 1)
    max_len = config.sample.max_sequence_length
    try:
        result = evaluate_prompts(family, pipeline, lambda p: family.encode_prompts(pipeline, p, max_len, "cpu"),
                                  prompts, metadata, rewards, seed=seed, resolution=config.sample.resolution,
                                  sigmas=family.sigmas(pipeline, config.sample.eval_num_steps,
                                                       config.sample.resolution),
                                  solver=config.sample.eval_solver,
                                  guidance=config.sample.distilled_guidance,
                                  guidance_scale=config.sample.eval_guidance_scale,
                                  batch_size=config.sample.test_batch_size, keep_images=keep_images)
    finally:
        rewards.close()
    scores = result.scores[name]
    return sum(scores) / len(scores), result.images, result.maps.get(name)


def _apply_override(config, item):
    """Apply ``KEY=VALUE`` (as --config.KEY=VALUE would) to a ConfigDict; errors name the override."""
    key, sep, text = item.partition("=")
    if not sep:
        raise SystemExit(f"--override {item!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    if leaf not in node:
        raise SystemExit(f"--override {item!r}: no config key {key!r}")
    old = node[leaf]
    if isinstance(old, bool):
        node[leaf] = text.lower() in ("1", "true")
    elif isinstance(old, (int, float, str)):
        node[leaf] = type(old)(text)
    else:
        raise SystemExit(f"--override {item!r}: {key!r} is a {type(old).__name__}; only scalars can be overridden")


# ---- statistics ----------------------------------------------------------------------------------------


def reward_key(records, prefix):
    """The one metric key starting with ``prefix`` (``reward/`` or ``eval/``) and ending in the score."""
    keys = sorted({k for r in records for k in r if k.startswith(prefix) and (prefix == "reward/" or k.endswith("/mean"))})
    if len(keys) != 1:
        raise RuntimeError(f"expected one {prefix!r} metric, found {keys}")
    return keys[0]


def run_seconds(args):
    """Sum of the runs' own wall times (written by :func:`train_one`; reused runs keep theirs)."""
    total = 0.0
    for path in Path(args.runs_dir).glob("*/wall_seconds.txt"):
        if path.parent.name in {run_name(o, m, s) for o in args.objectives for m in args.methods for s in args.seeds}:
            total += float(path.read_text(encoding="utf-8"))
    return total


def run_curves(args, objective, method):
    """{seed: ([train reward per epoch], held-out final)} of one (objective, method)."""
    out = {}
    for seed in args.seeds:
        records = _records(Path(args.runs_dir) / run_name(objective, method, seed))
        train_key = reward_key(records, "reward/")
        curve = [r[train_key] for r in sorted((r for r in records if train_key in r), key=lambda r: r["epoch"])]
        eval_key = reward_key(records, "eval/")
        held_out = [r[eval_key] for r in records if eval_key in r][-1]
        out[seed] = (curve, held_out)
    return out


def mean(values):
    return sum(values) / len(values)


def std(values):
    m = mean(values)
    return (sum((v - m) ** 2 for v in values) / len(values)) ** 0.5


def first_epoch(curve, threshold):
    """First epoch whose reward is >= threshold, or None."""
    return next((e for e, v in enumerate(curve) if v >= threshold), None)


def summarize(args, curves, baselines):
    """Per objective: start, achievable, threshold and per-method statistics (see the module doc)."""
    summary = {}
    for objective in args.objectives:
        per_method = {}
        for method in args.methods:
            seeds = curves[objective][method]
            matrix = [seeds[s][0] for s in args.seeds]
            epochs = min(len(c) for c in matrix)
            mean_curve = [mean([c[e] for c in matrix]) for e in range(epochs)]
            per_method[method] = {"mean_curve": mean_curve,
                                  "low": [min(c[e] for c in matrix) for e in range(epochs)],
                                  "high": [max(c[e] for c in matrix) for e in range(epochs)],
                                  "curves": matrix, "held_out": [seeds[s][1] for s in args.seeds]}
        start = mean([m["mean_curve"][0] for m in per_method.values()])
        achievable = max(v for m in per_method.values() for v in m["mean_curve"])
        threshold = start + args.fraction * (achievable - start)
        for stats in per_method.values():
            stats["epochs_to_threshold"] = first_epoch(stats["mean_curve"], threshold)
            stats["seed_epochs"] = [first_epoch(c, threshold) for c in stats["curves"]]
        summary[objective] = {"start": start, "achievable": achievable, "threshold": threshold,
                              "held_out_start": [baselines[objective][s] for s in args.seeds],
                              "methods": per_method}
    return summary


# ---- figures -------------------------------------------------------------------------------------------


def plot_curves(args, summary, path):
    """One line_plot panel per objective (seed mean, min-max band, the threshold as a flat line), stacked."""
    from PIL import Image

    from u_nft.plotting import line_plot

    panels = []
    for objective, info in summary.items():
        series = {m: (list(range(len(s["mean_curve"]))), s["mean_curve"], s["low"], s["high"])
                  for m, s in info["methods"].items()}
        panel = Path(path).with_name(f".{Path(path).stem}_{objective}.png")
        epochs = len(next(iter(series.values()))[0])
        flat = [info["threshold"]] * epochs
        series["threshold"] = (list(range(epochs)), flat, flat, flat)
        line_plot(series, panel, title=f"{objective}: train reward, mean and min-max over {len(args.seeds)} seeds "
                                       f"",
                  xlabel="epoch", ylabel="reward")
        panels.append(Image.open(panel).convert("RGB"))
        panel.unlink()
    canvas = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
    y = 0
    for panel in panels:
        canvas.paste(panel, (0, y))
        y += panel.height
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def sample_grid(args, start_grids, path):
    """Rows per objective: the initial model's held-out samples | heatmaps, then each method's final ones."""
    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    rows = []
    seed = args.seeds[0]
    scale = 2  # 64 px samples: enlarge (nearest) so the heatmap cells stay legible
    for objective in args.objectives:
        rows.append((f"{objective}: start", Image.open(start_grids[objective]).convert("RGB")))
        for method in args.methods:
            images = Path(args.runs_dir) / run_name(objective, method, seed) / "images"
            found = sorted(images.glob(f"epoch{args.epochs - 1:04d}_eval_*.png"))
            if not found:
                raise RuntimeError(f"no final evaluation grid in {images}")
            rows.append((f"{objective}: {method}, end", Image.open(found[0]).convert("RGB")))
    rows = [(label, row.resize((row.width * scale, row.height * scale), Image.NEAREST)) for label, row in rows]
    label_w, font = 190, ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 15)  # matplotlib ships it
    canvas = Image.new("RGB", (label_w + max(r.width for _, r in rows), sum(r.height for _, r in rows)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for label, row in rows:
        canvas.paste(row, (label_w, y))
        draw.text((6, y + row.height // 2 - 8), label, fill=(0, 0, 0), font=font)
        y += row.height
    canvas.save(path)
    return path


# ---- the report ----------------------------------------------------------------------------------------


def _fmt_epochs(value, epochs):
    return f">{epochs - 1}" if value is None else str(value)


def table_rows(args, summary):
    """Markdown table rows: one per (objective, method)."""
    rows = []
    last = args.epochs - 1
    for objective, info in summary.items():
        held_start = mean(info["held_out_start"])
        for method, s in info["methods"].items():
            final = [c[-1] for c in s["curves"]]
            rows.append(
                f"| {objective} | {method} | {info['start']:.3f} | {mean(final):.3f} ± {std(final):.3f} "
                f"[{min(final):.3f}, {max(final):.3f}] | {info['threshold']:.3f} | "
                f"{_fmt_epochs(s['epochs_to_threshold'], args.epochs)} "
                f"({', '.join(_fmt_epochs(e, args.epochs) for e in s['seed_epochs'])}) | "
                f"{held_start:.3f} → {mean(s['held_out']):.3f} ± {std(s['held_out']):.3f} |")
    header = ["| objective | method | train start | train epoch " + str(last) + " (mean ± std [min, max]) | "
              "threshold | epochs to threshold: mean curve (per seed) | held-out start → end (mean ± std) |",
              "|---|---|---|---|---|---|---|"]
    return header + rows


def verdicts(args, summary):
    """One line per objective: dense vs scalar epochs to threshold against the ≤ 1/3 expectation."""
    lines = []
    if not {"dense", "scalar"} <= set(args.methods):
        return lines
    for objective, info in summary.items():
        d = info["methods"]["dense"]["epochs_to_threshold"]
        s = info["methods"]["scalar"]["epochs_to_threshold"]
        kind = "localized" if objective in args.localized else "control"
        text = f"dense {_fmt_epochs(d, args.epochs)} vs scalar {_fmt_epochs(s, args.epochs)} epochs to threshold"
        if d is None:
            verdict = "dense never reached the threshold"
        elif s is None:
            bound = d / (args.epochs - 1)
            verdict = (f"scalar never reached it, so dense/scalar < {bound:.2f}"
                       + (" (≤ 1/3 holds)" if bound <= 1 / 3 else " (≤ 1/3 undecided: longer runs needed)"))
        else:
            ratio = d / s if s else (1.0 if d == 0 else float("inf"))
            verdict = (f"dense/scalar = {ratio:.2f} ({'≤' if ratio <= 1 / 3 else '>'} 1/3)" if kind == "localized"
                       else f"dense/scalar = {ratio:.2f} (a tie is 1)")
        lines.append(f"- **{objective}** ({kind}): {text}; {verdict}.")
    return lines


def write_report(args, summary, path, wall_seconds):
    """docs/dense_vs_scalar.md: what was run, how to reproduce, the table; keeps an existing Findings section."""
    notes = ""
    if Path(path).exists():
        old = Path(path).read_text(encoding="utf-8")
        if NOTES_HEADING in old:
            notes = old[old.index(NOTES_HEADING):]
    command = " ".join(["python scripts/dense_vs_scalar.py"] + [shlex.quote(a) for a in sys.argv[1:] if a != "--reuse"])
    example = train_command(args, args.objectives[0], args.methods[0], args.seeds[0])
    example = "python " + " ".join(shlex.quote(str(a)).replace(str(REPO_ROOT) + os.sep, "") for a in example[1:])
    lines = [
        "# Dense reward maps vs scalar rewards (tiny SD3, CPU)",
        "",
        "Generated by `scripts/dense_vs_scalar.py` (configs: `config/experiments.py`). "
        f"Objectives: {', '.join(args.objectives)}; methods: {', '.join(args.methods)}; seeds: "
        f"{', '.join(map(str, args.seeds))}; {args.epochs} epochs per run, equal budgets (per epoch "
        "the same rollouts, the same optimizer steps).",
        "",
        "![reward curves](dense_vs_scalar.png)",
        "",
        "![samples](dense_vs_scalar_samples.png) — held-out samples and their reward maps (blue = low, red = "
        f"high; own min-max per image), seed {args.seeds[0]}: the initial model, then each method's final EMA model.",
        "",
        f"Train reward at epoch e = mean reward of that epoch's rollouts (e updates done). Start = mean "
        f"epoch-0 reward; achievable = best seed-mean reward of any method at any epoch; threshold = start + "
        f"{args.fraction:g} × (achievable − start); epochs to threshold = first epoch whose seed-mean (or per-seed) "
        f"reward ≥ threshold, `>{args.epochs - 1}` = never. Held-out = evaluation on the test prompts (not used in "
        "training) with fixed seeds: the initial model → the final EMA model.",
        "",
        *table_rows(args, summary),
        "",
        *verdicts(args, summary),
        "",
        f"Reproduce everything: `{command}` (runs in `{_rel(args.runs_dir)}`). One run, e.g.: `{example}`.",
        "",
        f"Machine: {platform.node() or 'unknown'}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores visible, {args.jobs} runs at once with 1 thread each, torch {torch.__version__}; "
        f"date {datetime.date.today().isoformat()}; wall time of this invocation's training {wall_seconds / 60:.1f} min "
        f"(the runs' own times sum to {run_seconds(args) / 60:.1f} min, i.e. about "
        f"{run_seconds(args) / 60 / args.jobs:.0f} min of wall time at {args.jobs} at once).",
        "",
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + ("\n" + notes if notes else ""), encoding="utf-8")
    return path


def _rel(path):
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def write_summary_json(args, summary, path):
    """The numbers behind the table (curves per seed included), for scripts and tests."""
    data = {"epochs": args.epochs, "seeds": args.seeds, "fraction": args.fraction, "objectives": summary}
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("WANDB_MODE", "disabled")
    docs = Path(args.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    print(f"held-out evaluation of the initial model ({len(args.objectives)} objectives x {len(args.seeds)} seeds)", flush=True)
    from reward_maps.heatmap import save_grid

    baselines, start_grids = {}, {}
    for objective in args.objectives:
        baselines[objective] = {}
        for seed in args.seeds:
            score, images, maps = baseline_eval(args, objective, seed, keep_images=8 if seed == args.seeds[0] else 0)
            baselines[objective][seed] = score
            if seed == args.seeds[0]:
                start_grids[objective] = save_grid(images, maps, Path(args.runs_dir) / f"start_{objective}_s{seed}.png",
                                                   value_range=None)
    runs = len(args.objectives) * len(args.methods) * len(args.seeds)
    print(f"training {runs} runs, {args.jobs} at once, into {args.runs_dir}", flush=True)
    wall = train_grid(args)
    curves = {o: {m: run_curves(args, o, m) for m in args.methods} for o in args.objectives}
    summary = summarize(args, curves, baselines)
    write_summary_json(args, summary, Path(args.runs_dir) / "summary.json")
    outputs = [plot_curves(args, summary, docs / "dense_vs_scalar.png"),
               sample_grid(args, start_grids, docs / "dense_vs_scalar_samples.png"),
               write_report(args, summary, docs / "dense_vs_scalar.md", wall)]
    print("\n".join(table_rows(args, summary) + verdicts(args, summary)))
    print(f"wrote {', '.join(map(str, outputs))}; grid wall time {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
