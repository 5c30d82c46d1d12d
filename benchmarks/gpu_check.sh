#!/usr/bin/env bash
# The GPU checks of issue 11, as one prepared script for one NVIDIA H100/H200 that can reach no
# network. It installs nothing from the network: the packages the GPU image lacks (pyro-ppl and
# arviz with their small dependencies) come as wheels in .whl/, fetched beforehand on a machine
# with a package registry.
#
#   benchmarks/gpu_check.sh wheels            # here, with a registry: fetch the wheels into .whl/
#   benchmarks/gpu_check.sh                   # there: the checks below, about 7 minutes
#   benchmarks/gpu_check.sh rehearse          # here, on a CPU: the same stages, tiny, to check
#                                             # the script before spending GPU minutes on it
#   benchmarks/gpu_check.sh disentangle [STEPS] [SEEDS]
#                                             # there: the β sweep of examples/disentangle.py
#   benchmarks/gpu_check.sh sweep [POINTS] [STEPS]
#                                             # there: benchmarks/bench_sweep.py on the GPU (K
#                                             # points one after another, in the pool, vmapped;
#                                             # the goal: 8 vmapped in <= 1.5x one), then a
#                                             # vmapped `ppl-vae sweep` and its sweep-report
#
# With the device tool: run `benchmarks/gpu_check.sh` with carry [".whl"] and timeout_s 600; the
# stages' limits add up to 560 s, so one call does it all (a lent GPU has 15 minutes, its start
# included). The stages, each under its own limit, most important first, everything printed and
# tee'd into $OUT/<stage>.log (six files; the run folders stay in /tmp):
#   machine    GPU, versions, and every package the checks import (stops here if one is missing)
#   precision  benchmarks/precision_check.py: float32 products under each precision policy
#   tests_gpu  tests/test_gpu.py: graphed Pyro steps (equal to eager, exact resume, NaN stop,
#              eager fallback), NumPyro convolutions inside the scan
#   bench      benchmarks/bench_step.py --device cuda at batches 128 and 4096 (`make bench
#              DEVICE=cuda` adds 1024), the dSprites conv step of both backends, the targets
#   cli        `ppl-vae compare` on the GPU (both backends side by side: ELBO, steps per second,
#              precision, how steps ran) and `ppl-vae eval` of the Pyro run on the GPU
#   tests      the rest of the suite with CUDA visible
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

if [ "${1:-}" = "wheels" ]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2 arviz==0.23.4 xarray-einstats==0.9.1 \
        h5netcdf==1.8.2 platformdirs==4.14.8
fi

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no .whl/ here: tests that need pyro-ppl or arviz will be skipped or fail"
    export PYTHONPATH=$PWD
fi

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, print its wall time and status
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    return "$rc"
}

if [ "${1:-}" = "disentangle" ]; then
    # 3 β x SEEDS seeds x STEPS steps with the NumPyro backend (its conv step is the faster one
    # on a GPU), metrics on the GPU. One call may run 600 s: when the sweep needs more, call the
    # same command again while the machine is warm: finished runs in /tmp/disentangle are re-used.
    stage disentangle 570 "$PY" examples/disentangle.py --backend numpyro --device cuda --full \
        --engine vmap --steps "${2:-30000}" --seeds "${3:-3}" --no-progress --out /tmp/disentangle
    cp /tmp/disentangle/table.md /tmp/disentangle/results.json /tmp/disentangle/*.png \
        /tmp/disentangle/sweep/sweep_report.md "$OUT"/ 2>/dev/null
    exit 0
fi

if [ "${1:-}" = "sweep" ]; then
    # about 5 minutes: each way of bench_sweep starts its own processes and compiles in them
    stage bench_sweep 420 "$PY" benchmarks/bench_sweep.py --device cuda --points "${2:-8}" \
        --steps "${3:-300}" --workers 4 --json "$OUT/bench_sweep.json"
    stage sweep_cli 150 bash -c "$PY -m ppl_vae.cli sweep vae_digits --backend numpyro \
        --engine vmap --device cuda --grid objective.beta=0.25,1,4 --seeds 2 \
        --set train.steps=1000 --out /tmp/gpu_sweep --overwrite --no-progress \
        && $PY -m ppl_vae.cli sweep-report /tmp/gpu_sweep --device cuda --iwae-k 100 \
        --no-progress && cp /tmp/gpu_sweep/sweep_report.md /tmp/gpu_sweep/*.png $OUT/"
    exit 0
fi

DEVICE=cuda BENCH=(--batch 128 4096 --steps 200 --warmup 40 --repeats 2) STEPS=5000
SUITE=(tests --ignore=tests/test_gpu.py --timeout 60)
if [ "${1:-}" = "rehearse" ]; then
    DEVICE=cpu BENCH=(--smoke) STEPS=200 SUITE=(tests/test_spec.py)
fi

stage machine 40 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c 'import sys, torch, jax, numpyro; print(sys.version.split()[0], \"torch\",
    torch.__version__, \"cuda\", torch.cuda.is_available(), \"jax\", jax.__version__,
    jax.devices(), \"numpyro\", numpyro.__version__)'
    $PY -c 'import importlib, sys
missing = []
for name in (\"torch\", \"jax\", \"numpyro\", \"flax\", \"optax\", \"pyro\", \"arviz\", \"sklearn\",
             \"tqdm\", \"matplotlib\", \"scipy\", \"xarray\", \"h5netcdf\", \"xdist\", \"pytest\"):
    try:
        importlib.import_module(name)
    except Exception as err:
        missing.append(f\"{name} ({type(err).__name__}: {err})\")
print(\"missing:\", \"; \".join(missing) if missing else \"none\")
sys.exit(1 if missing else 0)'" || { echo "a package is missing: carry .whl/ (see the top)"; exit 1; }
stage precision 40 "$PY" benchmarks/precision_check.py
# -p no:benchmark: the image's pytest-benchmark plugin breaks pytest-xdist
stage tests_gpu 90 "$PY" -m pytest -q -p no:benchmark -p no:cacheprovider -rs tests/test_gpu.py
stage bench 200 "$PY" benchmarks/bench_step.py --device "$DEVICE" "${BENCH[@]}"
# run folders stay in /tmp: the device tool brings back at most 8 files from $OUT
stage cli 60 bash -c "$PY -m ppl_vae.cli compare vae_digits --device $DEVICE --overwrite \
    --set train.steps=$STEPS --out /tmp/gpu_compare \
    && $PY -m ppl_vae.cli eval /tmp/gpu_compare/pyro --device $DEVICE --iwae-k 100 --no-progress"
stage tests 130 "$PY" -m pytest -q -n 8 -p no:benchmark -p no:cacheprovider -rs "${SUITE[@]}"
echo; echo "gpu_check done in $SECONDS s; logs in $OUT"
