"""Training step and rollout sampling, upstream DiffusionNFT recipe vs our trainer's paths, in one run.

    python bench/bench_train_step.py --shape sd3.5-medium --device cuda --batch 9 --resolution 512 \
        --steps 10 --grad-ckpt --out docs/benchmarks.md
    python bench/bench_train_step.py --shape tiny --device cpu          # CI smoke (tests/test_bench.py)

A random-weight ``SD3Transformer2DModel`` of the chosen shape (docs/upstream_facts.md §G; no download) with LoRA
r=32 / alpha=64 on upstream's 8 attention targets, adapters "default" and "old" given different random
B (so v_theta, v_old and v_ref all differ), random prompt embeddings (SD3.5-M: 205 tokens x 4096,
pooled 2048). Paths, each measured on the same weights and the same batch:

  upstream          fp32 base, fp16 autocast, v_old / v_ref / v_theta as three forwards of the peft
                    model (adapter "old", adapters off, "default"): ``u_nft.training.micro_step_loss``
                    is exactly this structure. Samples with adapter "old".
  ours-adapters     the trainer with train.old_policy="adapter": the same code, bf16 base, bf16 autocast.
  ours-merged       bf16 base; v_old and rollouts from ``u_nft.fast_policy.MergedOldPolicy`` (old LoRA
                    merged into a copy of the target linears, all other weights shared); v_ref = base
                    with adapters off; eager.
  ours-compiled     ours-merged with the LoRA'd model and the merged copy whole-model ``torch.compile``d
                    (``u_nft.fast_policy.compile_policy_forwards``, the trainer's ``train.compile``;
                    CUDA by default, ``--compile on`` on the CPU too).
  ours-ckpt         the last of the above with gradient checkpointing on (``--grad-ckpt``).

Per path: one training micro-step (three forwards, the loss ``u_nft.loss.u_nft_loss`` with
kl_weight 1e-4, backward) with a dense random map r (B, h/2, w/2) and with a scalar r (B,), a
``--steps``-step dpm2 sampling batch, peak CUDA memory of each, the dense loss value (same semantics
on every path: they differ only by rounding), MFU against a matmul ceiling timed in the same run.

Scoring section (``--score-batches``, default 3): the trainer's sample -> submit -> sample loop with a real
scorer (``--scorer``, default jpeg_map) in ``--reward-workers`` threads, reporting how long the sampler waits
on the scorers after its last batch against the scorers' serial time (overlap measured, not assumed); and an
``occlusion_map`` over the same scorer, full map vs only the cells covering ``--locations`` Monte Carlo
locations drawn before scoring (``u_nft/sampled_cells.py``): scorer images and seconds of each.

FLOPs (matmul only, 2 per multiply-add; d = heads x head_dim, N image tokens, T text tokens, S = N + T,
J = joint_attention_dim, P = pooled_projection_dim, c = in_channels x patch², per sample):
  block:   24 N d² (qkv, out, 4d MLP) + 24 T d² (6 T d² in the last, context-pre-only block)
           + 4 S² d (joint attention) + 2 d·6d·2 (AdaLN; 9d for the image side of dual blocks, 2d for
           the last context side)  [+ dual-attention blocks: 8 N d² + 4 N² d]
  outside: 2 N c d (patch embed) + 2 T J d (context embed) + 2 (256 + P + 2 d) d (time / pooled)
           + 4 d² (final AdaLN) + 2 N d c_out (proj_out)
A training micro-step counts (k + 3) forwards, k = no-grad forwards (v_old, and v_ref when
kl_weight > 0), the backward as two forwards (the convention of docs/benchmarks.md's reference point; with a frozen base the weight
gradients are not computed, so this overstates the real backward by about one forward). A sampling
batch counts ``--steps`` forwards. The formula is checked against ``torch.utils.flop_counter`` in each run.

Epoch model (the upstream default run, config/base.py: 48 groups x 24 images, 8 GPUs, sampling and
training batch 9, 10 steps, 9 training timesteps, 1 optimizer step per epoch): per GPU
16 sampling batches + 144 micro-steps + 1 optimizer step (+ 1 merged-policy refresh), scaled linearly
from the measured batch size. Excludes VAE decode, rewards, text encoding and communication.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, uninstalled too
from u_nft import lora  # noqa: E402
from u_nft.fast_policy import MergedOldPolicy, compile_policy_forwards  # noqa: E402
from u_nft.loss import DenseLossOptions, u_nft_loss  # noqa: E402
from u_nft.rollout import sample_latents  # noqa: E402
from u_nft.solvers import sd3_sigmas  # noqa: E402
from u_nft.models.sd3 import FAMILY as SD3  # noqa: E402
from u_nft.training import micro_step_loss  # noqa: E402

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]

# docs/upstream_facts.md §G. Text tokens: 77 CLIP + 128 T5 (upstream max_sequence_length) = 205.
SHAPES = {
    "sd3.5-medium": dict(
        config=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
        text_tokens=205, resolution=512, batch=9),
    "tiny": dict(
        config=dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                    caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
                    dual_attention_layers=(0,), qk_norm="rms_norm"),
        text_tokens=12, resolution=128, batch=2),
}
VAE_FACTOR = 8

# The upstream default run (config/base.py; docs/upstream_facts.md §F).
EPOCH = dict(groups=48, images_per_group=24, gpus=8, timesteps=9)

KL_WEIGHT = 1e-4  # upstream train.beta


# ---- FLOPs -------------------------------------------------------------------------------------------

def forward_flops(config: dict, batch: int, image_tokens: int, text_tokens: int) -> int:
    """Matmul FLOPs of one SD3 transformer forward (formula in the module docstring)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, t = image_tokens, text_tokens
    s = n + t
    p2 = config["patch_size"] ** 2
    layers, dual = config["num_layers"], set(config.get("dual_attention_layers", ()))
    total = 2 * n * config["in_channels"] * p2 * d + 2 * t * config["joint_attention_dim"] * d
    total += 2 * (256 + config["pooled_projection_dim"] + 2 * d) * d
    for i in range(layers):
        last = i == layers - 1
        total += 24 * n * d * d + (6 if last else 24) * t * d * d + 4 * s * s * d
        total += 2 * d * (9 * d if i in dual else 6 * d) + 2 * d * (2 * d if last else 6 * d)
        if i in dual:
            total += 8 * n * d * d + 4 * n * n * d
    total += 4 * d * d + 2 * n * d * config["out_channels"] * p2
    return batch * total


