#!/bin/bash
# Host emulation of the CUDA kernels' per-thread code (no GPU needed; nvcc needed to parse the headers).
# Usage: tests/cuda_emulation/run.sh   (from the repository root)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
TORCH_INC=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
OUT=${TMPDIR:-/tmp}/augkd_cuda_emulation
mkdir -p "$OUT"
for t in emul_rows emul_mixup emul_topk emul_divergence; do
  nvcc -std=c++20 -O1 -I"$ROOT/kernels" -I"$ROOT/tests/cuda_emulation" -I"$TORCH_INC" --expt-relaxed-constexpr -diag-suppress 20011 \
    -o "$OUT/$t" "$ROOT/tests/cuda_emulation/$t.cu"
  "$OUT/$t"
done
