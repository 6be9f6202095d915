"""Model families (pemn_jax.models via pemn_jax.build): exact masked-weight counts, one definition
for masked and dense, architecture checked against a hand-written forward pass, bad input."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.scipy.special import erf

from pemn_jax import build, layers, models, strategies
from pemn_jax.configs import common

RNGS = {'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)}


def _config(masked=True, **model):
  c = common.base_config()
  for k, v in model.items():
    c.model[k] = v
  c.model.masked = masked
  return c


def _abstract_variables(config, batch=1):
  model = build.build_model(config)
  shape = build.input_shape(config)
  x = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  return model, jax.eval_shape(model.init, RNGS, x), x


def _numpy_variables(abstract, seed):
  """Concrete variables for an abstract tree, drawn with numpy.

  For forward-pass checks: a real init costs seconds of XLA:CPU compile per model (the random
  draws), and init itself is tested in test_layers.py and test_strategies.py.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif name.endswith("['scale']"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith("['mean']") or name.endswith("['bias']"):
      value = rng.normal(0.0, 0.1, leaf.shape)
    else:  # kernels and scores, at roughly Kaiming scale
      value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / max(1, math.prod(leaf.shape[:-1])))
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _masked_count(config):
  _, v, _ = _abstract_variables(config)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(v[layers.FROZEN]))


# ---------------------------------------------------------------------------------------------
# Exact counts (CIFAR-10 head, 32x32x3 input).


@pytest.mark.parametrize('depth, expected', [(6, 437_248), (8, 581_120)])
def test_convmixer_256_masked_weights(depth, expected):
  # stem 256*3*2*2 = 3,072; per block 256*5*5 + 256*256 = 71,936; head 256*10 = 2,560.
  assert 3072 + depth * 71_936 + 2560 == expected
  config = _config(name='convmixer', dim=256, depth=depth, kernel_size=5, patch_size=2)
  assert _masked_count(config) == expected


@pytest.mark.parametrize('depth, expected', [(20, 268_336), (32, 461_872), (56, 848_944)])
def test_resnet_masked_weights(depth, expected):
  n = (depth - 2) // 6
  # stem 3*16*9; stage 1: 2n convs 16->16; stage 2: 16->32, then 2n-1 of 32->32;
  # stage 3: 32->64, then 2n-1 of 64->64; head 64*10. Option-A shortcuts have no weights.
  by_hand = 432 + 2 * n * 2304 + 4608 + (2 * n - 1) * 9216 + 18_432 + (2 * n - 1) * 36_864 + 640
  assert by_hand == expected
  assert _masked_count(_config(name='resnet', depth=depth)) == expected


def test_masked_and_dense_share_kernel_shapes():
  for model in [
    dict(name='resnet', depth=20),
    dict(name='convmixer', dim=32, depth=2),
    dict(name='vit', dim=64, depth=2, patch_size=4),
    dict(name='mlp'),
  ]:
    _, masked, _ = _abstract_variables(_config(True, **model))
    _, dense, _ = _abstract_variables(_config(False, **model))
    assert layers.FROZEN not in dense
    # Every frozen kernel is a trainable 'kernel' in the dense baseline, and vice versa.
    flat_frozen = {
      jax.tree_util.keystr(p): a.shape
      for p, a in jax.tree_util.tree_flatten_with_path(masked[layers.FROZEN])[0]
    }
    flat_dense = {
      jax.tree_util.keystr(p): a.shape
      for p, a in jax.tree_util.tree_flatten_with_path(dense['params'])[0]
      if jax.tree_util.keystr(p).endswith("['kernel']")
    }
    assert flat_frozen == flat_dense, model['name']
    # The masked model has no trainable kernel, only scores (plus norm parameters).
    leaves = {
      jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(masked['params'])[0]
    }
    assert not any(p.endswith("['kernel']") for p in leaves)
    assert sum(p.endswith("['scores']") for p in leaves) == len(flat_frozen)


