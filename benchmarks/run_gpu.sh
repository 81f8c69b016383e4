#!/usr/bin/env bash
# One device-machine session's steps, in calls of under 10 minutes chained on one warm machine (a fresh machine
# compiles every Triton kernel again: the CUDA tests need ~2 calls):
#   bash benchmarks/run_gpu.sh setup tests-kernels  # test_cuda_linear + test_gemlite_layout -> $OUT/h200-tests-kernels.log
#   bash benchmarks/run_gpu.sh tests                # the other CUDA tests -> $OUT/h200-tests.log
#   bash benchmarks/run_gpu.sh cold pipeline        # h200-cold, h200-pipeline (every section, layout, kind)
#   bash benchmarks/run_gpu.sh e2e                  # h200-pipeline-e2e (e2e and peer rows), h200-lowvram
#   bash benchmarks/run_gpu.sh serve kernels        # h200-serve(-jpeg), h200-step (projections, step, kernel profile)
# Test logs are verbose (one line per test as it ends), so a run cut short still says what passed.
# Wheels the GPU image lacks travel in .whl/ (git-ignored): diffusers, importlib_metadata, gemlite's sdist, and for
# serve fastapi, opentelemetry_api, starlette, pydantic, pydantic_core, typing_inspection, annotated_types, uvicorn.
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
    tests-kernels|tests)
      [ $step = tests ] && files="tests/test_cuda_transformer.py tests/test_cuda_inputs.py tests/test_cuda_state.py tests/test_cuda_elementwise.py
        tests/test_cuda_choice.py tests/test_elementwise.py tests/test_tokenizer.py tests/test_noise.py
        tests/test_latents.py" \
        || files="tests/test_cuda_linear.py tests/test_gemlite_layout.py"
      timeout 540 python3 -m pytest -v -n 14 --dist load -p no:cacheprovider --timeout 500 $files 2>&1 \
        | grep --line-buffered -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|Error" | tee "$OUT/h200-$step.log" | tail -25 ;;
    pipeline)
      (cd benchmarks && timeout 450 python3 bench_pipeline.py --repos $REPOS --out "$OUT/h200-pipeline" \
        --layouts gemlite,mlx,compact --kinds ternary,binary 2>&1 | tail -40) ;;
    e2e)
      # memory="low" in a process of its own: the pipelines before it leave ~0.5 GB allocated (2.69 vs 3.24 GB)
      (cd benchmarks && timeout 420 python3 bench_pipeline.py --repos $REPOS --out "$OUT/h200-pipeline-e2e" \
        --sections e2e,peer --layouts gemlite --kinds ternary \
        --impls ours,ours_fp8,ours_torch_elementwise,dense_bf16,gemlite 2>&1 | grep -v "^|" | tail -30 \
        && timeout 150 python3 bench_pipeline.py --repos $REPOS --out "$OUT/h200-lowvram" --sections lowvram \
        --layouts gemlite --kinds ternary 2>&1 | grep lowvram) ;;
    cold)
      (cd benchmarks && timeout 240 python3 cold_start.py --repo $REPOS --out "$OUT/h200-cold" 2>&1 | tail -12) ;;
    serve)
      (cd benchmarks && python3 -c "from pathlib import Path; from common import full_size_repo
full_size_repo(Path('$REPOS'), 'gemlite', 'ternary', device='cuda')" && timeout 200 python3 load_test.py --model $REPOS/ternary-gemlite --backend cuda \
        --size 1024x1024 --requests 32 --duration 40 --out "$OUT/h200-serve" 2>&1 | tail -15 \
        && timeout 120 python3 load_test.py --model $REPOS/ternary-gemlite --backend cuda --size 1024x1024 \
        --requests 16 --duration 30 --concurrency 1 4 --output-format jpeg --out "$OUT/h200-serve-jpeg" 2>&1 | tail -6) ;;
    kernels)
      (cd benchmarks && timeout 300 python3 bench_cuda.py --out "$OUT/h200-step" --sections projections,step,profile \
        --step-kinds ternary --impls ours,ours_fp8,ours_torchops,dense_bf16 2>&1 | grep -v "^|" | tail -30) ;;
  esac
done
