"""Convolution formulations that are fast on XLA:CPU and exact everywhere.

XLA:CPU lowers some convolutions poorly: a depthwise ``conv_general_dilated`` with
``feature_group_count == channels`` takes seconds for one ConvMixer-256 weight gradient at
batch 128, and a 1x1 conv is several times slower than the same matrix product. ``conv``
dispatches each case to a formulation with the same result:

* depthwise (groups == in == out channels): a sum of ``kh * kw`` shifted multiply-adds; at
  stride 1 with a hand-written VJP (input grad: the same shift-add on the cotangent; kernel grad:
  a reduction walked over L2-sized batch chunks), see ``depthwise_shift_add``. At stride 1 in
  float32 the same three computations can run as compiled kernels (``pemn_jax.native``, 2-10x
  faster than these XLA forms);
* 1x1, stride 1, ungrouped: one matrix product over the flattened pixels;
* patchify (kernel == stride, no padding, ungrouped): space-to-depth then one matrix product;
* anything else: ``lax.conv_general_dilated``.

``impl='auto'`` uses the rewrites on the CPU backend, with the native depthwise kernels where
``native.usable`` (float32; they compile on first use) and, for depthwise convs, keeps XLA's
conv on GPU/TPU (where it is well optimised); ``'xla'`` always calls ``conv_general_dilated``;
``'fast'`` always uses the pure-XLA rewrites; ``'native'`` is ``'fast'`` with the native
depthwise kernels required (an error if they cannot load or the dtype is not float32). All are
tested against ``conv_general_dilated`` (values and gradients) in ``tests/test_ops.py``,
``tests/test_ops_perf.py`` and ``tests/test_native.py``. Layouts are Flax's: inputs NHWC,
kernels HWIO.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pemn_jax import native
from pemn_jax.native import build as native_build

Padding = str | Sequence[tuple[int, int]]
CONV_IMPLS = ('auto', 'xla', 'fast', 'native')


def _pads(in_hw, kernel_hw, strides, padding: Padding) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)), got {padding!r}")
    return list(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper()))
  return [tuple(p) for p in padding]


def conv_xla(x, kernel, strides=(1, 1), padding: Padding = 'SAME', feature_group_count=1):
  """The reference: ``lax.conv_general_dilated`` in NHWC / HWIO."""
  return lax.conv_general_dilated(
    x,
    kernel,
    window_strides=tuple(strides),
    padding=padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=feature_group_count,
  )


def _shift_add(xp, kernel, out_hw, strides):
  """sum_ij window_ij(xp) * kernel[i, j, 0]: the forward of a depthwise conv on a padded input."""
  kh, kw, _, c = kernel.shape
  sh, sw = strides
  out_h, out_w = out_hw
  out = None
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(
        xp,
        (0, i, j, 0),
        (xp.shape[0], i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, c),
        (1, sh, sw, 1),
      )
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


# Batch rows per step of the depthwise kernel-gradient scan: small enough that a chunk of the
# padded input and of the cotangent stay in L2 while its kh*kw products are reduced.
DW_GRAD_CHUNK_BYTES = 1 << 20


def _batch_chunk(n: int, row_bytes: int, budget: int) -> int:
  """Largest divisor of ``n`` whose rows fit in ``budget`` bytes (at least 1)."""
  best = 1
  for d in range(1, n + 1):
    if n % d == 0 and d * row_bytes <= budget:
      best = d
  return best


def _depthwise_kernel_grad(x, g, pads, kh, kw):
  """d(depthwise conv, stride 1)/d(kernel) = sum_{n,h,w} window_ij(pad(x)) * g, in fp32.

  No padded copy of ``x`` is made: tap (i, j) multiplies the part of ``x`` it reaches with the
  matching part of ``g``. XLA:CPU reduces the (N, H, W) axes of an NHWC product slowly when it
  streams the whole batch (every reduction misses cache), so the batch is walked in chunks that
  fit L2 (``DW_GRAD_CHUNK_BYTES``, dynamic slices, no copies) and the ``kh * kw`` reductions of a
  chunk read the same cached rows.
  """
  (ph0, _), (pw0, _) = pads
  n, h, w, c = x.shape
  out_h, out_w = g.shape[1:3]
  acc_dtype = jnp.promote_types(g.dtype, jnp.float32)

  def partial(xc, gc):
    rows = []
    for i in range(kh):
      o0, o1 = max(0, ph0 - i), min(out_h, h + ph0 - i)
      for j in range(kw):
        q0, q1 = max(0, pw0 - j), min(out_w, w + pw0 - j)
        if o1 <= o0 or q1 <= q0:  # this tap only ever sees padding
          rows.append(jnp.zeros((c,), acc_dtype))
          continue
        xs = xc[:, o0 + i - ph0 : o1 + i - ph0, q0 + j - pw0 : q1 + j - pw0]
        rows.append(jnp.sum((xs * gc[:, o0:o1, q0:q1]).astype(acc_dtype), axis=(0, 1, 2)))
    return jnp.stack(rows)

  row_bytes = (x[0].size + g[0].size) * x.dtype.itemsize
  chunk = _batch_chunk(n, row_bytes, DW_GRAD_CHUNK_BYTES)
  if chunk == n:
    total = partial(x, g)
  else:

    def body(k, acc):
      xc = lax.dynamic_slice_in_dim(x, k * chunk, chunk, 0)
      gc = lax.dynamic_slice_in_dim(g, k * chunk, chunk, 0)
      return acc + partial(xc, gc)

    total = lax.fori_loop(0, n // chunk, body, jnp.zeros((kh * kw, c), acc_dtype))
  return total.reshape(kh, kw, 1, c)


def _pad_or_crop(a, hw_pads):
  """Pads (positive) or crops (negative) the H and W axes of an NHWC array.

  Crops are taken as slices so that every ``lax.pad`` width is non-negative.
  """
  (h0, h1), (w0, w1) = hw_pads
  n, h, w, c = a.shape
  a = lax.slice(a, (0, max(-h0, 0), max(-w0, 0), 0), (n, h - max(-h1, 0), w - max(-w1, 0), c))
  return lax.pad(
    a,
    jnp.zeros((), a.dtype),
    ((0, 0, 0), (max(h0, 0), max(h1, 0), 0), (max(w0, 0), max(w1, 0), 0), (0, 0, 0)),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_s1(x, kernel, pads, use_native=False):
  """Stride-1 depthwise conv with explicit ``pads`` and a hand-written, cache-friendly VJP.

  ``use_native``: the three parts run as ``pemn_jax.native`` kernels instead of XLA ops.
  """
  (ph0, ph1), (pw0, pw1) = pads
  kh, kw = kernel.shape[:2]
  if use_native:
    return native.depthwise(
      x, kernel, (ph0, pw0), (x.shape[1] + ph0 + ph1 - kh + 1, x.shape[2] + pw0 + pw1 - kw + 1)
    )
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph0, ph1, 0), (pw0, pw1, 0), (0, 0, 0)))
  return _shift_add(xp, kernel, (xp.shape[1] - kh + 1, xp.shape[2] - kw + 1), (1, 1))


def _depthwise_s1_fwd(x, kernel, pads, use_native=False):
  return _depthwise_s1(x, kernel, pads, use_native), (x, kernel)


def _depthwise_s1_bwd(pads, use_native, res, g):
  x, kernel = res
  (ph0, ph1), (pw0, pw1) = pads
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1:3]
  if use_native:
    # dx: the same correlation on g with the flipped kernel; leading pads kh-1-ph0, kw-1-pw0.
    dx = native.depthwise(g, kernel[::-1, ::-1], (kh - 1 - ph0, kw - 1 - pw0), (h, w))
    return dx, native.depthwise_kernel_grad(x, g, (ph0, pw0), kh, kw)
  # dx: the "full" correlation of g with the flipped kernel, cropped to x (a shift-add again).
  gp = _pad_or_crop(g, ((kh - 1 - ph0, kh - 1 - ph1), (kw - 1 - pw0, kw - 1 - pw1)))
  dx = _shift_add(gp, kernel[::-1, ::-1], (h, w), (1, 1))
  dk = _depthwise_kernel_grad(x, g, pads, kh, kw).astype(kernel.dtype)
  return dx.astype(x.dtype), dk


_depthwise_s1.defvjp(_depthwise_s1_fwd, _depthwise_s1_bwd)


def depthwise_shift_add(
  x, kernel, strides=(1, 1), padding: Padding = 'SAME', use_native: bool = False
):
  """Depthwise conv (kernel ``(kh, kw, 1, C)``) as ``kh * kw`` shifted multiply-adds.

  Stride 1 (ConvMixer's case) has its own VJP: the input gradient is the same shift-add on the
  padded cotangent with the flipped kernel, and the kernel gradient a chunked reduction
  (``_depthwise_kernel_grad``); autodiff of the shift-add would instead materialise one padded
  copy of the cotangent per tap and reduce each over the whole batch. Other strides use autodiff.
  ``use_native`` (stride 1 only): the same three computations as ``pemn_jax.native`` kernels.
  """
  kh, kw, _, c = kernel.shape
  strides = tuple(strides)
  pads = tuple(tuple(p) for p in _pads(x.shape[1:3], (kh, kw), strides, padding))
  if strides == (1, 1) and all(p >= 0 for pp in pads for p in pp):
    return _depthwise_s1(x, kernel, pads, use_native)
  (ph0, ph1), (pw0, pw1) = pads
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  out_h = (xp.shape[1] - kh) // strides[0] + 1
  out_w = (xp.shape[2] - kw) // strides[1] + 1
  return _shift_add(xp, kernel, (out_h, out_w), strides)


# ---- Matrix products in bfloat16 on the CPU ------------------------------------------------


@functools.cache
def cpu_has_bf16_gemm() -> bool:
  """The CPU multiplies bfloat16 in hardware (AMX-BF16 or AVX512-BF16, /proc/cpuinfo)."""
  return bool(native_build._cpu_flags() & set(native_build.BF16_GEMM_FLAGS))


_F32 = jnp.float32


def _dot_f32acc(a, b, contract):
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=_F32)


@jax.custom_vjp
def dot_bf16(x, w):
  """``x @ w`` for 2-D bfloat16 ``x`` and ``w``: bfloat16 products accumulated in float32,
  rounded to bfloat16 once, in the forward and both backward products.

  XLA:CPU runs a bfloat16 dot with a float32 result on its fast bfloat16 kernels (AMX or
  AVX512-BF16 where the CPU has them: 2-4x its float32 dot), but a bfloat16-out dot, which is
  what ``jnp.dot`` of two bfloat16 arrays and its autodiff emit, ~1.5x slower than float32
  (experiments/results/PERFORMANCE.md, attempt 36). This VJP keeps the forward and the input
  gradient in the fast form. Where ``native.gemm_usable`` (oneDNN or MKL installed, ``'gemm'``
  in ``model.native_kernels``), the weight gradient is that library's bfloat16 GEMM (the same
  float32 sums, ~10x XLA's product there); the forward and the input gradient stay XLA's, which
  measured faster than the library's for them (PERFORMANCE.md, attempt 57), or, where
  ``native.amx_usable`` (``'amx'``: a CPU with AMX-BF16, widths multiples of 32), run on AMX
  tiles and round in cache (``native.matmul_amx``: XLA's values, without the float32 product
  in memory; PERFORMANCE.md, attempt 66).
  """
  return _product(x, w, trans_w=False)


def _product(a, w, trans_w):
  """``a @ w`` (``a @ w.T`` when ``trans_w``) in bfloat16 from float32 sums."""
  if native.amx_usable(a, w, trans_b=trans_w):
    return native.matmul_amx(a, w, trans_b=trans_w)
  return _dot_f32acc(a, w, ((1,), (1,) if trans_w else (0,))).astype(a.dtype)


def _dot_bf16_fwd(x, w):
  return dot_bf16(x, w), (x, w)


def _dot_bf16_bwd(res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = _product(g, w, trans_w=True)
  if native.gemm_usable(x):
    return dx, native.matmul_bf16_dw(x, g).astype(w.dtype)
  # The weight gradient contracts the long batch axis, where XLA:CPU's bfloat16 kernels are
  # slower than its float32 ones (attempt 36); bfloat16 products are exact in float32, so the
  # float32 product of the same inputs is the same sum.
  dw = _dot_f32acc(x.astype(_F32), g.astype(_F32), ((0,), (0,))).astype(w.dtype)
  return dx, dw


dot_bf16.defvjp(_dot_bf16_fwd, _dot_bf16_bwd)


def matmul(x, kernel):
  """``x @ kernel`` over ``x``'s last axis (``kernel`` 2-D), the layers' matrix product.

  On the CPU backend with both bfloat16: ``dot_bf16`` where the CPU has bfloat16 GEMM
  hardware (``cpu_has_bf16_gemm``), else the product in float32, rounded to bfloat16 (without
  that hardware XLA's bfloat16 dot is slower than its float32 one). Elsewhere ``jnp.dot``.
  """
  bf16 = x.dtype == jnp.bfloat16 and kernel.dtype == jnp.bfloat16
  if not bf16 or jax.default_backend() != 'cpu':
    return jnp.dot(x, kernel)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, x.shape[-1])
  if cpu_has_bf16_gemm():
    y = dot_bf16(x2, kernel)
  else:
    y = jnp.dot(x2.astype(_F32), kernel.astype(_F32)).astype(x.dtype)
  return y.reshape(*lead, kernel.shape[-1])


def pointwise_dot(x, kernel):
  """1x1 stride-1 conv as one ``(N*H*W, C) @ (C, O)`` matrix product (``matmul``)."""
  n, h, w, c = x.shape
  y = matmul(x.reshape(n * h * w, c), kernel.reshape(c, kernel.shape[-1]))
  return y.reshape(n, h, w, kernel.shape[-1])


def patchify_dot(x, kernel):
  """Conv with kernel == stride and no padding as space-to-depth + one matrix product."""
  ph, pw, c, o = kernel.shape
  n, h, w, _ = x.shape
  hp, wp = h // ph, w // pw
  x = x[:, : hp * ph, : wp * pw, :]
  x = x.reshape(n, hp, ph, wp, pw, c).transpose(0, 1, 3, 2, 4, 5)
  y = matmul(x.reshape(n * hp * wp, ph * pw * c), kernel.reshape(ph * pw * c, o))
  return y.reshape(n, hp, wp, o)


def conv(
  x,
  kernel,
  strides=(1, 1),
  padding: Padding = 'SAME',
  feature_group_count: int = 1,
  impl: str = 'auto',
):
  """2-D convolution, NHWC x HWIO -> NHWC, dispatched to the fastest exact formulation.

  Args:
    x: input, ``(N, H, W, C)``.
    kernel: ``(kh, kw, C // groups, O)``.
    strides: ``(sh, sw)``.
    padding: ``'SAME'``, ``'VALID'`` or explicit ``((lo, hi), (lo, hi))``.
    feature_group_count: groups; ``C`` for a depthwise conv.
    impl: ``'auto'``, ``'xla'``, ``'fast'`` or ``'native'`` (see the module docstring).

  Returns:
    The convolution, ``(N, H', W', O)``.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'model.conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
  strides = tuple(strides)
  kh, kw, cin_g, cout = kernel.shape
  c = x.shape[-1]
  if impl == 'xla':
    return conv_xla(x, kernel, strides, padding, feature_group_count)
  on_cpu = jax.default_backend() == 'cpu'
  depthwise = feature_group_count == c and cin_g == 1 and cout == c and c > 1
  if depthwise and impl == 'native':
    if not native.available():
      raise ValueError(
        "model.conv_impl='native' needs the native kernels, which did not load: "
        f"{native.unavailable_reason()}; use 'auto' to fall back to XLA"
      )
    if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
      raise ValueError(
        "model.conv_impl='native' computes in float32, got "
        f"{x.dtype} (model.dtype); use 'auto' for other dtypes"
      )
  if depthwise and (impl in ('fast', 'native') or on_cpu):
    use_native = impl == 'native' or (impl == 'auto' and native.usable(x, kernel))
    return depthwise_shift_add(x, kernel, strides, padding, use_native)
  if feature_group_count == 1:
    pads = _pads(x.shape[1:3], (kh, kw), strides, padding)
    no_pad = all(p == (0, 0) for p in pads)
    if (kh, kw) == (1, 1) and strides == (1, 1) and no_pad:
      return pointwise_dot(x, kernel)
    if (kh, kw) == strides and no_pad:
      return patchify_dot(x, kernel)
  return conv_xla(x, kernel, strides, padding, feature_group_count)
