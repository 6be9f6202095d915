"""Benchmark of ``model.remat_blocks`` (or of the native kernels): the masked train step under
each choice, side by side.

  python -m experiments.bench_remat [--compare remat|native] [--steps N] [--rounds N]
                                    [--rows 0,1,2,3] [--json]

``--compare native`` measures instead the pure-XLA step (``model.native_kernels=none``: XLA's
conv formulations, TopK, GELU and BatchNorm), the step with every ``pemn_jax.native`` kernel but
the fused GELU+BatchNorm (``model.native_kernels=depthwise,topk``), the default step with all of
them (``auto``), and the latter with ``remat_blocks=save_convs``, the same way (one process per
variant, alternated). Each variant is a list of ``--config.FIELD=VALUE`` overrides passed to its
process.

``model.remat_blocks`` ('save_convs' or 'full') runs a ConvMixer's or ViT's identical blocks as
one ``lax.scan`` with a rematerialised body (``pemn_jax.models.remat``): the backward keeps each
block's input (and, with 'save_convs', its conv and dense outputs) and recomputes the rest one
block at a time.
It trades recomputation for memory, so this measures, for three ConvMixer sizes and a ViT at
batch 128, 'none' (the default), 'save_convs' and 'full':

  * ConvMixer-256/8, patch 2, 32x32x3 (the default model of ``bench_step.py``);
  * ConvMixer-128/4, patch 4, 32x32x3 (the CIFAR-10 grid's model);
  * the demo's ConvMixer-96/4, patch 2, 28x28x1;
  * the masked ViT-256/6, patch 4, 32x32x3 (``pemn_jax/configs/vit_cifar10.py``).

Each variant runs in its own fresh process (it trains only that variant: the peak RSS is its
own), and the processes alternate none, save_convs, full, none, ... (``--rounds``), so that load
from other processes hits all alike. Alternating the variants step by step inside ONE process
is biased here: XLA:CPU mallocs its temp buffer every step, and the plain step (2.6 GB temp)
ran 1.6-2x slower when it alternated with a remat step than when it ran alone.
Per row: compile time, median step time over all rounds, XLA temp buffer
(``memory_analysis``), peak RSS, and the ratios to 'none'. The values are equal across the
variants up to float reassociation (``tests/test_models.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from experiments import bench_step, common

ROWS = (
  ('ConvMixer-256/8 p2, 32x32x3', bench_step.DEFAULT_CONFIG, []),
  (
    'ConvMixer-128/4 p4, 32x32x3',
    bench_step.DEFAULT_CONFIG,
    ['--config.model.dim=128', '--config.model.depth=4', '--config.model.patch_size=4'],
  ),
  ('demo ConvMixer-96/4 p2, 28x28x1', bench_step.SMALL_CONFIG, []),
  (
    'ViT-256/6 p4, 32x32x3',
    os.path.join(bench_step.REPO, 'pemn_jax', 'configs', 'vit_cifar10.py'),
    [],
  ),
)


# Per comparison: variant -> the config overrides of its process (on top of the row's). The
# first variant is the baseline of the ratios.
COMPARISONS = {
  'remat': {
    'none': ['--config.model.remat_blocks=none'],
    'save_convs': ['--config.model.remat_blocks=save_convs'],
    'full': ['--config.model.remat_blocks=full'],
  },
  'native': {
    'xla': ['--config.model.remat_blocks=none', '--config.model.native_kernels=none'],
    'native, XLA GELU+BN': [
      '--config.model.remat_blocks=none',
      '--config.model.native_kernels=depthwise,topk',
    ],
    'native': ['--config.model.remat_blocks=none', '--config.model.native_kernels=auto'],
    'native+save_convs': [
      '--config.model.remat_blocks=save_convs',
      '--config.model.native_kernels=auto',
    ],
  },
}


def child(row: int, variant: list[str], batch_size: int, steps: int, copts: dict) -> dict:
  """In this process: build one variant (the row's config with the ``variant`` overrides),
  train ``WARMUP + steps`` steps, report times and RSS."""
  from pemn_jax import native

  _, config_path, overrides = ROWS[row]
  config = bench_step.load_config(config_path, [*overrides, *variant])
  spec = config.model.get('native_kernels', 'auto')
  # The switch acts at trace time, and build_step traces and compiles a fresh jitted step.
  with native.kernels(spec) as active:
    step, state, frozen, batch, compile_s, _ = bench_step.build_step(
      config, batch_size, True, compiler_options=copts, count_flops=False
    )
  times = bench_step.run_steps(
    {'v': dict(step=step, state=state, frozen=frozen, batch=batch)}, steps
  )['v']
  return {
    'compile_s': compile_s,
    'step_times_s': times,
    'temp_mb': step.memory_analysis().temp_size_in_bytes / 2**20,
    'peak_rss_mb': bench_step.peak_rss_mb(),
    'native': native.available(),
    'native_kernels_on': sorted(active) if native.available() else [],
  }


def run_child(row: int, variant: list[str], batch_size: int, steps: int, copts: dict) -> dict:
  cmd = [
    sys.executable,
    '-m',
    'experiments.bench_remat',
    '--_child',
    str(row),
    '--batch-size',
    str(batch_size),
    '--steps',
    str(steps),
    *variant,
  ]
  out = subprocess.run(
    cmd,
    cwd=bench_step.REPO,
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, 'PEMN_BENCH_COPTS': json.dumps(copts)},
  )
  if out.returncode != 0:
    raise RuntimeError(f'child {cmd} failed:\n{out.stderr[-2000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def bench_row(
  row: int, batch_size: int, steps: int, rounds: int, copts: dict, compare: str = 'remat'
) -> dict:
  """Every variant of one row, each in fresh processes, alternated for ``rounds`` rounds."""
  name, config_path, overrides = ROWS[row]
  variants_def = COMPARISONS[compare]
  runs = {v: [] for v in variants_def}
  for _ in range(rounds):
    for v, variant in variants_def.items():
      runs[v].append(run_child(row, variant, batch_size, steps, copts))
  variants = {}
  for v, rs in runs.items():
    variants[v] = {
      'step_s': statistics.median(t for r in rs for t in r['step_times_s']),
      'step_times_s': [r['step_times_s'] for r in rs],
      'compile_s': statistics.median(r['compile_s'] for r in rs),
      'temp_mb': rs[0]['temp_mb'],
      'peak_rss_mb': max(r['peak_rss_mb'] for r in rs),
      'native_kernels': rs[0].get('native', False),
      'native_kernels_on': rs[0].get('native_kernels_on', []),
      'overrides': variants_def[v],
    }
  base = variants[next(iter(variants_def))]
  for d in variants.values():  # keys keep their first names ('none' = the baseline)
    d['step_over_none'] = d['step_s'] / base['step_s']
    d['rss_over_none'] = d['peak_rss_mb'] / base['peak_rss_mb']
  return {
    'row': name,
    'config': os.path.relpath(config_path, bench_step.REPO),
    'overrides': overrides,
    'batch_size': batch_size,
    'variants': variants,
  }


def format_table(result: dict) -> str:
  lines = [
    f'device {result["device"]} ({result["cpu_model"]}, nproc {result["nproc"]}), '
    f'jax {result["jax"]}, {result["date"]}; batch {result["batch_size"]}; median of '
    f'{result["steps"]} steps x {result["rounds"]} rounds per variant, one process each, '
    f'alternated; load average at the end '
    f'{tuple(round(x, 1) for x in result["load_average"])}',
    '',
    f'| model | {result.get("compare_label", "remat_blocks")} | step s | step / '
    f'{result.get("baseline", "none")} | XLA temp MB | peak RSS MB | RSS / '
    f'{result.get("baseline", "none")} | compile s |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in result['rows']:
    for v, d in r['variants'].items():
      lines.append(
        f'| {r["row"]} | {v} | {d["step_s"]:.3f} | {d["step_over_none"]:.2f} | '
        f'{d["temp_mb"]:.0f} | {d["peak_rss_mb"]:.0f} | {d["rss_over_none"]:.2f} | '
        f'{d["compile_s"]:.1f} |'
      )
  return '\n'.join(lines)


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch-size', type=int, default=128)
  p.add_argument('--steps', type=int, default=8, help='timed steps per variant (after warm-up)')
  p.add_argument(
    '--rounds',
    type=int,
    default=2,
    help='processes per variant, run alternately (none, save_convs, full, ...)',
  )
  p.add_argument(
    '--rows',
    default='all',
    help='comma-separated row numbers (0 = ConvMixer-256/8, 1 = grid model, '
    "2 = demo, 3 = ViT-256/6) or 'all'",
  )
  p.add_argument(
    '--compare',
    default='remat',
    choices=tuple(COMPARISONS),
    help='remat: model.remat_blocks none / save_convs / full; native: pure XLA '
    '(model.native_kernels=none) / without the fused GELU+BN (depthwise,topk) / all native '
    'kernels (auto) / all + save_convs',
  )
  p.add_argument('--json', action='store_true', help='print one JSON object')
  p.add_argument('--_child', help=argparse.SUPPRESS)
  args, rest = p.parse_known_args()
  if args._child:
    bad = [a for a in rest if not a.startswith('--config.') or '=' not in a]
    if bad:
      p.error(f'unrecognised arguments: {" ".join(bad)} (overrides are --config.FIELD=VALUE)')
    copts = json.loads(os.environ.get('PEMN_BENCH_COPTS', '{}'))
    print(json.dumps(child(int(args._child), rest, args.batch_size, args.steps, copts)))
    return 0
  if rest:
    p.error(f'unrecognised arguments: {" ".join(rest)}')
  if args.rows == 'all':
    picked = list(range(len(ROWS)))
  else:
    try:
      picked = [int(r) for r in args.rows.split(',')]
    except ValueError:
      p.error(
        f"--rows must be comma-separated integers in 0..{len(ROWS) - 1} or 'all', got {args.rows!r}"
      )
    if any(not 0 <= r < len(ROWS) for r in picked):
      p.error(f'--rows must be in 0..{len(ROWS) - 1}, got {args.rows!r}')
  from pemn_jax import steps

  copts = steps.compiler_options() or {}
  rows = [
    bench_row(i, args.batch_size, args.steps, args.rounds, copts, args.compare) for i in picked
  ]
  result = {
    **bench_step.machine_fields(),
    'command': common.command_line('experiments.bench_remat'),
    'batch_size': args.batch_size,
    'steps': args.steps,
    'rounds': args.rounds,
    'compare': args.compare,
    'baseline': next(iter(COMPARISONS[args.compare])),
    'compare_label': 'remat_blocks' if args.compare == 'remat' else 'variant',
    'compiler_options': copts,
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    'load_average': os.getloadavg(),
    'rows': rows,
  }
  print(json.dumps(result, indent=2) if args.json else format_table(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