def test_vit_masks_every_projection():
  config = _config(name='vit', dim=32, depth=2, patch_size=4, input_shape=(16, 16, 3))
  model, v, _ = _abstract_variables(config)
  order = build.kernel_order(model, (16, 16, 3))
  names = ['/'.join(p[:-1]) for p in order]
  block = ['attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp_in', 'mlp_out']
  assert names == (['patch_embed'] + [f'block{i}/{n}' for i in range(2) for n in block] + ['head'])
  # patch 4*4*3*32 + 2 blocks * (4*32*32 + 32*64 + 64*32) + head 32*10.
  assert _masked_count(config) == 1536 + 2 * 8192 + 320


def test_dense_baseline_has_trainable_kernels_and_no_frozen():
  config = _config(False, name='convmixer', dim=16, depth=2, kernel_size=3, patch_size=4)
  _, v, _ = _abstract_variables(config)
  assert set(v) == {'params', 'batch_stats'}
  assert set(v['params']['stem']) == {'kernel'}
  assert set(v['params']['head']) == {'kernel'}  # no bias anywhere
  assert set(v['params']['stem_bn']) == {'scale', 'bias'}


# ---------------------------------------------------------------------------------------------
# Forward passes: logits of the right shape, masked and dense from one definition.


@pytest.mark.parametrize(
  'name, model, in_shape',
  [
    ('vit', dict(dim=32, depth=2, patch_size=4, num_heads=2), (16, 16, 3)),
    ('mlp', dict(hidden_dims=(16, 8)), (28, 28, 1)),
  ],
)
def test_vit_and_mlp_masked_and_dense_logits(name, model, in_shape):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, *in_shape)), jnp.float32)
  for masked in (True, False):
    config = _config(masked, name=name, num_classes=7, input_shape=in_shape, **model)
    net, abstract, _ = _abstract_variables(config)
    assert (layers.FROZEN in abstract) == masked
    variables = _numpy_variables(abstract, seed=1)
    logits = jax.jit(lambda v, x, net=net: net.apply(v, x))(variables, x)
    chex.assert_shape(logits, (3, 7))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    assert np.std(np.asarray(logits)) > 0


@pytest.mark.parametrize(
  'model',
  [
    dict(name='resnet', depth=20),
    dict(name='convmixer', dim=32, depth=2),
    dict(name='vit', dim=64, depth=2, patch_size=4),
  ],
)
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_logit_shapes_abstract(model, dtype):
  for masked in (True, False):
    config = _config(masked, dtype=dtype, num_classes=100, **model)
    net, v, x = _abstract_variables(config, batch=4)
    logits = jax.eval_shape(lambda v, x, net=net: net.apply(v, x), v, x)
    assert logits.shape == (4, 100) and logits.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# The architectures against hand-written forward passes (docs/method.md, section 5).


def _conv(x, w, stride, padding, groups=1):
  return lax.conv_general_dilated(
    x,
    w,
    (stride, stride),
    padding,
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
    precision=lax.Precision.HIGHEST,
  )


