"""NNX masked layers (pemn_jax.nnx): variables, drawn values, Linen parity, training, strategies.

What is pinned: ``Frozen`` kernels are invisible to ``nnx.grad`` and ``nnx.Optimizer(...,
wrt=nnx.Param)``; masks keep exactly ``masking.num_kept`` entries; a layer's values are the Linen
layer's functions of its per-layer keys; forward and score gradients equal the Linen layers' for
equal variables; jitted training lowers a loss and never touches a kernel; strategies follow the
order of first call; ``nnx.bridge`` carries the ``frozen`` collection as ``Frozen``; and the
module docstring's recipe runs as written. Training, order and bridge tests run in NNX's graph mode
and in its tree mode (``nnx.set_graph_mode(False)``, which refuses shared references).
"""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx, traverse_util

from pemn_jax import layers, masking, strategies
from pemn_jax import nnx as pnnx

K_PARAMS, K_FROZEN = jax.random.key(3), jax.random.key(4)
RECIPE_MARKER = 'runs this block verbatim)::\n'


@pytest.fixture(params=[True, False], ids=['graph_mode', 'tree_mode'])
def graph_mode(request):
  """Runs a test in NNX graph mode and again in tree mode."""
  with nnx.set_graph_mode(request.param):
    yield request.param


class _LinenKeys(nn.Module):
  """The keys a top-level Linen layer gets from its first make_rng of each stream."""

  @nn.compact
  def __call__(self):
    return self.make_rng(layers.FROZEN), self.make_rng('params')


class _FixedKeys:
  """Stands in for ``nnx.Rngs``: its streams hand out given keys (all a masked layer draws)."""

  def __init__(self, frozen_key, params_key):
    self._frozen, self._params = frozen_key, params_key

  def frozen(self):
    return self._frozen

  def params(self):
    return self._params


def _linen_dense_and_nnx(features_in, features_out, **kw):
  """(Linen MaskedDense, its variables, the NNX MaskedLinear drawn from the same per-layer keys)."""
  linen = layers.MaskedDense(features_out, **kw)
  x = jnp.ones((2, features_in))
  variables = linen.init({'params': K_PARAMS, layers.FROZEN: K_FROZEN}, x)
  (kf, kp), _ = _LinenKeys().init_with_output({'params': K_PARAMS, layers.FROZEN: K_FROZEN})
  layer = pnnx.MaskedLinear(features_in, features_out, rngs=_FixedKeys(kf, kp), **kw)
  return linen, variables, layer


def _linen_conv_and_nnx(cin, cout, kernel_size, **kw):
  """(Linen MaskedConv, its variables, the NNX MaskedConv drawn from the same per-layer keys)."""
  linen = layers.MaskedConv(cout, kernel_size, **kw)
  x = jnp.ones((1, 6, 6, cin))
  variables = linen.init({'params': K_PARAMS, layers.FROZEN: K_FROZEN}, x)
  (kf, kp), _ = _LinenKeys().init_with_output({'params': K_PARAMS, layers.FROZEN: K_FROZEN})
  layer = pnnx.MaskedConv(cin, cout, kernel_size, rngs=_FixedKeys(kf, kp), **kw)
  return linen, variables, layer


# -- the recipe ------------------------------------------------------------------------------------


def test_docstring_recipe_runs_verbatim():
  code = textwrap.dedent(pnnx.__doc__.split(RECIPE_MARKER, 1)[1])
  assert 'train_step(model, optimizer, x, y)' in code  # the block is the whole recipe
  ns: dict = {}
  exec(compile(code, 'pemn_jax.nnx recipe', 'exec'), ns)
  losses = ns['losses']
  assert len(losses) == 20 and losses[-1] < losses[0]
  kernels = pnnx.frozen_kernels(ns['model'])
  assert ns['order'] == [('conv', 'kernel'), ('head', 'kernel')]
  shapes = [strategies.get_path(kernels, p).shape for p in ns['order']]
  assert strategies.unique_values(kernels) == strategies.stored_value_count(
    shapes, 'random_vector_padding', 0.1
  )


