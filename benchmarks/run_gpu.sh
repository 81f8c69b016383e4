#!/usr/bin/env bash
# One device-machine session's steps, two calls chained on one warm machine:
#   bash benchmarks/run_gpu.sh setup tests cold    # CUDA tests -> $OUT/h200-tests.log; h200-cold
#   bash benchmarks/run_gpu.sh retest pipeline serve   # last failures again; h200-pipeline, h200-serve
#   bash benchmarks/run_gpu.sh kernels              # h200-step (per-step kernel profile)
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
    tests|retest)  # retest: the tests that failed in the last `tests` on this machine (pytest's cache)
      [ $step = retest ] && only="--lf --lfnf=none" || only=""
      timeout 330 python3 -m pytest -q -n 8 --dist loadfile $only --timeout 200 tests/test_cuda_linear.py \
        tests/test_cuda_transformer.py tests/test_cuda_inputs.py tests/test_cuda_state.py tests/test_cuda_choice.py \
        tests/test_gemlite_layout.py tests/test_elementwise.py 2>&1 | tee "$OUT/h200-$step.log" | tail -25 ;;
    pipeline)
      (cd benchmarks && timeout 450 python3 bench_pipeline.py --repos $REPOS --out "$OUT/h200-pipeline" \
        --layouts gemlite --kinds ternary --impls ours,dense_bf16,gemlite 2>&1 | tail -40) ;;
    cold)
      (cd benchmarks && timeout 240 python3 cold_start.py --repo $REPOS --out "$OUT/h200-cold" 2>&1 | tail -12) ;;
    serve)
      (cd benchmarks && timeout 200 python3 load_test.py --model $REPOS/ternary-gemlite --backend cuda \
        --size 1024x1024 --requests 32 --duration 40 --out "$OUT/h200-serve" 2>&1 | tail -15) ;;
    kernels)
      (cd benchmarks && timeout 240 python3 bench_cuda.py --out "$OUT/h200-step" --sections step,profile \
        --step-kinds ternary --impls ours,dense_bf16 2>&1 | tail -30) ;;
  esac
done
