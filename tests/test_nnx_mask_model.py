"""``pemn_jax.nnx.mask_model`` on NNX models written in the ordinary style, with no pemn-jax inside.

A CNN of ``nnx.Conv`` (a padded strided stem, a depthwise conv, a 1x1 conv without bias),
``nnx.BatchNorm`` and ``nnx.Linear``, called in another order than NNX sorts its attributes; and a
small transformer of ``nnx.Linear``, ``nnx.LayerNorm`` and ``nnx.MultiHeadAttention`` (whose
projections are ``nnx.LinearGeneral``, which the masked layers cannot stand in for). Pinned:
exact kept counts, values drawn as the masked layers draw them, the original computation at
keep 1 (so strides, padding, groups and biases carried over), ``Frozen`` outside the params and
the optimizer, jitted training that lowers a loss and leaves kernels alone, the rules and their
one-line errors, frozen biases, strategies in call order, and the Linen ``mask_model`` handing
NNX models over.
"""

from __future__ import annotations

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pemn_jax as pemn
from pemn_jax import masking, strategies
from pemn_jax import nnx as pnnx


@pytest.fixture(params=[True, False], ids=['graph_mode', 'tree_mode'])
def graph_mode(request):
  """Runs a test in NNX graph mode and again in tree mode."""
  with nnx.set_graph_mode(request.param):
    yield request.param


class CNN(nnx.Module):
  """Called stem -> dw -> pw -> head; NNX visits them sorted: bn, dw, head, pw, stem."""

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=2, padding=1, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, padding='SAME', rngs=rngs)
    self.pw = nnx.Conv(8, 16, (1, 1), padding='VALID', use_bias=False, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x, train: bool = False):
    h = jax.nn.relu(self.bn(self.stem(x), use_running_average=not train))
    h = jax.nn.relu(self.pw(jax.nn.relu(self.dw(h))))
    return self.head(h.mean((1, 2)))


CNN_LAYERS = ['dw', 'head', 'pw', 'stem']  # the order NNX visits them in
CNN_CALLS = [('stem', 'kernel'), ('dw', 'kernel'), ('pw', 'kernel'), ('head', 'kernel')]


class Block(nnx.Module):
  def __init__(self, d: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, d, d, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.mlp = nnx.List([nnx.Linear(d, 2 * d, rngs=rngs), nnx.Linear(2 * d, d, rngs=rngs)])

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp[1](jax.nn.gelu(self.mlp[0](self.norm2(x))))


class Transformer(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, d: int = 16):
    self.embed = nnx.Linear(6, d, rngs=rngs)
    self.blocks = nnx.List([Block(d, rngs) for _ in range(2)])
    self.head = nnx.Linear(d, 5, rngs=rngs)

  def __call__(self, x):
    x = self.embed(x)
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(1))


NO_ATTENTION = [(r'blocks/\d+/attn/.*', None), ('.*', 0.25)]
TRANSFORMER_MASKED = [
  'blocks/0/mlp/0',
  'blocks/0/mlp/1',
  'blocks/1/mlp/0',
  'blocks/1/mlp/1',
  'embed',
  'head',
]
ATTENTION = [f'blocks/{i}/attn/{p}' for i in (0, 1) for p in ('key', 'out', 'query', 'value')]


def cnn_data():
  x = jax.random.normal(jax.random.key(10), (32, 8, 8, 3))
  return x, jnp.argmax(x.mean((1, 2)), -1)  # the class: the channel of largest mean


def transformer_data():
  x = jax.random.normal(jax.random.key(11), (16, 7, 6))
  return x, jnp.argmax(x.mean(1)[:, :5], -1)


def at(node, path: str):
  """The node at a '/'-joined NNX path."""
  for key in path.split('/'):
    node = node[int(key)] if key.isdigit() else getattr(node, key)
  return node


def at_keys(path: str) -> tuple:
  """A '/'-joined path as NNX's path tuple (list indices as ints)."""
  return tuple(int(k) if k.isdigit() else k for k in path.split('/'))


