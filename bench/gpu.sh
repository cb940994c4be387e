#!/usr/bin/env bash
# GPU readiness in one short run (< 5 minutes on one H100): CUDA paths (bf16, SDPA vs xformers, accelerate) and
# throughput (DINOv2-B features, FlatDINO and DiT-XL train steps at 32x128 vs 256x768 with MFU, sampling).
# Needs a python3 with torch, transformers and accelerate; writes gpu_results.json to $OUT (or /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi not available"
timeout 290 "$PY" bench/gpu_check.py --json "${OUT:-/tmp}/gpu_results.json"