# -- variables and masks ---------------------------------------------------------------------------


def test_frozen_is_a_variable_but_not_a_param():
  assert issubclass(pnnx.Frozen, nnx.Variable) and not issubclass(pnnx.Frozen, nnx.Param)
  layer = pnnx.MaskedLinear(5, 3, use_bias=True, rngs=nnx.Rngs(params=0, frozen=1))
  assert type(layer.kernel) is pnnx.Frozen and type(layer.scores) is nnx.Param
  assert set(nnx.state(layer, nnx.Param).keys()) == {'scores', 'bias'}
  assert set(nnx.state(layer, pnnx.Frozen).keys()) == {'kernel'}
  assert nnx.variablelib.variable_type_from_name(layers.FROZEN) is pnnx.Frozen


@pytest.mark.parametrize('keep_fraction', [0.05, 0.3, 0.5, 1.0])
@pytest.mark.parametrize(
  'make',
  [
    lambda k, r: pnnx.MaskedLinear(10, 7, keep_fraction=k, rngs=r),
    lambda k, r: pnnx.MaskedConv(6, 4, 3, keep_fraction=k, rngs=r),
    lambda k, r: pnnx.MaskedConv(6, 6, (3, 2), feature_group_count=6, keep_fraction=k, rngs=r),
  ],
  ids=['linear', 'conv', 'depthwise'],
)
def test_exact_kept_count(make, keep_fraction):
  layer = make(keep_fraction, nnx.Rngs(params=0, frozen=1))
  n = layer.kernel[...].size
  assert int(layer.mask().sum()) == masking.num_kept(n, keep_fraction)
  assert int((layer.effective_kernel() != 0).sum()) == masking.num_kept(n, keep_fraction)


def test_shapes_and_validation():
  conv = pnnx.MaskedConv(8, 12, 3, feature_group_count=4, rngs=nnx.Rngs(0))
  assert conv.kernel[...].shape == (3, 3, 2, 12) == conv.scores[...].shape
  assert conv(jnp.ones((2, 5, 5, 8))).shape == (2, 5, 5, 12)
  assert pnnx.MaskedLinear(5, 3, rngs=nnx.Rngs(0)).kernel[...].shape == (5, 3)
  with pytest.raises(ValueError, match='feature_group_count'):
    pnnx.MaskedConv(8, 12, 3, feature_group_count=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='keep_fraction'):
    pnnx.MaskedLinear(5, 3, keep_fraction=0.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='input channels'):
    conv(jnp.ones((2, 5, 5, 3)))


def test_frozen_not_in_grads_nor_optimizer():
  model = nnx.Sequential(
    pnnx.MaskedLinear(4, 6, use_bias=True, rngs=nnx.Rngs(params=0, frozen=1)),
    pnnx.MaskedLinear(6, 2, rngs=nnx.Rngs(params=2, frozen=3)),
  )
  x = jnp.ones((3, 4))
  grads = nnx.grad(lambda m: (m(x) ** 2).sum())(model)
  grad_paths = set(traverse_util.flatten_dict(nnx.to_pure_dict(grads)))
  assert grad_paths == {('layers', 0, 'scores'), ('layers', 0, 'bias'), ('layers', 1, 'scores')}
  assert not any(isinstance(v, pnnx.Frozen) for v in jax.tree.leaves(grads, is_leaf=_is_var))

  # Tree mode's nnx.grad is jax.grad of the whole module: it has a Frozen entry, exactly zero.
  with nnx.set_graph_mode(False):
    tree_grads = nnx.grad(lambda m: (m(x) ** 2).sum())(model)
  graph_grads = nnx.to_pure_dict(grads)['layers']
  for i, layer in enumerate(tree_grads.layers):
    assert type(layer.kernel) is pnnx.Frozen and not np.any(layer.kernel[...])
    np.testing.assert_array_equal(layer.scores[...], graph_grads[i]['scores'])

  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  opt_leaves = jax.tree.leaves_with_path(nnx.state(optimizer))
  assert opt_leaves and not any('kernel' in jax.tree_util.keystr(p) for p, _ in opt_leaves)
  assert any('scores' in jax.tree_util.keystr(p) for p, _ in opt_leaves)


