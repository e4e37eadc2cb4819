#!/usr/bin/env bash
# Every check that needs a GPU, in one bounded run: the Triton backend's tests on CUDA, then
# benchmarks/bench_gpu.py, benchmarks/bench_dcnv3_v4.py, benchmarks/bench_3d.py on the
# GPU (the torch backend, deform_conv3d's only GPU path) and `deformconv demo --quick` (which
# needs Pillow, matplotlib and tqdm).  Needs torch, triton, pytest and hypothesis (torchvision
# if it is to be compared); runs from the source tree without installing.  Logs and tables go
# to $OUT.
#
#   OUT=gpu-results benchmarks/gpu_checks.sh [bench_gpu.py arguments]
#
# Each step is bounded by its variable's seconds (0 skips it): TEST_SECONDS (150),
# BENCH_SECONDS (180), DCNV3_SECONDS (120), BENCH3D_SECONDS (40), DEMO_SECONDS (60); the
# defaults fit one 10-minute call.  TEST_WORKERS runs the tests in that many processes (default 8 where pytest-xdist is
# installed, else 1; Triton compiles in parallel then); DCNV3_ARGS go to bench_dcnv3_v4.py;
# DEMO_OUT is where the demo writes (default $OUT/demo).  PACK=1 finally packs everything in
# $OUT into one $OUT/gpu-checks.tar.gz (for a runner that brings back only a few files); the
# summaries are printed either way.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
TEST_SECONDS=${TEST_SECONDS:-150}
BENCH_SECONDS=${BENCH_SECONDS:-180}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "environment"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/env.log"

DCNV3_SECONDS=${DCNV3_SECONDS:-120}
DEMO_SECONDS=${DEMO_SECONDS:-60}
BENCH3D_SECONDS=${BENCH3D_SECONDS:-40}
if [ -z "${TEST_WORKERS:-}" ]; then
    TEST_WORKERS=1
    python3 -c "import xdist" 2>/dev/null && TEST_WORKERS=8
fi
workers=()
[ "$TEST_WORKERS" -gt 1 ] && workers=(-n "$TEST_WORKERS")

if [ "$TEST_SECONDS" -gt 0 ]; then
    stamp "tests (at most ${TEST_SECONDS}s)"
    timeout "$TEST_SECONDS" python3 -m pytest -q -p no:cacheprovider --maxfail=15 "${workers[@]}" \
        tests/test_dcnv3_gpu.py tests/test_triton_gpu.py tests/test_triton_backend.py \
        > "$OUT/tests.log" 2>&1
    echo "pytest exit status $?" >> "$OUT/tests.log"
    grep -E "passed|failed|error|FAILED|ERROR|exit status" "$OUT/tests.log" | tail -25
fi

if [ "$BENCH_SECONDS" -gt 0 ]; then
    stamp "benchmark (at most ${BENCH_SECONDS}s)"
    timeout "$BENCH_SECONDS" python3 benchmarks/bench_gpu.py --budget $((BENCH_SECONDS - 40)) \
        --out "$OUT/bench.md" --csv "$OUT/bench.csv" "$@" > "$OUT/bench.log" 2>&1
    echo "bench exit status $?" >> "$OUT/bench.log"
    tail -5 "$OUT/bench.log"
    cat "$OUT/bench.md" 2>/dev/null
fi

if [ "$DCNV3_SECONDS" -gt 0 ]; then
    stamp "DCNv3/DCNv4 benchmark (at most ${DCNV3_SECONDS}s)"
    timeout "$DCNV3_SECONDS" python3 benchmarks/bench_dcnv3_v4.py ${DCNV3_ARGS:-} \
        --budget $((DCNV3_SECONDS - 20)) --csv "$OUT/dcnv3.csv" > "$OUT/dcnv3.log" 2>&1
    echo "dcnv3 bench exit status $?" >> "$OUT/dcnv3.log"
    tail -40 "$OUT/dcnv3.log"
fi

if [ "$BENCH3D_SECONDS" -gt 0 ]; then
    stamp "3-D benchmark on the GPU, torch backend (at most ${BENCH3D_SECONDS}s)"
    timeout "$BENCH3D_SECONDS" python3 benchmarks/bench_3d.py --device cuda \
        --csv "$OUT/bench3d.csv" > "$OUT/bench3d.log" 2>&1
    echo "3-D bench exit status $?" >> "$OUT/bench3d.log"
    tail -8 "$OUT/bench3d.log"
fi

if [ "$DEMO_SECONDS" -gt 0 ]; then
    stamp "demo --quick on the GPU (at most ${DEMO_SECONDS}s)"
    timeout "$DEMO_SECONDS" python3 -m deformconv demo --quick --device cuda --no-progress \
        --out "${DEMO_OUT:-$OUT/demo}" > "$OUT/demo.log" 2>&1
    echo "demo exit status $?" >> "$OUT/demo.log"
    ls -l "${DEMO_OUT:-$OUT/demo}" >> "$OUT/demo.log" 2>&1
    tail -12 "$OUT/demo.log"
fi

stamp "atomic and matrix instructions in the compiled kernels (PTX)"
for f in $(find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name "deform_conv2d_*.ptx" 2>/dev/null); do
    echo "$(basename "$f"): $(grep -oE '(red|atom)\.[a-z0-9.]+|wgmma\.[a-z0-9.]+|mma\.sync\.[a-z0-9.]+' "$f" \
        | sort | uniq -c | tr '\n' ' ')"
done | sort | uniq | head -40 > "$OUT/ptx.log"
echo "$(wc -l < "$OUT/ptx.log") kernel variants listed in $OUT/ptx.log"
if [ "${PACK:-0}" = 1 ]; then  # tar removes exactly what it packed
    pack=$(mktemp)
    (cd "$OUT" && tar -czf "$pack" --remove-files -- *) && mv "$pack" "$OUT/gpu-checks.tar.gz" \
        && stamp "packed into $OUT/gpu-checks.tar.gz"
fi
stamp "done"
