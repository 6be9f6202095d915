"""Masked Linen layers (pemn_jax.layers): collections, initialisation, effective weight, training.

The method (docs/method.md, section 1): frozen weights are plain Kaiming normal (std sqrt(2 /
fan_in)), never trained; scores U(-1/sqrt(fan_in), +1/sqrt(fan_in)); effective weight = w * mask,
keeping exactly ceil(k * n) entries; trainable = scores and BN. Section 2: values are drawn in
PyTorch layout and transposed into Flax layout.
"""

from __future__ import annotations

import functools
import math
import textwrap

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from pemn_jax import layers, masking
from pemn_jax.models import ConvMixer

RNGS = {'params': jax.random.key(1), layers.FROZEN: jax.random.key(2)}


class _FrozenKey(nn.Module):
  """Returns the first key a module at the top level draws from the 'frozen' stream."""

  @nn.compact
  def __call__(self):
    return self.make_rng(layers.FROZEN)


def _frozen_key_of_top_level_module(frozen_key):
  return _FrozenKey().apply({}, rngs={layers.FROZEN: frozen_key})


def _np(a):
  return np.asarray(a, np.float64)


# ---------------------------------------------------------------------------------------------
# Collections.


class _Baselines(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = layers.Conv(6, (3, 3), name='conv')(x)
    z = layers.Dense(5, name='dense')(y.mean((1, 2)))
    return layers.Dense(2, use_bias=True, name='dense_bias')(z)


def test_dense_baselines_have_trainable_kernels_and_no_frozen():
  v = jax.jit(_Baselines().init)(RNGS, jnp.zeros((1, 8, 8, 4)))
  assert set(v) == {'params'}
  assert set(v['params']['conv']) == {'kernel'}  # no bias by default
  assert set(v['params']['dense']) == {'kernel'}
  assert set(v['params']['dense_bias']) == {'kernel', 'bias'}
  chex.assert_shape(v['params']['conv']['kernel'], (3, 3, 4, 6))
  # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  assert np.abs(v['params']['conv']['kernel']).max() <= 1 / 6
  assert np.abs(v['params']['dense']['kernel']).max() <= 1 / math.sqrt(6)


# ---------------------------------------------------------------------------------------------
# Initialisation.


@pytest.mark.parametrize(
  'module, x_shape, flax_shape, torch_shape',
  [
    (layers.MaskedDense(5), (1, 3), (3, 5), (5, 3)),
    (layers.MaskedConv(4, (3, 2)), (1, 6, 6, 2), (3, 2, 2, 4), (4, 2, 3, 2)),
    (layers.MaskedConv(6, (3, 3), feature_group_count=3), (1, 6, 6, 3), (3, 3, 1, 6), (6, 1, 3, 3)),
  ],
)
def test_frozen_is_kaiming_normal_drawn_in_torch_layout(module, x_shape, flax_shape, torch_shape):
  v = module.init(RNGS, jnp.zeros(x_shape))
  # Scores are the only params (no bias, no trainable kernel); the kernel is in 'frozen'.
  assert set(v) == {'params', layers.FROZEN}
  assert set(v['params']) == {'scores'}
  assert set(v[layers.FROZEN]) == {'kernel'}
  chex.assert_type([v['params']['scores'], v[layers.FROZEN]['kernel']], jnp.float32)
  chex.assert_shape(v['params']['scores'], flax_shape)
  w = v[layers.FROZEN]['kernel']
  assert w.shape == flax_shape
  assert layers.torch_shape(flax_shape) == torch_shape
  fan_in = math.prod(torch_shape[1:])  # in / groups * kh * kw
  key = _frozen_key_of_top_level_module(RNGS[layers.FROZEN])
  drawn = jax.random.normal(key, torch_shape) * np.float32(np.sqrt(2.0 / fan_in))
  if drawn.ndim == 2:
    expected = drawn.T  # (out, in) -> (in, out)
  else:
    expected = drawn.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  np.testing.assert_array_equal(w, expected)
  # Drawing in Flax layout (equivalently, reshaping the PyTorch-layout draw instead of
  # transposing it) gives the same values in other places: the layout matters.
  assert not np.array_equal(w, np.asarray(drawn).reshape(flax_shape))


def test_frozen_and_score_statistics_on_big_layers():
  fan_in = 512
  v = jax.jit(layers.MaskedDense(256).init)(RNGS, jnp.zeros((1, fan_in)))
  w = _np(v[layers.FROZEN]['kernel']).ravel()  # 131,072 draws
  std = math.sqrt(2.0 / fan_in)
  assert abs(w.mean()) < 0.01 * std
  assert w.std() == pytest.approx(std, rel=0.01)
  # Plain, not truncated: a truncated normal (at 2 std) never goes past 2 std; here ~4.6% do.
  assert np.mean(np.abs(w) > 2 * std) == pytest.approx(0.0455, abs=0.003)
  assert np.abs(w).max() > 4 * std
  kurtosis = np.mean((w - w.mean()) ** 4) / w.var() ** 2
  assert kurtosis == pytest.approx(3.0, abs=0.1)
  # Scores: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  s = _np(v['params']['scores']).ravel()
  bound = 1.0 / math.sqrt(fan_in)
  assert s.min() >= -bound and s.max() <= bound
  assert s.min() < -0.99 * bound and s.max() > 0.99 * bound
  assert abs(s.mean()) < 0.01 * bound
  assert s.var() == pytest.approx(bound**2 / 3, rel=0.02)


def test_depthwise_conv_fan_in_is_kh_kw():
  # (in_channels / groups) * kh * kw = 25: std sqrt(2/25), score bound 1/5.
  v = jax.jit(layers.MaskedConv(256, (5, 5), feature_group_count=256).init)(
    RNGS, jnp.zeros((1, 4, 4, 256))
  )
  s = _np(v['params']['scores'])
  w = _np(v[layers.FROZEN]['kernel'])
  assert s.shape == w.shape == (5, 5, 1, 256)
  assert np.abs(s).max() <= 0.2 and np.abs(s).max() > 0.199
  assert w.std() == pytest.approx(math.sqrt(2.0 / 25), rel=0.03)


def test_frozen_and_scores_use_different_streams():
  a = layers.MaskedDense(8).init(RNGS, jnp.zeros((1, 8)))
  b = layers.MaskedDense(8).init(
    {'params': RNGS['params'], layers.FROZEN: jax.random.key(9)}, jnp.zeros((1, 8))
  )
  np.testing.assert_array_equal(a['params']['scores'], b['params']['scores'])
  assert not np.array_equal(a[layers.FROZEN]['kernel'], b[layers.FROZEN]['kernel'])


# ---------------------------------------------------------------------------------------------
# The effective weight.


@pytest.mark.parametrize('k', [0.3, 0.5, 1.0])
def test_masked_dense_effective_weight(k):
  module = layers.MaskedDense(10, keep_fraction=k)
  v = module.init(RNGS, jnp.zeros((1, 7)))
  # Dense is linear: applying it to the identity reads off the effective kernel.
  w_eff = _np(module.apply(v, jnp.eye(7)))
  w = _np(v[layers.FROZEN]['kernel'])
  s = _np(v['params']['scores'])
  kept = math.ceil(k * 70) if k != 0.3 else 21  # 0.3 * 70 = 21.000000000000004
  assert np.count_nonzero(w_eff) == kept == masking.num_kept(70, k)
  # The kept entries are the largest |score|, at their frozen values.
  mask = np.zeros(70)
  mask[np.argsort(-np.abs(s).ravel(), kind='stable')[:kept]] = 1
  np.testing.assert_allclose(w_eff, w * mask.reshape(7, 10), rtol=1e-6, atol=0)


@pytest.mark.parametrize('groups, cin, cout', [(1, 3, 5), (4, 4, 4)], ids=['dense', 'depthwise'])
def test_masked_conv_effective_weight(groups, cin, cout):
  module = layers.MaskedConv(
    cout,
    (3, 3),
    strides=(2, 2),
    padding=((1, 0), (0, 1)),
    feature_group_count=groups,
    keep_fraction=0.3,
  )
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 7, cin)), jnp.float32)
  v = module.init(RNGS, x)
  w = _np(v[layers.FROZEN]['kernel'])
  s = _np(v['params']['scores'])
  n = w.size
  mask = np.zeros(n)
  mask[np.argsort(-np.abs(s).ravel(), kind='stable')[: masking.num_kept(n, 0.3)]] = 1
  w_eff = (w * mask.reshape(w.shape)).astype(np.float32)
  assert np.count_nonzero(w_eff) == math.ceil(0.3 * n - 1e-9)
  expected = lax.conv_general_dilated(
    x,
    w_eff,
    (2, 2),
    ((1, 0), (0, 1)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
  )
  chex.assert_trees_all_close(module.apply(v, x), expected, rtol=1e-5, atol=1e-5)


def test_mask_follows_the_scores_at_apply_time():
  module = layers.MaskedDense(1, keep_fraction=0.5)
  v = module.init(RNGS, jnp.zeros((1, 4)))
  w = _np(v[layers.FROZEN]['kernel'])[:, 0]
  for scores, kept in [([0.9, 0.1, -0.8, 0.0], [0, 2]), ([0.0, 0.5, 0.1, -0.7], [1, 3])]:
    v2 = {**v, 'params': {'scores': jnp.asarray(scores, jnp.float32)[:, None]}}
    w_eff = _np(module.apply(v2, jnp.eye(4)))[:, 0]
    expected = np.zeros(4)
    expected[kept] = w[kept]
    np.testing.assert_array_equal(w_eff, expected)


def test_score_abs_false_ranks_raw_scores():
  v = layers.MaskedDense(1).init(RNGS, jnp.zeros((1, 4)))
  w = _np(v[layers.FROZEN]['kernel'])[:, 0]
  v2 = {**v, 'params': {'scores': jnp.asarray([[0.9], [0.1], [-0.8], [0.2]], jnp.float32)}}
  for score_abs, kept in [(True, [0, 2]), (False, [0, 3])]:
    module = layers.MaskedDense(1, keep_fraction=0.5, score_abs=score_abs)
    expected = np.zeros(4)
    expected[kept] = w[kept]
    np.testing.assert_array_equal(_np(module.apply(v2, jnp.eye(4)))[:, 0], expected)


def test_bfloat16_compute_keeps_float32_variables():
  module = layers.MaskedDense(4, dtype=jnp.bfloat16)
  v = module.init(RNGS, jnp.zeros((1, 3)))
  chex.assert_type([v['params']['scores'], v[layers.FROZEN]['kernel']], jnp.float32)
  assert module.apply(v, jnp.ones((2, 3))).dtype == jnp.bfloat16


@pytest.mark.parametrize('bad', [0, -0.5, 1.5, float('nan'), True, '0.5'])
def test_layer_rejects_bad_keep_fraction(bad):
  with pytest.raises(ValueError, match=r'strategy\.keep_fraction'):
    layers.MaskedDense(4, keep_fraction=bad).init(RNGS, jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match=r'strategy\.keep_fraction'):
    layers.MaskedConv(4, keep_fraction=bad).init(RNGS, jnp.zeros((1, 4, 4, 2)))


def test_conv_rejects_groups_not_dividing_channels():
  with pytest.raises(ValueError, match='feature_group_count'):
    layers.MaskedConv(4, feature_group_count=3).init(RNGS, jnp.zeros((1, 4, 4, 4)))


# ---------------------------------------------------------------------------------------------
# Training: gradients, optimizer state, no retracing.


def _tiny_convmixer():
  conv = functools.partial(layers.MaskedConv, keep_fraction=0.5)
  dense = functools.partial(layers.MaskedDense, keep_fraction=0.5)
  return ConvMixer(
    dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, conv=conv, dense=dense
  )


def _batch(seed, n=4):
  rng = np.random.default_rng(seed)
  return (
    jnp.asarray(rng.standard_normal((n, 8, 8, 3)), jnp.float32),
    jnp.asarray(rng.integers(0, 3, n), jnp.int32),
  )


def _paths(tree):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope='module')
def tiny_convmixer():
  """The model and variables shaped by its init, filled with numpy draws (a real init costs
  seconds of XLA:CPU compile; init itself is tested above)."""
  model = _tiny_convmixer()
  abstract = jax.eval_shape(model.init, RNGS, _batch(0)[0])
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']") or name.endswith("['scale']"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name.endswith("['mean']") or name.endswith("['bias']"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name.endswith("['scores']"):
      return jnp.asarray(rng.uniform(-0.3, 0.3, leaf.shape), leaf.dtype)
    return jnp.asarray(rng.standard_normal(leaf.shape) * 0.5, leaf.dtype)

  return model, jax.tree_util.tree_map_with_path(fill, abstract)