def random_biases(model) -> None:
  """Non-zero biases, so that a copied bias differs from a fresh (zero) one."""
  for i, (_, node) in enumerate(nnx.iter_graph(model)):
    if isinstance(node, nnx.Linear | nnx.Conv | nnx.LinearGeneral) and node.bias is not None:
      shape = node.bias[...].shape
      node.bias.set_value(jax.random.normal(jax.random.key(100 + i), shape))


def masked_paths(model) -> list[str]:
  return ['/'.join(map(str, p)) for p, _ in pnnx.masked_layers(model)]


def pure(tree):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(tree))


# -- what replaces what ----------------------------------------------------------------------------


@pytest.mark.parametrize('keep', [0.05, 0.3, 0.5, 1.0])
def test_cnn_layers_become_masked_layers_with_exact_counts(keep):
  model = CNN(nnx.Rngs(0))
  bn = model.bn
  assert pnnx.mask_model(model, keep_fraction=keep, rngs=nnx.Rngs(params=1, frozen=2)) is model
  assert masked_paths(model) == CNN_LAYERS
  assert model.bn is bn  # untouched, the same object
  assert type(model.head) is pnnx.MaskedLinear and type(model.stem) is pnnx.MaskedConv
  assert (model.stem.strides, model.stem.padding) == ((2, 2), ((1, 1), (1, 1)))
  assert model.dw.feature_group_count == 8 and model.dw.kernel[...].shape == (3, 3, 1, 8)
  assert model.pw.bias is None and model.pw.padding == 'VALID'
  for _, layer in pnnx.masked_layers(model):
    n = layer.kernel[...].size
    assert layer.keep_fraction == keep
    assert int(layer.mask().sum()) == masking.num_kept(n, keep)
    assert int((layer.effective_kernel() != 0).sum()) == masking.num_kept(n, keep)
  assert model(cnn_data()[0]).shape == (32, 10)


def test_values_are_drawn_as_the_masked_layers_draw_them():
  model = pnnx.mask_model(CNN(nnx.Rngs(0)), rngs=nnx.Rngs(params=1, frozen=2))
  twin_rngs = nnx.Rngs(params=1, frozen=2)
  twins = {  # built in the order NNX visits the layers, from the same streams
    'dw': pnnx.MaskedConv(8, 8, 3, feature_group_count=8, rngs=twin_rngs),
    'head': pnnx.MaskedLinear(16, 10, rngs=twin_rngs),
    'pw': pnnx.MaskedConv(8, 16, 1, rngs=twin_rngs),
    'stem': pnnx.MaskedConv(3, 8, 3, rngs=twin_rngs),
  }
  for name, twin in twins.items():
    np.testing.assert_array_equal(at(model, name).kernel[...], twin.kernel[...])
    np.testing.assert_array_equal(at(model, name).scores[...], twin.scores[...])


