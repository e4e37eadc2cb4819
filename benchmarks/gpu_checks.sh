#!/usr/bin/env bash
# Every check that needs a GPU, in one bounded run: the Triton backend's tests on CUDA, then
# benchmarks/bench_gpu.py, benchmarks/bench_dcnv3_v4.py and `deformconv demo --quick` (which
# needs Pillow, matplotlib and tqdm).  Needs torch, triton, pytest and hypothesis (torchvision
# if it is to be compared); runs from the source tree without installing.  Logs and tables go
# to $OUT.
#
#   OUT=gpu-results benchmarks/gpu_checks.sh [bench_gpu.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
TEST_SECONDS=${TEST_SECONDS:-240}
BENCH_SECONDS=${BENCH_SECONDS:-300}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "environment"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'triton', triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/env.log"

stamp "tests (at most ${TEST_SECONDS}s)"
timeout "$TEST_SECONDS" python3 -m pytest -q -p no:cacheprovider --maxfail=15 \
    tests/test_triton_gpu.py tests/test_dcnv3_gpu.py tests/test_triton_backend.py \
    > "$OUT/tests.log" 2>&1
echo "pytest exit status $?" >> "$OUT/tests.log"
grep -E "passed|failed|error|FAILED|ERROR|exit status" "$OUT/tests.log" | tail -25

stamp "benchmark (at most ${BENCH_SECONDS}s)"
timeout "$BENCH_SECONDS" python3 benchmarks/bench_gpu.py --budget $((BENCH_SECONDS - 40)) \
    --out "$OUT/bench.md" --csv "$OUT/bench.csv" "$@" > "$OUT/bench.log" 2>&1
echo "bench exit status $?" >> "$OUT/bench.log"
tail -5 "$OUT/bench.log"
cat "$OUT/bench.md" 2>/dev/null

stamp "DCNv3/DCNv4 benchmark (at most ${DCNV3_SECONDS:-120}s)"
timeout "${DCNV3_SECONDS:-120}" python3 benchmarks/bench_dcnv3_v4.py \
    --budget $((${DCNV3_SECONDS:-120} - 20)) --csv "$OUT/dcnv3.csv" > "$OUT/dcnv3.log" 2>&1
echo "dcnv3 bench exit status $?" >> "$OUT/dcnv3.log"
tail -30 "$OUT/dcnv3.log"

stamp "demo --quick on the GPU (at most ${DEMO_SECONDS:-120}s)"
timeout "${DEMO_SECONDS:-120}" python3 -m deformconv demo --quick --device cuda --no-progress \
    --out "$OUT/demo" > "$OUT/demo.log" 2>&1
echo "demo exit status $?" >> "$OUT/demo.log"
tail -12 "$OUT/demo.log"

stamp "atomic and matrix instructions in the compiled kernels (PTX)"
for f in $(find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name "deform_conv2d_*.ptx" 2>/dev/null); do
    echo "$(basename "$f"): $(grep -oE '(red|atom)\.[a-z0-9.]+|wgmma\.[a-z0-9.]+|mma\.sync\.[a-z0-9.]+' "$f" \
        | sort | uniq -c | tr '\n' ' ')"
done | sort | uniq | head -40 | tee "$OUT/ptx.log"
stamp "done"
