"""When a native kernel is used, and the JAX ops that call it (with their VJPs).

Which kernels are on is a value, ``model.native_kernels``: ``'auto'`` (every kernel in
``FEATURES``, where usable: the default; ``'gemm'`` also needs MKL or oneDNN,
``gemm_available``, and ``'amx'`` a CPU with AMX-BF16, ``amx_available``),
``'none'`` (pure XLA) or a comma-separated subset of ``FEATURES`` (``'depthwise,topk'``).
``parse_kernels`` validates it; ``kernels(spec)`` makes it
the active set while a function is traced; ``enabled(feature)`` asks whether ``feature`` is in
the active set (all of ``FEATURES`` outside any ``kernels`` context) and the library is
``available()``.

The switch applies at trace time: ``pemn_jax.ops``, ``masking`` and ``layers`` pick the native
or the XLA formulation while JAX traces them, and ``jax.jit`` caches a trace by function (and
argument types), not by this switch. So trace inside the context and create a fresh jitted
function per setting, e.g. ``with native.kernels('none'): jax.jit(step).lower(...)`` with a new
``jax.jit(step)`` for each spec (the trainer does); a function jitted and traced under one
setting keeps it when called under another. The active set lives in a ``contextvars``
variable: nestable, restored on exit (exceptions included), and a new thread starts from the
default.

The legacy environment switches (``PEMN_JAX_NATIVE=0``: all off; ``PEMN_JAX_NATIVE_OFF=a,b``:
those off) are not read here: ``kernels_from_env`` translates them into a spec, which the
command-line entry point puts into ``model.native_kernels``.

Data parallelism: XLA's partitioner cannot split an opaque custom call, so it would gather the
whole batch onto every device (the masks' inputs are replicated parameters: no issue there).
Under a mesh with a ``'data'`` axis (``jax.sharding.use_abstract_mesh``, as the training loop's
``steps.in_mesh`` sets), each conv and GELU+BN call runs per shard through ``jax.shard_map``
(the depthwise kernel gradient and the GELU+BN statistics then ``psum`` over ``'data'``); with
several devices and no such mesh, ``usable`` is false and the XLA formulation is used.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from pemn_jax.native.build import (
  amx_available,
  available,
  gemm_available,
  gemm_unavailable_reason,
  unavailable_reason,
)

FEATURES = ('depthwise', 'topk', 'gelu_bn', 'gemm', 'amx')
DATA_AXIS = 'data'
FIELD = 'model.native_kernels'

_ALL = frozenset(FEATURES)
_active: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
  'pemn_jax_native_kernels', default=_ALL
)


# ---- The switch ---------------------------------------------------------------------------


def _spec_error(spec, bad) -> ValueError:
  return ValueError(
    f"{FIELD} must be 'auto', 'none' or comma-separated names from {FEATURES}; "
    f'got {bad!r}' + (f' in {spec!r}' if bad != spec else '')
  )


def parse_kernels(spec: str) -> frozenset[str]:
  """The kernels a ``model.native_kernels`` spec turns on.

  Args:
    spec: ``'auto'`` (all of ``FEATURES``), ``'none'`` (no kernel: pure XLA), or a
      comma-separated subset of ``FEATURES`` (spaces around names are ignored).

  Raises:
    ValueError: naming ``model.native_kernels``, the bad item and the allowed values.
  """
  if not isinstance(spec, str):
    raise _spec_error(spec, spec)
  if spec.strip() == 'auto':
    return _ALL
  if spec.strip() == 'none':
    return frozenset()
  names = [name.strip() for name in spec.split(',')]
  for name in names:
    if name not in _ALL:  # 'auto' and 'none' only stand alone; '' is a stray comma
      raise _spec_error(spec, name)
  return frozenset(names)


@contextlib.contextmanager
def kernels(spec: str) -> Iterator[frozenset[str]]:
  """Within this context, only the kernels of ``spec`` (see ``parse_kernels``) are enabled.

  It applies to what is traced inside it (see the module docstring: use a fresh jitted
  function per setting). Nestable: the innermost spec wins, and each exit, by exception too,
  restores the set that was active before. Yields the active set.
  """
  token = _active.set(parse_kernels(spec))
  try:
    yield _active.get()
  finally:
    _active.reset(token)


_OFF_VALUES = ('0', 'false', 'no', 'off')
_ON_VALUES = ('', '1', 'true', 'yes', 'on')


def kernels_from_env(environ: Mapping[str, str]) -> str | None:
  """The ``model.native_kernels`` spec the legacy environment variables ask for, or None.

  ``PEMN_JAX_NATIVE=0`` (or false/no/off) gives ``'none'``; ``PEMN_JAX_NATIVE_OFF=a,b`` gives
  ``FEATURES`` minus those (``'none'`` when that leaves nothing); both unset (or empty, or
  ``PEMN_JAX_NATIVE=1`` alone) gives None: the config decides.

  Raises:
    ValueError: naming the variable, for a value of ``PEMN_JAX_NATIVE`` that is neither on nor
      off, or a name in ``PEMN_JAX_NATIVE_OFF`` that is not in ``FEATURES``.
  """
  switch = environ.get('PEMN_JAX_NATIVE', '').strip().lower()
  if switch in _OFF_VALUES:
    return 'none'
  if switch not in _ON_VALUES:
    raise ValueError(
      f'PEMN_JAX_NATIVE must be one of {_OFF_VALUES} (all native kernels off) or '
      f'{_ON_VALUES[1:]}; got {environ["PEMN_JAX_NATIVE"]!r}'
    )
  raw = environ.get('PEMN_JAX_NATIVE_OFF', '')
  off = {name.strip() for name in raw.split(',') if name.strip()}
  if not off:
    return None
  for name in sorted(off):
    if name not in _ALL:
      raise ValueError(
        f'PEMN_JAX_NATIVE_OFF must be comma-separated names from {FEATURES}; '
        f'got {name!r} in {raw!r}'
      )
  spec = ','.join(f for f in FEATURES if f not in off) or 'none'
  parse_kernels(spec)  # by construction valid: the same check as the config field's
  return spec


# ---- Dispatch -----------------------------------------------------------------------------


def enabled(feature: str) -> bool:
  """``feature`` (one of ``FEATURES``) is in the active set (``kernels``; all outside any
  context) and the library is ``available()`` (not compiled when the feature is off)."""
  if feature not in _ALL:
    raise ValueError(f'feature must be one of {FEATURES}, got {feature!r}')
  return feature in _active.get() and available()


def _data_mesh(batch: int):
  """The current mesh if it splits the batch over ``'data'``, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA_AXIS not in mesh.axis_names:
    return None
  size = mesh.shape[DATA_AXIS]
  return mesh if size > 1 and batch % size == 0 else None