def _gelu_erf(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _bn(v, name, x):
  p, s = v['params'][name], v['batch_stats'][name]
  return (x - s['mean']) / jnp.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias']


def _effective(v, path, keep):
  """frozen * top-ceil(k n) |score| mask, by numpy (stable argsort: lower index on ties)."""
  w = np.asarray(strategies.get_path(v[layers.FROZEN], path + ('kernel',)))
  s = np.asarray(strategies.get_path(v['params'], path + ('scores',)))
  kept = math.ceil(keep * w.size)
  mask = np.zeros(w.size, np.float32)
  mask[np.argsort(-np.abs(s).ravel(), kind='stable')[:kept]] = 1
  return jnp.asarray(w * mask.reshape(w.shape))


def test_masked_convmixer_matches_a_hand_written_forward():
  config = _config(
    name='convmixer', dim=4, depth=2, kernel_size=3, patch_size=2, input_shape=(8, 8, 3)
  )
  config.strategy.name, config.strategy.keep_fraction = 'mask', 0.5
  net, abstract, _ = _abstract_variables(config)
  v = _numpy_variables(abstract, seed=1)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 3)), jnp.float32)
  kernels = {name: _effective(v, (name,), 0.5) for name in v[layers.FROZEN]}

  @jax.jit
  def reference(v, w, x):
    y = _bn(v, 'stem_bn', _gelu_erf(_conv(x, w['stem'], 2, 'VALID')))
    for i in range(2):
      z = _gelu_erf(_conv(y, w[f'block{i}_depthwise'], 1, 'SAME', groups=4))
      y = y + _bn(v, f'block{i}_depthwise_bn', z)
      y = _bn(
        v, f'block{i}_pointwise_bn', _gelu_erf(_conv(y, w[f'block{i}_pointwise'], 1, 'VALID'))
      )
    return jnp.dot(y.mean((1, 2)), w['head'], precision=lax.Precision.HIGHEST)

  expected = reference(v, kernels, x)

  logits = jax.jit(lambda v, x: net.apply(v, x, train=False))(v, x)
  chex.assert_trees_all_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_dense_resnet_option_a_matches_a_hand_written_forward():
  # ResNet-8 (n = 1) at base width 4: stem 3->4; stages 4, 8 (stride 2), 16 (stride 2).
  config = _config(False, name='resnet', depth=8, width=4, input_shape=(8, 8, 3))
  net, abstract, _ = _abstract_variables(config)
  v = _numpy_variables(abstract, seed=3)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 8, 3)), jnp.float32)
  pad1 = ((1, 1), (1, 1))

  @jax.jit
  def reference(v, x):
    k = lambda *path: strategies.get_path(v['params'], path + ('kernel',))
    y = jax.nn.relu(_bn(v, 'stem_bn', _conv(x, k('stem'), 1, pad1)))
    for stage, (width, stride) in enumerate([(4, 1), (8, 2), (16, 2)]):
      b = f'stage{stage}_block0'
      vb = {'params': v['params'][b], 'batch_stats': v['batch_stats'][b]}
      z = jax.nn.relu(_bn(vb, 'bn1', _conv(y, k(b, 'conv1'), stride, pad1)))
      z = _bn(vb, 'bn2', _conv(z, k(b, 'conv2'), 1, pad1))
      shortcut = y
      if stride != 1 or y.shape[-1] != width:
        # Option A: subsample by the stride, zero-pad the new channels evenly on both sides.
        extra = width - y.shape[-1]
        shortcut = jnp.pad(
          y[:, ::stride, ::stride, :], ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2))
        )
      y = jax.nn.relu(z + shortcut)
    assert y.shape == (2, 2, 2, 16)
    return jnp.dot(y.mean((1, 2)), k('head'), precision=lax.Precision.HIGHEST)

  expected = reference(v, x)

  logits = jax.jit(lambda v, x: net.apply(v, x, train=False))(v, x)
  chex.assert_trees_all_close(logits, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input names the field.


@pytest.mark.parametrize(
  'field, value, pattern',
  [
    ('name', 'densenet', r'model\.name'),
    ('name', 'ConvMixer', r'model\.name'),
    ('dtype', 'float16', r'model\.dtype'),
    ('dtype', 'fp32', r'model\.dtype'),
    ('conv_impl', 'cudnn', r'model\.conv_impl'),
    ('dim', 0, r'model\.dim'),
    ('depth', -1, r'model\.depth'),
    ('kernel_size', 0, r'model\.kernel_size'),
    ('patch_size', 0, r'model\.patch_size'),
    ('num_classes', 0, r'model\.num_classes'),
  ],
)
def test_bad_model_fields_name_the_field(field, value, pattern):
  config = _config()
  config.model[field] = value
  with pytest.raises(ValueError, match=pattern):
    build.build_model(config)


@pytest.mark.parametrize('depth', [18, 21, 30, 34, 33])
def test_resnet_depth_must_be_6n_plus_2(depth):
  config = _config(name='resnet', depth=depth)
  with pytest.raises(ValueError, match=r'model\.depth') as e:
    build.build_model(config)
  assert '6n+2' in str(e.value)


def test_bad_model_name_lists_the_allowed_names():
  config = _config(name='densenet')
  with pytest.raises(ValueError) as e:
    build.build_model(config)
  for name in models.REGISTRY:
    assert name in str(e.value)


def test_bad_dtype_lists_the_allowed_dtypes():
  config = _config(dtype='float16')
  with pytest.raises(ValueError, match='float32') as e:
    build.build_model(config)
  assert 'bfloat16' in str(e.value)


def test_vit_heads_must_divide_dim():
  config = _config(name='vit', dim=96, depth=2, num_heads=5)
  with pytest.raises(ValueError, match=r'model\.num_heads'):
    build.build_model(config)


def test_bad_keep_fraction_in_config_names_the_field():
  config = _config()
  config.strategy.keep_fraction = 0.0
  with pytest.raises(ValueError, match=r'strategy\.keep_fraction'):
    build.build_model(config)


# ---------------------------------------------------------------------------------------------
# model.remat_blocks: the same network, run as a rematerialised scan over the blocks.


@pytest.mark.parametrize('policy', ['save_convs', 'full'])
@pytest.mark.parametrize(
  'masked, sparsity_method', [(True, None), (False, None), (False, 'random')]
)
def test_remat_blocks_same_values_gradients_and_batch_stats(masked, sparsity_method, policy):
  base = dict(dim=16, depth=3, kernel_size=3, patch_size=2, input_shape=(8, 8, 3))
  if sparsity_method:
    base.update(sparsity_method=sparsity_method, sparsity=0.5)
  plain = _config(masked, remat_blocks='none', **base)
  remat = _config(masked, remat_blocks=policy, **base)
  model_p, abstract, _ = _abstract_variables(plain, batch=4)
  model_r = build.build_model(remat)
  assert (model_r.remat_blocks, model_p.remat_blocks) == (policy, 'none')
  variables = _numpy_variables(abstract, seed=5)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))

  def train_outputs(model):
    def loss(params):
      logits, updates = model.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(logits * jnp.arange(10.0)), (logits, updates)

    (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
    return aux, grads, model.apply(variables, x, train=False)

  got, want = jax.jit(lambda: train_outputs(model_r))(), jax.jit(lambda: train_outputs(model_p))()
  # Same tree (the flat per-layer names every strategy and artifact relies on), same values.
  chex.assert_trees_all_equal_structs(got, want)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  # and the block statistics really moved (the scan wrote them back, not the old values)
  moved = got[0][1]['batch_stats']['block2_pointwise_bn']['mean']
  assert not np.allclose(moved, variables['batch_stats']['block2_pointwise_bn']['mean'])


@pytest.mark.parametrize('policy', ['save_convs', 'full'])
@pytest.mark.parametrize('masked', [True, False])
def test_vit_remat_blocks_same_values_and_gradients(masked, policy):
  base = dict(name='vit', dim=32, depth=3, patch_size=4, num_heads=2, input_shape=(8, 8, 3))
  plain, remat = _config(masked, **base), _config(masked, remat_blocks=policy, **base)
  model_p, abstract, _ = _abstract_variables(plain, batch=4)
  model_r = build.build_model(remat)
  variables = _numpy_variables(abstract, seed=6)
  x = jax.random.normal(jax.random.key(4), (4, 8, 8, 3))

  def outputs(model):
    def loss(params):
      logits = model.apply({**variables, 'params': params}, x, train=True)
      return jnp.sum(logits * jnp.arange(10.0)), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
    return logits, grads

  got, want = jax.jit(lambda: outputs(model_r))(), jax.jit(lambda: outputs(model_p))()
  chex.assert_trees_all_equal_structs(got, want)
  # gradients of size ~1-10 here: float reassociation shows up around 1e-5
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_remat_blocks_init_makes_the_flat_tree():
  plain = _abstract_variables(_config(remat_blocks='none', dim=16, depth=2))[1]
  remat = _abstract_variables(_config(remat_blocks='full', dim=16, depth=2))[1]
  chex.assert_trees_all_equal_shapes_and_dtypes(plain, remat)


@pytest.mark.parametrize('value', ['yes', 'Full', True, None])
def test_remat_blocks_names_the_field_and_the_choices(value):
  config = _config()
  del config.model['remat_blocks']  # the field is typed str; a hand-made config need not be
  config.model.remat_blocks = value
  with pytest.raises(
    ValueError,
    match=r"model\.remat_blocks must be one of \('none', "
    r"'save_convs', 'full'\)",
  ):
    build.build_model(config)


def test_remat_blocks_is_for_models_with_identical_blocks():
  with pytest.raises(
    ValueError,
    match=r"model\.remat_blocks .*\('convmixer', 'vit'\).*"
    r"'resnet'",
  ):
    build.build_model(_config(name='resnet', depth=20, remat_blocks='full'))