def test_gradient_and_optimizer_state_never_contain_frozen(tiny_convmixer):
  model, v = tiny_convmixer
  x, y = _batch(0)
  assert set(v) == {'params', 'batch_stats', layers.FROZEN}
  assert not any(layers.FROZEN in p for p in _paths(v['params']))

  def loss(variables):
    logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def grads_fn(v):
    by_params = jax.grad(lambda p: loss({**v, 'params': p}))(v['params'])
    # Even if someone differentiates the whole variable dict, frozen gets a zero gradient.
    return by_params, jax.grad(loss)(v)

  grads, g_all = grads_fn(v)
  assert _paths(grads) == _paths(v['params'])
  assert not any('kernel' in p or layers.FROZEN in p for p in _paths(grads))
  # Every score gets a gradient, kept or not (straight-through).
  head = np.asarray(grads['head']['scores'])
  assert np.count_nonzero(head) == head.size
  for leaf in jax.tree.leaves(g_all[layers.FROZEN]):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  chex.assert_trees_all_close(g_all['params'], grads)

  tx = optax.adamw(1e-3, weight_decay=0.005)
  state = tx.init(v['params'])
  assert not any(layers.FROZEN in p or "'kernel'" in p for p in _paths(state))
  n_params = len(jax.tree.leaves(v['params']))
  stem_shape = v[layers.FROZEN]['stem']['kernel'].shape
  n_stem_shaped = sum(
    1 for leaf in jax.tree.leaves(state) if getattr(leaf, 'shape', None) == stem_shape
  )
  assert n_stem_shaped == 2  # mu and nu of stem/scores, nothing of stem's frozen kernel
  assert len(jax.tree.leaves(state)) == 2 * n_params + 1  # mu, nu, count


