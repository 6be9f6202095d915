"""Train-step benchmark: masked vs dense, against this CPU's FLOP floor and the PyTorch reference.

  python -m experiments.bench_step [--config PATH] [--config.FIELD=VALUE ...] [--batch-size N]
                                   [--steps N] [--json]

Default: ConvMixer-256/8 (``pemn_jax/configs/convmixer_cifar10.py``) on synthetic CIFAR-shaped
input (32x32x3), batch 128, plus a small row (``--small-config``, default the demo config:
ConvMixer-96/4 on 28x28x1) unless ``--config`` is given or ``--small-config ''``.

For each config, in one process:
  * the masked model and the dense model of the same definition (``model.masked`` False) are
    built, initialised, and jitted with the library's own step (``steps.make_train_step`` +
    ``steps.make_optimizer``, sharded and donated as ``train.train_and_evaluate`` does);
  * compile time (trace + lower + compile) of each step;
  * XLA cost-analysis FLOPs of the compiled steps (with ``--config.model.remat_blocks=...``,
    those of the same step without remat: XLA counts a loop body once, and recomputation is
    not useful work; when the step calls native kernels, which XLA counts as zero, those of
    the same step in pure XLA, every native kernel off);
  * median step time over ``--steps`` steps after two warm-up steps, masked and dense ALTERNATED
    step by step so that load from other processes on this shared machine hits both alike;
  * peak RSS of a separate process that trains ONLY the masked model (``--_rss-child``).
Then the fp32 matmul peak of this device (best of a few large ``jnp.dot``), timed in the same
run, and ``floor_ratio = masked_step_s / (flops_per_step / matmul_peak_flops)``.

With ``--json``, one JSON object; keys (stable): ``device``, ``masked_step_s``, ``dense_step_s``,
``masked_compile_s``, ``dense_compile_s``, ``flops_per_step``, ``dense_flops_per_step``,
``matmul_peak_flops``, ``floor_ratio``, ``masked_peak_rss_mb``, ``masked_images_per_s``,
``dense_images_per_s``, ``masked_over_dense``, ``reference_*``, ``rows`` (every config
measured, the first being the main one), ``machine`` and ``machine_info`` (``experiments.common``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from experiments import common
from experiments.common import load_config

REPO = common.ROOT
DEFAULT_CONFIG = os.path.join(REPO, 'pemn_jax', 'configs', 'convmixer_cifar10.py')
SMALL_CONFIG = os.path.join(REPO, 'pemn_jax', 'configs', 'demo.py')
# The authors' PyTorch code, dense ConvMixer-256/8, batch 128, fp32, on this machine kind
# (2 vCPU AMD EPYC, AVX2), torch 2.13 CPU: measured in another run, not by this script.
REFERENCE = {
  'name': 'authors PyTorch (torch 2.13 CPU, oneDNN), dense ConvMixer-256/8, batch 128',
  'step_s': 6.7,
  'peak_rss_mb': 2.0 * 1024,
  'dim': 256,
  'depth': 8,
  'batch': 128,
}
WARMUP = 2


# ----------------------------------------------------------------------------------------------
# Config (loaded by ``load_config``: ``pemn_jax.configs.common.load``).


def describe(config) -> str:
  m = config.model
  dtype = m.get('dtype', 'float32')
  if m.name == 'convmixer':
    return f'convmixer-{m.dim}/{m.depth} k={m.kernel_size} p={m.patch_size} {dtype}'
  if m.name == 'vit':
    return f'vit-{m.dim}/{m.depth} p={m.patch_size} {dtype}'
  if m.name == 'resnet':
    return f'resnet-{m.depth} {dtype}'
  return f'{m.name} {dtype}'


# ----------------------------------------------------------------------------------------------
# The step, exactly as the library builds it.


class RematModel:
  """``model`` whose ``apply`` runs under ``jax.checkpoint(policy)``: the lever ``--remat``.

  Remat of the whole unrolled model (PERFORMANCE.md attempt 8: it did not lower XLA:CPU's
  memory). The library's memory lever is ``--config.model.remat_blocks`` instead (a scan over
  the blocks, attempt 28), which this script measures like any other config override.
  """

  def __init__(self, model, policy):
    self.model, self.policy = model, policy

  def apply(self, variables, x, **kwargs):
    import jax

    f = jax.checkpoint(lambda v, x: self.model.apply(v, x, **kwargs), policy=self.policy)
    return f(variables, x)


def remat_policy(name: str):
  import jax

  cp = jax.checkpoint_policies
  return {'dots': cp.dots_with_no_batch_dims_saveable, 'nothing': cp.nothing_saveable}[name]


def build_step(
  config,
  batch_size: int,
  masked: bool,
  remat: str = 'none',
  compiler_options: dict | None = None,
  count_flops: bool = True,
):
  """(compiled step, initial state, frozen, batch, compile seconds, flops) for one variant.

  ``count_flops=False`` skips the extra compile that counting needs under
  ``model.remat_blocks`` (the RSS child must not hold a second model); flops is then XLA's.
  """
  import jax
  import numpy as np

  from pemn_jax import build, layers, steps

  config = config.copy_and_resolve_references()
  config.model.masked = masked
  shape = build.input_shape(config)
  model = build.build_model(config)
  variables = build.init_variables(model, config, shape)
  shardings = steps.mesh_and_shardings()
  replicated, batch_sharding = shardings.replicated, shardings.batch
  variables = jax.device_put(variables, replicated)
  frozen = variables.get(layers.FROZEN)
  tx = steps.make_optimizer(config.train, 1000)
  state = steps.create_train_state(variables, tx, replicated)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.standard_normal((batch_size, *shape), dtype=np.float32),
    'label': rng.integers(0, config.model.num_classes, batch_size).astype(np.int32),
  }
  batch = steps.to_global(batch, batch_sharding)
  if remat != 'none':
    model = RematModel(model, remat_policy(remat))
  # The trainer's step, traced as the trainer traces it (under the data mesh, with the config's
  # native kernels); compiler options are given at compile time so variants can differ.
  step = jax.jit(
    steps.in_mesh(steps.make_train_step(model, tx), shardings.mesh, config.model.native_kernels),
    in_shardings=(replicated, replicated, batch_sharding),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
  )
  t0 = time.perf_counter()
  compiled = step.lower(state, frozen, batch).compile(compiler_options or None)
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get('flops', float('nan')))
  remat_blocks = config.model.remat_blocks != 'none'
  uses_native = 'custom_call_target="pemn_' in compiled.as_text()
  if count_flops and (remat_blocks or uses_native):
    # XLA's cost analysis counts a while loop's body once, so the scanned blocks would be
    # counted for one block; and the recomputation is overhead, not work the floor should
    # grant. It also counts the native kernels (custom calls) as zero. The floor is the
    # model's own FLOPs: those of the same step without remat, in pure XLA.
    twin = config.copy_and_resolve_references()
    twin.model.remat_blocks = 'none'
    twin.model.native_kernels = 'none'  # the same step in pure XLA: no custom call to recount
    flops = build_step(twin, batch_size, masked, remat, compiler_options)[5]
  return compiled, state, frozen, batch, compile_s, flops


def run_steps(variants: dict, steps: int) -> dict:
  """Median seconds per step of each variant, the variants alternated step by step."""
  import jax

  times = {k: [] for k in variants}
  for i in range(WARMUP + steps):
    for name, v in variants.items():
      t0 = time.perf_counter()
      v['state'], metrics = v['step'](v['state'], v['frozen'], v['batch'])
      jax.block_until_ready((v['state'], metrics))
      if i >= WARMUP:
        times[name].append(time.perf_counter() - t0)
      v['loss'] = float(metrics['loss'])
  return times


def matmul_peak(n: int = 2048, reps: int = 7) -> tuple[float, float]:
  """(best, median) fp32 FLOP/s of an ``n x n @ n x n`` ``jnp.dot`` on the default device."""
  import jax
  import jax.numpy as jnp

  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(lambda a, b: jnp.dot(a, b, precision='highest'))
  jax.block_until_ready(f(a, b))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    ts.append(time.perf_counter() - t0)
  flops = 2.0 * n**3
  return flops / min(ts), flops / statistics.median(ts)


def peak_rss_mb() -> float:
  """Peak RSS of this process's own address space.

  ``VmHWM`` from /proc, not ``getrusage``: on Linux ``ru_maxrss`` survives fork + exec, so a
  child of a big benchmark process would report its parent's peak.
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024 if sys.platform != 'darwin' else kb / 2**20


