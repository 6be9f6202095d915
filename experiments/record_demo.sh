#!/usr/bin/env bash
# Runs `make demo` from scratch and writes experiments/results/demo.md: the command, date,
# machine, dataset and the demo's own output, verbatim (progress bar excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
out=experiments/results/demo.md
log=$(mktemp)
make clean-demo >/dev/null
start=$(date +%s)
make demo 2>/dev/null | grep -v '^\(test -x\|\.venv/bin/python -m pip\|touch \)' > "$log"
elapsed=$(( $(date +%s) - start ))
{
  echo '# `make demo`'
  echo
  echo "- Command: \`bash experiments/record_demo.sh\` (runs \`make clean-demo && make demo\`)"
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); wall time ${elapsed} s (venv already built)"
  echo "- Machine: $(.venv/bin/python -m experiments.common); $(uptime | sed 's/.*load average/load average/') at the end"
  echo "- ISA flags, versions, native kernels: \`$(.venv/bin/python -m experiments.common --json | .venv/bin/python -c 'import json, sys; m = json.load(sys.stdin); print(json.dumps({k: m[k] for k in ("isa", "jax", "jaxlib", "native_kernels")}, separators=(",", ":")))')\`"
  echo '- Dataset: the embedded Fashion-MNIST subset (pemn_jax/data_files/fashion_mnist_subset: 10,000 train / 2,000 test, first 1,000 / 200 per class of the official files)'
  echo
  echo '```'
  cat "$log"
  echo '```'
} > "$out.tmp"
mv "$out.tmp" "$out"
rm -f "$log"
cat "$out"
