#!/usr/bin/env bash
# The GPU checks and benchmarks on a lent CUDA machine (no network there): installs ctxstream and the
# wheels carried in .whl/ (pip download them here for the device's Python first), then runs
#   tests   the GPU tests (decoder, pipeline, loader on both sinks)
#   micro   bench/gpu_ttft.py's prepared-path, hidden-share and decode numbers (no TTFT grid)
#   grid    bench/gpu_ttft.py's TTFT grid through ContextLoader (keeps the micro numbers of an earlier run;
#           GRID_ARGS: more flags, e.g. '--gpu-graphs --json $OUT/gpu-ttft-graphs.json')
#   policies  the grid's recompute, slo and mpc cells only (keeps the fixed-level cells of an earlier run)
#   graphs  the hidden-share cell (16K, 64-token question) with CUDA-graph-captured chunks too (into $OUT only;
#           GRAPHS_ARGS: more flags, e.g. '--trace $OUT/trace' for the sink's host profile)
#   trace   the hidden-share cell's host/GPU time split and torch.profiler traces (into $OUT only)
# e.g. `bash scripts/device_gpu.sh tests micro`. Results go to bench/results/ and to $OUT.
set -euo pipefail
R="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
cd "$R"
py=python3
if [ -d .whl ]; then
    $py -m pip install -q --no-index --find-links .whl --break-system-packages \
        msgpack xxhash fastapi uvicorn httptools uvloop aiohttp "redis[hiredis]" pydantic pydantic-settings \
        prometheus-client pytest pytest-asyncio hypothesis httpx gguf 2>&1 | tail -3
fi
rm -rf /tmp/site
$py -m pip install -q --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -3
export PYTHONPATH=/tmp/site:$R  # ctxstream from the install, bench/ from the checkout (run from /tmp)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
for step in "$@"; do
    case "$step" in
    tests)  # (not the real-model test: the default model's package is larger than a carry)
        (cd /tmp && timeout "${TESTS_S:-300}" $py -m pytest -q -rf -c "$R/pyproject.toml" --rootdir "$R" -p no:cacheprovider \
            "$R/tests/test_gpu_pipeline.py" "$R/tests/test_gpu_decoder.py" "$R/tests/test_pipeline.py" \
            "$R/tests/test_loader.py" -k "not test_real_model_fp16_generation_matches_local_prefill" 2>&1 | tee "$OUT/tests-full.txt" | tail -25 | tee "$OUT/tests.txt") || true
        ;;
    micro)
        (cd /tmp && timeout "${MICRO_S:-560}" $py -m bench.gpu_ttft --no-grid --reps 2 --calib-segments 2 2>&1 | tee "$OUT/micro.txt" | tail -40)
        ;;
    grid)
        (cd /tmp && timeout "${GRID_S:-560}" $py -m bench.gpu_ttft --no-micro --reps 2 --cap-s 2.0 --calib-segments 2 \
            --keep "$R/bench/results/gpu-ttft-nvidia-h200.json" ${GRID_ARGS:-} 2>&1 | tee "$OUT/grid.txt" | tail -40)
        ;;
    policies)  # recompute, slo and mpc again; the fixed-level cells of the kept run stay
        (cd /tmp && timeout "${GRID_S:-560}" $py -m bench.gpu_ttft --no-micro --only-policies --reps 2 --cap-s 2.0 \
            --calib-segments 2 --keep "$R/bench/results/gpu-ttft-nvidia-h200.json" 2>&1 | tee "$OUT/policies.txt" | tail -40)
        ;;
    graphs)  # the hidden-share cell with the chunks' decodes captured as CUDA graphs, beside the launched ones
        (cd /tmp && timeout "${GRAPHS_S:-400}" $py -m bench.gpu_ttft --no-grid --reps 2 --calib-segments 2 \
            --contexts 16384 --questions 64 --levels "${GRAPHS_LEVELS:-fp16,q0,q2,q4}" \
            --json "$OUT/graphs.json" ${GRAPHS_ARGS:-} 2>&1 | tee "$OUT/graphs.txt" | tail -40) || true
        ;;
    trace)  # where the target cell's time goes: host/GPU split and profiler traces (to $OUT only)
        (cd /tmp && timeout "${TRACE_S:-400}" $py -m bench.gpu_ttft --no-grid --reps 2 --calib-segments 2 \
            --contexts 16384 --questions 64 --levels "${TRACE_LEVELS:-fp16,q0,q2,q4}" --trace "$OUT/trace" \
            --json "$OUT/trace.json" 2>&1 | tee "$OUT/trace.txt" | tail -40) || true
        gzip -f "$OUT"/trace/*.json || true
        ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