def _is_var(x):
  return isinstance(x, nnx.Variable)


# -- drawn values ----------------------------------------------------------------------------------


def test_values_are_linen_functions_of_the_per_layer_keys():
  rngs, twin = (
    nnx.Rngs(params=K_PARAMS, frozen=K_FROZEN),
    nnx.Rngs(params=K_PARAMS, frozen=K_FROZEN),
  )
  layer = pnnx.MaskedConv(4, 6, 3, rngs=rngs)
  kf, kp = twin.frozen(), twin.params()  # the keys the layer drew: the first of each stream
  np.testing.assert_array_equal(layer.kernel[...], layers.kaiming_normal_frozen(kf, (3, 3, 4, 6)))
  np.testing.assert_array_equal(layer.scores[...], layers.uniform_fan_in(kp, (3, 3, 4, 6)))
  # The Linen layer applies the same functions to its own per-layer keys...
  linen = layers.MaskedConv(6, (3, 3)).init(
    {'params': K_PARAMS, layers.FROZEN: K_FROZEN}, jnp.ones((1, 6, 6, 4))
  )
  (lf, lp), _ = _LinenKeys().init_with_output({'params': K_PARAMS, layers.FROZEN: K_FROZEN})
  np.testing.assert_array_equal(
    linen[layers.FROZEN]['kernel'], layers.kaiming_normal_frozen(lf, (3, 3, 4, 6))
  )
  np.testing.assert_array_equal(linen['params']['scores'], layers.uniform_fan_in(lp, (3, 3, 4, 6)))
  # ...which differ from NNX's for the same top-level keys: what is NOT guaranteed.
  assert not np.array_equal(linen[layers.FROZEN]['kernel'], layer.kernel[...])


@pytest.mark.parametrize(
  'build',
  [
    lambda: _linen_dense_and_nnx(9, 5),
    lambda: _linen_dense_and_nnx(9, 5, use_bias=True, keep_fraction=0.3),
    lambda: _linen_conv_and_nnx(4, 6, (3, 3)),
    lambda: _linen_conv_and_nnx(6, 6, (3, 3), feature_group_count=6, strides=(2, 2)),
  ],
  ids=['dense', 'dense_bias', 'conv', 'depthwise_s2'],
)
def test_same_per_layer_keys_give_the_linen_values(build):
  _, variables, layer = build()
  np.testing.assert_array_equal(layer.kernel[...], variables[layers.FROZEN]['kernel'])
  np.testing.assert_array_equal(layer.scores[...], variables['params']['scores'])
  if 'bias' in variables['params']:
    np.testing.assert_array_equal(layer.bias[...], variables['params']['bias'])


# -- forward and gradients vs Linen ----------------------------------------------------------------


@pytest.mark.parametrize('score_abs', [True, False])
@pytest.mark.parametrize(
  'build, x_shape',
  [
    (lambda a: _linen_dense_and_nnx(9, 5, use_bias=True, score_abs=a), (4, 9)),
    (lambda a: _linen_conv_and_nnx(4, 6, (3, 3), padding='VALID', score_abs=a), (2, 7, 7, 4)),
    (
      lambda a: _linen_conv_and_nnx(
        6, 6, (3, 3), feature_group_count=6, strides=(2, 2), score_abs=a, keep_fraction=0.3
      ),
      (2, 8, 8, 6),
    ),
    (lambda a: _linen_conv_and_nnx(4, 8, (2, 2), strides=(2, 2), score_abs=a), (2, 8, 8, 4)),
  ],
  ids=['dense_bias', 'conv_valid', 'depthwise_s2', 'patchify'],
)
def test_forward_and_gradients_equal_linen(build, x_shape, score_abs):
  linen, variables, layer = build(score_abs)
  x = jax.random.normal(jax.random.key(7), x_shape)
  target = jax.random.normal(jax.random.key(8), linen.apply(variables, x).shape)

  def loss(y):
    return ((y - target) ** 2).mean()

  y_linen = linen.apply(variables, x)
  np.testing.assert_allclose(layer(x), y_linen, rtol=1e-6, atol=1e-6)
  g_linen = jax.grad(
    lambda p: loss(linen.apply({'params': p, layers.FROZEN: variables[layers.FROZEN]}, x))
  )(variables['params'])
  g_nnx = nnx.to_pure_dict(nnx.grad(lambda m: loss(m(x)))(layer))
  assert set(g_nnx) == set(g_linen)
  for name in g_linen:
    np.testing.assert_allclose(g_nnx[name], g_linen[name], rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(g_nnx['scores']).sum()) > 0


