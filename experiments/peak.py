"""This device's matmul peak, measured honestly and checked against what the hardware can do.

  python -m experiments.peak [--sizes 1024,2048,3072,4096] [--reps 5] [--json]

``measure()``: for fp32 and bf16, an ``n x n @ n x n`` ``jnp.dot`` for each size, jitted, two
warm-up calls, then the best (and median) of ``reps`` calls each timed to
``block_until_ready``; FLOPs ``2 n^3`` per call; the peak is the best over the sizes. bf16 means
bf16 inputs accumulated and returned in fp32 (``preferred_element_type=float32``): the form the
library's bf16 GEMMs use (``pemn_jax.ops.dot_bf16``; XLA:CPU's bf16-out dot is several times
slower, ``experiments/results/PERFORMANCE.md``). The thread count is XLA's: its CPU client runs
one intra-op thread per core it may use (``os.sched_getaffinity``), the same pool the train step
runs on; ``threads`` in the record says how many that was. Each product's checksum is compared
with a float64 reference of one row, so a compiler that skipped work would be caught.

``theoretical()``: cores x FLOP/cycle/core x clock. The clock is ``CPU max MHz`` from lscpu
when the kernel knows it, else the largest ``cpu MHz`` of /proc/cpuinfo (in a VM often the base
clock: turbo can then exceed the bound by its ratio, ~1.3-1.5x). FLOP/cycle/core by ISA: fp32
AVX-512 (Intel, two FMA ports) 64, AVX2+FMA 32 (AMD Zen 2-4 also 32 with AVX-512, which they
run on 256-bit units; Zen 5, cpu family 26, 64), else 16; bf16 AMX-BF16 1024 (one 16x16x32
tile product per 16 cycles), AVX512-BF16 128, else the fp32 figure. GPUs by device kind
(dense tensor-core bf16, fp32 without tensor cores; H100/H200 SXM figures). ``check()`` flags
a measured peak above its bound: then the clock, the timing or the FLOP count is wrong, and a
floor ratio computed from that peak is too kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SIZES = (1024, 2048, 3072, 4096)
QUICK_SIZES = (512, 1024)
DTYPES = ('float32', 'bfloat16')
# Dense peaks in FLOP/s of accelerators met here, by ``device_kind`` prefix: (bf16, fp32).
GPU_PEAKS = {
  'NVIDIA H200': (989e12, 67e12),
  'NVIDIA H100': (989e12, 67e12),
  'NVIDIA A100': (312e12, 19.5e12),
}


def threads() -> int:
  """The cores this process may run on: XLA:CPU's intra-op pool has one thread per core."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def _clock_mhz() -> tuple[float | None, str]:
  """(clock in MHz, where it came from)."""
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, timeout=10).stdout
    for ln in out.splitlines():
      if ln.startswith('CPU max MHz:'):
        return float(ln.split(':')[1]), 'lscpu CPU max MHz'
  except (OSError, subprocess.SubprocessError, ValueError):
    pass
  mhz = []
  try:
    with open('/proc/cpuinfo') as f:
      mhz = [float(ln.split(':')[1]) for ln in f if ln.startswith('cpu MHz')]
  except (OSError, ValueError):
    pass
  if mhz:
    return max(mhz), '/proc/cpuinfo cpu MHz (may be the base clock: turbo can exceed it)'
  return None, 'unknown'


def _cpuinfo_int(key: str) -> int | None:
  """The first ``key : N`` line of /proc/cpuinfo (e.g. 'cpu family', 'model'), or None."""
  try:
    with open('/proc/cpuinfo') as f:
      for ln in f:
        k, _, v = ln.partition(':')
        if k.strip() == key:
          return int(v)
  except (OSError, ValueError):
    pass
  return None


def theoretical(device_kind: str | None = None) -> dict:
  """The bound: ``{'fp32_flops', 'bf16_flops', 'basis', ...}`` (FLOP/s; None where unknown)."""
  if device_kind and not device_kind.lower().startswith('cpu'):
    for prefix, (bf16, fp32) in GPU_PEAKS.items():
      if device_kind.startswith(prefix):
        return {
          'fp32_flops': fp32,
          'bf16_flops': bf16,
          'basis': f'{prefix} datasheet: dense bf16 tensor core, fp32 without tensor cores',
        }
    return {'fp32_flops': None, 'bf16_flops': None, 'basis': f'no table entry for {device_kind}'}
  from experiments import common

  model, flags = common.cpu_info()
  family = _cpuinfo_int('cpu family')
  amd = 'AMD' in model
  # AMD runs AVX-512 on two 256-bit FMA pipes up to Zen 4 (family 25), on 512-bit ones from
  # Zen 5 (family 26): 32 vs 64 fp32 FLOP/cycle.
  if 'avx512f' in flags and (not amd or (family or 0) >= 26):
    fp32 = 64
  elif 'avx2' in flags and 'fma' in flags:
    fp32 = 32
  else:
    fp32 = 16
  bf16 = 1024 if 'amx_bf16' in flags else 128 if 'avx512_bf16' in flags and not amd else fp32
  cores = threads()
  mhz, source = _clock_mhz()
  hz = mhz * 1e6 if mhz else None
  return {
    'fp32_flops': cores * fp32 * hz if hz else None,
    'bf16_flops': cores * bf16 * hz if hz else None,
    'cores': cores,
    'cpu_model': model,
    'cpu_family': family,
    'cpu_model_number': _cpuinfo_int('model'),
    'clock_mhz': mhz,
    'clock_source': source,
    'fp32_flop_per_cycle_per_core': fp32,
    'bf16_flop_per_cycle_per_core': bf16,
    'basis': f'{cores} cores x FLOP/cycle/core (fp32 {fp32}, bf16 {bf16}) x {mhz} MHz ({source})',
  }


