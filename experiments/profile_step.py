"""Where a train step's time goes: op time per kind of op, from a ``jax.profiler`` trace.

  python -m experiments.profile_step [--config PATH] [--config.FIELD=VALUE ...] [--batch-size N]
                                     [--steps N] [--warmup N] [--dtypes float32,bfloat16] [--json]

Builds the library's own train step as ``experiments.bench_step`` does (the masked
ConvMixer-256/8 on synthetic CIFAR-shaped input, batch 128, by default), runs ``--warmup`` steps
(default 5: enough for the allocation cache of ``pemn_jax.native.process`` to hold its blocks),
then traces ``--steps`` steps and sums the duration of every XLA op executed on the CPU's
threads (the main thread and XLA's intra-op pool), grouped by kind:

  * ``native:NAME``: a pemn-jax native kernel (an XLA FFI custom call ``pemn_NAME``);
  * ``dot``: matrix products (XLA dots, convolutions, and library GEMM calls XLA emits);
  * ``fusion``: XLA's fused elementwise / reduction loops (BatchNorm math, GELU, the optimizer,
    converts, residual adds, ...);
  * ``copy``: copies and transposes; ``other``: the rest.

Op time is summed over the threads that ran the ops (``op_ms_total`` beside ``step_wall_ms``;
``op_share`` is each kind's part of the total). Under load from other processes every op
stretches, so compare the shares, not the times, between machines or runs; and time a step
with ``experiments.bench_step``, not with this (tracing costs a little).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import re
import sys
import tempfile
import time

from experiments import bench_step, common

# The trace names each op by its HLO instruction ('fusion.12', 'ffi_call.3', 'ynn_fusion.4',
# 'copy.7'), and marks its end with an 'end: NAME' event; the executor's own events are skipped.
_SKIP = ('end: ', 'ThunkExecutor', 'ThreadpoolListener', 'SlinkyThreadPool', '$')
_DOT = re.compile(r'^(dot|convolution|ynn_fusion|xnn_fusion|onednn|__onednn)')
_COPY = re.compile(r'^(copy|transpose|bitcast|broadcast|concatenate|slice|pad|reverse)\b')


def custom_call_targets(hlo_text: str) -> dict[str, str]:
  """``{instruction name: custom-call target}`` of a compiled module's HLO text."""
  pattern = r'([\w.\-]+) = [^\n]*?custom-call\([^\n]*?custom_call_target="([^"]+)"'
  return dict(re.findall(pattern, hlo_text))


def kind_of(name: str, targets: dict[str, str]) -> str | None:
  """The kind (see the module docstring) of the op an event of this name ran; None for the
  executor's own events."""
  if name.startswith(_SKIP) or not name:
    return None
  if name in targets:
    target = targets[name]
    return f'native:{target[len("pemn_") :]}' if target.startswith('pemn_') else f'call:{target}'
  if _DOT.match(name):
    return 'dot'
  if _COPY.match(name):
    return 'copy'
  if 'fusion' in name or name.startswith('wrapped_'):
    return 'fusion'
  return 'other'


def profile(config, batch_size: int, steps: int, warmup: int = 5) -> dict:
  """Traces ``steps`` steps of ``config``'s masked train step: op milliseconds per kind per
  step, summed over the threads that ran them (a native kernel's own helper tasks on XLA's pool
  are inside its event on the calling thread, so its time is the kernel's wall time)."""
  import jax

  compiled, state, frozen, batch, _, _ = bench_step.build_step(
    config, batch_size, masked=True, count_flops=False
  )
  targets = custom_call_targets(compiled.as_text())
  # Warm-up steps past the second are dispatched without waiting, as a training loop does: XLA
  # may then allocate a step's scratch buffer before the last one is freed, so the allocation
  # cache maps the two buffers it keeps now rather than during the trace (a new block's first
  # touch costs seconds on some VMs).
  for i in range(warmup):
    state, metrics = compiled(state, frozen, batch)
    if i < 2:
      jax.block_until_ready((state, metrics))
  jax.block_until_ready((state, metrics))
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, frozen, batch)
      jax.block_until_ready((state, metrics))
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(d, '**', '*.xplane.pb'), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  per_kind: collections.Counter = collections.Counter()
  for plane in data.planes:
    if plane.name != '/host:CPU':
      continue
    for line in plane.lines:
      if line.name == 'python':
        continue
      for e in line.events:
        kind = kind_of(e.name, targets)
        if kind is not None:
          per_kind[kind] += e.duration_ns / 1e6 / steps
  total = sum(per_kind.values())
  return {
    'dtype': config.model.dtype,
    'step_wall_ms': wall * 1e3,
    'op_ms_per_step': dict(per_kind.most_common()),
    'op_ms_total': total,
    'op_share': {k: v / total for k, v in per_kind.most_common()},
  }


def format_table(rows: list[dict]) -> str:
  kinds = list(dict.fromkeys(k for r in rows for k in r['op_ms_per_step']))
  head = '| kind | ' + ' | '.join(f'{r["dtype"]} ms (share)' for r in rows) + ' |'
  lines = [head, '|---|' + '---|' * len(rows)]
  for k in kinds:
    cells = [
      f'{r["op_ms_per_step"].get(k, 0.0):.1f} ({r["op_share"].get(k, 0.0):.1%})' for r in rows
    ]
    lines.append(f'| {k} | ' + ' | '.join(cells) + ' |')
  lines.append('| all ops | ' + ' | '.join(f'{r["op_ms_total"]:.1f}' for r in rows) + ' |')
  lines.append('| step wall | ' + ' | '.join(f'{r["step_wall_ms"]:.1f}' for r in rows) + ' |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m experiments.profile_step', description=__doc__)
  p.add_argument('--config', default=bench_step.DEFAULT_CONFIG)
  p.add_argument('--batch-size', type=int, default=128)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--warmup', type=int, default=5, help='untraced steps first (default 5)')
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--json', action='store_true', help='print one JSON object')
  args, overrides = common.parse_args(p, argv)
  rows = []
  for dtype in args.dtypes.split(','):
    config = common.load_config(args.config, [*overrides, f'--config.model.dtype={dtype}'])
    rows.append(profile(config, args.batch_size, args.steps, args.warmup))
  out = {'rows': rows, 'machine': common.machine_line(common.machine()), 'config': args.config}
  out['command'] = common.command_line('experiments.profile_step')
  out['date'] = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
  out['allocation_cache'] = bench_step.allocation_cache()
  out['machine_info'] = common.machine()
  out['batch_size'] = args.batch_size
  print(json.dumps(out, indent=2) if args.json else f'{out["machine"]}\n{format_table(rows)}')
  return 0


if __name__ == '__main__':
  from pemn_jax.native import process

  process.reexec_tuned('experiments.profile_step')  # huge pages and the allocation cache
  sys.exit(main())
