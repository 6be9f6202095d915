"""The PEMN weight strategies (pemn_jax.strategies), value placement computed by hand.

The method (docs/method.md, section 2): masked layers ordered by depth; a kernel is flattened in
PyTorch layout (conv OIHW, dense OI), filled, then transposed into Flax layout (HWIO, IO).

  mask     each layer its own Kaiming-normal draw
  OL       the first layer of each shape is the prototype, later layers of that shape copy it;
           the classifier keeps its own draw
  MP       u = flattened largest layer (most entries, first on ties), layer l gets u[:d_l]
  RP r     v = u[:floor(N r) + 1] tiled to length N, layer l takes the prefix of length d_l

The expected arrays below are built with numpy from the Mask strategy's frozen collection (the
independent draws every strategy starts from), independently of the library's layout helpers.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import build, layers, strategies, summary
from pemn_jax.configs import common

# ---------------------------------------------------------------------------------------------
# Helpers written from the method (docs/method.md), not from the library.


def _to_torch(w):
  """Flax layout -> PyTorch layout: dense (in, out) -> (out, in); conv HWIO -> OIHW."""
  w = np.asarray(w)
  return w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1)


def _from_torch(w):
  """PyTorch layout -> Flax layout."""
  return w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)


def _fill(flat, flax_shape):
  """A kernel of ``flax_shape`` whose PyTorch-layout flattening is ``flat``."""
  torch_shape = (
    (flax_shape[1], flax_shape[0])
    if len(flax_shape) == 2
    else (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  )
  return _from_torch(np.asarray(flat).reshape(torch_shape))


def _get(tree, path):
  return np.asarray(strategies.get_path(tree, path))


def _config(strategy='mask', rp_ratio=None, **model):
  c = common.base_config()
  for k, v in model.items():
    c.model[k] = v
  c.strategy.name = strategy
  c.strategy.rp_ratio = rp_ratio if rp_ratio is not None else 1e-3
  return c


# A tiny ConvMixer: stem (1,1,3,6) = 18, depthwise (3,3,1,6) = 54 (twice: the largest ties, the
# first wins), pointwise (1,1,6,6) = 36 (twice), head (6,5) = 30.
CONVMIXER = dict(
  name='convmixer',
  dim=6,
  depth=2,
  kernel_size=3,
  patch_size=1,
  num_classes=5,
  input_shape=(4, 4, 3),
)
CONVMIXER_ORDER = [
  ('stem', 'kernel'),
  ('block0_depthwise', 'kernel'),
  ('block0_pointwise', 'kernel'),
  ('block1_depthwise', 'kernel'),
  ('block1_pointwise', 'kernel'),
  ('head', 'kernel'),
]
# A tiny MLP whose classifier has the same shape as two hidden layers: dense0 (4,5) = 20,
# dense1 (5,5), dense2 (5,5), head (5,5).
MLP = dict(name='mlp', hidden_dims=(5, 5, 5), num_classes=5, input_shape=(2, 2, 1))
MLP_ORDER = [('dense0', 'kernel'), ('dense1', 'kernel'), ('dense2', 'kernel'), ('head', 'kernel')]


MODELS = {'convmixer': CONVMIXER, 'mlp': MLP}


def _fresh_init(strategy='mask', rp_ratio=None, model='convmixer'):
  config = _config(strategy, rp_ratio, **MODELS[model])
  return build.init_variables(build.build_model(config), config)[layers.FROZEN]


# Each init compiles (2-3 s of CPU here): tests share them, and most strategies below are
# applied to the shared Mask-strategy draws with the same pure function init_variables uses
# (test_init_variables_applies_the_strategy checks that link).
_init = functools.lru_cache(_fresh_init)


def _apply(frozen, strategy, rp_ratio=None, model='convmixer'):
  order = CONVMIXER_ORDER if model == 'convmixer' else MLP_ORDER
  return strategies.apply_strategy(frozen, order, strategy, rp_ratio)


@pytest.fixture(scope='module')
def convmixer_mask():
  return _init('mask')


@pytest.fixture(scope='module')
def mlp_mask():
  return _init('mask', model='mlp')


# ---------------------------------------------------------------------------------------------
# Order and shapes.


def test_kernel_order_is_definition_order():
  for model, order in [(CONVMIXER, CONVMIXER_ORDER), (MLP, MLP_ORDER)]:
    config = _config(**model)
    assert build.kernel_order(build.build_model(config), model['input_shape']) == order


def test_mask_strategy_draws_every_layer_independently(convmixer_mask):
  f = convmixer_mask
  shapes = [_get(f, p).shape for p in CONVMIXER_ORDER]
  assert shapes == [(1, 1, 3, 6), (3, 3, 1, 6), (1, 1, 6, 6), (3, 3, 1, 6), (1, 1, 6, 6), (6, 5)]
  values = np.concatenate([_get(f, p).ravel() for p in CONVMIXER_ORDER])
  assert np.unique(values).size == values.size == 18 + 2 * 54 + 2 * 36 + 30


# ---------------------------------------------------------------------------------------------
# Value placement by hand.


def test_one_layer_by_hand(convmixer_mask):
  f = convmixer_mask
  got = _apply(f, 'one_layer')
  expected = {
    'stem': _get(f, ('stem', 'kernel')),
    'block0_depthwise': _get(f, ('block0_depthwise', 'kernel')),
    'block0_pointwise': _get(f, ('block0_pointwise', 'kernel')),
    'block1_depthwise': _get(f, ('block0_depthwise', 'kernel')),  # copies the prototype
    'block1_pointwise': _get(f, ('block0_pointwise', 'kernel')),
    'head': _get(f, ('head', 'kernel')),
  }
  for name, w in expected.items():
    np.testing.assert_array_equal(got[name]['kernel'], w, err_msg=name)


def test_one_layer_classifier_keeps_its_own_draw_even_with_a_repeated_shape(mlp_mask):
  f = mlp_mask
  got = strategies.apply_strategy(f, MLP_ORDER, 'one_layer')
  np.testing.assert_array_equal(got['dense0']['kernel'], f['dense0']['kernel'])
  np.testing.assert_array_equal(got['dense1']['kernel'], f['dense1']['kernel'])
  np.testing.assert_array_equal(got['dense2']['kernel'], f['dense1']['kernel'])  # copy
  np.testing.assert_array_equal(got['head']['kernel'], f['head']['kernel'])  # own draw
  assert not np.array_equal(got['head']['kernel'], f['dense1']['kernel'])


def test_max_layer_padding_by_hand(convmixer_mask):
  f = convmixer_mask
  got = _apply(f, 'max_layer_padding')
  # Largest: the depthwise kernels (54 entries); block0 comes first.
  u = _to_torch(_get(f, ('block0_depthwise', 'kernel'))).ravel()
  assert u.size == 54
  for path in CONVMIXER_ORDER:
    shape = _get(f, path).shape
    expected = _fill(u[: math.prod(shape)], shape)
    np.testing.assert_array_equal(_get(got, path), expected, err_msg=str(path))
  # Spelled out for two entries: the stem (1,1,3,6) in OIHW is (6,3,1,1), flat index
  # o * 3 + i, so Flax stem[0, 0, i, o] = u[3 * o + i].
  stem = _get(got, ('stem', 'kernel'))
  assert stem[0, 0, 2, 1] == u[3 * 1 + 2]
  assert stem[0, 0, 0, 5] == u[15]
  # The head (6, 5) in OI is (5, 6): head[i, o] = u[6 * o + i].
  head = _get(got, ('head', 'kernel'))
  assert head[4, 3] == u[6 * 3 + 4]


def test_max_layer_padding_first_on_ties_mlp(mlp_mask):
  f = mlp_mask
  got = strategies.apply_strategy(f, MLP_ORDER, 'max_layer_padding')
  u = f['dense1']['kernel'].T.ravel()  # dense1, dense2 and head tie at 25: dense1 first
  np.testing.assert_array_equal(got['dense0']['kernel'], u[:20].reshape(5, 4).T)
  for name in ('dense1', 'dense2', 'head'):
    np.testing.assert_array_equal(got[name]['kernel'], f['dense1']['kernel'], err_msg=name)


@pytest.mark.parametrize('r, v_len', [(0.07, 4), (0.1, 6), (1e-5, 1)])
def test_random_vector_padding_by_hand(convmixer_mask, r, v_len):
  f = convmixer_mask
  got = _apply(f, 'random_vector_padding', r)
  u = _to_torch(_get(f, ('block0_depthwise', 'kernel'))).ravel()
  n = u.size
  assert math.floor(n * r) + 1 == v_len
  v = u[:v_len]
  tiled = np.array([v[i % v_len] for i in range(n)])  # tile v to length N
  for path in CONVMIXER_ORDER:
    shape = _get(f, path).shape
    np.testing.assert_array_equal(
      _get(got, path), _fill(tiled[: math.prod(shape)], shape), err_msg=str(path)
    )
  assert strategies.unique_values(got) == v_len


@pytest.mark.parametrize('strategy, r', [('one_layer', None), ('random_vector_padding', 0.07)])
def test_init_variables_applies_the_strategy(convmixer_mask, strategy, r):
  chex.assert_trees_all_equal(_init(strategy, r), _apply(convmixer_mask, strategy, r))


def test_random_vector_padding_r_1_equals_max_layer_padding(mlp_mask):
  rp = strategies.apply_strategy(mlp_mask, MLP_ORDER, 'random_vector_padding', 1.0)
  mp = strategies.apply_strategy(mlp_mask, MLP_ORDER, 'max_layer_padding')
  chex.assert_trees_all_equal(rp, mp)


def test_strategies_keep_structure_shapes_dtypes_and_work_under_jit(mlp_mask):
  for name, r in [
    ('mask', None),
    ('one_layer', None),
    ('max_layer_padding', None),
    ('random_vector_padding', 0.1),
  ]:
    eager = strategies.apply_strategy(mlp_mask, MLP_ORDER, name, r)
    jitted = jax.jit(lambda f, n=name, r=r: strategies.apply_strategy(f, MLP_ORDER, n, r))(mlp_mask)
    chex.assert_trees_all_equal_shapes_and_dtypes(eager, mlp_mask)
    chex.assert_trees_all_equal(eager, jitted)


# ---------------------------------------------------------------------------------------------
# Stored random values (the paper's count), by hand on the tiny models.


def test_stored_value_count_by_hand():
  cm = [(1, 1, 3, 6), (3, 3, 1, 6), (1, 1, 6, 6), (3, 3, 1, 6), (1, 1, 6, 6), (6, 5)]
  assert strategies.stored_value_count(cm, 'mask') == 18 + 108 + 72 + 30
  assert strategies.stored_value_count(cm, 'one_layer') == 18 + 54 + 36 + 30
  assert strategies.stored_value_count(cm, 'max_layer_padding') == 54
  assert strategies.stored_value_count(cm, 'random_vector_padding', 0.07) == 4
  mlp = [(4, 5), (5, 5), (5, 5), (5, 5)]
  assert strategies.stored_value_count(mlp, 'one_layer') == 20 + 25 + 25  # head counted


# ---------------------------------------------------------------------------------------------
# Determinism and golden values.


def test_init_is_a_pure_function_of_definition_seed_and_strategy(convmixer_mask):
  again = _fresh_init('mask')  # a new model object, a new compile, the same bits
  assert again is not convmixer_mask
  chex.assert_trees_all_equal(again, convmixer_mask)
  assert build.frozen_fingerprint(again) == build.frozen_fingerprint(convmixer_mask)
  a, b = _fresh_init('one_layer'), _init('one_layer')
  chex.assert_trees_all_equal(a, b)
  assert build.frozen_fingerprint(a) == build.frozen_fingerprint(b)
  assert build.frozen_fingerprint(a) != build.frozen_fingerprint(convmixer_mask)


def test_other_seed_gives_other_weights(mlp_mask):
  config = _config(**MLP)
  config.seed = 1
  other = build.init_variables(build.build_model(config), config)[layers.FROZEN]
  assert build.frozen_fingerprint(other) != build.frozen_fingerprint(mlp_mask)


def test_golden_values_seed_0(mlp_mask):
  """Pins a few frozen values of seed 0: a change in JAX's random streams (or in how we derive
  keys, or in the PyTorch-layout draw) would silently change every model's weights."""
  f = mlp_mask
  golden = {
    ('dense0', 0, 0): 0.40920502,
    ('dense0', 1, 4): 1.6864865,
    ('dense0', 3, 1): -1.3294524,
    ('head', 0, 1): 1.2784941,
    ('head', 4, 1): -0.028529525,
    ('head', 2, 0): 1.3792356,
  }
  for (name, i, j), value in golden.items():
    np.testing.assert_allclose(
      f[name]['kernel'][i, j], np.float32(value), rtol=1e-6, err_msg=f'{name}[{i}, {j}]'
    )