# -- training --------------------------------------------------------------------------------------


class _MLP(nnx.Module):
  """Three masked layers; no module is referenced twice, so tree mode accepts it."""

  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List(
      [
        pnnx.MaskedLinear(8, 32, rngs=rngs),
        pnnx.MaskedLinear(32, 32, rngs=rngs),
        pnnx.MaskedLinear(32, 4, rngs=rngs),
      ]
    )

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def _toy_problem():
  x = jax.random.normal(jax.random.key(10), (64, 8))
  y = jnp.argmax(x[:, :4], axis=-1)  # the class is the largest of the first 4 inputs
  return x, y


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def test_nnx_jit_training_lowers_loss_and_keeps_kernels(graph_mode):
  model = _MLP(nnx.Rngs(params=0, frozen=1))
  kernels = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, pnnx.Frozen)))
  scores = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-2, weight_decay=5e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  x, y = _toy_problem()
  losses = [float(step(model, optimizer, x, y)) for _ in range(60)]
  assert losses[-1] < 0.6 * losses[0], losses
  jax.tree.map(
    np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, pnnx.Frozen)), kernels
  )
  changed = jax.tree.map(
    lambda a, b: not np.array_equal(a, b), nnx.to_pure_dict(nnx.state(model, nnx.Param)), scores
  )
  assert all(jax.tree.leaves(changed))


def test_split_merge_jax_jit_training_matches_nnx_jit():
  x, y = _toy_problem()
  tx = optax.adamw(3e-2, weight_decay=5e-3)
  model = _MLP(nnx.Rngs(params=0, frozen=1))
  graphdef, params, frozen = nnx.split(model, nnx.Param, pnnx.Frozen)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, frozen, x, y):
    loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graphdef, p, frozen), x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(5):
    params, opt_state, _ = step(params, opt_state, frozen, x, y)

  twin = _MLP(nnx.Rngs(params=0, frozen=1))
  optimizer = nnx.Optimizer(twin, tx, wrt=nnx.Param)
  nnx_step = nnx.jit(lambda m, o: o.update(m, nnx.grad(_loss)(m, x, y)))
  for _ in range(5):
    nnx_step(twin, optimizer)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    nnx.to_pure_dict(params),
    nnx.to_pure_dict(nnx.state(twin, nnx.Param)),
  )


# -- strategies and their order --------------------------------------------------------------------


@pytest.mark.parametrize(
  'name, rp_ratio',
  [
    ('random_vector_padding', 0.1),
    ('max_layer_padding', None),
    ('one_layer', None),
    ('mask', None),
  ],
)
def test_strategy_on_a_three_layer_model(graph_mode, name, rp_ratio):
  model = _MLP(nnx.Rngs(params=0, frozen=1))
  before = pnnx.frozen_kernels(model)
  x, _ = _toy_problem()
  order = pnnx.call_order(model, x)
  assert order == [('layers', 0, 'kernel'), ('layers', 1, 'kernel'), ('layers', 2, 'kernel')]
  pnnx.apply_strategy(model, name, rp_ratio=rp_ratio, order=order)
  after = pnnx.frozen_kernels(model)
  shapes = [strategies.get_path(after, p).shape for p in order]
  assert shapes == [(8, 32), (32, 32), (32, 4)]
  assert strategies.unique_values(after) == strategies.stored_value_count(shapes, name, rp_ratio)
  expected = strategies.apply_strategy(before, order, name, rp_ratio)  # the Linen code path
  for path in order:
    np.testing.assert_array_equal(
      strategies.get_path(after, path), strategies.get_path(expected, path)
    )
  assert model(x).shape == (64, 4)


