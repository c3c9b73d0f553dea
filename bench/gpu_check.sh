#!/usr/bin/env bash
# HLDF at PixArt-XL-2-512 size on one H100/H200, reference approach vs ours, in under 8 minutes, offline.
# Pixel steps: ref, ours full/truncated (bf16 weights, checkpointing on), and ours full_auto/truncated_auto as
# `train --precision auto --hldf.checkpointing auto` runs them (autocast + the memory-estimate checkpointing choice).
# Run from anywhere; it cds to the repository root. Extra arguments go to bench/gpu_check.py, e.g.
#     bash bench/gpu_check.sh                       # the full check (random weights, nothing downloaded)
#     bash bench/gpu_check.sh --t5-reload every     # also reload T5 from disk in every reference step
# With the device tool:  run(command="bash bench/gpu_check.sh", timeout_s=540)   (+ carry=[".whl"] if needed)
# Output: stdout (last line = one JSON object); when $OUT is set also $OUT/gpu_check.log and
# $OUT/gpu_check.json (rewritten after every section, so a killed run still leaves its figures).
#
# Needs on the GPU machine: python3 with a CUDA build of torch, and diffusers, transformers, peft, accelerate,
# safetensors, tokenizers, huggingface_hub (sentencepiece is not needed: the offline tokenizer is a
# tokenizers JSON). No network there, so if any are missing, carry wheels in a `.whl/` folder at the repo root
# (git-ignored: pass it in the device tool's `carry`, 64 MiB in all; torch itself is far too big to carry):
#     bash bench/gpu_check.sh --fetch-wheels      # on a machine with pip access: the versions installed there
# This script installs `.whl/*.whl` into /tmp/site (no index, no deps) and puts it first on PYTHONPATH; their
# own dependencies (numpy, regex, tqdm, pyyaml, filelock, packaging, httpx, ...) must already be importable.
# Pure-Python wheels work on any Python 3; tokenizers/safetensors wheels are abi3 but platform-specific.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY="${PYTHON:-$(command -v python3 || command -v python)}"
PKGS="diffusers transformers peft accelerate safetensors tokenizers huggingface_hub"

if [ "${1:-}" = "--fetch-wheels" ]; then
    # Pin each package to the version installed here, so the GPU run uses the code the tests ran with.
    pins=$("$PY" - $PKGS <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        out.append(name)
print(" ".join(out))
EOF
)
    mkdir -p .whl
    echo "pip download --no-deps -d .whl $pins"
    # shellcheck disable=SC2086
    "$PY" -m pip download --no-deps -d .whl $pins || exit 1
    du -sh .whl
    exit 0
fi

echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
else
    echo "nvidia-smi not found: no NVIDIA GPU here (use: python bench/gpu_check.py --size tiny --device cpu)" >&2
    exit 3
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    echo "== installing carried wheels from .whl/ into /tmp/site"
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
        --upgrade --target /tmp/site .whl/*.whl || exit 4
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
# Same allocator setting for every variant: fewer fragmentation OOMs, peak *allocated* bytes unaffected.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

"$PY" - $PKGS torch <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
missing = []
for name in sys.argv[1:]:
    try:
        print(f"   {name} {version(name)}")
    except PackageNotFoundError:
        missing.append(name)
if missing:
    print(f"missing packages: {' '.join(missing)} (carry wheels in .whl/, see the top of bench/gpu_check.sh)")
    sys.exit(4)
import torch
print(f"   torch.cuda.is_available() = {torch.cuda.is_available()}, cuda {torch.version.cuda}, "
      f"python {sys.version.split()[0]}")
EOF
[ $? -eq 0 ] || exit 4

args=(--size xl --device cuda --budget-s 400)  # imports + the last section must fit the 470 s timeout
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    args+=(--json-out "$OUT/gpu_check.json")
    # /tmp is local disk on the device machine: the reference's per-step reload reads from there.
    timeout -k 20 470 "$PY" bench/gpu_check.py "${args[@]}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
    timeout -k 20 470 "$PY" bench/gpu_check.py "${args[@]}" "$@" 2>&1
fi
rc=${PIPESTATUS[0]}
echo "== gpu_check exit code $rc" >&2  # stderr: stdout still ends with the JSON line
exit "$rc"
