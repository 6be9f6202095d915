"""Native kernels for XLA:CPU, compiled on first use and called through the XLA FFI.

What XLA:CPU does slowly or wastefully in a PEMN training step, done here in C++
(``kernels.cc``):

* the stride-1 depthwise conv (ConvMixer), forward, input gradient and kernel gradient;
* the top-k mask of every masked layer (``pemn_jax.masking.topk_mask``): XLA's TopK sorts the
  kept entries, a linear-time selection (``std::nth_element``) finds the same set, with XLA's
  order and tie rule (ConvMixer-256/8: 18 masks, ~70 ms of a ~1 s step with TopK);
* ConvMixer's "GELU, BatchNorm" in training (``layers.FusedGeluBatchNorm``): four streaming
  passes (statistics, normalise; backward statistics, input gradient) that keep only the input
  and recompute GELU, where XLA makes ~10 fusions and keeps several full-size residuals
  (ConvMixer-256/8: XLA's temp buffer 2.8 -> 1.2 GB, same step time).

Depthwise conv: XLA:CPU has no good lowering for its kernel gradient (the best pure-XLA form,
``ops._depthwise_kernel_grad``, is a chunked reduction at ~10 GFLOP/s), and the stride-1
shift-add forward and input gradient stream each activation once per tap. ``kernels.cc`` does
all three with one cache-resident pass per image and channel block, on XLA's intra-op thread
pool (ConvMixer-256 shapes, batch 128: kernel gradient 55 -> 5 ms, forward and input gradient
12-15 -> 7 ms; ``experiments/results/PERFORMANCE.md``, attempt 32).

The source ships with the package and is compiled once per machine with the system C++ compiler
(``$CXX``, else ``g++``; C++20, ``-O3 -march=native``) against the FFI headers that jaxlib
ships. The library is cached under ``$PEMN_JAX_CACHE_DIR`` (default ``~/.cache/pemn_jax``),
keyed by the source, compiler, jaxlib headers and CPU, and written atomically, so concurrent
processes never load a half-written file. Without a compiler, or with ``PEMN_JAX_NATIVE=0``,
``available()`` is false (``PEMN_JAX_NATIVE_OFF=depthwise,topk,gelu_bn`` turns off single
kernels) and ``pemn_jax.ops`` and ``pemn_jax.masking`` keep their pure-XLA
formulations (same masks; conv values equal to float rounding); ``model.conv_impl='native'``
then fails with the reason.

Data parallelism: XLA's partitioner cannot split an opaque custom call, so it would gather the
whole batch onto every device (the masks' inputs are replicated parameters: no issue there).
Under a mesh with a ``'data'`` axis (``jax.sharding.use_abstract_mesh``, as the training loop's
``train.in_mesh`` sets), each conv call runs per shard through ``jax.shard_map`` (the kernel
gradient then ``psum``s over ``'data'``); with several devices and no such mesh, ``usable`` is
false and the XLA formulation is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels.cc')
FLAGS = ('-O3', '-march=native', '-std=c++20', '-shared', '-fPIC')
TARGETS = {
  'pemn_dw_fwd': 'PemnDwFwd',
  'pemn_dw_kgrad': 'PemnDwKgrad',
  'pemn_topk_mask': 'PemnTopkMask',
  'pemn_gelu_stats': 'PemnGeluStats',
  'pemn_gelu_bn_fwd': 'PemnGeluBnFwd',
  'pemn_gelu_bn_bstats': 'PemnGeluBnBwdStats',
  'pemn_gelu_bn_bwd': 'PemnGeluBnBwd',
}
DATA_AXIS = 'data'

_lock = threading.Lock()
_state: dict = {'tried': False, 'ok': False, 'reason': 'not loaded yet', 'path': None}


def cache_dir() -> str:
  return os.environ.get('PEMN_JAX_CACHE_DIR') or os.path.join(
    os.path.expanduser('~'), '.cache', 'pemn_jax'
  )


def _cpu_signature() -> str:
  """The CPU model and feature flags: ``-march=native`` code is only valid on a CPU like this."""
  lines = []
  try:
    with open('/proc/cpuinfo') as f:
      for ln in f:
        if ln.startswith(('model name', 'flags', 'Features')):
          lines.append(ln.strip())
          if len(lines) >= 2:
            break
  except OSError:
    pass
  return '\n'.join(lines) + platform.machine()


def _library_path(compiler: str) -> str:
  version = subprocess.run(
    [compiler, '--version'], capture_output=True, text=True, timeout=30
  ).stdout
  h = hashlib.sha256()
  with open(SOURCE, 'rb') as f:
    h.update(f.read())
  with open(os.path.join(jax.ffi.include_dir(), 'xla', 'ffi', 'api', 'ffi.h'), 'rb') as f:
    h.update(f.read())
  for part in (version, ' '.join(FLAGS), _cpu_signature()):
    h.update(part.encode())
  return os.path.join(cache_dir(), f'kernels-{h.hexdigest()[:16]}.so')


def _build(compiler: str, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so.tmp', dir=os.path.dirname(path))
  os.close(fd)
  try:
    t0 = time.time()
    # -march=native first; a compiler that lacks it gets the portable build (same code, the
    # vector types then lower to the baseline instruction set).
    for flags in (FLAGS, tuple(f for f in FLAGS if f != '-march=native')):
      cmd = [compiler, *flags, '-I', jax.ffi.include_dir(), SOURCE, '-o', tmp]
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
      if proc.returncode == 0:
        break
    else:
      tail = ' | '.join(proc.stderr.strip().splitlines()[-3:])  # one line, for CLI errors
      raise RuntimeError(f'{" ".join(cmd)} failed: {tail}')
    os.replace(tmp, path)  # atomic: other processes see no file or a complete one
    logging.info('pemn_jax.native: compiled %s in %.1f s', path, time.time() - t0)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load() -> None:
  if os.environ.get('PEMN_JAX_NATIVE', '1').strip().lower() in ('0', 'false', 'no', 'off'):
    raise RuntimeError('disabled by PEMN_JAX_NATIVE')
  compiler = os.environ.get('CXX') or 'g++'
  if shutil.which(compiler) is None:
    raise RuntimeError(f'no C++ compiler: {compiler!r} is not on PATH (set $CXX)')
  path = _library_path(compiler)
  if not os.path.exists(path):
    _build(compiler, path)
  lib = ctypes.CDLL(path)
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  _state['path'] = path


def available() -> bool:
  """True once the kernels are compiled, loaded and registered (tried once per process)."""
  with _lock:
    if not _state['tried']:
      _state['tried'] = True
      try:
        _load()
        _state.update(ok=True, reason=None)
      except Exception as e:  # noqa: BLE001 - any failure means: use the XLA formulation
        _state.update(ok=False, reason=f'{type(e).__name__}: {e}')
        log = logging.info if 'PEMN_JAX_NATIVE' in str(e) else logging.warning  # asked for
        log(
          'pemn_jax.native: native kernels unavailable (%s); using the pure-XLA formulations',
          _state['reason'],
        )
    return _state['ok']


def unavailable_reason() -> str | None:
  """Why ``available()`` is false (None when it is true)."""
  available()
  return _state['reason']


def _data_mesh(batch: int):
  """The current mesh if it splits the batch over ``'data'``, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return None
  size = mesh.shape[DATA_AXIS]
  return mesh if size > 1 and batch % size == 0 else None


