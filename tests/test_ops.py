"""Every conv formulation of pemn_jax.ops equals lax.conv_general_dilated, values and gradients."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pemn_jax import ops

TOL = dict(rtol=1e-5, atol=1e-5)


def _reference(x, kernel, strides, padding, groups):
  return lax.conv_general_dilated(
    x,
    kernel,
    window_strides=strides,
    padding=padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )


def _inputs(x_shape, k_shape, seed=0):
  """Input, kernel and a seed for the cotangent (numpy: no per-shape compile)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  kernel = jnp.asarray(0.5 * rng.standard_normal(k_shape), jnp.float32)
  return x, kernel, rng


def _assert_same_value_and_grads(fs, x, kernel, strides, padding, groups, rng):
  """Each f(x, kernel) in ``fs`` vs the reference: values, and the VJP w.r.t. input and kernel.

  One jitted program per case computes everything (eager dispatch of the shift-add's many small
  ops would dominate the suite's runtime).
  """
  ref = lambda x, k: _reference(x, k, strides, padding, groups)
  y_shape = jax.eval_shape(ref, x, kernel).shape
  cot = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)

  @jax.jit
  def run(x, kernel, cot):
    out = []
    for f in (ref, *fs):
      y, vjp = jax.vjp(f, x, kernel)
      out.append((y, vjp(cot)))
    return out

  (y_ref, grads_ref), *rest = run(x, kernel, cot)
  for y, grads in rest:
    chex.assert_equal_shape([y, y_ref])
    chex.assert_trees_all_close(y, y_ref, **TOL)
    chex.assert_trees_all_close(grads, grads_ref, **TOL)


def _conv_primitives(f, *args):
  return [e.primitive.name for e in jax.make_jaxpr(f)(*args).eqns if 'conv' in e.primitive.name]


PADDINGS = ['SAME', 'VALID', ((1, 2), (2, 1))]


def _conv(impl, strides, padding, groups=1):
  return lambda x, k: ops.conv(x, k, strides, padding, feature_group_count=groups, impl=impl)


@pytest.mark.parametrize('padding', PADDINGS, ids=['same', 'valid', 'explicit'])
@pytest.mark.parametrize('strides', [(1, 1), (2, 2)], ids=['s1', 's2'])
@pytest.mark.parametrize('ksize', [3, 5])
def test_depthwise_shift_add_matches_xla(ksize, strides, padding):
  c = 4
  x, kernel, rng = _inputs((2, 9, 8, c), (ksize, ksize, 1, c))
  fs = [_conv(impl, strides, padding, c) for impl in ('fast', 'auto')]
  _assert_same_value_and_grads(fs, x, kernel, strides, padding, c, rng)
  # ... and it really is the shift-add formulation on CPU, not XLA's conv.
  for f in fs:
    assert _conv_primitives(f, x, kernel) == []


def test_depthwise_shift_add_uneven_strides_and_one_sided_padding():
  x, kernel, rng = _inputs((1, 7, 10, 3), (3, 3, 1, 3), seed=1)
  for strides, padding in [((2, 1), 'SAME'), ((1, 2), ((0, 0), (3, 0)))]:
    f = lambda x, k, s=strides, p=padding: ops.depthwise_shift_add(x, k, s, p)
    _assert_same_value_and_grads(
      [f, _conv('fast', strides, padding, 3)], x, kernel, strides, padding, 3, rng
    )


@pytest.mark.parametrize(
  'x_shape, ksize, padding',
  [
    ((2, 3, 6, 3), 3, ((4, 0), (0, 4))),  # padding wider than the kernel reach: dx is cropped
    ((2, 2, 6, 3), 5, ((4, 0), (2, 2))),  # taps that only ever see padding
    ((1, 5, 5, 2), 5, ((0, 0), (0, 0))),  # a single output pixel
  ],
  ids=['wide-padding', 'padding-only-taps', 'one-pixel'],
)
def test_depthwise_unusual_padding(x_shape, ksize, padding):
  c = x_shape[-1]
  x, kernel, rng = _inputs(x_shape, (ksize, ksize, 1, c), seed=5)
  _assert_same_value_and_grads(
    [_conv('fast', (1, 1), padding, c)], x, kernel, (1, 1), padding, c, rng
  )


@pytest.mark.parametrize('chunk_rows', [1, 2])
def test_depthwise_kernel_grad_in_batch_chunks(monkeypatch, chunk_rows):
  """The stride-1 kernel gradient walks the batch in chunks when a batch exceeds the budget."""
  n, c = 4, 3
  x, kernel, rng = _inputs((n, 6, 5, c), (3, 3, 1, c), seed=6)
  row_bytes = (6 * 5 * c + 6 * 5 * c) * 4  # one example of x and of the cotangent, fp32
  monkeypatch.setattr(ops, 'DW_GRAD_CHUNK_BYTES', chunk_rows * row_bytes)
  f = _conv('fast', (1, 1), 'SAME', c)
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: f(x, k).sum()))(kernel))
  assert 'scan' in jaxpr or 'while' in jaxpr  # the chunked loop is really taken
  _assert_same_value_and_grads([f], x, kernel, (1, 1), 'SAME', c, rng)


