"""Train-step benchmark: masked vs dense, fp32 vs bf16, against this device's FLOP floor.

  python -m experiments.bench_step [--config PATH] [--config.FIELD=VALUE ...] [--batch-size N]
                                   [--steps N] [--dtypes float32,bfloat16] [--quick] [--json]

Default: ConvMixer-256/8 (``pemn_jax/configs/convmixer_cifar10.py``) on synthetic CIFAR-shaped
input (32x32x3), batch 128, plus a small row (``--small-config``, default the demo config:
ConvMixer-96/4 on 28x28x1) unless ``--config`` is given or ``--small-config ''``; each config in
every dtype of ``--dtypes`` (``model.dtype``; default fp32 and bf16, printed side by side).

For each config and dtype, in one process:
  * the masked model and the dense model of the same definition (``model.masked`` False) are
    built, initialised, and jitted with the library's own step (``steps.make_train_step`` +
    ``steps.make_optimizer``, sharded and donated as ``train.train_and_evaluate`` does);
  * compile time (trace + lower + compile) of each step, and the native kernels its HLO calls;
  * FLOPs per step two ways: XLA's cost analysis of the compiled step (with
    ``--config.model.remat_blocks=...``, that of the same step without remat: XLA counts a loop
    body once, and recomputation is not useful work; when the step calls native kernels, which
    XLA counts as zero, that of the same step in pure XLA), and the matrix-product FLOPs alone
    (``2 M N K`` of every dot and conv in the step's jaxpr, backward included: ``dot_flops``);
  * median step time over ``--steps`` steps after two warm-up steps, masked and dense ALTERNATED
    step by step so that load from other processes on this shared machine hits both alike (the
    dtypes run one after the other: their temp buffers differ in size, and alternating such
    variants biases the ratio, PERFORMANCE.md attempt 29);
  * peak RSS of a separate process per variant (``--_rss-child``: masked or dense, this dtype).
Then the matmul peaks of this device, fp32 and bf16 (``experiments.peak``: sizes 1024..4096,
best of N after warm-up, XLA's full thread pool as the step uses, checked against the bound
cores x FLOP/cycle x clock), timed before and after the steps (best taken), and
``floor_ratio = step_s / (flops_per_step / matmul_peak)``, each row against the peak of its
dtype (fp32 rows also as before: ``floor_ratio`` of the main row).

With ``--json``, one JSON object; keys (stable): ``device``, ``masked_step_s``, ``dense_step_s``,
``masked_compile_s``, ``dense_compile_s``, ``flops_per_step``, ``dense_flops_per_step``,
``matmul_peak_flops`` (fp32), ``matmul_peak_bf16_flops``, ``peak`` (``experiments.peak``:
per size, the bound and its check), ``floor_ratio``, ``masked_peak_rss_mb``,
``masked_images_per_s``, ``dense_images_per_s``, ``masked_over_dense`` (all of the first
config's fp32 row), ``bf16`` (the same for its bf16 row, and ``bf16_over_fp32``),
``reference_*``, ``rows`` (every config x dtype measured, the first being the main one),
``machine`` and ``machine_info`` (``experiments.common``: CPU model, ISA flags, cores, jax and
jaxlib, native kernels).
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
# The authors' PyTorch code, dense ConvMixer-256/8, batch 128, measured in other runs (not by
# this script), per machine kind (a substring of the CPU model name): on 2-vCPU AMD EPYC (AVX2),
# torch 2.13 CPU, fp32; on 2-core Intel Xeon (AVX-512, AMX), torch 2.14 CPU, fp32 and under
# torch.autocast('cpu', torch.bfloat16) (idle machine, 2 threads, before the bf16 work here).
REFERENCES = {  # step_s: the dense model; masked_step_s, bf16_step_s where measured
  'AMD EPYC': {
    'name': 'authors PyTorch (torch 2.13 CPU, oneDNN), dense ConvMixer-256/8, batch 128',
    'step_s': 6.7,
    'peak_rss_mb': 2.0 * 1024,
  },
  'Intel(R) Xeon(R)': {
    'name': 'authors PyTorch (torch 2.14 CPU, oneDNN, 2 threads), dense ConvMixer-256/8, '
    'batch 128 (measured before the bf16 work, another run)',
    'step_s': 3.84,
    'masked_step_s': 3.42,
    'bf16_step_s': 1.69,
    'peak_rss_mb': 2.38 * 1024,
  },
}
REFERENCE = {**REFERENCES['AMD EPYC'], 'dim': 256, 'depth': 8, 'batch': 128}


def reference_for(cpu_model: str) -> dict | None:
  """The PyTorch reference measured on this machine kind, if any."""
  for kind, ref in REFERENCES.items():
    if kind in cpu_model:
      return {**ref, 'dim': 256, 'depth': 8, 'batch': 128}
  return None


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
  traced = step.trace(state, frozen, batch)
  compiled = traced.lower().compile(compiler_options or None)
  compile_s = time.perf_counter() - t0
  compiled.dot_flops = dot_flops(traced.jaxpr)  # read by bench_config
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


def native_calls(compiled) -> list[str]:
  """The ``pemn_*`` native kernels (FFI custom calls) a compiled step calls."""
  import re

  return sorted(set(re.findall(r'custom_call_target="(pemn_[a-z0-9_]+)"', compiled.as_text())))


def dot_flops(jaxpr) -> float:
  """``2 M N K`` summed over every ``dot_general``, ``conv_general_dilated`` and native bf16
  GEMM call of ``jaxpr`` (a ``ClosedJaxpr`` or ``Jaxpr``), sub-jaxprs included, a scan's body
  times its length."""
  import math

  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0].aval if eqn.outvars else None
    if name == 'dot_general':
      (lc, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval
      total += 2.0 * math.prod(out.shape) * math.prod(lhs.shape[i] for i in lc)
    elif name == 'ffi_call' and eqn.params['target_name'] == 'pemn_gemm_bf16':
      # the native bf16 GEMM (model.native_kernels 'gemm'): op(a) (M, K) @ op(b) (K, N)
      a = eqn.invars[0].aval
      k = a.shape[0] if dict(eqn.params['attributes'])['trans_a'] else a.shape[1]
      total += 2.0 * math.prod(out.shape) * k
    elif name == 'ffi_call' and eqn.params['target_name'] == 'pemn_matmul_amx':
      # the native AMX product (model.native_kernels 'amx'): a (M, K) @ op(b) (K, N)
      total += 2.0 * math.prod(out.shape) * eqn.invars[0].aval.shape[1]
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out features, in features, *spatial)
      total += 2.0 * math.prod(out.shape) * math.prod(rhs.shape[i] for i in spec[1:])
    times = eqn.params.get('length', 1) if name == 'scan' else 1
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
          total += times * dot_flops(sub)
  return total


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
  masked: bool = True,
) -> dict:
  """Peak RSS (MB) of a fresh process that builds and trains only this variant (the masked
  model, or the dense one), with ``overrides`` (the dtype among them)."""
  cmd = [
    sys.executable,
    '-m',
    'experiments.bench_step',
    '--_rss-child' if masked else '--_rss-child-dense',
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
# One row: one config in one dtype, masked and dense.


def bench_config(
  config_path: str,
  overrides: list[str],
  batch_size: int,
  steps: int,
  rss_steps: int,
  remat: str = 'none',
  compiler_options: dict | None = None,
  rss_variants: tuple[str, ...] = ('masked', 'dense'),
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
  rss = {
    v: rss_child(
      config_path, overrides, batch_size, rss_steps, remat, compiler_options, v == 'masked'
    )
    for v in rss_variants
  }
  ms, ds = statistics.median(times['masked']), statistics.median(times['dense'])
  return {
    'config': os.path.relpath(config_path, REPO),
    'overrides': overrides,
    'model': describe(config),
    'dtype': config.model.get('dtype', 'float32'),
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
    'masked_native_calls': native_calls(masked[0]),
    'dense_native_calls': native_calls(dense[0]),
    'flops_per_step': masked[5],
    'dense_flops_per_step': dense[5],
    'dot_flops_per_step': masked[0].dot_flops,
    'dense_dot_flops_per_step': dense[0].dot_flops,
    'masked_images_per_s': batch_size / ms,
    'dense_images_per_s': batch_size / ds,
    'masked_over_dense': ms / ds,
    'masked_peak_rss_mb': rss.get('masked', {}).get('peak_rss_mb'),
    'dense_peak_rss_mb': rss.get('dense', {}).get('peak_rss_mb'),
    'rss_child': rss.get('masked', {}),
    'rss_children': rss,
  }


def add_floors(row: dict, peaks: dict) -> None:
  """Each variant's floor ratio against the matmul peak of the row's dtype (bf16 rows against
  the bf16 peak; ``*_floor_ratio_fp32_peak`` against the fp32 one), from XLA's FLOPs and from
  the matrix-product FLOPs alone (``*_dot_floor_ratio``)."""
  key = 'bfloat16' if row['dtype'] == 'bfloat16' else 'float32'
  peak = peaks[key]['best_flops']
  row['peak_dtype'], row['peak_flops'] = key, peak
  for v, pre in (('masked', ''), ('dense', 'dense_')):
    step = row[f'{v}_step_s']
    row[f'{v}_floor_ratio'] = step / (row[f'{pre}flops_per_step'] / peak)
    row[f'{v}_dot_floor_ratio'] = step / (row[f'{pre}dot_flops_per_step'] / peak)
    fp32 = peaks['float32']['best_flops']
    row[f'{v}_floor_ratio_fp32_peak'] = step / (row[f'{pre}flops_per_step'] / fp32)


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
  """The human report of a record: records made before the fp32/bf16 rows (no ``peak``) keep
  their old layout (``format_table_v1``), so bench_step.md's tables regenerate unchanged."""
  if 'peak' not in result:
    return format_table_v1(result)
  from experiments import peak as peak_mod

  m = result['machine_info']
  isa = ' '.join(f for f, on in m['isa'].items() if on) or 'none of ' + ', '.join(m['isa'])
  lines = [
    f'{result["machine"]}; ISA {isa}; jax {m["jax"]}, jaxlib {m["jaxlib"]}; {result["date"]}',
    f'native kernels: {common.native_line(m)}',
    peak_mod.summary(result['peak']),
    f'load average at the end {tuple(round(x, 1) for x in result["load_average"])} on '
    f'{result["nproc"]} cores; XLA_FLAGS={result["xla_flags"]!r} '
    f'GLIBC_TUNABLES={result["glibc_tunables"]!r} allocation cache '
    f'{result.get("allocation_cache", "none")}, compiler options '
    f'{result["compiler_options"] or "none"}, remat {result["remat"]}',
  ]
  if result['rows'][0].get('overrides'):
    lines.append(f'overrides of the first config: {" ".join(result["rows"][0]["overrides"])}')
  lines.append('')
  hdr = (
    '| config | batch | variant | compile s | step s (median) | images/s | GFLOP/step (XLA) '
    '| of it matmul | step/floor | step/floor (matmul FLOPs) | XLA temp MB | peak RSS MB |'
  )
  lines += [hdr, '|' + '---|' * 12]
  for r in result['rows']:
    for v, pre in (('masked', ''), ('dense', 'dense_')):
      rss = r.get(f'{v}_peak_rss_mb')
      lines.append(
        f'| {r["model"]} | {r["batch_size"]} | {v} | {r[f"{v}_compile_s"]:.1f} | '
        f'{r[f"{v}_step_s"]:.3f} | {r[f"{v}_images_per_s"]:.0f} | '
        f'{r[f"{pre}flops_per_step"] / 1e9:.1f} | {r[f"{pre}dot_flops_per_step"] / 1e9:.1f} | '
        f'{r[f"{v}_floor_ratio"]:.2f} | {r[f"{v}_dot_floor_ratio"]:.2f} | '
        f'{r[f"{v}_temp_mb"]:.0f} | {f"{rss:.0f}" if rss else "-"} |'
      )
  lines += [
    '',
    "step/floor: against the matmul peak of the row's dtype (bf16 rows: the bf16 peak).",
    '',
    '| config | variant | fp32 step s | bf16 step s | bf16 / fp32 | fp32 RSS MB | bf16 RSS MB '
    '| native kernels called (fp32 / bf16) |',
    '|' + '---|' * 8,
  ]
  for pair in side_by_side(result['rows']):
    f32, b16 = pair
    for v in ('masked', 'dense'):
      rs = [x.get(f'{v}_peak_rss_mb') if x else None for x in pair]
      calls = [short_calls(x[f'{v}_native_calls']) if x else '-' for x in pair]
      lines.append(
        f'| {(f32 or b16)["model"].rsplit(" ", 1)[0]} | {v} | '
        + ' | '.join(f'{x[f"{v}_step_s"]:.3f}' if x else '-' for x in pair)
        + ' | '
        + (f'{b16[f"{v}_step_s"] / f32[f"{v}_step_s"]:.2f}' if f32 and b16 else '-')
        + ' | '
        + ' | '.join(f'{x:.0f}' if x else '-' for x in rs)
        + f' | {calls[0]} / {calls[1]} |'
      )
  lines.append('')
  for r in result['rows']:
    lines.append(
      f'{r["model"]} batch {r["batch_size"]}: masked/dense = '
      f'{r["masked_over_dense"]:.3f} (median of {r["steps"]} alternated steps)'
    )
  lines.append(
    'fp32 and bf16 rows ran one after the other in one process (not alternated): on a loaded '
    'machine compare them only within one run.'
  )
  if result.get('reference_step_s'):
    lines.append(
      f'reference: {result["reference"]}: {result["reference_step_s"]} s/step fp32 dense, '
      f'{result["reference_masked_step_s"]} masked'
      + (
        f', {result["bf16"]["reference_step_s"]} s/step bf16 autocast (dense)'
        if result.get('bf16', {}).get('reference_step_s')
        else ''
      )
      + f', measured in another run on this machine kind; ours masked '
      f'{result["masked_step_s"]:.3f} s/step fp32 -> '
      f'{result["speedup_vs_reference_masked"]:.2f}x its fp32 throughput'
      + (
        f', {result["bf16"]["masked_step_s"]:.3f} s/step bf16 -> '
        f'{result["bf16"]["speedup_vs_reference_bf16"]:.2f}x its bf16 throughput'
        if result.get('bf16', {}).get('reference_step_s')
        else ''
      )
    )
  return '\n'.join(lines)