# ---------------------------------------------------------------------------------------------
# The paper's ConvMixer unique-value counts.


def _abstract_shapes(config):
  """Masked kernel shapes by depth, from an abstract init (no arrays are made)."""
  model = build.build_model(config)
  shape = build.input_shape(config)
  abstract = jax.eval_shape(
    model.init,
    {'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)},
    jax.ShapeDtypeStruct((1, *shape), jnp.float32),
  )
  return [
    tuple(strategies.get_path(abstract[layers.FROZEN], p).shape)
    for p in build.kernel_order(model, shape)
  ]


UNIQUE = {
  256: (6554, 656, 66, 7, 1),
  512: (26215, 2622, 263, 27, 3),
}


@pytest.mark.parametrize('dim', [256, 512])
@pytest.mark.parametrize('depth', [6, 8])
def test_convmixer_rp_unique_values(dim, depth):
  shapes = _abstract_shapes(
    _config(
      'random_vector_padding',
      1e-3,
      name='convmixer',
      dim=dim,
      depth=depth,
      kernel_size=5,
      patch_size=2,
    )
  )
  assert len(shapes) == 2 * depth + 2
  assert max(math.prod(s) for s in shapes) == dim * dim
  counts = tuple(
    strategies.stored_value_count(shapes, 'random_vector_padding', r)
    for r in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
  )
  assert counts == UNIQUE[dim]
  assert strategies.stored_value_count(shapes, 'max_layer_padding') == dim * dim


def test_convmixer_256_rp_1e3_real_init_tiles_66_values():
  # Any depth has the same largest layer (256 x 256 pointwise); depth 1 keeps this quick.
  model = dict(name='convmixer', dim=256, depth=1, kernel_size=5, patch_size=2, num_classes=10)
  config = _config('random_vector_padding', 1e-3, **model)
  net = build.build_model(config)
  variables = build.init_variables(net, config)
  frozen = variables[layers.FROZEN]
  u = _to_torch(frozen['block0_pointwise']['kernel']).ravel()
  assert u.size == 65536
  v = u[:66]
  assert np.unique(v).size == 66  # the vector really has 66 entries ...
  np.testing.assert_array_equal(u, np.resize(v, 65536))  # ... tiled over the largest layer
  for path in build.kernel_order(net, (32, 32, 3)):
    w = _to_torch(_get(frozen, path)).ravel()
    np.testing.assert_array_equal(w, np.resize(v, w.size), err_msg=str(path))
  assert strategies.unique_values(frozen) == 66
  report = summary.summarize(config, variables)
  assert report['unique_values'] == report['distinct_values_present'] == 66


def test_mlp_mnist_one_layer_shares_the_two_100x100_layers():
  from pemn_jax.configs import mlp_mnist

  shapes = _abstract_shapes(mlp_mnist.get_config())
  assert shapes == [(784, 100), (100, 100), (100, 100), (100, 10)]
  assert strategies.stored_value_count(shapes, 'one_layer') == 78_400 + 10_000 + 1_000


# ---------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('bad', ['bogus', 'Mask', '', None, 'rp'])
def test_bad_strategy_name_names_the_field(bad):
  with pytest.raises(ValueError, match=r'strategy\.name') as e:
    strategies.validate(bad)
  for allowed in strategies.STRATEGIES:
    assert allowed in str(e.value)
  with pytest.raises(ValueError, match=r'strategy\.name'):
    strategies.stored_value_count([(2, 2)], bad)


@pytest.mark.parametrize(
  'bad', [None, 0, 0.0, -1e-3, 1.5, float('nan'), float('inf'), True, '1e-3']
)
def test_bad_rp_ratio_names_the_field(bad, mlp_mask):
  with pytest.raises(ValueError, match=r'strategy\.rp_ratio') as e:
    strategies.validate('random_vector_padding', bad)
  assert '(0, 1]' in str(e.value)
  with pytest.raises(ValueError, match=r'strategy\.rp_ratio'):
    strategies.apply_strategy(mlp_mask, MLP_ORDER, 'random_vector_padding', bad)
  with pytest.raises(ValueError, match=r'strategy\.rp_ratio'):
    strategies.stored_value_count([(2, 2)], 'random_vector_padding', bad)
  if not isinstance(bad, (bool, str)):  # ml_collections itself refuses these in a float field
    config = _config('random_vector_padding', **MLP)
    config.strategy.rp_ratio = bad
    with pytest.raises(ValueError, match=r'strategy\.rp_ratio'):
      build.build_model(config)


def test_rp_ratio_is_ignored_by_other_strategies():
  for name in ('mask', 'one_layer', 'max_layer_padding'):
    strategies.validate(name, None)
    strategies.validate(name, 7.0)