FEATURES = ('depthwise', 'topk', 'gelu_bn')


def enabled(feature: str) -> bool:
  """``available()``, and ``feature`` (one of ``FEATURES``) not listed in the environment
  variable ``PEMN_JAX_NATIVE_OFF`` (comma-separated; e.g. ``gelu_bn`` for an A/B run)."""
  if feature not in FEATURES:
    raise ValueError(f'feature must be one of {FEATURES}, got {feature!r}')
  off = {f.strip() for f in os.environ.get('PEMN_JAX_NATIVE_OFF', '').split(',') if f.strip()}
  return feature not in off and available()


def usable(x, *others, feature: str = 'depthwise') -> bool:
  """Whether a native call on batch-major ``x`` is valid and efficient here: ``feature``
  enabled, float32 (``x`` and ``others``) on the CPU backend, and either one device or a mesh
  that splits this batch over ``'data'`` (see the module docstring)."""
  if any(a.dtype != np.float32 for a in (x, *others)):
    return False
  if jax.default_backend() != 'cpu' or not enabled(feature):
    return False
  return jax.device_count() == 1 or _data_mesh(x.shape[0]) is not None


def _per_shard(fn, x, *args, batch_args=0, reduce=False):
  """``fn(x, *args)`` on each 'data' shard of the current mesh (if any). The first
  ``batch_args`` of ``args`` are batch-major like ``x``, the rest replicated; ``reduce``: the
  result is a sum over the batch (psum-ed, replicated), else batch-major."""
  mesh = _data_mesh(x.shape[0])
  if mesh is None:
    return fn(x, *args)
  specs = (P(DATA_AXIS),) * (1 + batch_args) + (P(),) * (len(args) - batch_args)
  body = (lambda *a: jax.lax.psum(fn(*a), DATA_AXIS)) if reduce else fn
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P() if reduce else P(DATA_AXIS))(
    x, *args
  )


def _require() -> None:
  if not available():
    raise RuntimeError(f'pemn_jax.native kernels are unavailable: {unavailable_reason()}')


def _call(target, shape, *args, **attrs):
  """One float32 result of shape ``shape`` from FFI target ``target`` (int attributes)."""
  _require()
  return jax.ffi.ffi_call(
    target, jax.ShapeDtypeStruct(shape, np.float32), vmap_method='sequential'
  )(*args, **{k: np.int64(v) for k, v in attrs.items()})


def _ffi_fwd(x, kernel, pad_lo, out_hw):
  n, c = x.shape[0], x.shape[-1]
  return _call(
    'pemn_dw_fwd',
    (n, *out_hw, c),
    x,
    kernel.reshape(kernel.shape[0], kernel.shape[1], c),
    pad_h=pad_lo[0],
    pad_w=pad_lo[1],
  )