def test_pointwise_dot_matches_xla():
  x, kernel, rng = _inputs((2, 5, 6, 3), (1, 1, 3, 7), seed=2)
  fs = [
    _conv(impl, (1, 1), pad)
    for impl in ('fast', 'auto')
    for pad in ('SAME', 'VALID', ((0, 0), (0, 0)))
  ]
  _assert_same_value_and_grads([*fs, ops.pointwise_dot], x, kernel, (1, 1), 'VALID', 1, rng)
  for f in fs:
    assert _conv_primitives(f, x, kernel) == []


@pytest.mark.parametrize(
  'hw, p',
  [((8, 8), 2), ((8, 12), 4), ((7, 8), 2), ((28, 28), 3), ((9, 10), 4)],
  ids=['8x8p2', '8x12p4', '7x8p2-undivisible', '28x28p3-undivisible', '9x10p4-undivisible'],
)
def test_patchify_dot_matches_xla(hw, p):
  x, kernel, rng = _inputs((2, *hw, 3), (p, p, 3, 5), seed=3)
  fs = [_conv(impl, (p, p), 'VALID') for impl in ('fast', 'auto')]
  _assert_same_value_and_grads([*fs, ops.patchify_dot], x, kernel, (p, p), 'VALID', 1, rng)
  for f in fs:
    assert _conv_primitives(f, x, kernel) == []


@pytest.mark.parametrize(
  'case',
  [
    # (x shape, kernel shape, strides, padding, groups): cases left to XLA's conv.
    ((2, 8, 8, 3), (3, 3, 3, 4), (1, 1), 'SAME', 1),
    ((2, 8, 8, 4), (3, 3, 4, 8), (2, 2), ((1, 1), (1, 1)), 1),
    ((2, 8, 8, 4), (3, 3, 2, 6), (1, 1), 'SAME', 2),  # grouped, not depthwise
    ((2, 8, 8, 4), (3, 3, 1, 8), (1, 1), 'SAME', 4),  # depth multiplier 2
    ((2, 7, 7, 3), (2, 2, 3, 4), (2, 2), 'SAME', 1),  # patch size, but padded
    ((2, 8, 8, 3), (1, 1, 3, 4), (2, 2), 'VALID', 1),  # 1x1 with stride
  ],
  ids=['3x3', '3x3s2', 'grouped', 'multiplier', 'padded-patch', '1x1s2'],
)
def test_other_convs_match_xla(case):
  x_shape, k_shape, strides, padding, groups = case
  x, kernel, rng = _inputs(x_shape, k_shape, seed=4)
  fs = [_conv(impl, strides, padding, groups) for impl in ('fast', 'auto', 'xla')]
  _assert_same_value_and_grads(fs, x, kernel, strides, padding, groups, rng)


def test_xla_impl_always_calls_xla_conv():
  x, kernel, _ = _inputs((1, 6, 6, 4), (3, 3, 1, 4))
  f = lambda x, k: ops.conv(x, k, (1, 1), 'SAME', feature_group_count=4, impl='xla')
  assert _conv_primitives(f, x, kernel) == ['conv_general_dilated']


def test_jit_matches_eager():
  x, kernel, _ = _inputs((2, 8, 8, 4), (5, 5, 1, 4))
  f = lambda x, k: ops.conv(x, k, (1, 1), 'SAME', feature_group_count=4)
  chex.assert_trees_all_close(jax.jit(f)(x, kernel), f(x, kernel), **TOL)


def test_bad_impl_and_padding_are_named():
  x, kernel, _ = _inputs((1, 4, 4, 2), (3, 3, 1, 2))
  with pytest.raises(ValueError, match=r'model\.conv_impl'):
    ops.conv(x, kernel, impl='cudnn')
  with pytest.raises(ValueError, match='padding'):
    ops.conv(x, kernel, padding='CIRCULAR', feature_group_count=2, impl='fast')


def test_bfloat16_depthwise_close_to_float32():
  x, kernel, _ = _inputs((1, 6, 6, 4), (3, 3, 1, 4))
  y16 = ops.conv(
    x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), feature_group_count=4, impl='fast'
  )
  assert y16.dtype == jnp.bfloat16
  chex.assert_trees_all_close(
    y16.astype(jnp.float32), _reference(x, kernel, (1, 1), 'SAME', 4), rtol=5e-2, atol=5e-2
  )