def rss_child(
  config_path: str,
  overrides: list[str],
  batch_size: int,
  steps: int,
  remat: str = 'none',
  compiler_options: dict | None = None,
) -> dict:
  """Peak RSS (MB) of a fresh process that builds and trains only the masked model."""
  cmd = [
    sys.executable,
    '-m',
    'experiments.bench_step',
    '--_rss-child',
    '--config',
    config_path,
    '--batch-size',
    str(batch_size),
    '--steps',
    str(steps),
    '--remat',
    remat,
    *overrides,
  ]
  for k, v in (compiler_options or {}).items():
    cmd += ['--compiler-option', f'{k}={v}']
  if not compiler_options:
    cmd += ['--compiler-option', 'none']  # the child must not fall back to the library default
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    return {'error': out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed'}
  return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# One row: one config, masked and dense.


def bench_config(
  config_path: str,
  overrides: list[str],
  batch_size: int,
  steps: int,
  rss_steps: int,
  remat: str = 'none',
  compiler_options: dict | None = None,
) -> dict:
  config = load_config(config_path, overrides)
  masked = build_step(config, batch_size, True, remat, compiler_options)
  dense = build_step(config, batch_size, False, remat, compiler_options)
  variants = {
    name: dict(step=v[0], state=v[1], frozen=v[2], batch=v[3])
    for name, v in (('masked', masked), ('dense', dense))
  }
  times = run_steps(variants, steps)
  del variants
  rss = rss_child(config_path, overrides, batch_size, rss_steps, remat, compiler_options)
  ms, ds = statistics.median(times['masked']), statistics.median(times['dense'])
  return {
    'config': os.path.relpath(config_path, REPO),
    'overrides': overrides,
    'model': describe(config),
    'batch_size': batch_size,
    'steps': steps,
    'remat': remat,
    'masked_step_s': ms,
    'dense_step_s': ds,
    'masked_step_times_s': times['masked'],
    'dense_step_times_s': times['dense'],
    'masked_compile_s': masked[4],
    'dense_compile_s': dense[4],
    'masked_temp_mb': masked[0].memory_analysis().temp_size_in_bytes / 2**20,
    'dense_temp_mb': dense[0].memory_analysis().temp_size_in_bytes / 2**20,
    'flops_per_step': masked[5],
    'dense_flops_per_step': dense[5],
    'masked_images_per_s': batch_size / ms,
    'dense_images_per_s': batch_size / ds,
    'masked_over_dense': ms / ds,
    'masked_peak_rss_mb': rss.get('peak_rss_mb'),
    'rss_child': rss,
  }


def machine_fields() -> dict:
  """The machine part of a benchmark record: ``machine`` (one line) and ``machine_info``
  (``common.machine()``), and the flat keys these records have always had (``device``,
  ``nproc``, ``cpu_model``, ``jax``, ``native_depthwise``, ...), plus the date and XLA_FLAGS."""
  m = common.machine()
  on_cpu = m['device'].startswith('cpu:')
  return {
    'native_depthwise': on_cpu and m['native_kernels']['available'],
    'native_reason': m['native_kernels']['reason'] if on_cpu else 'not the CPU backend',
    'device': m['device'],
    'device_count': m['device_count'],
    'nproc': m['nproc'],
    'cpu_model': m['cpu_model'],
    'jax': m['jax'],
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'date': common.utc_now(),
    'machine': common.machine_line(m),
    'machine_info': m,
  }


def format_table(result: dict) -> str:
  lines = [
    f'device {result["device"]} ({result["cpu_model"]}, nproc {result["nproc"]}), '
    f'jax {result["jax"]}, {result["date"]}',
    f'fp32 matmul peak (2048^3 jnp.dot, best of 7): '
    f'{result["matmul_peak_flops"] / 1e9:.1f} GFLOP/s '
    f'(median {result["matmul_median_flops"] / 1e9:.1f}; best of before/after the steps)',
    f'load average at the end {tuple(round(x, 1) for x in result["load_average"])} on '
    f'{result["nproc"]} cores; XLA_FLAGS={result["xla_flags"]!r} '
    f'GLIBC_TUNABLES={result["glibc_tunables"]!r} compiler options '
    f'{result["compiler_options"] or "none"}, remat {result["remat"]}',
    'native kernels (pemn_jax.native: depthwise conv, top-k mask, GELU+BN): '
    + (
      'loaded (used in float32 unless model.conv_impl or model.native_kernels says otherwise)'
      if result['native_depthwise']
      else f'not used ({result["native_reason"]})'
    ),
  ]
  if result['rows'][0].get('overrides'):
    lines.append(f'overrides of the first config: {" ".join(result["rows"][0]["overrides"])}')
  lines.append('')
  hdr = (
    '| config | batch | variant | compile s | step s (median) | images/s | GFLOP/step '
    '| floor s | step/floor | XLA temp MB | peak RSS MB |'
  )
  lines += [hdr, '|' + '---|' * 11]
  peak = result['matmul_peak_flops']
  for r in result['rows']:
    for v in ('masked', 'dense'):
      flops = r['flops_per_step'] if v == 'masked' else r['dense_flops_per_step']
      floor = flops / peak
      rss = f'{r["masked_peak_rss_mb"]:.0f}' if v == 'masked' and r['masked_peak_rss_mb'] else '-'
      lines.append(
        f'| {r["model"]} | {r["batch_size"]} | {v} | {r[f"{v}_compile_s"]:.1f} | '
        f'{r[f"{v}_step_s"]:.3f} | {r[f"{v}_images_per_s"]:.0f} | {flops / 1e9:.1f} | '
        f'{floor:.3f} | {r[f"{v}_step_s"] / floor:.2f} | {r[f"{v}_temp_mb"]:.0f} | '
        f'{rss} |'
      )
  lines.append('')
  for r in result['rows']:
    lines.append(
      f'{r["model"]} batch {r["batch_size"]}: masked/dense = '
      f'{r["masked_over_dense"]:.3f} (median of {r["steps"]} alternated steps)'
    )
  ref = result.get('reference_step_s')
  if ref:
    lines.append(
      f'reference: {REFERENCE["name"]}: {ref} s/step, measured in another run on the '
      f'same machine kind; ours masked {result["masked_step_s"]:.3f} s/step '
      f'-> {result["speedup_vs_reference_masked"]:.2f}x its throughput, dense '
      f'{result["dense_step_s"]:.3f} s/step -> '
      f'{result["speedup_vs_reference_dense"]:.2f}x'
    )
  return '\n'.join(lines)


def main() -> int:
  p = argparse.ArgumentParser(
    prog='python -m experiments.bench_step', description=__doc__.split('\n')[0]
  )
  p.add_argument('--config', default=None, help='config file (default ConvMixer-256/8 CIFAR-10)')
  p.add_argument(
    '--small-config',
    default=None,
    help="second, small row (default the demo config when --config is not given; '' for none)",
  )
  p.add_argument('--batch-size', type=int, default=128)
  p.add_argument('--steps', type=int, default=10, help='timed steps per variant (after warm-up)')
  p.add_argument('--rss-steps', type=int, default=3, help='steps the RSS child process trains')
  p.add_argument('--json', action='store_true', help='print one JSON object')
  p.add_argument(
    '--remat',
    default='none',
    choices=('none', 'dots', 'nothing'),
    help='lever of attempt 8: run the whole model.apply under jax.checkpoint with '
    "this policy (default none = exactly the library step; the library's "
    'own memory lever is --config.model.remat_blocks)',
  )
  p.add_argument(
    '--compiler-option',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='XLA option for the step compile, e.g. xla_cpu_scheduler_type='
    "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED; default: the library trainer's "
    'own (steps.compiler_options); "none" for XLA\'s defaults',
  )
  p.add_argument('--_rss-child', action='store_true', help=argparse.SUPPRESS)
  args, rest = common.parse_args(p)
  config_path = os.path.abspath(args.config or DEFAULT_CONFIG)
  # Default: the options the library's trainer compiles its step with (what users run).
  if args.compiler_option:
    copts = dict(kv.split('=', 1) for kv in args.compiler_option if kv != 'none')
  else:
    from pemn_jax import steps

    copts = steps.compiler_options() or {}

  if args._rss_child:
    import jax

    config = load_config(config_path, rest)
    step, state, frozen, batch, _, _ = build_step(
      config, args.batch_size, True, args.remat, copts, count_flops=False
    )
    for _ in range(args.steps):
      state, metrics = step(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    print(json.dumps({'peak_rss_mb': peak_rss_mb(), 'steps': args.steps}))
    return 0

  import jax

  peak_before = matmul_peak()
  rows = [
    bench_config(config_path, rest, args.batch_size, args.steps, args.rss_steps, args.remat, copts)
  ]
  small = (
    args.small_config if args.small_config is not None else ('' if args.config else SMALL_CONFIG)
  )
  if small:
    rows.append(
      bench_config(
        os.path.abspath(small), [], args.batch_size, args.steps, args.rss_steps, args.remat, copts
      )
    )
  peak_after = matmul_peak()
  # This machine is shared: the matmul is timed before and after the steps, best taken.
  best, median = max(peak_before[0], peak_after[0]), max(peak_before[1], peak_after[1])
  main_row = rows[0]
  result = {
    **machine_fields(),
    'command': common.command_line('experiments.bench_step'),
    'matmul_peak_flops': best,
    'matmul_median_flops': median,
    'matmul_peak_before_after_flops': [peak_before[0], peak_after[0]],
    'compiler_options': copts,
    'remat': args.remat,
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    'load_average': os.getloadavg(),
  }
  for k in (
    'masked_step_s',
    'dense_step_s',
    'masked_compile_s',
    'dense_compile_s',
    'flops_per_step',
    'dense_flops_per_step',
    'masked_peak_rss_mb',
    'masked_images_per_s',
    'dense_images_per_s',
    'masked_over_dense',
  ):
    result[k] = main_row[k]
  result['floor_ratio'] = main_row['masked_step_s'] / (main_row['flops_per_step'] / best)
  result['dense_floor_ratio'] = main_row['dense_step_s'] / (main_row['dense_flops_per_step'] / best)
  cfg = load_config(config_path, rest)
  same_as_ref = (
    cfg.model.name == 'convmixer'
    and cfg.model.dim == REFERENCE['dim']
    and cfg.model.depth == REFERENCE['depth']
    and args.batch_size == REFERENCE['batch']
  )
  if same_as_ref:
    result['reference'] = REFERENCE['name']
    result['reference_step_s'] = REFERENCE['step_s']
    result['reference_peak_rss_mb'] = REFERENCE['peak_rss_mb']
    result['speedup_vs_reference_masked'] = REFERENCE['step_s'] / main_row['masked_step_s']
    result['speedup_vs_reference_dense'] = REFERENCE['step_s'] / main_row['dense_step_s']
  result['rows'] = rows
  del jax
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    print(format_table(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