def lora_flops(config: dict, batch: int, image_tokens: int, text_tokens: int, rank: int = 32) -> int:
    """Matmul FLOPs one LoRA adapter adds to a forward: 4 r d per token per target (x A^T, then B);
    8 targets per block (4 on image tokens, 4 on text tokens; the last block has no ``to_add_out``)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers = config["num_layers"]
    per_token = 4 * rank * d
    return batch * per_token * (4 * layers * image_tokens + (4 * layers - 1) * text_tokens)


def counted_forward_flops(model, inputs: dict) -> int:
    """FLOPs of one forward as ``torch.utils.flop_counter.FlopCounterMode`` counts them; attention runs
    through SDPA's math backend there, whose matmuls the counter sees on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
        model(**inputs, return_dict=False)
    return counter.get_total_flops()


# ---- timing ------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls (device synchronized)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_ceiling(device: torch.device, repeats: int) -> tuple[float, str]:
    """Measured matmul rate in FLOP/s: bf16 8192³ on CUDA, fp32 1024³ on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    seconds = median_seconds(lambda: a @ b, device, warmup=3, repeats=max(repeats, 5))
    return 2 * n ** 3 / seconds, f"{str(dtype).removeprefix('torch.')} {n}³"


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict, key: str):
    """Record the peak CUDA memory (GiB) allocated inside the block as ``into[key]`` (None on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into[key] = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


# ---- model and batch ---------------------------------------------------------------------------------

def build_transformer(shape: str, device: torch.device, seed: int):
    """Random-weight fp32 transformer with adapters "default" and "old" (r=32, alpha=64), both with
    random non-zero B, different from each other."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel(**SHAPES[shape]["config"])
    lora.add_lora_adapters(model, rank=32, alpha=64, target_modules=TARGETS, init="gaussian")
    g = torch.Generator().manual_seed(seed + 1)
    for adapter in (lora.TRAINABLE, lora.OLD):
        state = lora.lora_state_dict(model, adapter)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=g).to(v.device) if ".lora_B." in k else v
                 for k, v in state.items()}
        lora.load_lora_state(model, adapter, state)
    return model


@dataclasses.dataclass
class Batch:
    """x0, noise: (B, 16, h, w) fp32; t: (B,); r_dense: (B, h/2, w/2); r_scalar: (B,);
    embeds (B, T, J), pooled (B, P) fp32 (cast to each path's base dtype); sampling noise (B, 16, h, w)."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    r_dense: torch.Tensor
    r_scalar: torch.Tensor
    embeds: torch.Tensor
    pooled: torch.Tensor
    x_T: torch.Tensor


def make_batch(shape: str, batch: int, resolution: int, steps: int, device: torch.device, seed: int) -> Batch:
    cfg = SHAPES[shape]["config"]
    h = resolution // VAE_FACTOR
    if h % (2 * cfg["patch_size"]):
        raise ValueError(f"--resolution {resolution} gives latent size {h}, not a multiple of 2 x patch size")
    g = torch.Generator().manual_seed(seed)
    rand = lambda *size: torch.randn(*size, generator=g).to(device)  # noqa: E731
    sigmas = sd3_sigmas(steps)[:-1]
    t = sigmas[torch.randint(len(sigmas), (batch,), generator=g)].to(device)
    return Batch(
        x0=rand(batch, cfg["in_channels"], h, h), noise=rand(batch, cfg["in_channels"], h, h), t=t,
        r_dense=torch.rand(batch, h // 2, h // 2, generator=g).to(device),
        r_scalar=torch.rand(batch, generator=g).to(device),
        embeds=rand(batch, SHAPES[shape]["text_tokens"], cfg["joint_attention_dim"]),
        pooled=rand(batch, cfg["pooled_projection_dim"]), x_T=rand(batch, cfg["in_channels"], h, h))


def to_bf16_base(model) -> None:
    """Frozen base weights and buffers to bf16 in place; both LoRA adapters stay fp32."""
    lora_ids = {id(p) for name, p in model.named_parameters() if "lora_" in name}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in lora_ids and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(torch.bfloat16)


# ---- one path -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Path:
    name: str
    recipe: str
    base_dtype: torch.dtype
    autocast: torch.dtype
    old_policy: MergedOldPolicy | None = None


def step_loss(transformer, path: Path, batch: Batch, r: torch.Tensor, options: DenseLossOptions):
    embeds, pooled = batch.embeds.to(path.base_dtype), batch.pooled.to(path.base_dtype)
    cond = {"prompt_embeds": embeds, "pooled": pooled}
    return micro_step_loss(SD3, transformer, batch.x0, batch.noise, batch.t, r, cond, options, path.autocast,
                           old_policy=path.old_policy)[0]


def train_step_fn(transformer, path: Path, batch: Batch, r: torch.Tensor, options: DenseLossOptions,
                  scaler: torch.amp.GradScaler) -> Callable[[], torch.Tensor]:
    params = lora.trainable_parameters(transformer)

    def run():
        for p in params:
            p.grad = None
        loss = step_loss(transformer, path, batch, r, options)
        scaler.scale(loss).backward()
        return loss.detach()
    return run


def sample_fn(transformer, path: Path, batch: Batch, sigmas: torch.Tensor) -> Callable[[], torch.Tensor]:
    embeds, pooled = batch.embeds.to(path.base_dtype), batch.pooled.to(path.base_dtype)
    device = batch.x_T.device

    def run():
        policy = path.old_policy if path.old_policy is not None else transformer
        context = lora.use_adapter(transformer, lora.OLD) if path.old_policy is None else contextlib.nullcontext()
        with context, torch.autocast(device.type, dtype=path.autocast):
            return sample_latents(policy, embeds, pooled, batch.x_T, sigmas, "dpm2")
    return run


def measure_path(transformer, path: Path, batch: Batch, args, device: torch.device) -> dict:
    options = DenseLossOptions(beta=1.0, kl_weight=KL_WEIGHT, adv_clip_max=5.0)
    # The trainer's scaler: only for fp16 autocast on CUDA.
    scaler = torch.amp.GradScaler(device.type, enabled=path.autocast == torch.float16 and device.type == "cuda")
    result = {}
    transformer.train()
    dense = train_step_fn(transformer, path, batch, batch.r_dense, options, scaler)
    scalar = train_step_fn(transformer, path, batch, batch.r_scalar, options, scaler)
    with peak_memory(device, result, "peak_train"):
        result["train_dense"] = median_seconds(dense, device, args.warmup, args.repeats)
    result["train_scalar"] = median_seconds(scalar, device, args.warmup, args.repeats)
    result["loss_dense"] = float(dense())
    transformer.eval()
    sampler = sample_fn(transformer, path, batch, sd3_sigmas(args.steps))
    with peak_memory(device, result, "peak_sample"):
        result["sample"] = median_seconds(sampler, device, max(1, args.warmup - 1), max(1, args.repeats // 2))
    return result


# ---- scoring: overlap with sampling, and Monte Carlo cells drawn before scoring ------------------------

def rollout_like_images(batch: int, resolution: int, seed: int) -> torch.Tensor:
    """(B, 3, R, R) in [0, 1]: smooth random images (bilinear 16 x 16 noise), what a decoder returns more
    than white noise does (the JPEG scorer's cost depends on content)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, 16, 16, generator=g)
    return torch.nn.functional.interpolate(low, size=(resolution, resolution), mode="bilinear",
                                           align_corners=False).clamp(0, 1)


def scoring_overlap(sample: Callable[[], torch.Tensor], rewards, images: torch.Tensor, prompts: list[str],
                    batches: int, device: torch.device) -> dict:
    """The trainer's sampling loop (sample a batch, submit it to the scorer workers, sample the next) for
    ``batches`` batches, timed: how long the GPU waits on the scorers after the last batch (``idle``),
    against the scorers' serial time (``scoring``, measured alone). ``hidden`` = 1 - idle / scoring is the
    fraction of scoring that ran under sampling. Seconds; images stand in for the decoded rollouts."""
    rewards(images, prompts, [{} for _ in prompts])  # warm-up (thread start, first-call costs)
    start = time.perf_counter()
    for _ in range(batches):
        rewards(images, prompts, [{} for _ in prompts])
    scoring = time.perf_counter() - start
    sample()
    synchronize(device)
    start = time.perf_counter()
    pending = []
    for b in range(batches):
        sample()
        synchronize(device)  # the trainer decodes (a device sync) before it submits
        pending.append(rewards.submit(images, prompts, [{} for _ in prompts], label=f"bench batch {b}"))
    sampled = time.perf_counter()
    for p in pending:
        p.result()
    end = time.perf_counter()
    idle = end - sampled
    return dict(batches=batches, sampling=sampled - start, scoring=scoring, idle=idle,
                hidden=max(0.0, 1.0 - idle / scoring) if scoring > 0 else 1.0, total=end - start)


def sampled_cell_saving(images: torch.Tensor, prompts: list[str], grid: tuple[int, int], location_grid: tuple[int, int],
                        num_locations: int, inner: str, workers: int) -> dict:
    """Scorer images and seconds of an ``occlusion_map`` over ``inner`` for one batch: the full map vs only
    the cells covering ``num_locations`` Monte Carlo locations drawn before scoring (``u_nft.sampled_cells``)."""
    from reward_maps.combine import RewardSet
    from reward_maps.occlusion import covering_cells
    from u_nft.sampled_cells import SampledCellScoring

    options = {"occlusion_map": {"scorer": inner, "grid": tuple(grid)}}
    plan = SampledCellScoring(True, location_grid, num_locations, seed=0)
    cells = plan.draw(0, prompts)
    metadata = [{} for _ in prompts]
    result = {}
    with RewardSet({"occlusion_map": 1.0}, options, num_workers=workers) as rewards:
        rewards(images[:1], prompts[:1], metadata[:1])  # warm-up
        for key, md in (("full", metadata), ("sampled", plan.attach(metadata, cells))):
            start = time.perf_counter()
            rewards(images, prompts, md)
            result[f"{key}_s"] = time.perf_counter() - start
    b = len(prompts)
    result["full_images"] = b * (grid[0] * grid[1] + 1)
    result["sampled_images"] = b + sum(len(covering_cells(row.tolist(), location_grid, tuple(grid))) for row in cells)
    result.update(grid=tuple(grid), location_grid=tuple(location_grid), m=num_locations, inner=inner)
    return result


def loss_only_times(batch: Batch, device: torch.device, args) -> tuple[float, float]:
    """Seconds of ``u_nft_loss`` forward + backward alone on prediction-shaped fp32 tensors: (dense, scalar)."""
    options = DenseLossOptions(beta=1.0, kl_weight=KL_WEIGHT, adv_clip_max=5.0)
    g = torch.Generator().manual_seed(7)
    v_theta = torch.randn(batch.x0.shape, generator=g).to(device).requires_grad_(True)
    v_old, v_ref = (torch.randn(batch.x0.shape, generator=g).to(device) for _ in range(2))
    x_t = (1 - batch.t.view(-1, 1, 1, 1)) * batch.x0 + batch.t.view(-1, 1, 1, 1) * batch.noise

    def run(r):
        v_theta.grad = None
        u_nft_loss(v_theta, v_old, batch.x0, batch.t, r, options, x_t=x_t, v_ref=v_ref)[0].backward()
    reps = max(args.repeats, 5)
    return (median_seconds(lambda: run(batch.r_dense), device, 2, reps),
            median_seconds(lambda: run(batch.r_scalar), device, 2, reps))


def optimizer_step_seconds(transformer, device: torch.device, args) -> float:
    """AdamW step + grad-norm clip over the trainable LoRA (upstream hyper-parameters), grads present."""
    params = lora.trainable_parameters(transformer)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)

    def run():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    seconds = median_seconds(run, device, 1, max(3, args.repeats // 2))
    with torch.no_grad():  # leave the weights as they were, so every path sees the same model
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    return seconds


# ---- report --------------------------------------------------------------------------------------------

def epoch_seconds(m: dict, batch: int, t_opt: float, t_refresh: float) -> float:
    """Per-GPU epoch time of the upstream default run from the measured pieces (see module docstring)."""
    images = EPOCH["groups"] * EPOCH["images_per_group"] // EPOCH["gpus"]
    per_image_sample = m["sample"] / batch
    per_sample_step = m["train_dense"] / batch
    return images * per_image_sample + images * EPOCH["timesteps"] * per_sample_step + t_opt + t_refresh


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def fmt_mem(gib: float | None) -> str:
    return "n/a (CPU)" if gib is None else f"{gib:.1f} GiB"


def report(args, device_name: str, info: dict, results: dict[str, dict], paths: dict[str, Path]) -> str:
    """Markdown: header (command, device, date, FLOPs, ceiling), measurements table, ratios table."""
    up = results["upstream"]
    lines = [
        f"\n### Training step and sampling: upstream recipe vs ours ({args.shape})\n",
        f"`{info['command']}` on {device_name}, torch {torch.__version__}, {datetime.date.today().isoformat()}. "
        f"Batch {args.batch}, {args.resolution} px ({info['image_tokens']} image + {info['text_tokens']} text tokens), "
        f"{info['params'] / 1e6:.2f} M base parameters, LoRA r=32 on {len(TARGETS)} attention targets, "
        f"kl_weight {KL_WEIGHT}; median of {args.repeats} (sampling {max(1, args.repeats // 2)}) after warm-up.\n",
        f"- one forward: {info['flops'] / 1e12:.4g} TFLOP analytic, {info['flops_counted'] / 1e12:.4g} TFLOP counted "
        f"(torch flop counter; ratio {info['flops'] / info['flops_counted']:.4f}); one LoRA adds "
        f"{info['flops_lora'] / 1e12:.4g} TFLOP (not counted in MFU)",
        f"- matmul ceiling ({info['ceiling_kind']}): {info['ceiling'] / 1e12:.2f} TFLOP/s; "
        f"train-step FLOPs = 5 forwards (old, ref, theta, backward as 2), sampling = {args.steps} forwards",
        f"- loss alone (fwd + bwd, fp32): dense map {fmt_time(info['loss_dense'])}, "
        f"scalar {fmt_time(info['loss_scalar'])} "
        f"(dense/scalar {info['loss_dense'] / info['loss_scalar']:.2f}); AdamW step {fmt_time(info['t_opt'])}; "
        f"merged-policy refresh {fmt_time(info['t_refresh'])}; merged copy owns "
        f"{info['merged_bytes'] / 2 ** 20:.1f} MiB",
        "",
        "| path | recipe | train step (dense) | train step (scalar) | dense/scalar | sampling batch | img/s "
        "| peak train | peak sample | MFU train | MFU sample | loss (dense) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        mfu_train = 5 * info["flops"] / m["train_dense"] / info["ceiling"]
        mfu_sample = args.steps * info["flops"] / m["sample"] / info["ceiling"]
        lines.append(
            f"| {name} | {paths[name].recipe} | {fmt_time(m['train_dense'])} | {fmt_time(m['train_scalar'])} "
            f"| {m['train_dense'] / m['train_scalar']:.3f} | {fmt_time(m['sample'])} | {args.batch / m['sample']:.2f} "
            f"| {fmt_mem(m['peak_train'])} | {fmt_mem(m['peak_sample'])} | {100 * mfu_train:.1f}% "
            f"| {100 * mfu_sample:.1f}% | {m['loss_dense']:.6g} |")
    lines += ["", "| path | train speed-up vs upstream | sampling speed-up vs upstream | loss rel. diff vs upstream "
                  "| epoch model (per GPU) | epoch speed-up |", "|---|---|---|---|---|---|"]
    up_epoch = epoch_seconds(up, args.batch, info["t_opt"], 0.0)
    for name, m in results.items():
        refresh = info["t_refresh"] if paths[name].old_policy is not None else 0.0
        epoch = epoch_seconds(m, args.batch, info["t_opt"], refresh)
        rel = abs(m["loss_dense"] - up["loss_dense"]) / max(abs(up["loss_dense"]), 1e-30)
        lines.append(f"| {name} | {up['train_dense'] / m['train_dense']:.2f}x | {up['sample'] / m['sample']:.2f}x "
                     f"| {rel:.2e} | {epoch:.1f} s | {up_epoch / epoch:.2f}x |")
    if "overlap" in info:
        o, c = info["overlap"], info["cells"]
        lines += [
            f"\nScoring ({args.scorer}, {args.reward_workers} worker threads, {args.batch} images of {args.resolution} px "
            f"per batch): {o['batches']} batches sampled with {o['path']} while the previous ones score: sampling "
            f"{fmt_time(o['sampling'])}, scoring alone {fmt_time(o['scoring'])}, the sampler then waits "
            f"{fmt_time(o['idle'])} on the scorers ({100 * o['hidden']:.0f}% of scoring hidden under sampling; "
            f"the trainer waits once per epoch, after its last batch).",
            f"\nOcclusion map over {c['inner']} ({c['grid'][0]}x{c['grid'][1]} cells), one batch: full map "
            f"{c['full_images']} scorer images, {fmt_time(c['full_s'])}; m = {c['m']} Monte Carlo locations on the "
            f"{c['location_grid'][0]}x{c['location_grid'][1]} grid drawn before scoring: {c['sampled_images']} images, "
            f"{fmt_time(c['sampled_s'])} ({c['full_s'] / max(c['sampled_s'], 1e-9):.1f}x less time).",
        ]
    lines.append("\nEpoch model: per GPU 144 images = 16 sampling batches of 9 + 144 micro-steps (16 x 9 timesteps) "
                 "+ 1 AdamW step (+ 1 refresh for merged paths), scaled per image from the measured batch; "
                 "VAE decode, rewards, text encoding and all-reduce excluded.\n")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 9 (sd3.5-medium), 2 (tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels; default 512 (sd3.5-medium), 128 (tiny)")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps of the sampling batch")
    parser.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA (compilation), 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="add the ours-compiled path: auto = on CUDA only (on: CPU too, minutes of inductor)")
    parser.add_argument("--score-batches", type=int, default=3,
                        help="sampling batches of the scorer-overlap measurement (0 = skip the scoring section)")
    parser.add_argument("--scorer", default="jpeg_map",
                        help="registered scorer for the overlap measurement and inside the occlusion map")
    parser.add_argument("--reward-workers", type=int, default=4, help="scorer threads (config.reward_workers)")
    parser.add_argument("--occlusion-grid", type=int, default=8, help="occlusion map grid side (cells per axis)")
    parser.add_argument("--locations", type=int, default=8, help="Monte Carlo locations m drawn before scoring")
    parser.add_argument("--grad-ckpt", action="store_true", help="add the ours-ckpt path (gradient checkpointing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="append the markdown report to this file")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    cuda = args.device == "cuda"
    args.batch = args.batch or shape["batch"]
    args.resolution = args.resolution or shape["resolution"]
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats or (10 if cuda else 3)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device; use --device cpu")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls stay fp32 (upstream's fp32 outside autocast)
    shape = SHAPES[args.shape]
    batch = make_batch(args.shape, args.batch, args.resolution, args.steps, device, args.seed)
    transformer = build_transformer(args.shape, device, args.seed)
    latent = args.resolution // VAE_FACTOR
    words = sys.argv[1:] if argv is None else list(argv)
    info = dict(command=" ".join(["python", os.path.relpath(__file__)] + words),
                image_tokens=(latent // shape["config"]["patch_size"]) ** 2, text_tokens=shape["text_tokens"],
                params=sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n))
    info["flops"] = forward_flops(shape["config"], args.batch, info["image_tokens"], info["text_tokens"])
    info["flops_lora"] = lora_flops(shape["config"], args.batch, info["image_tokens"], info["text_tokens"])
    inputs = dict(hidden_states=batch.x0, encoder_hidden_states=batch.embeds, pooled_projections=batch.pooled,
                  timestep=batch.t * 1000)
    with lora.adapters_disabled(transformer):
        info["flops_counted"] = counted_forward_flops(transformer, inputs)
    info["ceiling"], info["ceiling_kind"] = matmul_ceiling(device, args.repeats)
    info["loss_dense"], info["loss_scalar"] = loss_only_times(batch, device, args)
    info["t_opt"] = optimizer_step_seconds(transformer, device, args)

    results, paths = {}, {}

    def run(path: Path):
        paths[path.name] = path
        results[path.name] = measure_path(transformer, path, batch, args, device)
        print(f"{path.name}: {results[path.name]}", flush=True)
        gc.collect()

    run(Path("upstream", "fp32 base, fp16 autocast, old/ref/theta via adapters", torch.float32, torch.float16))
    to_bf16_base(transformer)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run(Path("ours-adapters", "bf16 base, bf16 autocast, old/ref/theta via adapters", torch.bfloat16, torch.bfloat16))
    policy = MergedOldPolicy(transformer)
    info["merged_bytes"] = policy.owned_bytes
    info["t_refresh"] = median_seconds(lambda: policy.refresh(transformer), device, 1, 3)
    run(Path("ours-merged", "bf16 base, bf16 autocast, merged old copy, ref = adapters off", torch.bfloat16,
             torch.bfloat16, policy))
    last = paths["ours-merged"]
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        # the trainer's train.compile: the LoRA'd model (v_theta, v_ref) and the merged copy (v_old, rollouts)
        compile_policy_forwards(transformer, policy, "on", device)
        last = Path("ours-compiled", last.recipe + ", torch.compile (whole model)", torch.bfloat16, torch.bfloat16,
                    policy)
        run(last)
    if args.grad_ckpt:
        transformer.enable_gradient_checkpointing()
        run(dataclasses.replace(last, name="ours-ckpt", recipe=last.recipe + ", gradient checkpointing"))
        transformer.disable_gradient_checkpointing()

    if args.score_batches:
        from reward_maps.combine import RewardSet

        images = rollout_like_images(args.batch, args.resolution, args.seed)
        prompts = [f"bench prompt {i // 3}" for i in range(args.batch)]
        with RewardSet({args.scorer: 1.0}, num_workers=args.reward_workers) as rewards:
            info["overlap"] = scoring_overlap(sample_fn(transformer, last, batch, sd3_sigmas(args.steps)), rewards,
                                              images, prompts, args.score_batches, device)
        location_grid = (latent // 2, latent // 2)  # train.cell_size 2: one transformer token
        info["cells"] = sampled_cell_saving(images, prompts, (args.occlusion_grid, args.occlusion_grid), location_grid,
                                            args.locations, args.scorer, args.reward_workers)
        info["overlap"]["path"] = last.name
        print(f"scoring: {info['overlap']} {info['cells']}", flush=True)

    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU {platform.machine()} ({torch.get_num_threads()} threads)")
    text = report(args, device_name, info, results, paths)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