def short_calls(calls: list[str]) -> str:
  """The native kernels called, by ``pemn_jax.native.FEATURES`` name."""
  names = {
    'dw': 'depthwise',
    'topk': 'topk',
    'gelu': 'gelu_bn',
    'bn': 'gelu_bn',
    'add': 'gelu_bn',  # layers.fork's sum, used with the fused GELU+BN path
    'gemm': 'gemm',
    'matmul': 'amx',
  }
  got = {names.get(c.split('_')[1], c) for c in calls}
  return ','.join(sorted(got)) or 'none'


def side_by_side(rows: list[dict]) -> list[tuple[dict | None, dict | None]]:
  """(fp32 row, bf16 row) per config, in the order the configs were measured."""
  pairs: dict = {}
  for r in rows:
    key = (r['config'], tuple(o for o in r['overrides'] if not o.startswith(DTYPE_FIELD)))
    pairs.setdefault(key, [None, None])[r['dtype'] == 'bfloat16'] = r
  return [tuple(p) for p in pairs.values()]


def format_table_v1(result: dict) -> str:
  lines = [
    f'device {result["device"]} ({result["cpu_model"]}, nproc {result["nproc"]}), '
    f'jax {result["jax"]}, {result["date"]}',
    f'fp32 matmul peak (2048^3 jnp.dot, best of 7): '
    f'{result["matmul_peak_flops"] / 1e9:.1f} GFLOP/s '
    f'(median {result["matmul_median_flops"] / 1e9:.1f}; best of before/after the steps)',
    f'load average at the end {tuple(round(x, 1) for x in result["load_average"])} on '
    f'{result["nproc"]} cores; XLA_FLAGS={result["xla_flags"]!r} '
    f'GLIBC_TUNABLES={result["glibc_tunables"]!r} allocation cache '
    f'{result.get("allocation_cache", "none")}, compiler options '
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


MAIN_KEYS = (
  'masked_step_s',
  'dense_step_s',
  'masked_compile_s',
  'dense_compile_s',
  'flops_per_step',
  'dense_flops_per_step',
  'dot_flops_per_step',
  'masked_peak_rss_mb',
  'dense_peak_rss_mb',
  'masked_images_per_s',
  'dense_images_per_s',
  'masked_over_dense',
)
DTYPE_FIELD = '--config.model.dtype='


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
  p.add_argument('--rss-steps', type=int, default=3, help='steps each RSS child process trains')
  p.add_argument(
    '--dtypes',
    default='float32,bfloat16',
    help='model.dtype of the rows, comma-separated (default both, side by side); a '
    '--config.model.dtype override instead gives that dtype alone',
  )
  p.add_argument(
    '--rss',
    default='masked,dense',
    help="variants whose peak RSS is measured, one child process each ('' for none)",
  )
  p.add_argument(
    '--peak-sizes',
    default=','.join(map(str, peak_sizes())),
    help='matrix sizes n of the n^3 matmul peak (default 1024..4096)',
  )
  p.add_argument('--peak-reps', type=int, default=5)
  p.add_argument(
    '--quick',
    action='store_true',
    help='a smoke run: 2 steps, 1 RSS step, peak sizes 512,1024 and 3 reps',
  )
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
  p.add_argument('--_rss-child-dense', action='store_true', help=argparse.SUPPRESS)
  args, rest = common.parse_args(p)
  config_path = os.path.abspath(args.config or DEFAULT_CONFIG)
  if args.quick:
    args.steps, args.rss_steps, args.peak_reps = 2, 1, 3
    args.peak_sizes = ','.join(map(str, peak_sizes(quick=True)))
  # Default: the options the library's trainer compiles its step with (what users run).
  if args.compiler_option:
    copts = dict(kv.split('=', 1) for kv in args.compiler_option if kv != 'none')
  else:
    from pemn_jax import steps

    copts = steps.compiler_options() or {}

  if args._rss_child or args._rss_child_dense:
    import jax

    config = load_config(config_path, rest)
    step, state, frozen, batch, _, _ = build_step(
      config, args.batch_size, args._rss_child, args.remat, copts, count_flops=False
    )
    for _ in range(args.steps):
      state, metrics = step(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    print(json.dumps({'peak_rss_mb': peak_rss_mb(), 'steps': args.steps}))
    return 0

  from experiments import peak as peak_mod

  sizes = tuple(int(n) for n in args.peak_sizes.split(','))
  peak_before = peak_mod.measure(sizes, args.peak_reps)
  if any(o.startswith(DTYPE_FIELD) for o in rest):
    dtype_sets = [[]]  # the override decides
  else:
    dtype_sets = [[f'{DTYPE_FIELD}{d.strip()}'] for d in args.dtypes.split(',') if d.strip()]
  rss_variants = tuple(v.strip() for v in args.rss.split(',') if v.strip())
  small = (
    args.small_config if args.small_config is not None else ('' if args.config else SMALL_CONFIG)
  )
  configs = [(config_path, rest)] + ([(os.path.abspath(small), [])] if small else [])
  rows = [
    bench_config(
      path,
      [*ov, *dt],
      args.batch_size,
      args.steps,
      args.rss_steps,
      args.remat,
      copts,
      rss_variants,
    )
    for path, ov in configs
    for dt in dtype_sets
  ]
  peak_after = peak_mod.measure(sizes, args.peak_reps)
  # This machine is shared: the peaks are timed before and after the steps, the best taken.
  peaks = {k: peak_before[k] for k in peak_before}
  for dtype in peak_mod.DTYPES:
    if peak_after[dtype]['best_flops'] > peak_before[dtype]['best_flops']:
      peaks[dtype] = peak_after[dtype]
  peaks['before_after_flops'] = {
    d: [peak_before[d]['best_flops'], peak_after[d]['best_flops']] for d in peak_mod.DTYPES
  }
  peaks['check'] = peak_mod.check(peaks)
  for r in rows:
    add_floors(r, peaks)
  main_row = rows[0]
  result = {
    **machine_fields(),
    'command': common.command_line('experiments.bench_step'),
    'matmul_peak_flops': peaks['float32']['best_flops'],
    'matmul_peak_bf16_flops': peaks['bfloat16']['best_flops'],
    'matmul_median_flops': max(r['median_flops'] for r in peaks['float32']['sizes']),
    'peak': peaks,
    'compiler_options': copts,
    'remat': args.remat,
    'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    'allocation_cache': allocation_cache(),
    'load_average': os.getloadavg(),
  }
  for k in MAIN_KEYS:
    result[k] = main_row[k]
  result['floor_ratio'] = main_row['masked_floor_ratio']
  result['dense_floor_ratio'] = main_row['dense_floor_ratio']
  f32, b16 = side_by_side(rows)[0]
  if f32 and b16:
    result['bf16'] = {k: b16[k] for k in MAIN_KEYS}
    result['bf16']['floor_ratio'] = b16['masked_floor_ratio']
    result['bf16']['bf16_over_fp32'] = b16['masked_step_s'] / f32['masked_step_s']
    if f32['masked_peak_rss_mb'] and b16['masked_peak_rss_mb']:
      result['bf16']['rss_over_fp32'] = b16['masked_peak_rss_mb'] / f32['masked_peak_rss_mb']
  cfg = load_config(config_path, rest)
  same_as_ref = (
    cfg.model.name == 'convmixer'
    and cfg.model.dim == REFERENCE['dim']
    and cfg.model.depth == REFERENCE['depth']
    and args.batch_size == REFERENCE['batch']
  )
  ref = reference_for(result['cpu_model'])
  if same_as_ref and ref:
    result['reference'] = ref['name']
    result['reference_step_s'] = ref['step_s']
    result['reference_peak_rss_mb'] = ref['peak_rss_mb']
    # Against the reference's own masked step where it was measured (Intel), else its dense one.
    result['reference_masked_step_s'] = ref.get('masked_step_s', ref['step_s'])
    result['speedup_vs_reference_masked'] = (
      result['reference_masked_step_s'] / main_row['masked_step_s']
    )
    result['speedup_vs_reference_dense'] = ref['step_s'] / main_row['dense_step_s']
    if 'bf16' in result and 'bf16_step_s' in ref:
      result['bf16']['reference_step_s'] = ref['bf16_step_s']
      result['bf16']['speedup_vs_reference_bf16'] = ref['bf16_step_s'] / b16['masked_step_s']
  result['rows'] = rows
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    print(format_table(result))
  return 0


def allocation_cache() -> str:
  """Whether the process runs with pemn_jax's large-allocation cache preloaded
  (``pemn_jax.native.process``; ``PEMN_JAX_ALLOC=0`` runs without it), and its counters."""
  from pemn_jax.native import process

  stats = process.allocator_stats()
  if stats is None:
    return 'none'
  cap = os.environ.get('PEMN_ALLOC_CACHE_MB', 'default')
  return f'pemn_jax alloc.cc (cap {cap} MB; {stats["reused"]} reused, {stats["mapped"]} mapped)'


def peak_sizes(quick: bool = False) -> tuple[int, ...]:
  from experiments import peak as peak_mod

  return peak_mod.QUICK_SIZES if quick else peak_mod.SIZES


if __name__ == '__main__':
  from pemn_jax.native import process

  process.reexec_tuned('experiments.bench_step')  # huge pages and the allocation cache (process.py)
  sys.exit(main())
