#!/usr/bin/env bash
# The accelerator check: one command that runs what makes sense on a GPU, on whatever
# JAX backend the machine has (a GPU, or the CPU here), and writes every output under one folder.
#
#   bash experiments/device_check.sh [--quick] [--wheels DIR]   # the check
#   bash experiments/device_check.sh --download [--wheels DIR]  # fill DIR with the wheels first
#
# Steps (each timed; a failing step is recorded and the next one still runs; the exit status is
# that of the first failure):
#   0. install the Python packages the image lacks from wheels in DIR (--wheels, else
#      $PEMN_DEVICE_WHEELS, else experiments/device_wheels/; ignored by git: --download fills it
#      here with `pip download`, for CPython 3.12 manylinux x86-64, the GPU image's Python) into
#      a private target folder on PYTHONPATH, when a needed module does not import;
#   1. the machine (experiments.common --json, nvidia-smi);
#   2. the test files that make sense on any backend (layers, masking, models, conv formulations,
#      steps, mask_model, strategies, bf16, api), not the slow ones;
#   3. trains the smoke config and the demo (experiments.demo: accuracy and storage table);
#   4. bench_step in fp32 and bf16 at batch 512 (ConvMixer-256/8), with the device's measured fp32
#      and bf16 matmul peaks, and experiments.topk_share: the share of the step spent on the masks.
# --quick: the same steps at toy sizes (a few minutes on 2 CPU cores): fewer tests, 5 smoke steps,
# 1 demo epoch, the demo config at batch 32 for the bench. Each step has a time limit (together
# 8 minutes at most, plus the install). Outputs: $OUT if set (the device tool's folder that comes
# back), else workdirs/device_check/; summary.txt there has one line per step.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
DOWNLOAD=0
WHEELS=${PEMN_DEVICE_WHEELS:-experiments/device_wheels}
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --download) DOWNLOAD=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#--wheels=} ;;
    -h | --help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi

# The packages pemn-jax needs that the GPU image (Python 3.12, jax 0.11.2, flax, optax, orbax,
# chex, numpy, pytest, hypothesis, ...) lacks, at this repository's pinned versions. All are
# pure Python but dm-tree and array_record.
WHEEL_SPECS=(
  tensorflow-datasets==4.9.10 array_record==0.8.6 ml_collections==1.1.0
  importlib_resources==7.1.0 tensorboardX==2.6.5 dm-tree==0.1.10 docstring_parser==0.18.0
  googleapis-common-protos==1.76.0 immutabledict==4.3.1 promise==2.3 simple-parsing==0.1.9
  tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2
)

if [ $DOWNLOAD = 1 ]; then
  mkdir -p "$WHEELS"
  for spec in "${WHEEL_SPECS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$WHEELS" "$spec" ||
      "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$spec" || {
        echo "device_check.sh: no wheel for $spec" >&2
        exit 1
      } # an sdist-only package (promise): built here, pure Python
  done
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  exit 0
fi

# What comes back: at most 7 files in OUTDIR (the device tool returns 8 files at most):
# summary.txt, machine.json, nvidia-smi.txt, steps.log (every step's output, in order),
# bench_step.json, bench_step.txt, topk_share.json. Workdirs and per-step logs go to WORK.
OUTDIR=${OUT:-workdirs/device_check}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
if [ -n "${OUT:-}" ]; then WORK=${TMPDIR:-/tmp}/pemn_device_check; else WORK=$OUTDIR/work; fi
rm -rf "$WORK"
mkdir -p "$WORK"
SUMMARY=$OUTDIR/summary.txt
: >"$SUMMARY"
: >"$OUTDIR/steps.log"
STATUS=0
export PYTHONUNBUFFERED=1 GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}

# step NAME LIMIT_S COMMAND...: runs it with a time limit, output to $OUTDIR/NAME.log (and the
# tail to the terminal and all of it to steps.log), one summary line. With JSON=1: stdout to
# $OUTDIR/NAME.json, stderr to the log.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$OUTDIR/steps.log"
  if [ "${JSON:-0}" = 1 ]; then
    timeout "$limit" "$@" >"$OUTDIR/$name.json" 2>"$WORK/$name.log"
  else
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  fi
  local rc=$?
  cat "$WORK/$name.log" >>"$OUTDIR/steps.log"
  tail -n 25 "$WORK/$name.log"
  echo "$name rc=$rc $((SECONDS - t0)) s: $*" | tee -a "$SUMMARY"
  if [ $rc != 0 ] && [ $STATUS = 0 ]; then STATUS=$rc; fi
  return 0
}

