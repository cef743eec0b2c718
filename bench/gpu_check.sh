#!/usr/bin/env bash
# The one prepared GPU check: benchmark + real training on CUDA, markdown figures for docs/benchmarks.md.
#
# Within ~8 minutes on one H100 / H200 (each stage time-boxed; a failing stage does not stop the others):
#   1. bench   bench/bench_train_step.py at SD3.5-Medium shape (random weights, no download): upstream recipe
#              vs the trainer's GPU paths (bf16 base, merged old policy, whole-model torch.compile, gradient
#              checkpointing): one training step (dense and scalar r), a 10-step sampling batch, peak memory,
#              MFU against a bf16 matmul ceiling measured in the same run, scorer overlap, occlusion-map
#              cells drawn before scoring.
#   2. train   scripts/train_u_nft_sd3.py on CUDA, for each precision in $PRECISIONS (fp16, bf16): epoch 1 of 2
#              (merged old policy, Monte Carlo locations; bf16 with train.compile=auto), stopped after it
#              (checkpoint saved), then resumed for epoch 2 (checkpoint loaded, evaluation at the end), on
#              $TRAIN_PIPELINE (default: the offline tiny pipeline).
#   3. report  $OUT/gpu_check.md: every stage's status and wall time, the benchmark tables, the epoch
#              lines of the train runs; logs next to it ($OUT/*.log).
#
# Preparing the wheels (HERE, on the development machine; the GPU machine cannot download; its Python has
# torch, transformers, peft, absl-py, tqdm but not diffusers / ml_collections / importlib_metadata):
#
#   bash bench/gpu_check.sh --prepare        # = the pip download below + the tiny pipeline into .cache/tiny-sd3
#   #   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#   #       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#   #       diffusers==0.42.1 ml_collections==1.1.0 importlib_metadata
#   #   python3 scripts/make_tiny_sd3.py .cache/tiny-sd3   (or copy an already built one there)
#
# (.whl/ and .cache/ are in .gitignore; together ~30 MB, inside the device tool's 64 MiB.) Then the exact call:
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl", ".cache/tiny-sd3"], timeout_s=560)
#
# and copy the tables of the returned gpu_check.md into docs/benchmarks.md. This package itself needs no
# install: the repository root goes on PYTHONPATH.
#
# Dry run on a CPU (what tests/test_gpu_check.py does; tiny sizes, no compile, minutes):
#   DEVICE=cpu OUT=/tmp/gpu_check bash bench/gpu_check.sh
#
# Environment: OUT (output folder; default ./gpu_check_out), DEVICE (cuda | cpu), PRECISIONS ("fp16 bf16"),
# TRAIN_PIPELINE (a local SD3 pipeline dir; default .cache/tiny-sd3), BENCH_TIMEOUT / TRAIN_TIMEOUT (seconds
# per stage; defaults 300 / 150 on CUDA), PYTHON (python3).
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"

if [ "${1:-}" = "--prepare" ]; then
    set -e
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 ml_collections==1.1.0 importlib_metadata
    if [ ! -f .cache/tiny-sd3/model_index.json ]; then
        if [ -n "${U_NFT_TINY_SD3_DIR:-}" ] && [ -f "$U_NFT_TINY_SD3_DIR/model_index.json" ]; then
            mkdir -p .cache/tiny-sd3 && cp -r "$U_NFT_TINY_SD3_DIR"/. .cache/tiny-sd3/
        else
            "$PYTHON" scripts/make_tiny_sd3.py .cache/tiny-sd3
        fi
    fi
    du -sh .whl .cache/tiny-sd3
    exit 0
fi

DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
REPORT="$OUT/gpu_check.md"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled

# ---- stage 0: dependencies from the carried wheels (skipped where they import already) ----
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PYTHON" -c "import diffusers, ml_collections" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        .whl/*.whl > "$OUT/install.log" 2>&1 || echo "wheel install failed (see install.log)"
    export PYTHONPATH="$WORK/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$REPO:${PYTHONPATH:-}"

# Time boxes (seconds; they sum to 570, inside the device tool's 600 s per command; typical runs take less).
if [ "$DEVICE" = "cuda" ]; then
    SHAPE=sd3.5-medium; BENCH_ARGS=(--warmup 2 --repeats 5)
    BENCH_TIMEOUT="${BENCH_TIMEOUT:-120}"; COMPILED_TIMEOUT="${COMPILED_TIMEOUT:-240}"
    TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-45}"; COMPILED_TRAIN_TIMEOUT="${COMPILED_TRAIN_TIMEOUT:-75}"
    TRAIN_SIZE=(--config.sample.num_groups=4 --config.sample.num_image_per_prompt=4)
else
    SHAPE=tiny; BENCH_ARGS=(--batch 2 --steps 2 --warmup 0 --repeats 1 --score-batches 2)
    BENCH_TIMEOUT="${BENCH_TIMEOUT:-240}"; COMPILED_TIMEOUT=0
    TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-240}"; COMPILED_TRAIN_TIMEOUT="$TRAIN_TIMEOUT"
    TRAIN_SIZE=(--config.sample.num_groups=2 --config.sample.num_image_per_prompt=4)
