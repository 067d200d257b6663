#!/usr/bin/env bash
# GPU check of the CUDA backend (needs one CUDA GPU and CuPy; budget < 8 minutes).
#   scripts/gpu_check.sh [OUT_DIR]     (default: results/)
# 1. the device cross-validation: tests marked gpu (kernels on the GPU vs the simulator,
#    bit-exact; fused attention within its bound; the conformance kit on "cupy"), with
#    MIXKVQ_REQUIRE_GPU=1 so nothing can pass by skipping;
# 2. benchmarks (scripts/gpu_bench.py): quantize+pack vs copy bandwidth, fused decode
#    attention vs torch SDPA on fp16 K/V.
# Writes OUT_DIR/{env.txt,gpu_tests.log,gpu_bench.log,gpu_bench.json,gpu_bench.md}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results}"
mkdir -p "$OUT"
export MIXKVQ_REQUIRE_GPU=1
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  python -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__); cupy.show_config()" 2>&1
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1
} > "$OUT/env.txt"

status=0
timeout 210 python -m pytest -q -rs -p no:cacheprovider -m gpu tests/test_cupy_backend.py 2>&1 | tee "$OUT/gpu_tests.log"
test "${PIPESTATUS[0]}" -eq 0 || { echo "GPU cross-validation FAILED (see $OUT/gpu_tests.log)"; status=1; }

timeout 240 python scripts/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log"
test "${PIPESTATUS[0]}" -eq 0 || { echo "benchmark FAILED or timed out (see $OUT/gpu_bench.log)"; status=1; }
exit $status