class _OutOfOrder(nnx.Module):
  """Built (skip, up, down), called (up, down, skip), stored by NNX sorted (down, skip, up).
  BatchNorm in training mode, to see that call_order leaves the model's statistics alone."""

  def __init__(self, rngs: nnx.Rngs):
    self.skip = pnnx.MaskedLinear(6, 3, rngs=rngs)
    self.up = pnnx.MaskedLinear(6, 6, rngs=rngs)
    self.down = pnnx.MaskedLinear(6, 3, rngs=rngs)  # the shape of skip: one-layer can share
    self.norm = nnx.BatchNorm(6, rngs=rngs)

  def __call__(self, x, *, train: bool):
    h = self.norm(jax.nn.relu(self.up(x)), use_running_average=not train)
    return self.down(h) + self.skip(x)


CALLS = [('up', 'kernel'), ('down', 'kernel'), ('skip', 'kernel')]


def test_call_order_is_the_depth_order(graph_mode):
  model = _OutOfOrder(nnx.Rngs(params=0, frozen=1))
  stats = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  assert pnnx.call_order(model, jnp.ones((5, 6)), train=True) == CALLS
  assert pnnx.call_order(model, jax.ShapeDtypeStruct((2, 6), jnp.float32), train=False) == CALLS
  jax.tree.map(
    np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), stats
  )
  # What NNX itself offers is sorted by name, which is not the depth order.
  graph = [('down', 'kernel'), ('skip', 'kernel'), ('up', 'kernel')]
  assert [p for p, _ in nnx.to_flat_state(nnx.state(model, pnnx.Frozen))] == graph
  assert strategies.kernel_paths(pnnx.frozen_kernels(model)) == graph
  assert strategies.kernel_paths(pnnx.frozen_kernels(model, CALLS)) == CALLS
  # No stamp, counter or shared object in the graph: two builds have one graphdef.
  assert nnx.graphdef(model) == nnx.graphdef(_OutOfOrder(nnx.Rngs(params=5, frozen=6)))


def test_strategy_follows_the_order_given(graph_mode):
  model = _OutOfOrder(nnx.Rngs(params=0, frozen=1))
  before = pnnx.frozen_kernels(model)
  pnnx.apply_strategy(model, 'one_layer', order=CALLS)
  expected = strategies.apply_strategy(before, CALLS, 'one_layer')
  after = pnnx.frozen_kernels(model)
  for path in CALLS:
    np.testing.assert_array_equal(
      strategies.get_path(after, path), strategies.get_path(expected, path)
    )
  # By depth, skip is the classifier (last) and keeps its own draw; in NNX's sorted order it
  # would come after down, of its shape, and copy it.
  np.testing.assert_array_equal(after['skip']['kernel'], before['skip']['kernel'])
  graph = [('down', 'kernel'), ('skip', 'kernel'), ('up', 'kernel')]
  wrong = strategies.apply_strategy(before, graph, 'one_layer')
  np.testing.assert_array_equal(wrong['skip']['kernel'], before['down']['kernel'])
  assert not np.array_equal(before['skip']['kernel'], before['down']['kernel'])

  model = _OutOfOrder(nnx.Rngs(params=0, frozen=1))
  pnnx.apply_strategy(model, 'max_layer_padding', order=CALLS)
  up = layers.to_torch_layout(model.up.kernel[...]).reshape(-1)
  for name in ('down', 'skip'):
    w = layers.to_torch_layout(getattr(model, name).kernel[...]).reshape(-1)
    np.testing.assert_array_equal(w, up[: w.size])