fi
PRECISIONS="${PRECISIONS:-fp16 bf16}"
TRAIN_PIPELINE="${TRAIN_PIPELINE:-$REPO/.cache/tiny-sd3}"

{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), device $DEVICE)"
    echo
    "$PYTHON" - <<'EOF' 2>&1
import platform, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"no CUDA ({platform.machine()} CPU)"
print(f"torch {torch.__version__}, {dev}")
for name in ("diffusers", "transformers", "peft", "ml_collections"):
    try:
        print(f"{name} {__import__(name).__version__}" if name != "ml_collections" else "ml_collections ok")
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        print(f"{name}: MISSING ({err})")
EOF
    echo
    echo "| stage | status | wall time |"
    echo "|---|---|---|"
} > "$REPORT.head"
: > "$REPORT.body"

# stage NAME TIMEOUT CMD...: run time-boxed, log to $OUT/NAME.log, record status and wall time.
stage() {
    local name="$1" limit="$2"; shift 2
    local start end rc status
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s)
    case $rc in
        0) status="ok" ;;
        124|137) status="TIMED OUT after ${limit} s" ;;
        *) status="FAILED (exit $rc; tail of $name.log below)" ;;
    esac
    echo "| $name | $status | $((end - start)) s |" >> "$REPORT.head"
    if [ $rc -ne 0 ]; then
        { echo; echo "### $name: last lines of the log"; echo '```'; tail -n 25 "$OUT/$name.log"; echo '```'; } >> "$REPORT.body"
    fi
    echo "stage $name: $status ($((end - start)) s)"
    return 0
}

# ---- stage 1: the side-by-side benchmark; eager paths (+ gradient checkpointing, scoring) and, in a
# process of its own so that a slow compile cannot cost the eager figures, the compiled path ----
stage bench "$BENCH_TIMEOUT" "$PYTHON" bench/bench_train_step.py --shape "$SHAPE" --device "$DEVICE" \
    "${BENCH_ARGS[@]}" --compile off --grad-ckpt --out "$WORK/bench.md"
if [ "$COMPILED_TIMEOUT" != 0 ]; then
    stage bench_compiled "$COMPILED_TIMEOUT" "$PYTHON" bench/bench_train_step.py --shape "$SHAPE" --device "$DEVICE" \
        "${BENCH_ARGS[@]}" --compile on --score-batches 0 --out "$WORK/bench.md"
fi
if [ -s "$WORK/bench.md" ]; then
    cat "$WORK/bench.md" >> "$REPORT.body"
fi

# ---- stage 2: the real train script, per precision: epoch 1 (killed after), resume for epoch 2; the bf16
# first epoch with train.compile=auto (compiles on CUDA), the other runs eager (compile time is the cost) ----
for precision in $PRECISIONS; do
    compile=off; limit="$TRAIN_TIMEOUT"
    if [ "$precision" = bf16 ]; then compile=auto; limit="$COMPILED_TRAIN_TIMEOUT"; fi
    run_args=(--config config/u_nft.py:tiny "--config.device=$DEVICE" "--config.mixed_precision=$precision"
        "--config.pretrained.model=$TRAIN_PIPELINE" "--config.logdir=$WORK/runs" "--config.run_name=$precision"
        --config.num_epochs=2 --config.save_freq=1 --config.eval_freq=2 --config.dataset.max_test_prompts=4
        --config.train.old_policy=merged --config.train.estimator=monte_carlo --config.train.num_locations=16
        --config.sample.train_batch_size=8 --config.train.batch_size=8
        --config.train.gradient_step_per_epoch=1 --config.logging.num_log_images=4 "${TRAIN_SIZE[@]}")
    stage "train_${precision}_epoch1" "$limit" "$PYTHON" scripts/train_u_nft_sd3.py "${run_args[@]}" \
        "--config.train.compile=$compile" --stop_after_epochs=1
    stage "train_${precision}_resume" "$TRAIN_TIMEOUT" "$PYTHON" scripts/train_u_nft_sd3.py "${run_args[@]}" \
        --config.train.compile=off "--config.resume_from=$WORK/runs/$precision"
    {
        echo
        echo "### Train script on $DEVICE, mixed_precision=$precision (merged old policy, monte_carlo; epoch 1 compile=$compile)"
        echo
        echo '```'
        grep -hE "^(epoch [0-9]+:|resumed from|saved checkpoint|eval after)" \
            "$OUT/train_${precision}_epoch1.log" "$OUT/train_${precision}_resume.log" 2>/dev/null | cut -c1-400
        echo '```'
    } >> "$REPORT.body"
done

cat "$REPORT.head" "$REPORT.body" > "$REPORT"
rm -f "$REPORT.head" "$REPORT.body"
rm -rf "$WORK"
echo "report: $REPORT"