@pytest.mark.parametrize(
  'build, rules, data',
  [(CNN, None, cnn_data), (Transformer, [(r'blocks/\d+/attn/.*', None)], transformer_data)],
  ids=['cnn', 'transformer'],
)
@pytest.mark.parametrize('bias', ['train', 'freeze'])
def test_at_keep_one_the_model_computes_what_it_did_with_the_frozen_kernels(
  build, rules, data, bias
):
  model = build(nnx.Rngs(0))
  random_biases(model)
  reference = nnx.clone(model)
  rules = None if rules is None else [*rules, ('.*', 1.0)]
  pnnx.mask_model(model, rules, keep_fraction=1.0, rngs=nnx.Rngs(params=1, frozen=2), bias=bias)
  for path in masked_paths(model):
    layer, original = at(model, path), at(reference, path)
    original.kernel.set_value(layer.kernel[...])
    if original.bias is not None:  # the bias was copied, into a trainable or a frozen variable
      assert type(layer.bias) is (nnx.Param if bias == 'train' else pnnx.Frozen)
      np.testing.assert_array_equal(layer.bias[...], original.bias[...])
  x, _ = data()
  np.testing.assert_allclose(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_transformer_with_attention_excluded():
  model = Transformer(nnx.Rngs(0))
  attention = [at(model, p) for p in ATTENTION]
  pnnx.mask_model(model, NO_ATTENTION, rngs=nnx.Rngs(params=1, frozen=2))
  assert masked_paths(model) == TRANSFORMER_MASKED
  assert [at(model, p) for p in ATTENTION] == attention  # the same LinearGeneral objects
  assert all(type(layer.kernel) is nnx.Param for layer in attention)
  for path in TRANSFORMER_MASKED:
    layer = at(model, path)
    assert int(layer.mask().sum()) == masking.num_kept(layer.kernel[...].size, 0.25)
  assert model(transformer_data()[0]).shape == (16, 5)


def test_frozen_is_neither_a_param_nor_in_the_optimizer():
  model = pnnx.mask_model(Transformer(nnx.Rngs(0)), NO_ATTENTION, rngs=nnx.Rngs(0))
  frozen = {p for p, _ in nnx.to_flat_state(nnx.state(model, pnnx.Frozen))}
  assert frozen == {(*at_keys(p), 'kernel') for p in TRANSFORMER_MASKED}
  params = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert not frozen & params
  assert ('embed', 'scores') in params and ('blocks', 0, 'attn', 'query', 'kernel') in params
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  # Adam's moments hold one entry per parameter, under the parameter's path: none for a kernel.
  mu = {p[3:] for p, _ in nnx.to_flat_state(nnx.state(optimizer)) if p[2:3] == ('mu',)}
  assert mu == params


# -- training --------------------------------------------------------------------------------------


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x, train=True), y).mean()


@pytest.mark.parametrize(
  'bias, graph',
  [('train', True), ('train', False), ('freeze', True)],
  ids=['train', 'tree', 'freeze'],
)
def test_jitted_training_lowers_the_loss_and_leaves_frozen_alone(bias, graph):
  with nnx.set_graph_mode(graph):
    _train_and_check(bias)


def _train_and_check(bias):
  model = CNN(nnx.Rngs(0))
  random_biases(model)
  pnnx.mask_model(model, keep_fraction=0.5, rngs=nnx.Rngs(params=1, frozen=2), bias=bias)
  frozen = pure(nnx.state(model, pnnx.Frozen))
  params = pure(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, optax.adamw(3e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  x, y = cnn_data()
  losses = [float(step(model, optimizer, x, y)) for _ in range(40)]
  assert losses[-1] < 0.7 * losses[0], losses
  jax.tree.map(np.testing.assert_array_equal, pure(nnx.state(model, pnnx.Frozen)), frozen)
  trained = pure(nnx.state(model, nnx.Param))
  assert not np.array_equal(trained['stem']['scores'], params['stem']['scores'])
  if bias == 'train':  # a copied bias trains like any parameter
    assert 'bias' not in frozen['stem']
    assert not np.array_equal(trained['stem']['bias'], params['stem']['bias'])
  else:
    assert 'bias' not in params['stem'] and set(frozen['stem']) == {'kernel', 'bias'}


def test_a_frozen_bias_takes_no_gradient_in_either_mode():
  model = Holder(nnx.Linear(4, 3, rngs=R))
  random_biases(model)
  pnnx.mask_model(model, rngs=nnx.Rngs(0), bias='freeze')
  x = jnp.ones((2, 4))
  grads = nnx.grad(lambda m: (m.layer(x) ** 2).sum())(model)
  assert set(nnx.to_pure_dict(grads)['layer']) == {'scores'}
  with nnx.set_graph_mode(False):  # jax.grad of the whole module: the Frozen entries are zeros
    tree_grads = nnx.grad(lambda m: (m.layer(x) ** 2).sum())(model)
  assert type(tree_grads.layer.bias) is pnnx.Frozen and not np.any(tree_grads.layer.bias[...])
  assert np.any(tree_grads.layer.scores[...])


# -- rules and what is refused ---------------------------------------------------------------------


def test_rules_exclusion_order_and_defaults():
  model = pnnx.mask_model(
    CNN(nnx.Rngs(0)),
    [('stem', None), ('head', 0.2), ('.*', 0.4)],
    rngs=nnx.Rngs(0),
  )
  assert type(model.stem) is nnx.Conv  # excluded by the first rule that matches
  assert model.head.keep_fraction == 0.2 and model.dw.keep_fraction == model.pw.keep_fraction == 0.4
  # Layers no rule matches are left as they were; a dict gives the rules in its order.
  model = pnnx.mask_model(CNN(nnx.Rngs(0)), {'head': 0.3}, rngs=nnx.Rngs(0))
  assert masked_paths(model) == ['head']


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'rules': [('head', 0.5), ('nothing.*', 0.5)]}, r"\['nothing\.\*'\] match no layer.*stem"),
    ({'rules': [('bn', 0.5)]}, 'match no layer'),  # BatchNorm holds no kernel
    ({'keep_fraction': 0.0}, 'keep'),
    ({'keep_fraction': 1.5}, 'keep'),
    ({'rules': [('head', -0.1)]}, "rule 'head'"),
    ({'rules': [('(', 0.5)]}, 'regular expression'),
    ({'rules': ['head']}, 'pairs'),
    ({'bias': 'drop'}, 'bias'),
  ],
)
def test_bad_rules_are_one_line_errors_and_change_nothing(kwargs, match):
  model = CNN(nnx.Rngs(0))
  before = nnx.graphdef(model)
  with pytest.raises(ValueError, match=match) as err:
    pnnx.mask_model(model, rngs=nnx.Rngs(0), **kwargs)
  assert '\n' not in str(err.value)
  assert nnx.graphdef(model) == before


