#!/usr/bin/env bash
# One device-machine session's steps (each a separate call, in this order, on a warm machine):
#   bash benchmarks/run_gpu.sh setup tests        # CUDA tests -> $OUT/h200-tests.log
#   bash benchmarks/run_gpu.sh pipeline           # benchmarks/results/h200-pipeline.{md,json}
#   bash benchmarks/run_gpu.sh cold serve kernels # h200-cold, h200-serve, h200-step
# Wheels the GPU image lacks (diffusers, importlib_metadata, gemlite's sdist) travel in .whl/ (git-ignored).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:/tmp/gl/gemlite-0.6.0.post2:$PWD
OUT=${OUT:-/tmp/out}
REPOS=/tmp/bonsai-repos
for step in "$@"; do
  case $step in
    setup)
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
      mkdir -p /tmp/gl && tar xzf .whl/gemlite-0.6.0.post2.tar.gz -C /tmp/gl || exit 1
      nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader ;;
    tests)
      timeout 330 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_linear.py tests/test_cuda_transformer.py \
        tests/test_cuda_inputs.py tests/test_cuda_state.py tests/test_cuda_choice.py tests/test_gemlite_layout.py \
        tests/test_elementwise.py 2>&1 | tee "$OUT/h200-tests.log" | tail -25 ;;
    pipeline)
      (cd benchmarks && timeout 560 python3 bench_pipeline.py --repos $REPOS --out "$OUT/h200-pipeline" \
        --layouts gemlite,mlx,compact --kinds ternary,binary 2>&1 | tail -60) ;;
    cold)
      (cd benchmarks && timeout 300 python3 cold_start.py --repo $REPOS --out "$OUT/h200-cold" 2>&1 | tail -12) ;;
    serve)
      (cd benchmarks && timeout 200 python3 load_test.py --model $REPOS/ternary-gemlite --backend cuda \
        --out "$OUT/h200-serve" 2>&1 | tail -15) ;;
    kernels)
      (cd benchmarks && timeout 240 python3 bench_cuda.py --out "$OUT/h200-step" --sections step,profile \
        --step-kinds ternary --impls ours,dense_bf16 2>&1 | tail -30) ;;
  esac
done