# The dtypes the conv and GELU+BN kernels take: bfloat16 activations are read and written as
# bfloat16 and computed in float32 in registers (rounded to nearest even on store, as XLA's
# convert), several times faster than XLA's bfloat16 formulations (PERFORMANCE.md, attempt 44).
DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))


def usable(x, *others, feature: str = 'depthwise') -> bool:
  """Whether a native call on batch-major ``x`` is valid and efficient here: ``feature``
  enabled, ``x`` and ``others`` all float32 or all bfloat16 (``DTYPES``) on the CPU backend,
  and either one device or a mesh that splits this batch over ``'data'`` (see the module
  docstring)."""
  if x.dtype not in DTYPES or any(a.dtype != x.dtype for a in others):
    return False
  if jax.default_backend() != 'cpu' or not enabled(feature):
    return False
  return jax.device_count() == 1 or _data_mesh(x.shape[0]) is not None


def topk_usable(x) -> bool:
  """Whether ``topk_mask`` applies: float32 on the CPU backend, ``'topk'`` enabled."""
  return (
    x.dtype == np.float32 and x.size < 2**31 and jax.default_backend() == 'cpu' and enabled('topk')
  )


def _per_shard(fn, x, *args, batch_args=0, reduce=False):
  """``fn(x, *args)`` on each 'data' shard of the current mesh (if any). The first
  ``batch_args`` of ``args`` are batch-major like ``x``, the rest replicated; ``reduce``: the
  result is a sum over the batch (psum-ed, replicated), else batch-major; a tuple of bools
  says it for each of ``fn``'s results (a tuple)."""
  mesh = _data_mesh(x.shape[0])
  if mesh is None:
    return fn(x, *args)
  specs = (P(DATA_AXIS),) * (1 + batch_args) + (P(),) * (len(args) - batch_args)
  if isinstance(reduce, tuple):
    out_specs = tuple(P() if r else P(DATA_AXIS) for r in reduce)

    def body(*a):
      outs = fn(*a)
      return tuple(jax.lax.psum(o, DATA_AXIS) if r else o for o, r in zip(outs, reduce))

  else:
    out_specs = P() if reduce else P(DATA_AXIS)
    body = (lambda *a: jax.lax.psum(fn(*a), DATA_AXIS)) if reduce else fn
  return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs)(x, *args)