def test_matching_attention_names_the_layer_and_its_type():
  model = Transformer(nnx.Rngs(0))
  before = nnx.graphdef(model)
  with pytest.raises(ValueError, match="'blocks/0/attn/key', a LinearGeneral") as err:
    pnnx.mask_model(model, rngs=nnx.Rngs(0))
  assert '\n' not in str(err.value) and 'None' in str(err.value)  # how to exclude it
  assert nnx.graphdef(model) == before  # checked before anything is replaced


class Holder(nnx.Module):
  def __init__(self, layer):
    self.layer = layer


class CustomLinear(nnx.Linear):
  def __call__(self, x):
    return super().__call__(x) * 2


R = nnx.Rngs(0)


@pytest.mark.parametrize(
  'layer, match',
  [
    (lambda: nnx.Conv(4, 4, (3, 3), kernel_dilation=2, rngs=R), 'kernel_dilation=2'),
    (lambda: nnx.Conv(4, 4, (3, 3), input_dilation=2, rngs=R), 'input_dilation=2'),
    (lambda: nnx.Conv(4, 4, (3,), rngs=R), '1-D conv'),
    (lambda: nnx.Conv(4, 4, (3, 3, 3), rngs=R), '3-D conv'),
    (lambda: nnx.Conv(4, 4, (3, 3), padding='CIRCULAR', rngs=R), 'padding'),
    (lambda: nnx.Conv(4, 4, (3, 3), mask=jnp.ones((3, 3, 4, 4)), rngs=R), 'mask'),
    (lambda: nnx.Linear(4, 4, precision='highest', rngs=R), 'precision'),
    (lambda: nnx.LinearGeneral(4, (2, 2), rngs=R), 'a LinearGeneral'),
    (lambda: nnx.Einsum('ab,bc->ac', (4, 4), rngs=R), 'an? Einsum'),
    (lambda: nnx.ConvTranspose(4, 4, (3, 3), rngs=R), 'a ConvTranspose'),
    (lambda: CustomLinear(4, 4, rngs=R), 'overrides Linear.__call__'),
  ],
  ids=lambda v: v if isinstance(v, str) else '',
)
def test_what_the_masked_layers_cannot_express_is_refused(layer, match):
  model = Holder(layer())
  original = model.layer
  with pytest.raises(ValueError, match=match) as err:
    pnnx.mask_model(model, rngs=nnx.Rngs(0))
  assert "layer 'layer'" in str(err.value) and '\n' not in str(err.value)
  assert model.layer is original
  pnnx.mask_model(model, [('layer', None)], rngs=nnx.Rngs(0))  # excluding it is fine
  assert model.layer is original