def _time_dot(n: int, dtype: str, reps: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  dt = jnp.dtype(dtype)
  ka, kb = jax.random.split(jax.random.key(n))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  for _ in range(2):
    out = jax.block_until_ready(f(a, b))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(a, b))
    ts.append(time.perf_counter() - t0)
  # The product was really computed: its first row against float64 (inputs as stored).
  row = np.asarray(a[0].astype(jnp.float32), np.float64) @ np.asarray(b.astype(jnp.float32))
  err = float(np.max(np.abs(np.asarray(out[0], np.float64) - row)) / (np.max(np.abs(row)) or 1))
  flops = 2.0 * n**3
  return {
    'n': n,
    'best_flops': flops / min(ts),
    'median_flops': flops / statistics.median(ts),
    'times_s': ts,
    'row0_rel_err': err,
  }


def measure(sizes=SIZES, reps: int = 5, dtypes=DTYPES) -> dict:
  """Measured peaks on JAX's default device: ``{dtype: {'best_flops', 'best_n', 'sizes': [...]},
  'threads', 'method'}``, plus ``theoretical`` and ``check`` (see the module docstring)."""
  import jax

  out: dict = {}
  for dtype in dtypes:
    rows = [_time_dot(n, dtype, reps) for n in sizes]
    best = max(rows, key=lambda r: r['best_flops'])
    out[dtype] = {'best_flops': best['best_flops'], 'best_n': best['n'], 'sizes': rows}
  kind = jax.devices()[0].device_kind
  platform = jax.devices()[0].platform
  out['device'] = f'{platform}:{kind}'
  out['threads'] = threads() if platform == 'cpu' else None
  out['method'] = (
    f'jnp.dot n x n @ n x n, n in {list(sizes)}, jitted, 2 warm-up calls, best of {reps} '
    'timed to block_until_ready, 2 n^3 FLOP; bf16 = bf16 inputs, fp32 accumulation and output; '
    + (
      f'XLA:CPU intra-op pool of {out["threads"]} threads (one per usable core, as the step)'
      if platform == 'cpu'
      else 'default matmul precision (as the step)'
    )
  )
  out['theoretical'] = theoretical(None if platform == 'cpu' else kind)
  out['check'] = check(out)
  return out


def check(peaks: dict) -> dict:
  """``{dtype: 'ok' | 'ABOVE the bound ...' | 'no bound'}``: measured vs theoretical."""
  res = {}
  for dtype, key in (('float32', 'fp32_flops'), ('bfloat16', 'bf16_flops')):
    if dtype not in peaks:
      continue
    bound = peaks['theoretical'].get(key)
    got = peaks[dtype]['best_flops']
    if not bound:
      res[dtype] = 'no bound'
    elif got > bound:
      res[dtype] = (
        f'ABOVE the bound: {got / 1e9:.0f} > {bound / 1e9:.0f} GFLOP/s; the clock is probably '
        'the base clock, or the timing or FLOP count is off: treat floor ratios as too kind'
      )
    else:
      res[dtype] = f'ok: {got / bound:.0%} of the bound'
  return res


def summary(peaks: dict) -> str:
  """One line per dtype: measured, bound, verdict."""
  th = peaks['theoretical']
  lines = []
  for dtype, key in (('float32', 'fp32_flops'), ('bfloat16', 'bf16_flops')):
    if dtype not in peaks:
      continue
    p = peaks[dtype]
    bound = th.get(key)
    sizes = ', '.join(f'{r["n"]}: {r["best_flops"] / 1e9:.0f}' for r in p['sizes'])
    lines.append(
      f'{dtype} matmul peak {p["best_flops"] / 1e9:.1f} GFLOP/s (n={p["best_n"]}; per size '
      f'{sizes}); bound '
      + (f'{bound / 1e9:.0f} GFLOP/s' if bound else 'unknown')
      + f' -> {peaks["check"][dtype]}'
    )
  lines.append(f'peak method: {peaks["method"]}; bound: {th["basis"]}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m experiments.peak', description=__doc__.split('\n')[0])
  p.add_argument('--sizes', default=','.join(map(str, SIZES)))
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--json', action='store_true')
  args = p.parse_args(argv)
  peaks = measure(tuple(int(s) for s in args.sizes.split(',')), args.reps)
  print(json.dumps(peaks, indent=2) if args.json else summary(peaks))
  return 0


if __name__ == '__main__':
  sys.exit(main())
