#!/usr/bin/env bash
# The products study on one GPU: every stage with device = "cuda" (experts, the five soups with
# PLS on 2 MPI ranks sharing the GPU, the H-GRAMA merge, the report), with seconds, peak RSS and
# torch.cuda.max_memory_allocated per stage (benchmarks/gpu_check.py; RESULTS.md `## products`
# puts them beside the CPU figures).
#
#   benchmarks/gpu_check.sh                 # ogbn-products' size, 2.45M nodes
#   benchmarks/gpu_check.sh 2e4 1e6         # a small size first catches a broken setup in a minute
#
# Environment: PYTHON (default python3), EPOCHS (expert epochs, default 10), OUT_DIR (default
# benchmarks/out/gpu_check: gpu_check.json and gpu_check.log), WORK (stores and data, default
# /tmp/hpcsoup-gpu-check). Needs hpcsoup's dependencies and mpiexec (the 'mpi' extra).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT_DIR:-benchmarks/out/gpu_check}"
mkdir -p "$out"
if [[ $# -eq 0 ]]; then set -- 2.45e6; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
PYTHONUNBUFFERED=1 "${PYTHON:-python3}" benchmarks/gpu_check.py --nodes "$@" --epochs "${EPOCHS:-10}" \
    --work "${WORK:-/tmp/hpcsoup-gpu-check}" --out "$out" 2>&1 | tee "$out/gpu_check.log"
