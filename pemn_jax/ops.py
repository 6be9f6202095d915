"""Convolution formulations that are fast on XLA:CPU and exact everywhere.

XLA:CPU lowers some convolutions poorly: a depthwise ``conv_general_dilated`` with
``feature_group_count == channels`` takes seconds for one ConvMixer-256 weight gradient at
batch 128, and a 1x1 conv is several times slower than the same matrix product. ``conv``
dispatches each case to a formulation with the same result:

* depthwise (groups == in == out channels): a sum of ``kh * kw`` shifted multiply-adds;
* 1x1, stride 1, ungrouped: one matrix product over the flattened pixels;
* patchify (kernel == stride, no padding, ungrouped): space-to-depth then one matrix product;
* anything else: ``lax.conv_general_dilated``.

``impl='auto'`` uses the rewrites on the CPU backend and, for depthwise convs, keeps XLA's conv
on GPU/TPU (where it is well optimised); ``'xla'`` always calls ``conv_general_dilated``;
``'fast'`` always uses the rewrites. All are tested against ``conv_general_dilated`` (values and
gradients) in ``tests/test_ops.py``. Layouts are Flax's: inputs NHWC, kernels HWIO.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]
CONV_IMPLS = ('auto', 'xla', 'fast')


def _pads(in_hw, kernel_hw, strides, padding: Padding) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID'):
      raise ValueError(f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)), got {padding!r}")
    return list(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding.upper()))
  return [tuple(p) for p in padding]


def conv_xla(x, kernel, strides=(1, 1), padding: Padding = 'SAME', feature_group_count=1):
  """The reference: ``lax.conv_general_dilated`` in NHWC / HWIO."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=feature_group_count)


def depthwise_shift_add(x, kernel, strides=(1, 1), padding: Padding = 'SAME'):
  """Depthwise conv (kernel ``(kh, kw, 1, C)``) as ``kh * kw`` shifted multiply-adds."""
  kh, kw, _, c = kernel.shape
  sh, sw = strides
  (ph0, ph1), (pw0, pw1) = _pads(x.shape[1:3], (kh, kw), strides, padding)
  xp = jnp.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  out_h = (xp.shape[1] - kh) // sh + 1
  out_w = (xp.shape[2] - kw) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(xp, (0, i, j, 0),
                         (xp.shape[0], i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, c),
                         (1, sh, sw, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def pointwise_dot(x, kernel):
  """1x1 stride-1 conv as one ``(N*H*W, C) @ (C, O)`` matrix product."""
  n, h, w, c = x.shape
  y = jnp.dot(x.reshape(n * h * w, c), kernel.reshape(c, kernel.shape[-1]))
  return y.reshape(n, h, w, kernel.shape[-1])


def patchify_dot(x, kernel):
  """Conv with kernel == stride and no padding as space-to-depth + one matrix product."""
  ph, pw, c, o = kernel.shape
  n, h, w, _ = x.shape
  hp, wp = h // ph, w // pw
  x = x[:, :hp * ph, :wp * pw, :]
  x = x.reshape(n, hp, ph, wp, pw, c).transpose(0, 1, 3, 2, 4, 5)
  y = jnp.dot(x.reshape(n * hp * wp, ph * pw * c), kernel.reshape(ph * pw * c, o))
  return y.reshape(n, hp, wp, o)


def conv(x, kernel, strides=(1, 1), padding: Padding = 'SAME', feature_group_count: int = 1,
         impl: str = 'auto'):
  """2-D convolution, NHWC x HWIO -> NHWC, dispatched to the fastest exact formulation.

  Args:
    x: input, ``(N, H, W, C)``.
    kernel: ``(kh, kw, C // groups, O)``.
    strides: ``(sh, sw)``.
    padding: ``'SAME'``, ``'VALID'`` or explicit ``((lo, hi), (lo, hi))``.
    feature_group_count: groups; ``C`` for a depthwise conv.
    impl: ``'auto'``, ``'xla'`` or ``'fast'`` (see the module docstring).

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
  if depthwise and (impl == 'fast' or on_cpu):
    return depthwise_shift_add(x, kernel, strides, padding)
  if feature_group_count == 1:
    pads = _pads(x.shape[1:3], (kh, kw), strides, padding)
    no_pad = all(p == (0, 0) for p in pads)
    if (kh, kw) == (1, 1) and strides == (1, 1) and no_pad:
      return pointwise_dot(x, kernel)
    if (kh, kw) == strides and no_pad:
      return patchify_dot(x, kernel)
  return conv_xla(x, kernel, strides, padding, feature_group_count)
