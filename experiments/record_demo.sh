#!/usr/bin/env bash
# Runs `make demo` from scratch and writes experiments/results/NAME.md: the command, date,
# machine, dataset and the demo's own output, verbatim (progress bar excluded).
#   bash experiments/record_demo.sh [NAME [FLAG ...]]
# NAME (default demo) names the record, experiments/results/NAME.md, and the workdir,
# workdirs/NAME; the FLAGs go to the demo (DEMO_FLAGS), e.g. --config.model.dtype=bfloat16.
set -euo pipefail
cd "$(dirname "$0")/.."
args="$*"
name=${1:-demo}
[ $# -gt 0 ] && shift
flags="$*"
case "$name" in
  '' | */* | .*) echo "record_demo.sh: NAME must be a plain file name, got '$name'" >&2; exit 2 ;;
esac
out=experiments/results/$name.md
log=$(mktemp)
make clean-demo WORKDIR="workdirs/$name" >/dev/null
start=$(date +%s)
make demo WORKDIR="workdirs/$name" DEMO_FLAGS="$flags" 2>/dev/null \
  | grep -v '^\(test -x\|\.venv/bin/python -m pip\|touch \)' > "$log"
elapsed=$(( $(date +%s) - start ))
{
  echo '# `make demo`'
  echo
  echo "- Command: \`bash experiments/record_demo.sh${args:+ $args}\` (runs \`make clean-demo && make demo\` with WORKDIR=workdirs/$name${flags:+ DEMO_FLAGS='$flags'})"
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); wall time ${elapsed} s (venv already built)"
  echo "- Machine: $(.venv/bin/python -m experiments.common); $(uptime | sed 's/.*load average/load average/') at the end"
  echo "- ISA flags, versions, native kernels: \`$(.venv/bin/python -m experiments.common --json | .venv/bin/python -c 'import json, sys; m = json.load(sys.stdin); print(json.dumps({k: m[k] for k in ("isa", "jax", "jaxlib", "native_kernels", "gemm_library")}, separators=(",", ":")))')\`"
  echo '- Dataset: the embedded Fashion-MNIST subset (pemn_jax/data_files/fashion_mnist_subset: 10,000 train / 2,000 test, first 1,000 / 200 per class of the official files)'
  echo
  echo '```'
  cat "$log"
  echo '```'
} > "$out.tmp"
mv "$out.tmp" "$out"
rm -f "$log"
cat "$out"