def _groups(n: int, c: int) -> int:
  """Batch groups of the kernel gradient: its work items are (group, channel block) pairs, so
  narrow layers get more groups (about 32 items in all, counting 8-channel blocks) and wide ones
  a single group."""
  want = max(1, 32 // -(-c // 8))
  return max(d for d in range(1, min(n, want) + 1) if n % d == 0)


def _ffi_kgrad(x, g, pad_lo, kh, kw):
  n, c = x.shape[0], x.shape[-1]
  return _call(
    'pemn_dw_kgrad', (_groups(n, c), kh, kw, c), x, g, pad_h=pad_lo[0], pad_w=pad_lo[1]
  ).sum(0)


def depthwise(x, kernel, pad_lo, out_hw):
  """``y[n, p, q, c] = sum_ij x[n, p + i - pad_lo[0], q + j - pad_lo[1], c] * kernel[i, j, 0, c]``
  with ``x`` read as zero outside its bounds; ``out_hw`` sets the output size (so trailing pads
  are implied, and negative pads crop). Float32, NHWC, kernel ``(kh, kw, 1, C)``."""
  return _per_shard(lambda x, k: _ffi_fwd(x, k, pad_lo, out_hw), x, kernel)


def depthwise_kernel_grad(x, g, pad_lo, kh, kw):
  """``dk[i, j, 0, c] = sum_{n,p,q} x[n, p + i - pad_lo[0], q + j - pad_lo[1], c] * g[n, p, q, c]``
  (zero outside ``x``), shape ``(kh, kw, 1, C)``: the kernel gradient of ``depthwise``."""
  out = _per_shard(lambda x, g: _ffi_kgrad(x, g, pad_lo, kh, kw), x, g, batch_args=1, reduce=True)
  return out.reshape(kh, kw, 1, x.shape[-1])


def topk_usable(x) -> bool:
  """Whether ``topk_mask`` applies: float32 on the CPU backend, kernels loaded."""
  return (
    x.dtype == np.float32 and x.size < 2**31 and jax.default_backend() == 'cpu' and enabled('topk')
  )


def topk_mask(x, kept: int):
  """0/1 mask shaped like ``x`` keeping its ``kept`` largest entries (flat), exactly the set
  ``lax.top_k`` returns: XLA's total order on floats, ties kept in index order."""
  return _call('pemn_topk_mask', x.shape, x, kept=kept)


# ---- GELU -> BatchNorm (training) ---------------------------------------------------------


def gelu_batch_stats(x):
  """(mean, var) over all but the last axis of ``gelu(x)`` (exact erf GELU), float32: Flax's
  batch statistics (``var = E[z^2] - E[z]^2``, clipped at 0), summed over every 'data' shard."""
  c = x.shape[-1]
  sums = _per_shard(lambda x: _call('pemn_gelu_stats', (2, c), x), x, reduce=True)
  count = x.size // c
  mean = sums[0] / count
  return mean, jnp.maximum(sums[1] / count - mean * mean, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gelu_batch_norm(x, scale, bias, mean, var, epsilon: float):
  """``BatchNorm(gelu(x))`` in training, given ``(mean, var) = gelu_batch_stats(x)``.

  The VJP is that of a BatchNorm whose statistics are functions of ``x`` (as in Flax); ``mean``
  and ``var`` get a zero cotangent, so pass them as computed from this ``x``.
  """
  rstd = jax.lax.rsqrt(var + epsilon)
  mul = scale * rstd
  coef = jnp.stack([mul, bias - mean * mul])
  return _per_shard(lambda x, coef: _call('pemn_gelu_bn_fwd', x.shape, x, coef), x, coef)


def _gelu_bn_fwd(x, scale, bias, mean, var, epsilon):
  return gelu_batch_norm(x, scale, bias, mean, var, epsilon), (x, scale, mean, var)


def _gelu_bn_bwd(epsilon, res, dy):
  x, scale, mean, var = res
  c = x.shape[-1]
  count = x.size // c
  rstd = jax.lax.rsqrt(var + epsilon)
  sums = _per_shard(
    lambda x, dy, coef: _call('pemn_gelu_bn_bstats', (2, c), x, dy, coef),
    x,
    dy,
    jnp.stack([mean, rstd]),
    batch_args=1,
    reduce=True,
  )
  dbias, dscale = sums[0], sums[1]  # sum dy, sum dy * zhat
  # dz = k (dy - dbias / m - zhat dscale / m) with zhat = (z - mean) rstd: affine in dy and z.
  k = scale * rstd
  c1 = -k * rstd * dscale / count
  c0 = -k * dbias / count - c1 * mean
  dx = _per_shard(
    lambda x, dy, coef: _call('pemn_gelu_bn_bwd', x.shape, x, dy, coef),
    x,
    dy,
    jnp.stack([k, c0, c1]),
    batch_args=1,
  )
  return dx, dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(var)


gelu_batch_norm.defvjp(_gelu_bn_fwd, _gelu_bn_bwd)
