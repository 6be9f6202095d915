"""The learned 1-bit-weight baseline (``pemn_jax.binary``): the sign and its straight-through
gradient by hand, the layers' two values per output channel and their gradients, the config path
(``model.binary_weights``) and its errors, storage accounting, and a short real training run."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pemn_jax import artifact, binary, build, layers, steps, storage, summary, train
from pemn_jax.configs import common, smoke


def _capture_kernels(module, x, variables=None, rngs=None):
  """(variables, [effective kernels]) of ``module`` on ``x``: each ``effective_kernel`` result."""
  kernels = []

  def grab(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == 'effective_kernel':
      kernels.append(out)
    return out

  with nn.intercept_methods(grab):
    if variables is None:
      variables = module.init(rngs or {'params': jax.random.key(0)}, x)
    else:
      module.apply(variables, x)
  return variables, kernels


# ---------------------------------------------------------------------------------------------
# sign_ste.


def test_sign_ste_values_zero_is_plus_one():
  x = jnp.array([-3.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 2.0])
  np.testing.assert_array_equal(binary.sign_ste(x), [-1, -1, -1, 1, 1, 1, 1, 1])
  for dtype in (jnp.float32, jnp.bfloat16):
    assert binary.sign_ste(x.astype(dtype)).dtype == dtype


def test_sign_ste_gradient_is_the_clipped_straight_through_estimator():
  x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
  w = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
  g = jax.grad(lambda x: jnp.sum(binary.sign_ste(x) * w))(x)
  # 1{|x| <= 1}: |x| = 1 passes, beyond it nothing does
  np.testing.assert_array_equal(g, [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0])
  # under jit and vmap alike
  g2 = jax.jit(jax.vmap(jax.grad(lambda v, c: binary.sign_ste(v) * c)))(x, w)
  np.testing.assert_array_equal(g2, g)


# ---------------------------------------------------------------------------------------------
# The layers.


@pytest.mark.parametrize(
  'module, x_shape',
  [
    (binary.BinaryDense(5), (3, 7)),
    (binary.BinaryConv(6, (3, 3)), (2, 5, 5, 4)),
    (binary.BinaryConv(6, (3, 3), feature_group_count=2), (2, 5, 5, 4)),
    (binary.BinaryConv(4, (3, 3), feature_group_count=4), (2, 5, 5, 4)),  # depthwise
  ],
  ids=['dense', 'conv', 'conv-groups2', 'depthwise'],
)
def test_effective_kernel_is_plus_minus_scale_per_output_channel(module, x_shape):
  x = jax.random.normal(jax.random.key(1), x_shape)
  variables, (eff,) = _capture_kernels(module, x)
  p = variables['params']
  assert set(p) == {'kernel', 'scale'} and set(variables) == {'params'}  # nothing frozen
  kernel, scale = np.asarray(p['kernel']), np.asarray(p['scale'])
  assert scale.shape == (kernel.shape[-1],) and scale.dtype == np.float32
  # initialised to mean |latent| over the other axes (XNOR-Net's alpha)
  np.testing.assert_allclose(scale, np.abs(kernel).reshape(-1, kernel.shape[-1]).mean(0), 1e-6)
  eff = np.asarray(eff)
  assert eff.shape == kernel.shape
  for c in range(kernel.shape[-1]):
    np.testing.assert_array_equal(np.unique(eff[..., c]), [-scale[c], scale[c]])
  np.testing.assert_array_equal(eff, np.where(kernel >= 0, 1.0, -1.0) * scale)
  # the forward pass uses exactly that kernel
  if isinstance(module, binary.BinaryDense):
    np.testing.assert_allclose(module.apply(variables, x), x @ eff, rtol=1e-6, atol=1e-6)
  else:
    ref = layers.Conv(
      module.features, module.kernel_size, feature_group_count=module.feature_group_count
    ).apply({'params': {'kernel': jnp.asarray(eff)}}, x)
    np.testing.assert_allclose(module.apply(variables, x), ref, rtol=1e-5, atol=1e-5)


def test_a_changed_scale_gives_two_values_of_the_new_scale():
  module = binary.BinaryDense(3)
  x = jnp.ones((1, 4))
  variables = module.init(jax.random.key(0), x)
  p = dict(variables['params'], scale=jnp.array([0.5, 2.0, 3.0]))
  p['kernel'] = p['kernel'].at[0, 0].set(0.0)  # 0 is +1
  _, (eff,) = _capture_kernels(module, x, {'params': p})
  np.testing.assert_array_equal(np.abs(eff), np.broadcast_to([0.5, 2.0, 3.0], (4, 3)))
  assert eff[0, 0] == 0.5


def test_gradients_reach_kernel_and_scale_by_hand():
  module = binary.BinaryDense(3)
  x = jax.random.normal(jax.random.key(2), (6, 4))
  g = jax.random.normal(jax.random.key(3), (6, 3))
  params = dict(module.init(jax.random.key(0), x)['params'])
  params['kernel'] = params['kernel'].at[1, 2].set(1.5).at[3, 0].set(-2.0)  # outside the clip
  grads = jax.grad(lambda p: jnp.sum(module.apply({'params': p}, x) * g))(params)
  w, s = np.asarray(params['kernel']), np.asarray(params['scale'])
  xg = np.asarray(x).T @ np.asarray(g)  # dL / d(effective kernel), (4, 3)
  sign = np.where(w >= 0, 1.0, -1.0)
  np.testing.assert_allclose(grads['kernel'], xg * s * (np.abs(w) <= 1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads['scale'], (xg * sign).sum(0), rtol=1e-5, atol=1e-6)
  assert grads['kernel'][1, 2] == 0 and grads['kernel'][3, 0] == 0
  assert np.count_nonzero(grads['kernel']) == w.size - 2 and np.all(grads['scale'] != 0)


@pytest.mark.parametrize('cls', [binary.BinaryDense, binary.BinaryConv])
def test_compute_dtype_as_the_other_layers(cls):
  x = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
  module = cls(8, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  y = module.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  grads = jax.grad(lambda p: module.apply({'params': p}, x).astype(jnp.float32).sum())(
    variables['params']
  )
  assert grads['kernel'].dtype == grads['scale'].dtype == jnp.float32
  assert np.all(np.isfinite(grads['kernel'])) and np.any(grads['kernel'] != 0)


# ---------------------------------------------------------------------------------------------
# The config path.


def _config(**over):
  c = smoke.get_config()
  base = {'model.masked': False, 'model.binary_weights': True, 'train.num_steps': 4}
  return common.with_overrides(c, {**base, **over})


MLP = {'model.name': 'mlp', 'model.hidden_dims': (32,), 'model.input_shape': (8, 8, 1)}


def test_config_builds_binary_layers_everywhere():
  config = _config()
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  assert layers.FROZEN not in variables
  kernels = build.trainable_kernel_order(model, build.input_shape(config))
  assert [p[-2] for p in kernels] == [
    'stem',
    'block0_depthwise',
    'block0_pointwise',
    'block1_depthwise',
    'block1_pointwise',
    'head',
  ]
  for path in kernels:
    module = variables['params']
    for name in path[:-1]:
      module = module[name]
    assert set(module) == {'kernel', 'scale'}
    assert module['scale'].shape == (module['kernel'].shape[-1],)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  _, effs = _capture_kernels(model, x, variables)
  assert len(effs) == len(kernels)
  for eff in effs:
    eff = np.asarray(eff).reshape(-1, eff.shape[-1])
    assert all(len(np.unique(np.abs(eff[:, c]))) == 1 for c in range(eff.shape[-1]))


def test_a_tiny_binary_mlp_trains_on_a_fixed_batch():
  config = _config(**MLP)
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  x = jax.random.normal(jax.random.key(7), (32, 8, 8, 1))
  y = jnp.arange(32) % 10
  tx = optax.adam(1e-2)
  state = steps.create_train_state(variables, tx)
  step = jax.jit(steps.make_train_step(model, tx))
  losses = []
  for _ in range(20):
    state, metrics = step(state, {}, {'image': x, 'label': y})
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  # the trained kernels are still one bit a weight, the scales moved
  _, effs = _capture_kernels(model, x, {'params': state.params, 'batch_stats': state.batch_stats})
  for eff in effs:
    eff = np.asarray(eff)
    assert all(len(np.unique(eff[:, c])) <= 2 for c in range(eff.shape[-1]))
  assert not np.allclose(state.params['head']['scale'], variables['params']['head']['scale'])


@pytest.mark.parametrize(
  'over, message',
  [
    ({'model.masked': True}, 'set model.masked=False with it'),
    ({'model.sparsity_method': 'random'}, 'model.sparsity_method'),
    ({'model.sparsity_method': 'magnitude'}, 'model.sparsity_method'),
  ],
  ids=['masked', 'random-sparse', 'magnitude-sparse'],
)
def test_config_conflicts_are_one_line_naming_the_field(over, message):
  with pytest.raises(ValueError) as e:
    build.build_model(_config(**over))
  text = str(e.value)
  assert '\n' not in text and 'model.binary_weights' in text and message in text


@pytest.mark.parametrize('value', [1, 0, 'True', 'yes', None, 1.0])
def test_a_non_bool_is_one_line_naming_the_field(value):
  d = _config().to_dict()
  d['model']['binary_weights'] = value
  with pytest.raises(ValueError, match=r'^model\.binary_weights must be True or False') as e:
    build.validate_config(ml_collections.ConfigDict(d))
  assert '\n' not in str(e.value)


def test_the_default_leaves_every_other_model_alone():
  assert common.base_config().model.binary_weights is False
  dense = common.with_overrides(smoke.get_config(), {'model.masked': False})
  assert build.layer_classes(dense)['dense'] is layers.Dense


# ---------------------------------------------------------------------------------------------
# Storage and the inspect report.


def test_binary_bits_by_hand():
  # (3, 3, 2, 4): 72 sign bits + 4 scales x 32; (4, 3): 12 bits + 3 x 32
  assert storage.binary_bits([(3, 3, 2, 4)]) == 72 + 128 == 200
  assert storage.binary_bits([(4, 3)]) == 12 + 96 == 108
  assert storage.binary_bits([(3, 3, 2, 4), (4, 3)]) == 308
  assert storage.binary_bits([(4, 3)], scale_bits=16) == 12 + 48
  assert storage.binary_bits([]) == 0


def test_summary_reports_binary_bits_and_no_scale_as_norm():
  config = _config()
  report = summary.summarize(config, abstract=True)
  shapes = [tuple(layer['shape']) for layer in report['layers']]
  assert report['binary_bits'] == storage.binary_bits(shapes)
  assert report['binary_ratio'] == report['storage']['dense_fp32_bits'] / report['binary_bits']
  # the 1-bit layers' scales are not normalisation values: as many as the plain dense model's
  dense_config = common.with_overrides(config, {'model.binary_weights': False})
  dense = summary.summarize(dense_config, abstract=True)
  assert report['norm_values'] == dense['norm_values'] == 160  # 5 BNs x 16 channels x 2
  assert 'binary_bits' not in dense
  scales = sum(sh[-1] for sh in shapes)
  assert report['trainable_params'] == dense['trainable_params'] + scales
  text = summary.format_summary(report)
  assert '(dense baseline, learned 1-bit weights)' in text
  assert 'learned 1-bit weights + fp32 scales' in text


# ---------------------------------------------------------------------------------------------
# End to end: the trainer, evaluation and a .pemn file.


def test_train_evaluate_and_export_a_binary_model(data_dir, tmp_path):
  config = _config(
    **{
      'data.data_dir': data_dir,
      'train.batch_size': 16,
      'train.eval_batch_size': 384,
      'train.checkpoint_every_steps': 2,
    }
  )
  workdir = str(tmp_path / 'w')
  result = train.train_and_evaluate(config, workdir)
  assert result['finished'] and result['step'] == 4
  assert 0.0 <= result['final_accuracy'] <= 1.0
  evaluated = train.evaluate_workdir(workdir)
  assert evaluated['accuracy'] == result['final_accuracy']
  # The file rebuilds the trained network (whatever it stores for the kernels and scales).
  out = str(tmp_path / 'binary.pemn')
  train.export_workdir(workdir, out)
  config2, model2, v2, _ = artifact.load(out)
  assert config2.model.binary_weights is True
  _, s, state, _ = train.restore_workdir(workdir)
  x = jax.random.normal(jax.random.key(5), (4, 28, 28, 1))
  trained = {'params': state.params, 'batch_stats': state.batch_stats}
  np.testing.assert_array_equal(s.model.apply(trained, x), model2.apply(v2, x))


@pytest.mark.parametrize('policy', ['save_convs', 'full'])
def test_remat_blocks_same_variables_values_and_gradients(policy):
  over = {
    'model.dim': 8,
    'model.depth': 2,
    'model.patch_size': 2,
    'model.input_shape': (8, 8, 1),
    'model.native_kernels': 'none',
  }
  plain, remat = _config(**over), _config(**over, **{'model.remat_blocks': policy})
  model_p, model_r = build.build_model(plain), build.build_model(remat)
  variables = build.init_variables(model_p, plain)
  chex.assert_trees_all_equal(build.init_variables(model_r, remat), variables)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 1))

  def outputs(model):
    def loss(params):
      logits, _ = model.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(logits * jnp.arange(10.0))

    return jax.value_and_grad(loss)(variables['params'])

  chex.assert_trees_all_close(outputs(model_r), outputs(model_p), rtol=1e-5, atol=1e-5)