def test_containers_shared_layers_and_bare_layers():
  shared = nnx.Linear(4, 4, rngs=R)
  model = Holder(nnx.Dict({'a': shared, 'b': nnx.List([shared, nnx.Linear(4, 2, rngs=R)])}))
  model.again = shared
  pnnx.mask_model(model, rngs=nnx.Rngs(0))
  # Matched once (under its first path), replaced at every reference: it stays shared.
  assert masked_paths(model) == ['again', 'layer/b/1']
  assert model.again is model.layer['a'] is model.layer['b'][0]
  assert type(model.again) is pnnx.MaskedLinear
  with pytest.raises(ValueError, match=r"'layer/0' is held in a tuple.*nnx\.List"):
    pnnx.mask_model(Holder(nnx.data((nnx.Linear(4, 4, rngs=R),))), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='single Linear'):
    pnnx.mask_model(nnx.Linear(4, 4, rngs=R), rngs=nnx.Rngs(0))


# -- strategies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  'name, rp_ratio', [('random_vector_padding', 0.1), ('one_layer', None), ('mask', None)]
)
def test_strategies_follow_the_call_order(graph_mode, name, rp_ratio):
  model = pnnx.mask_model(CNN(nnx.Rngs(0)), rngs=nnx.Rngs(params=1, frozen=2))
  x, _ = cnn_data()
  order = pnnx.call_order(model, x)
  assert order == CNN_CALLS
  before = pnnx.frozen_kernels(model)
  pnnx.apply_strategy(model, name, rp_ratio, order=order)
  after = pnnx.frozen_kernels(model)
  shapes = [strategies.get_path(after, p).shape for p in order]
  assert shapes == [(3, 3, 3, 8), (3, 3, 1, 8), (1, 1, 8, 16), (16, 10)]
  assert strategies.unique_values(after) == strategies.stored_value_count(shapes, name, rp_ratio)
  expected = strategies.apply_strategy(before, order, name, rp_ratio)
  for path in order:
    np.testing.assert_array_equal(
      strategies.get_path(after, path), strategies.get_path(expected, path)
    )
  assert model(x).shape == (32, 10)


# -- the Linen mask_model hands NNX models over ----------------------------------------------------


def test_the_linen_mask_model_dispatches_nnx_models():
  model = Transformer(nnx.Rngs(0))
  out = pemn.mask_model(model, NO_ATTENTION, rngs=nnx.Rngs(params=1, frozen=2))
  assert out is model and masked_paths(model) == TRANSFORMER_MASKED
  twin = pnnx.mask_model(Transformer(nnx.Rngs(0)), NO_ATTENTION, rngs=nnx.Rngs(params=1, frozen=2))
  jax.tree.map(np.testing.assert_array_equal, pure(nnx.state(model)), pure(nnx.state(twin)))
  model = CNN(nnx.Rngs(0))
  pemn.mask_model(model, keep_fraction=0.3, bias='freeze', rngs=nnx.Rngs(0))
  assert model.head.keep_fraction == 0.3 and type(model.head.bias) is pnnx.Frozen

  with pytest.raises(ValueError, match='rngs=nnx.Rngs') as err:
    pemn.mask_model(CNN(nnx.Rngs(0)))
  assert '\n' not in str(err.value)
  with pytest.raises(ValueError, match='apply_strategy'):
    pemn.mask_model(CNN(nnx.Rngs(0)), strategy='one_layer', rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match='NNX'):
    pemn.mask_model(nn.Dense(3), rngs=nnx.Rngs(0))


def test_using_the_nnx_mask_model_first_leaves_pemn_mask_model_the_function():
  # A fresh interpreter: here the package's names may already be resolved by other tests.
  code = (
    'from flax import nnx\n'
    'from pemn_jax import nnx as pnnx\n'
    'class M(nnx.Module):\n'
    '  def __init__(self):\n'
    '    self.fc = nnx.Linear(2, 2, rngs=nnx.Rngs(0))\n'
    'pnnx.mask_model(M(), rngs=nnx.Rngs(0))\n'
    'import pemn_jax\n'
    'assert callable(pemn_jax.mask_model), pemn_jax.mask_model\n'
  )
  subprocess.run(
    [sys.executable, '-c', code], check=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}
  )
