#!/usr/bin/env bash
# The prepared GPU check: build with CUDA, run the GPU tests, benchmark on the GPU, in one call
# (under 8 minutes on an H200). Run it on the lent device machine from the repo root:
#   device run: bash scripts/gpu_check.sh      (results land in $OUT, or ./gpu_out without it)
# Liger-Kernel rows appear when liger_kernel is importable there (carry its wheel in .whl/ if needed).
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=16 AUGKD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" || python3 -m pip install -q torch==2.14.1
python3 -m pip install -q numpy pytest pytest-benchmark ninja 2>/dev/null
time python3 setup.py build_ext --inplace 2>&1 | tail -5 | tee "$OUT/build.txt"
python3 -m augkd.ops | tee "$OUT/backends.txt"
# the shared matrix on CUDA tensors (ids *-cuda), what only a GPU shows (test_gpu.py), the build
timeout 600 python3 -m pytest -q tests/test_gpu.py tests/test_build.py tests/test_numerics.py tests/test_kd_loss.py \
  tests/test_uncertainty.py tests/test_mixup.py tests/test_topk_kd_loss.py tests/test_compile_and_opcheck.py \
  -k "gpu or cuda or test_build" -x 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
# LLM distillation: topk_kd_loss on both GPU backends, fused_linear_kd_loss with GPU heads
timeout 150 python3 -m pytest -q tests/test_gpu_llm.py -x 2>&1 | tail -30 | tee "$OUT/gpu_tests_llm.txt"
timeout 200 python3 -m benchmarks.report --device cuda --repeats 20 --out "$OUT/gpu_bench.md" \
  --only kd_loss,uncertainty,latent_mixup,pixel_mixup 2>/dev/null
# fused_linear_kd vs eager / torch.compile / Liger, topk_kd_loss vs a dense teacher (N = 4096 on the GPU)
timeout 200 python3 -m benchmarks.report --device cuda --repeats 20 --only fused_linear_kd,topk_kd_loss \
  --out "$OUT/gpu_bench_llm.md" 2>/dev/null
# V = 262144 (whole 128-row chunks fit CUDA's budget, so this times the row path at that vocabulary)
timeout 120 python3 -m benchmarks.report --device cuda --repeats 10 --only fused_linear_kd-vocab \
  --out "$OUT/gpu_bench_llm_vocab.md" 2>/dev/null
for backend in triton cuda; do
  AUGKD_BACKEND=$backend timeout 60 python3 -m benchmarks.report --device cuda --only kd_loss --repeats 20 \
    --out "$OUT/gpu_bench_kd_$backend.md" 2>/dev/null
done
