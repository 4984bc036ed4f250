#!/usr/bin/env bash
# The checks a machine with a CUDA GPU is for, in one call (a lent GPU's time is short):
#   1. what the machine is (card, driver, torch, numba, CPU);
#   2. the tests whose CUDA legs run over the CPU test double in CI, now on the card
#      (ASTOLFO_TEST_CUDA=real: tests/cuda_double.runtime), and the end-to-end device = "cuda"
#      merges against the CPU's bytes (tests/merge/test_cuda_card.py); the geometric median's
#      kernels compiled by NVRTC against the CPU route's bits (tests/methods/test_median_device.py);
#   3. the cached merge (bench_merge: astolfo on the CPU and on the card, the plain loop) and the
#      medians (bench_methods --device cuda, with sd-mecha on the card), written to their own
#      sections of docs/benchmarks.md.
# Usage: bash bench/gpu_check.sh OUTDIR. Each step has its own time limit and log in OUTDIR, and
# a failed step does not stop the next. Packages the machine lacks may come as wheels in .whl/.
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/wheels.txt" 2>&1 || echo "wheels: install failed (see wheels.txt)"
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: its output in OUTDIR/NAME.txt, a one-line verdict and its tail here
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    echo "== $name: exit $rc in $((SECONDS - t0)) s"
    tail -n "${TAIL:-4}" "$OUT/$name.txt"
}

TAIL=12 step machine 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  $PY -c 'import torch, numba, numpy; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
    torch.cuda.get_device_name(0), \"numba\", numba.__version__, \"numpy\", numpy.__version__)';
  lscpu | grep -E \"Model name|^CPU\\(s\\)\"; free -g | head -2; df -h /tmp | tail -1"
step kernels 90 "$PY" -c "from engine.kernels import warm; warm.warm()"  # compiled once, read by every worker
TAIL=25 step tests "${TESTS_S:-240}" env ASTOLFO_TEST_CUDA=real "$PY" -m pytest -q -p no:cacheprovider \
    -n "${WORKERS:-12}" -W ignore::pytest.PytestConfigWarning \
    tests/merge/test_cuda_card.py tests/merge/test_merge_over_cuda_double.py \
    tests/methods/test_streamed_methods_on_the_card.py tests/methods/test_median_on_the_card.py \
    tests/methods/test_median_device.py \
    tests/compare/test_cuda_pass.py tests/merge/test_devices.py tests/merge/test_devices_nvml.py
TAIL=20 step bench_methods "${METHODS_S:-200}" "$PY" bench/bench_methods.py --device cuda --n 16 --mecha-n 16 \
    --methods ${METHODS:-mean,geometric_median,tgmd} --data /dev/shm/bench-methods --section "medians on a CUDA card (bench/gpu_check.sh)"
cp docs/benchmarks.md "$OUT/benchmarks.md"
TAIL=20 step bench_merge "${MERGE_S:-120}" "$PY" bench/bench_merge.py --runs cached --engines astolfo,astolfo-cuda,plain \
    --data /tmp/bench-merge --section "merge on a CUDA card (bench/gpu_check.sh)"
cp docs/benchmarks.md "$OUT/benchmarks.md"