def test_order_errors():
  model = _OutOfOrder(nnx.Rngs(0))
  with pytest.raises(ValueError, match='call_order'):
    pnnx.apply_strategy(model, 'max_layer_padding')
  with pytest.raises(ValueError, match='every masked kernel exactly once'):
    pnnx.apply_strategy(model, 'one_layer', order=[('up', 'kernel'), ('down', 'kernel')])
  with pytest.raises(ValueError, match='strategy.rp_ratio'):
    pnnx.apply_strategy(model, 'random_vector_padding', order=CALLS)
  before = pnnx.frozen_kernels(model)
  pnnx.apply_strategy(model, 'mask')  # needs no order: every layer keeps its own draw
  jax.tree.map(np.testing.assert_array_equal, pnnx.frozen_kernels(model), before)

  class _Unused(nnx.Module):
    def __init__(self, rngs):
      self.used = pnnx.MaskedLinear(4, 4, rngs=rngs)
      self.unused = pnnx.MaskedLinear(4, 4, rngs=rngs)

    def __call__(self, x):
      return self.used(x)

  with pytest.raises(ValueError, match='not called'):
    pnnx.call_order(_Unused(nnx.Rngs(0)), jnp.ones((1, 4)))


def test_bare_layer_strategy_paths():
  layer = pnnx.MaskedLinear(5, 3, rngs=nnx.Rngs(0))
  assert pnnx.call_order(layer, jnp.ones((1, 5))) == [('kernel',)]
  assert set(pnnx.frozen_kernels(layer)) == {'kernel'}
  pnnx.apply_strategy(layer, 'random_vector_padding', rp_ratio=0.1)  # one layer: no order needed
  assert np.unique(np.asarray(layer.kernel[...])).size == strategies.rp_vector_length(15, 0.1)


# -- nnx.bridge ------------------------------------------------------------------------------------


def test_to_nnx_keeps_the_frozen_collection_as_frozen(graph_mode):
  x = jax.random.normal(jax.random.key(5), (4, 9))
  bridged = nnx.bridge.ToNNX(layers.MaskedDense(5), rngs=nnx.Rngs(params=0, frozen=1))
  bridged = nnx.bridge.lazy_init(bridged, x)
  assert type(bridged.kernel) is pnnx.Frozen and type(bridged.scores) is nnx.Param
  assert set(nnx.to_pure_dict(nnx.state(bridged, nnx.Param))) == {'scores'}
  assert set(nnx.to_pure_dict(nnx.state(bridged, pnnx.Frozen))) == {'kernel'}
  # graph=True: tree mode's nnx.grad differentiates every leaf, the wrapper's uint32 rng key too.
  grads = nnx.grad(lambda m: m(x).sum(), graph=True)(bridged)
  assert set(nnx.to_pure_dict(grads)) == {'scores'}

  # Same attribute names and types: the bridged variables load into a MaskedLinear as they are.
  layer = pnnx.MaskedLinear(9, 5, rngs=nnx.Rngs(params=7, frozen=8))
  nnx.update(layer, nnx.state(bridged, nnx.Param), nnx.state(bridged, pnnx.Frozen))
  np.testing.assert_array_equal(layer(x), bridged(x))


def test_to_linen_writes_the_frozen_collection():
  x = jax.random.normal(jax.random.key(5), (4, 9))
  wrapped = nnx.bridge.ToLinen(pnnx.MaskedLinear, args=(9, 5))
  variables = wrapped.init({'params': K_PARAMS, layers.FROZEN: K_FROZEN}, x)
  assert set(variables) == {'params', layers.FROZEN}
  assert set(variables['params']) == {'scores'} and set(variables[layers.FROZEN]) == {'kernel'}
  assert isinstance(variables[layers.FROZEN]['kernel'], jax.Array)  # a plain array, no box
  # The Linen layer computes the same outputs from those variables.
  np.testing.assert_array_equal(
    wrapped.apply(variables, x), layers.MaskedDense(5).apply(variables, x)
  )
