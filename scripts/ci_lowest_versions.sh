#!/usr/bin/env bash
# CI step: the lowest dependency versions setup.py allows, in a clean virtual environment, running the
# scorer and train-path tests (CLIP-family scorers, GenEval, the tiny SD3 pipeline and rollouts, the
# train script end to end, the evaluation script, the model-family seam and the FLUX adapter; Qwen-Image
# needs diffusers >= 0.35, so its tests must skip cleanly here).
#
#   bash scripts/ci_lowest_versions.sh            # build or reuse .cache/lowest-versions/venv, run the tests
#   LOWEST_VENV=/somewhere bash scripts/...       # another venv location
#
# The venv does not see the system site-packages (newer releases are installed there). It gets the CPU
# torch 2.13.0 (as scripts/setup.sh), transformers 4.46, diffusers 0.33, peft 0.15, accelerate 1.0,
# numpy 1.26 and matplotlib 3.7 (the lowest releases setup.py allows, latest patch), then the package with
# its test extras constrained to those pins. Idempotent: a venv whose stamp matches the pins and setup.py is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
CACHE="$ROOT/.cache/lowest-versions"
VENV="${LOWEST_VENV:-$CACHE/venv}"
PINS=(
  "torch==2.13.0"
  "transformers==4.46.*"
  "diffusers==0.33.*"
  "peft==0.15.*"
  "accelerate==1.0.*"
  "numpy==1.26.*"
  "matplotlib==3.7.*"
)
mkdir -p "$CACHE"
STAMP="$VENV/.u_nft_lowest_stamp"
WANT="$(printf '%s\n' "${PINS[@]}" | cat - setup.py | sha256sum | cut -d' ' -f1)"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "ci_lowest_versions: building $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  CONSTRAINTS="$CACHE/constraints.txt"
  printf '%s\n' "${PINS[@]}" > "$CONSTRAINTS"
  "${PIP[@]}" -c "$CONSTRAINTS" "${PINS[@]}"
  "${PIP[@]}" -c "$CONSTRAINTS" -e ".[test]"
  # as scripts/setup.sh: the CLIP BPE merges for the offline tiny models, without torchvision
  "${PIP[@]}" --no-deps open-clip-torch==3.3.0
  echo "$WANT" > "$STAMP"
fi

"$VENV/bin/python" - <<'EOF'
import diffusers, numpy, peft, accelerate, torch, transformers
print("ci_lowest_versions:", ", ".join(f"{m.__name__} {m.__version__}" for m in
      (torch, transformers, diffusers, peft, accelerate, numpy)))
EOF

# The tiny SD3 pipeline built by these versions is cached next to the venv (their random init differs).
export U_NFT_TINY_SD3_DIR="$CACHE/tiny-sd3"
export WANDB_MODE=disabled
"$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_clip_maps.py tests/test_geneval_map.py tests/test_tiny_sd3.py tests/test_rollout.py \
  tests/test_evaluation.py tests/test_model_family.py tests/test_flux_adapter.py tests/test_qwen_image.py \
  "tests/test_train_e2e.py::test_tiny_run_writes_finite_metrics_images_and_checkpoints" \
  "tests/test_train_e2e.py::test_lora_trains_and_old_policy_follows_the_decay_rule" \
  "tests/test_train_e2e.py::test_checkpoint_lora_loads_in_diffusers_and_matches_our_adapter" \
  "tests/test_train_e2e.py::test_killed_and_resumed_run_matches_uninterrupted_run" \
  "$@"