# 0. Missing packages from the carried wheels.
NEEDED='import tensorflow_datasets, ml_collections, tensorboardX, flax, optax, orbax.checkpoint, chex'
if ! "$PY" -c "$NEEDED" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=${TMPDIR:-/tmp}/pemn_device_site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c "$NEEDED" || {
    echo "device_check.sh: missing packages and no wheels in $WHEELS (run --download here)" >&2
    exit 1
  }
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} # pemn_jax and experiments from this tree

# 1. The machine.
"$PY" -m experiments.common --json >"$OUTDIR/machine.json" 2>>"$OUTDIR/steps.log"
"$PY" -m experiments.common | tee -a "$SUMMARY"
command -v nvidia-smi >/dev/null && nvidia-smi >"$OUTDIR/nvidia-smi.txt" 2>&1
BACKEND=$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null)
echo "backend $BACKEND, python $("$PY" -c 'import sys; print(sys.version.split()[0])')" |
  tee -a "$SUMMARY"

# 2. Tests.
if [ $QUICK = 1 ]; then
  TESTS=(tests/test_layers.py tests/test_masking.py tests/test_bf16.py)
else
  TESTS=(tests/test_layers.py tests/test_masking.py tests/test_models.py tests/test_ops.py
    tests/test_steps.py tests/test_mask_model.py tests/test_strategies.py tests/test_bf16.py
    tests/test_api.py)
fi
step tests 120 "$PY" -m pytest -q -m 'not slow' -p no:cacheprovider "${TESTS[@]}"

# 3. Training: the smoke config and the demo.
SMOKE=(--config=pemn_jax/configs/smoke.py "--workdir=$WORK/smoke")
DEMO=(--workdir "$WORK/demo")
if [ $QUICK = 1 ]; then
  SMOKE+=(--config.train.num_steps=5)
  DEMO+=(--config.train.num_epochs=1)
fi
step smoke 60 "$PY" -m pemn_jax.main train "${SMOKE[@]}"
step demo 100 "$PY" -m experiments.demo "${DEMO[@]}"

# 4. Speed: fp32 and bf16 side by side, against this device's measured matmul peaks; the masks'
# share of the step. On a GPU: batch 512, larger peak sizes, no RSS children (host memory).
if [ $QUICK = 1 ]; then
  BENCH=(--quick --config pemn_jax/configs/demo.py --batch-size 32)
  SHARE=(--config pemn_jax/configs/demo.py --batch-size 32 --steps 3)
elif [ "$BACKEND" = cpu ]; then
  BENCH=(--batch-size 512 --small-config '' --steps 5)
  SHARE=(--batch-size 512 --steps 5)
else
  BENCH=(--batch-size 512 --small-config '' --steps 20 --rss '' --peak-sizes 4096,8192,16384)
  SHARE=(--batch-size 512 --steps 20)
fi
JSON=1 step bench_step 200 "$PY" -m experiments.bench_step "${BENCH[@]}" --json
if [ -s "$OUTDIR/bench_step.json" ]; then
  "$PY" -c "import json, sys; from experiments import bench_step
print(bench_step.format_table(json.load(open(sys.argv[1]))))" "$OUTDIR/bench_step.json" \
    >"$OUTDIR/bench_step.txt" 2>&1
  cat "$OUTDIR/bench_step.txt"
  grep -E '^(float32|bfloat16) matmul peak' "$OUTDIR/bench_step.txt" >>"$SUMMARY"
  grep -E '^\| .* \| (masked|dense) \| [0-9.-]+ \| [0-9.-]+ \| ' "$OUTDIR/bench_step.txt" |
    tail -n 2 >>"$SUMMARY"   # the fp32-vs-bf16 rows
fi
JSON=1 step topk_share 60 "$PY" -m experiments.topk_share "${SHARE[@]}" --json
"$PY" -c "import json, sys; r = json.load(open(sys.argv[1]))
print(f'top-k share of the masked step: {r[\"share_by_difference\"]:.1%} by difference '
      f'({r[\"step_s\"]:.4f} vs {r[\"step_threshold_masks_s\"]:.4f} s), masks alone '
      f'{r[\"masks_s\"] * 1e3:.2f} ms = {r[\"share_masks_alone\"]:.1%} of the step')" \
  "$OUTDIR/topk_share.json" 2>&1 | tee -a "$SUMMARY"

echo "=== summary ($SUMMARY)"
cat "$SUMMARY"
exit $STATUS