def _require() -> None:
  if not available():
    raise RuntimeError(f'pemn_jax.native kernels are unavailable: {unavailable_reason()}')


def _call(target, shape, *args, dtype=np.float32, **attrs):
  """One result of shape ``shape`` and ``dtype`` from FFI target ``target`` (int attributes).

  The kernels take their activations in float32 or bfloat16 (all of one call in one dtype, read
  and written in it, computed in float32 in registers); kernels, coefficients and statistics in
  float32."""
  _require()
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype), vmap_method='sequential')(
    *args, **{k: np.int64(v) for k, v in attrs.items()}
  )


# ---- Depthwise conv -----------------------------------------------------------------------


def _ffi_fwd(x, kernel, pad_lo, out_hw):
  n, c = x.shape[0], x.shape[-1]
  return _call(
    'pemn_dw_fwd',
    (n, *out_hw, c),
    x,
    kernel.reshape(kernel.shape[0], kernel.shape[1], c).astype(np.float32),
    dtype=x.dtype,
    pad_h=pad_lo[0],
    pad_w=pad_lo[1],
  )


def _groups(n: int, c: int) -> int:
  """Batch groups of the kernel gradient, its work items (one partial sum each, summed here): the
  largest divisor of the batch up to 8, or up to 32 / (8-channel blocks) for narrow layers (their
  items are small)."""
  want = max(8, 32 // -(-c // 8))
  return max(d for d in range(1, min(n, want) + 1) if n % d == 0)


def _ffi_kgrad(x, g, pad_lo, kh, kw):
  n, c = x.shape[0], x.shape[-1]
  return _call(
    'pemn_dw_kgrad',
    (_groups(n, c), kh, kw, c),
    x,
    g.astype(x.dtype),
    pad_h=pad_lo[0],
    pad_w=pad_lo[1],
  ).sum(0)


def depthwise(x, kernel, pad_lo, out_hw):
  """``y[n, p, q, c] = sum_ij x[n, p + i - pad_lo[0], q + j - pad_lo[1], c] * kernel[i, j, 0, c]``
  with ``x`` read as zero outside its bounds; ``out_hw`` sets the output size (so trailing pads
  are implied, and negative pads crop). NHWC, kernel ``(kh, kw, 1, C)``; float32, or bfloat16
  computed in float32 and returned in ``x``'s dtype."""
  return _per_shard(lambda x, k: _ffi_fwd(x, k, pad_lo, out_hw), x, kernel).astype(x.dtype)


def depthwise_kernel_grad(x, g, pad_lo, kh, kw):
  """``dk[i, j, 0, c] = sum_{n,p,q} x[n, p + i - pad_lo[0], q + j - pad_lo[1], c] * g[n, p, q, c]``
  (zero outside ``x``), shape ``(kh, kw, 1, C)``: the kernel gradient of ``depthwise``, summed
  in float32 and returned in ``x``'s dtype."""
  out = _per_shard(lambda x, g: _ffi_kgrad(x, g, pad_lo, kh, kw), x, g, batch_args=1, reduce=True)
  return out.reshape(kh, kw, 1, x.shape[-1]).astype(x.dtype)


# ---- Top-k mask ---------------------------------------------------------------------------


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

  Float32, or bfloat16 ``x`` computed in float32 with the result (and ``x``'s gradient) in
  bfloat16; the residual is ``x`` in its own dtype. The VJP is that of a BatchNorm whose
  statistics are functions of ``x`` (as in Flax); ``mean`` and ``var`` get a zero cotangent, so
  pass them as computed from this ``x``.
  """
  fwd = lambda x, coef: _call('pemn_gelu_bn_fwd', x.shape, x, coef, dtype=x.dtype)
  return _per_shard(fwd, x, _affine_coef(scale, bias, mean, var, epsilon))


def _affine_coef(scale, bias, mean, var, epsilon):
  """The forward passes' ``(2, C)`` coefficients: ``y = z * coef[0] + coef[1]`` is BatchNorm."""
  mul = scale * jax.lax.rsqrt(var + epsilon)
  return jnp.stack([mul, bias - mean * mul])


def _gelu_bn_fwd(x, scale, bias, mean, var, epsilon):
  return gelu_batch_norm(x, scale, bias, mean, var, epsilon), (x, scale, mean, var)


def _bn_grad_coef(bstats_target, a, dy, scale, mean, var, epsilon):
  """BatchNorm's backward over z: ``(k, c0, c1, dscale, dbias)`` with ``dz = k dy + c0 + c1 z``,
  from the backward statistics that ``bstats_target`` sums over ``a`` (x, whose GELU it takes,
  or the stored z) and ``dy``."""
  c = a.shape[-1]
  count = a.size // c
  rstd = jax.lax.rsqrt(var + epsilon)
  sums = _per_shard(
    lambda a, dy, coef: _call(bstats_target, (2, c), a, dy, coef),
    a,
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
  return k, c0, c1, dscale, dbias


def _gelu_bn_bwd(epsilon, res, dy):
  x, scale, mean, var = res
  dy = dy.astype(x.dtype)
  k, c0, c1, dscale, dbias = _bn_grad_coef('pemn_gelu_bn_bstats', x, dy, scale, mean, var, epsilon)
  dx = _per_shard(
    lambda x, dy, coef: _call('pemn_gelu_bn_bwd', x.shape, x, dy, coef, dtype=x.dtype),
    x,
    dy,
    jnp.stack([k, c0, c1]),
    batch_args=1,
  )
  return dx, dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(var)


gelu_batch_norm.defvjp(_gelu_bn_fwd, _gelu_bn_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def gelu_batch_norm_add(x, residual, scale, bias, mean, var, epsilon: float):
  """``residual + gelu_batch_norm(x, scale, bias, mean, var, epsilon)`` in one pass (a
  ConvMixer block's residual add), summed in float32 and rounded once to ``x``'s dtype (which
  ``residual`` shares). The VJP is ``gelu_batch_norm``'s, and the cotangent itself for
  ``residual``."""
  fwd = lambda x, r, coef: _call('pemn_gelu_bn_add_fwd', x.shape, x, coef, r, dtype=x.dtype)
  return _per_shard(fwd, x, residual, _affine_coef(scale, bias, mean, var, epsilon), batch_args=1)


def _gelu_bn_add_fwd(x, residual, scale, bias, mean, var, epsilon):
  out = gelu_batch_norm_add(x, residual, scale, bias, mean, var, epsilon)
  return out, (x, scale, mean, var)


def _gelu_bn_add_bwd(epsilon, res, dy):
  dx, dscale, dbias, dmean, dvar = _gelu_bn_bwd(epsilon, res, dy)
  return dx, dy.astype(res[0].dtype), dscale, dbias, dmean, dvar


gelu_batch_norm_add.defvjp(_gelu_bn_add_fwd, _gelu_bn_add_bwd)


# ---- GELU -> BatchNorm, the GELU evaluated once (training) ----------------------------------


def _stats_save(x):
  c = x.shape[-1]
  _require()
  out = (
    jax.ShapeDtypeStruct((2, c), np.float32),
    jax.ShapeDtypeStruct(x.shape, x.dtype),
    jax.ShapeDtypeStruct(x.shape, x.dtype),
  )
  return jax.ffi.ffi_call('pemn_gelu_stats_save', out, vmap_method='sequential')(x)


def _saved_forward(x, residual, scale, bias, epsilon):
  c = x.shape[-1]
  count = x.size // c
  sums, z, d = _per_shard(_stats_save, x, reduce=(True, False, False))
  mean = sums[0] / count
  var = jnp.maximum(sums[1] / count - mean * mean, 0.0)
  coef = _affine_coef(scale, bias, mean, var, epsilon)
  if residual is None:
    fwd = lambda z, coef: _call('pemn_bn_fwd', z.shape, z, coef, dtype=z.dtype)
    y = _per_shard(fwd, z, coef)
  else:
    fwd = lambda z, r, coef: _call('pemn_bn_add_fwd', z.shape, z, coef, r, dtype=z.dtype)
    y = _per_shard(fwd, z, residual, coef, batch_args=1)
  return (y, mean, var), (z, d, scale, mean, var)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def gelu_batch_norm_saved(x, residual, scale, bias, epsilon: float):
  """``(y, mean, var)``: ``y = BatchNorm(gelu(x))`` in training (plus ``residual`` unless it is
  None, summed in float32 and rounded once), with the batch statistics ``(mean, var)`` of
  ``gelu(x)`` that it used (float32; Flax's biased variance).

  The same function as ``gelu_batch_stats`` then ``gelu_batch_norm`` (or
  ``gelu_batch_norm_add``), but the GELU is evaluated once, in the statistics pass, which stores
  ``z = gelu(x)`` and ``gelu'(x)`` in ``x``'s dtype; the other passes and the backward read them.
  The residuals are those two arrays instead of ``x``: twice the memory, a quarter of the GELU
  evaluations (the passes' cost). In bfloat16 the normalisation takes the stored (rounded) ``z``,
  as an unfused bfloat16 GELU followed by BatchNorm does; in float32 the values are the
  recomputing form's to float rounding (the same kernel GELU; XLA may fuse the few per-channel
  coefficient operations differently). The VJP is exact for all three results (the
  statistics' cotangents enter the same affine form as the normalisation's).
  """
  return _saved_forward(x, residual, scale, bias, epsilon)[0]


def _gelu_bn_saved_fwd(x, residual, scale, bias, epsilon):
  # symbolic_zeros: the primals come wrapped (CustomVJPPrimal), and the statistics' cotangents
  # arrive as SymbolicZero where nothing uses them (a training step: the running averages),
  # so that the backward is then exactly the recomputing form's.
  x, residual, scale, bias = (a if a is None else a.value for a in (x, residual, scale, bias))
  out, res = _saved_forward(x, residual, scale, bias, epsilon)
  # The residual's cotangent is dy in its dtype, or None without one: a 0-size marker says which.
  marker = None if residual is None else jnp.zeros((0,), residual.dtype)
  return out, (*res, marker)


def _gelu_bn_saved_bwd(epsilon, res, cotangents):
  z, d, scale, mean, var, marker = res
  dy, dmean, dvar = cotangents
  if isinstance(dy, SymbolicZero):
    dy = jnp.zeros(dy.shape, dy.dtype)
  count = z.size // z.shape[-1]
  dy = dy.astype(z.dtype)
  k, c0, c1, dscale, dbias = _bn_grad_coef('pemn_bn_bstats', z, dy, scale, mean, var, epsilon)
  # dz = k dy + c0 + c1 z: the normalisation's part, plus the statistics' own (mean = sum z / m;
  # var = sum z^2 / m - mean^2, no gradient where clipped at 0).
  if not isinstance(dmean, SymbolicZero):
    c0 = c0 + dmean / count
  if not isinstance(dvar, SymbolicZero):
    dvar = jnp.where(var > 0, dvar, 0.0)
    c0 = c0 - 2 * dvar * mean / count
    c1 = c1 + 2 * dvar / count
  dx = _per_shard(
    lambda z, d, dy, coef: _call('pemn_bn_bwd_saved', z.shape, z, d, dy, coef, dtype=z.dtype),
    z,
    d,
    dy,
    jnp.stack([k, c0, c1]),
    batch_args=2,
  )
  dres = None if marker is None else dy.astype(marker.dtype)
  return dx, dres, dscale, dbias


gelu_batch_norm_saved.defvjp(_gelu_bn_saved_fwd, _gelu_bn_saved_bwd, symbolic_zeros=True)


# ---- An activation used twice (a residual block's input) ------------------------------------


def add(a, b):
  """``a + b`` for two float32 or bfloat16 arrays of one shape and dtype, summed in float32 and
  rounded once (the values of XLA's add), in one native pass; batch-major under a data mesh."""
  fn = lambda a, b: _call('pemn_add', a.shape, a, b, dtype=a.dtype)
  return _per_shard(fn, a, b, batch_args=1)


@jax.custom_vjp
def fork(x):
  """``(x, x)``, whose VJP sums the two cotangents with ``add``: for an activation that feeds
  two branches (a residual block's input), where autodiff would otherwise sum them in an XLA
  fusion. In the bfloat16 ConvMixer training step that fusion took ~4.4 ms per block against
  ~1.9 ms for ``add`` (``experiments/results/PERFORMANCE.md``, attempt 64)."""
  return x, x


def _fork_fwd(x):
  return (x, x), None


def _fork_bwd(_, cotangents):
  return (add(*cotangents),)


fork.defvjp(_fork_fwd, _fork_bwd)


# ---- bfloat16 GEMM (a BLAS's, through the FFI) ----------------------------------------------


def gemm_usable(x) -> bool:
  """Whether the weight gradient of a bfloat16 product with batch-major 2-D ``x`` goes to the
  library (``matmul_bf16_dw``; the other products are faster in XLA): ``'gemm'``
  enabled, ``gemm_available()`` (MKL or oneDNN found, a CPU with AMX-BF16 or AVX512-BF16),
  bfloat16 ``x`` on the CPU backend, one device or a mesh that splits its rows over
  ``'data'``."""
  return x.dtype == jnp.bfloat16 and x.ndim == 2 and gemm_available() and usable(x, feature='gemm')


def matmul_bf16_dw(x, g):
  """``x.T @ g`` in float32 (``x (M, K)``, ``g (M, N)``): the weight gradient, summed over
  every 'data' shard."""
  return _per_shard(lambda x, g: gemm_bf16(x, g, trans_a=True), x, g, batch_args=1, reduce=True)


def gemm_bf16(a, b, trans_a: bool = False, trans_b: bool = False):
  """``op(a) @ op(b)`` in float32 from 2-D bfloat16 ``a`` and ``b`` (``op``: transpose where
  asked), by the bf16 GEMM library found at load time (MKL or oneDNN, ``gemm_available()``)."""
  if not gemm_available():
    raise RuntimeError(f'pemn_gemm_bf16 is unavailable: {gemm_unavailable_reason()}')
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  return jax.ffi.ffi_call(
    'pemn_gemm_bf16', jax.ShapeDtypeStruct((m, n), np.float32), vmap_method='sequential'
  )(a, b, trans_a=np.int64(trans_a), trans_b=np.int64(trans_b))


# ---- bfloat16 products on AMX tiles -------------------------------------------------------


def amx_usable(a, b, trans_b: bool = False) -> bool:
  """Whether ``matmul_amx(a, b, trans_b)`` applies: ``'amx'`` enabled and ``amx_available()``,
  2-D bfloat16 operands on the CPU backend, the contracted and the output width multiples of
  32, and one device or a mesh that splits ``a``'s rows over ``'data'``."""
  if a.dtype != jnp.bfloat16 or a.ndim != 2 or b.ndim != 2 or not amx_available():
    return False
  n = b.shape[0] if trans_b else b.shape[1]
  return a.shape[1] % 32 == 0 and n % 32 == 0 and usable(a, b, feature='amx')


def matmul_amx(a, b, trans_b: bool = False):
  """``a @ op(b)`` in bfloat16 (``op(b)``: ``b``, or ``b.T`` when ``trans_b``) on AMX tiles:
  the float32 sums of the exact bfloat16 products, rounded once: what XLA's bfloat16 dot with
  a float32 result, then a convert, computes (to the bit on every shape tested: XLA:CPU's dot
  runs on AMX tiles too), without the float32 product in memory. ``a``'s rows are split over
  the 'data' shards of the current mesh, ``b`` replicated."""
  if not amx_available():
    raise RuntimeError('pemn_matmul_amx is unavailable: the kernels were not built for AMX-BF16')

  def call(a, b):
    n = b.shape[0] if trans_b else b.shape[1]
    return _call('pemn_matmul_amx', (a.shape[0], n), a, b, dtype=a.dtype, trans_b=trans_b)

  return _per_shard(call, a, b)