def test_jitted_train_step_does_not_retrace(tiny_convmixer):
  model, v = tiny_convmixer
  tx = optax.adamw(1e-2, weight_decay=0.005)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, batch_stats, opt_state, frozen, x, y):
    def loss_fn(p):
      logits, upd = model.apply(
        {'params': p, 'batch_stats': batch_stats, layers.FROZEN: frozen},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd['batch_stats'], opt_state, loss

  params, stats, opt_state, frozen = (
    v['params'],
    v['batch_stats'],
    tx.init(v['params']),
    v[layers.FROZEN],
  )
  losses = []
  for i in range(4):
    x, y = _batch(i)
    params, stats, opt_state, loss = step(params, stats, opt_state, frozen, x, y)
    losses.append(float(loss))
  assert all(np.isfinite(losses))
  # Scores and BN statistics moved; the frozen weights are the ones we passed in.
  assert not np.array_equal(params['head']['scores'], v['params']['head']['scores'])
  assert not np.array_equal(stats['stem_bn']['mean'], v['batch_stats']['stem_bn']['mean'])
  chex.assert_trees_all_equal(frozen, v[layers.FROZEN])


# ---------------------------------------------------------------------------------------------
# Composition into a user's own module (the README / layers docstring example).


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = layers.MaskedConv(32, (3, 3), keep_fraction=0.5)(x)
    x = nn.relu(x)
    x = layers.MaskedConv(32, (3, 3), feature_group_count=32, keep_fraction=0.25)(x)
    return layers.MaskedDense(10)(x.mean((1, 2)))


def test_compose_into_own_module():
  x = jnp.ones((2, 8, 8, 3))
  k1, k2 = jax.random.split(jax.random.key(0))
  variables = jax.jit(_Net().init)({'params': k1, 'frozen': k2}, x)
  assert set(variables) == {'params', 'frozen'}
  assert set(variables['params']) == {'MaskedConv_0', 'MaskedConv_1', 'MaskedDense_0'}
  logits = jax.jit(_Net().apply)(variables, x)
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  assert variables['frozen']['MaskedConv_1']['kernel'].shape == (3, 3, 1, 32)


def test_the_extension_seam_example_in_the_docstring_is_a_working_layer():
  import re

  from pemn_jax import layers as layers_mod

  example = re.search(r'::\n\n(.*?)\n\n  \(``tests', layers_mod.DenseBase.__doc__, re.S).group(1)
  namespace = {'layers': layers_mod, 'masking': masking, 'jax': jax, 'jnp': jnp}
  exec(textwrap.dedent(example), namespace)  # noqa: S102
  layer = namespace['SignedConstantMaskedDense'](features=8, keep_fraction=0.25)
  x = jnp.ones((2, 16))
  v = layer.init({'params': jax.random.key(0), 'frozen': jax.random.key(1)}, x)
  assert set(v) == {'params', 'frozen'} and set(v['params']) == {'scores'}
  assert set(np.unique(np.abs(np.asarray(v['frozen']['kernel'])))) == {1.0}
  mask = masking.score_mask(v['params']['scores'], 0.25)
  assert int(mask.sum()) == masking.num_kept(16 * 8, 0.25)
  grads = jax.grad(lambda p: layer.apply({**v, 'params': p}, x).sum())(v['params'])
  assert float(jnp.abs(grads['scores']).sum()) > 0  # trained through the straight-through mask
