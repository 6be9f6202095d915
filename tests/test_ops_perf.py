"""The performance formulations of pemn_jax.ops stay exact: values and gradients vs XLA's conv.

``tests/test_ops.py`` covers the public dispatch; this file covers the pieces added for speed
(the hand-written stride-1 depthwise VJP and its chunked kernel-gradient reduction) on shapes
that exercise them: several batch chunks, odd sizes, one-sided and over-sized padding, bf16.
No timing assertions here: timings live in experiments/bench_step.py.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pemn_jax import ops

TOL = dict(rtol=2e-5, atol=2e-5)


def _reference(x, kernel, padding):
  return lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=x.shape[-1],
  )


def _check(x, kernel, padding, seed=0, tol=TOL):
  ref = lambda x, k: _reference(x, k, padding)
  fast = lambda x, k: ops.depthwise_shift_add(x, k, (1, 1), padding)
  y_ref, vjp_ref = jax.vjp(ref, x, kernel)
  y, vjp = jax.vjp(fast, x, kernel)
  chex.assert_trees_all_close(y, y_ref, **tol)
  cot = jax.random.normal(jax.random.key(seed), y_ref.shape, y_ref.dtype)
  chex.assert_trees_all_close(vjp(cot), vjp_ref(cot), **tol)
  # Under jit too, and second-order-free use inside value_and_grad.
  g_ref = jax.grad(lambda x, k: jnp.sum(ref(x, k) * cot), argnums=(0, 1))(x, kernel)
  g = jax.jit(jax.grad(lambda x, k: jnp.sum(fast(x, k) * cot), argnums=(0, 1)))(x, kernel)
  chex.assert_trees_all_close(g, g_ref, **tol)


def _inputs(x_shape, ksize, seed=0, dtype=jnp.float32):
  kx, kk = jax.random.split(jax.random.key(seed))
  c = x_shape[-1]
  x = jax.random.normal(kx, x_shape, dtype)
  kernel = (0.5 * jax.random.normal(kk, (ksize[0], ksize[1], 1, c))).astype(dtype)
  return x, kernel


@pytest.mark.parametrize(
  'padding',
  ['SAME', 'VALID', ((1, 3), (0, 2)), ((2, 2), (3, 0))],
  ids=['same', 'valid', 'one-sided', 'wide'],
)
@pytest.mark.parametrize('ksize', [(5, 5), (3, 3), (1, 1), (3, 5)])
def test_depthwise_stride1_vjp_matches_xla(ksize, padding):
  x, kernel = _inputs((3, 9, 7, 5), ksize)
  _check(x, kernel, padding)


def _numpy_depthwise_vjp(x, kernel, pads, cot):
  """(y, dx, dkernel) of a stride-1 depthwise conv by brute-force loops in float64."""
  x, kernel, cot = (np.asarray(a, np.float64) for a in (x, kernel, cot))
  (ph0, ph1), (pw0, pw1) = pads
  n, h, w, c = x.shape
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
  oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  y = np.zeros((n, oh, ow, c))
  dxp = np.zeros_like(xp)
  dk = np.zeros_like(kernel)
  for i in range(kh):
    for j in range(kw):
      win = xp[:, i : i + oh, j : j + ow]
      y += win * kernel[i, j, 0]
      dxp[:, i : i + oh, j : j + ow] += cot * kernel[i, j, 0]
      dk[i, j, 0] = (win * cot).sum((0, 1, 2))
  return y, dxp[:, ph0 : ph0 + h, pw0 : pw0 + w], dk


@pytest.mark.parametrize('ksize', [(3, 3), (5, 3)])
def test_depthwise_oversized_padding_matches_brute_force(ksize):
  """Padding wider than the kernel on both axes (outputs that see only zeros).

  Checked against loops rather than XLA: jaxlib 0.10.2's own transpose of
  ``conv_general_dilated`` returns a wrong input gradient for pads ((4, 4), (5, 0)) with a 3x3
  depthwise kernel (found while writing this test).
  """
  pads = ((4, 4), (5, 0))
  x, kernel = _inputs((2, 9, 7, 3), ksize, seed=6)
  assert_vjp_matches_brute_force(
    lambda x, k: ops.depthwise_shift_add(x, k, (1, 1), pads), x, kernel, pads, seed=6
  )


def assert_vjp_matches_brute_force(fn, x, kernel, pads, seed):
  """``fn(x, kernel)`` (a stride-1 depthwise conv with ``pads``) and its VJP equal the loops."""
  y, vjp = jax.vjp(fn, x, kernel)
  cot = jax.random.normal(jax.random.key(seed), y.shape)
  y_np, dx_np, dk_np = _numpy_depthwise_vjp(x, kernel, pads, cot)
  dx, dk = vjp(cot)
  np.testing.assert_allclose(y, y_np, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_np, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, dk_np, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
  'batch, budget',
  [(12, 1), (12, 3000), (7, 2000), (16, 1 << 30)],
  ids=['chunk1', 'chunk-few', 'prime-batch', 'one-chunk'],
)
def test_depthwise_kernel_grad_chunked_scan_is_exact(monkeypatch, batch, budget):
  """The kernel gradient scans the batch in chunks; every chunking gives the same gradient."""
  monkeypatch.setattr(ops, 'DW_GRAD_CHUNK_BYTES', budget)
  x, kernel = _inputs((batch, 6, 6, 8), (5, 5), seed=1)
  _check(x, kernel, 'SAME', seed=1)


def test_batch_chunk_is_a_divisor_within_budget():
  assert ops._batch_chunk(128, 100, 1000) == 8
  assert ops._batch_chunk(128, 100, 50) == 1
  assert ops._batch_chunk(7, 10, 60) == 1
  assert ops._batch_chunk(12, 10, 60) == 6
  assert ops._batch_chunk(12, 10, 10**9) == 12


def test_depthwise_convmixer_shape_matches_xla():
  """ConvMixer's case: k=5, SAME, many channels, a batch that the scan splits."""
  x, kernel = _inputs((8, 8, 8, 64), (5, 5), seed=2)
  _check(x, kernel, 'SAME', seed=2, tol=dict(rtol=1e-4, atol=1e-4))


def test_depthwise_bfloat16_grads_close_to_float32():
  x, kernel = _inputs((4, 8, 8, 16), (5, 5), seed=3)
  cot = jax.random.normal(jax.random.key(3), x.shape)
  f = lambda x, k: jnp.sum(ops.depthwise_shift_add(x, k, (1, 1), 'SAME').astype(jnp.float32) * cot)
  g32 = jax.grad(f, argnums=(0, 1))(x, kernel)
  g16 = jax.grad(f, argnums=(0, 1))(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.bfloat16
  for a, b in zip(g16, g32):
    a, b = np.asarray(a, np.float32), np.asarray(b)
    assert np.max(np.abs(a - b)) <= 3e-2 * np.max(np.abs(b))


def test_strided_depthwise_still_uses_autodiff_and_matches_xla():
  x, kernel = _inputs((2, 9, 8, 4), (3, 3), seed=4)
  for strides in [(2, 2), (2, 1)]:
    ref = lambda x, k, s=strides: lax.conv_general_dilated(
      x, k, s, 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4
    )
    fast = lambda x, k, s=strides: ops.depthwise_shift_add(x, k, s, 'SAME')
    y_ref, vjp_ref = jax.vjp(ref, x, kernel)
    y, vjp = jax.vjp(fast, x, kernel)
    chex.assert_trees_all_close(y, y_ref, **TOL)
    chex.assert_trees_all_close(vjp(y_ref), vjp_ref(y_ref), **TOL)
