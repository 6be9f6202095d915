"""``pemn.mask_model`` on models written in the ordinary Flax style, with no pemn-jax inside.

A CNN of ``nn.Conv`` / ``nn.BatchNorm`` / ``nn.Dense`` with a strided stem, a dilated depthwise
conv and a 1x1 conv, whose layers are called in another order than their names sort in; and a
small transformer of ``nn.Dense``, ``nn.LayerNorm`` and ``nn.MultiHeadDotProductAttention``
(``nn.DenseGeneral`` projections with 3-D kernels).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import pemn_jax as pemn
from pemn_jax import layers, masking, steps, strategies

RNGS = {'params': jax.random.key(0), 'frozen': jax.random.key(1)}


class CNN(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
    # Called stem -> dw -> b_pw -> a_pw -> head; sorted names give a_pw, b_pw, dw, head, z_stem.
    x = nn.relu(norm('bn')(nn.Conv(self.width, (3, 3), strides=2, name='z_stem')(x)))
    x = nn.Conv(self.width, (3, 3), feature_group_count=self.width, kernel_dilation=2, name='dw')(x)
    x = nn.relu(norm('bn_dw')(x))
    x = nn.relu(norm('bn_b')(nn.Conv(self.width, (1, 1), name='b_pw')(x)))
    x = nn.relu(norm('bn_a')(nn.Conv(self.width, (1, 1), name='a_pw')(x)))
    return nn.Dense(10, name='head')(x.mean((1, 2)))


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.Dense(32, name='embed')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4, name='attn')(nn.LayerNorm()(x))
    return nn.Dense(5, name='head')(nn.LayerNorm()(x).mean(1))


def cnn_input():
  return jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), jnp.float32)


def transformer_input():
  return jnp.asarray(np.random.default_rng(0).standard_normal((4, 7, 12)), jnp.float32)


def flat(tree) -> dict:
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def masks(model, variables, keep):
  """Each masked layer's mask, as its forward pass computes it."""
  return {
    path[: -len('/scores')]: masking.score_mask(s, keep)
    for path, s in flat(variables['params']).items()
    if path.endswith('/scores')
  }


@pytest.mark.parametrize(
  'module, x, masked',
  [
    (CNN(), cnn_input(), ['z_stem', 'dw', 'b_pw', 'a_pw', 'head']),
    (
      Transformer(),
      transformer_input(),
      ['embed', 'attn/query', 'attn/key', 'attn/value', 'attn/out', 'head'],
    ),
  ],
  ids=['cnn', 'transformer'],
)
def test_every_supported_layer_is_masked_with_exact_counts(module, x, masked):
  model = pemn.mask_model(module, keep_fraction=0.3)
  assert type(model).__name__ == type(module).__name__
  variables = model.init(RNGS, x)
  frozen = flat(variables['frozen'])
  params = flat(variables['params'])
  assert sorted(frozen) == sorted(f'{p}/kernel' for p in masked)
  assert not any(p.endswith('/kernel') for p in params)  # no kernel is trainable
  for path, mask in masks(model, variables, 0.3).items():
    n = mask.size
    assert int(mask.sum()) == masking.num_kept(n, 0.3), path
  # Biases and norms stay trainable, where the original put them.
  assert 'head/bias' in params and any('LayerNorm' in p or p.startswith('bn/') for p in params)
  # The effective kernel the original layer sees: frozen x mask.
  out = model.apply(variables, x)
  assert out.shape[0] == x.shape[0] and np.all(np.isfinite(out))


def test_frozen_is_kaiming_normal_in_pytorch_layout():
  model = pemn.mask_model(CNN(width=32), keep_fraction=0.5)
  variables = model.init(RNGS, cnn_input())
  kernel = variables['frozen']['z_stem']['kernel']  # (3, 3, 3, 32), fan in 27
  assert abs(float(np.std(kernel)) - np.sqrt(2 / 27)) < 0.02
  # Drawn flat in PyTorch's OIHW order, like pemn_jax.layers: the same key gives the same
  # values as layers.kaiming_normal_frozen.
  torch = np.asarray(layers.to_torch_layout(kernel))
  assert torch.shape == (32, 3, 3, 3)
  scores = variables['params']['z_stem']['scores']
  assert float(np.max(np.abs(scores))) <= 1 / np.sqrt(27)


def test_unmatched_and_excluded_layers_keep_training_as_they_were():
  model = pemn.mask_model(CNN(), {'head': None, '.*pw': 0.1})
  variables = model.init(RNGS, cnn_input())
  assert sorted(flat(variables['frozen'])) == ['a_pw/kernel', 'b_pw/kernel']
  params = flat(variables['params'])
  assert 'head/kernel' in params and 'z_stem/kernel' in params and 'dw/kernel' in params
  for path, mask in masks(model, variables, 0.1).items():
    assert int(mask.sum()) == masking.num_kept(mask.size, 0.1), path


def test_frozen_never_in_gradients_or_optimizer_state_and_the_step_traces_once():
  model = pemn.mask_model(CNN(), keep_fraction=0.5, strategy='max_layer_padding')
  variables = model.init(RNGS, cnn_input())
  tx = optax.adamw(1e-2)
  state = steps.create_train_state(variables, tx)
  frozen = variables['frozen']
  step = jax.jit(chex.assert_max_traces(steps.make_train_step(model, tx), n=1))
  rng = np.random.default_rng(1)
  for _ in range(3):
    batch = {
      'image': jnp.asarray(rng.standard_normal((4, 16, 16, 3)), jnp.float32),
      'label': jnp.asarray(rng.integers(0, 10, 4), jnp.int32),
    }
    state, metrics = step(state, frozen, batch)
  assert np.isfinite(float(metrics['loss']))
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(state.opt_state)[0]]
  assert opt_paths and not any("'kernel'" in p for p in opt_paths if 'head' in p or 'pw' in p)
  grads = jax.grad(
    lambda p: model.apply(
      {**variables, 'params': p}, batch['image'], train=True, mutable=['batch_stats']
    )[0].sum()
  )(variables['params'])
  assert set(flat(grads)) == set(flat(variables['params']))
  # Scores get the straight-through gradient (non-zero), BN too.
  assert float(jnp.abs(grads['a_pw']['scores']).sum()) > 0


@pytest.mark.parametrize('name, rp', [('max_layer_padding', None), ('random_vector_padding', 0.1)])
def test_strategies_store_the_counted_values(name, rp):
  model = pemn.mask_model(Transformer(), keep_fraction=0.5, strategy=name, rp_ratio=rp)
  variables = model.init(RNGS, transformer_input())
  frozen = variables['frozen']
  shapes = [tuple(v.shape) for v in flat(frozen).values()]
  assert strategies.unique_values(frozen) == strategies.stored_value_count(shapes, name, rp)


def test_one_layer_follows_the_call_order_not_the_key_order():
  # b_pw is called before a_pw (same shape): one_layer gives a_pw b_pw's draw, by hand.
  mask_only = pemn.mask_model(CNN(), keep_fraction=0.5).init(RNGS, cnn_input())['frozen']
  one = pemn.mask_model(CNN(), keep_fraction=0.5, strategy='one_layer')
  frozen = one.init(RNGS, cnn_input())['frozen']
  np.testing.assert_array_equal(frozen['a_pw']['kernel'], mask_only['b_pw']['kernel'])
  np.testing.assert_array_equal(frozen['b_pw']['kernel'], mask_only['b_pw']['kernel'])
  for name in ('z_stem', 'dw', 'head'):  # unique shapes; the classifier keeps its own draw
    np.testing.assert_array_equal(frozen[name]['kernel'], mask_only[name]['kernel'])
  # An explicit order (a_pw first) makes a_pw the prototype instead.
  explicit = pemn.mask_model(
    CNN(), keep_fraction=0.5, strategy='one_layer', order=['z_stem', 'dw', 'a_pw', 'b_pw', 'head']
  ).init(RNGS, cnn_input())['frozen']
  np.testing.assert_array_equal(explicit['b_pw']['kernel'], mask_only['a_pw']['kernel'])


def test_freeze_biases_moves_them_out_of_params():
  model = pemn.mask_model(CNN(), keep_fraction=0.5, bias='freeze')
  variables = model.init(RNGS, cnn_input())
  assert 'head/bias' in flat(variables['frozen']) and 'head/bias' not in flat(variables['params'])
  assert 'bn/bias' in flat(variables['params'])  # BatchNorm is no layer of mask_model's
  model.apply(variables, cnn_input())


def test_as_a_field_of_another_module_and_under_jit():
  class Outer(nn.Module):
    backbone: nn.Module

    @nn.compact
    def __call__(self, x):
      return self.backbone(x) * 2.0

  model = Outer(backbone=pemn.mask_model(CNN(), keep_fraction=0.5))
  variables = jax.jit(model.init)(RNGS, cnn_input())
  assert 'backbone' in variables['frozen'] and 'backbone' in variables['params']
  inner = pemn.mask_model(CNN(), keep_fraction=0.5).init(RNGS, cnn_input())
  assert jax.tree.map(jnp.shape, variables['frozen']['backbone']) == jax.tree.map(
    jnp.shape, inner['frozen']
  )
  out = jax.jit(model.apply)(variables, cnn_input())
  assert out.shape == (4, 10)


def test_a_module_made_inside_a_compact_method_is_refused():
  class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
      return pemn.mask_model(CNN())(x)

  with pytest.raises(ValueError, match='made outside any other module'):
    Outer().init(RNGS, cnn_input())


@pytest.mark.parametrize(
  'kwargs, match',
  [
    ({'rules': {'nothing_here': 0.5}}, r"rule\(s\) \['nothing_here'\] match no layer"),
    ({'rules': {'.*': 1.5}}, 'keep fraction'),
    ({'keep_fraction': 0.0}, 'keep'),
    ({'strategy': 'bogus'}, 'strategy'),
    ({'bias': 'maybe'}, 'bias must be one of'),
    ({'order': ['head']}, 'order must name every masked layer once'),
  ],
)
def test_bad_input_is_one_line(kwargs, match):
  with pytest.raises(ValueError, match=match) as e:
    pemn.mask_model(CNN(), **kwargs).init(RNGS, cnn_input())
  assert '\n' not in str(e.value)


def test_an_unsupported_layer_matched_by_a_rule_is_named():
  class WithTranspose(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.ConvTranspose(4, (2, 2), name='up')(nn.Conv(4, (3, 3), name='c')(x))

  with pytest.raises(ValueError, match="matches layer 'up', a ConvTranspose"):
    pemn.mask_model(WithTranspose()).init(RNGS, cnn_input())
  model = pemn.mask_model(WithTranspose(), {'up': None, 'c': 0.5})  # excluded: fine
  assert list(model.init(RNGS, cnn_input())['frozen']) == ['c']


def test_a_trained_mask_model_network_learns_well_above_chance(data_dir):
  """The CNN, masked at keep 0.5 over fixed random weights, on the embedded Fashion-MNIST."""
  from pemn_jax.configs import common, smoke
  from pemn_jax.data import pipeline, sources

  config = common.with_overrides(
    smoke.get_config(), {'data.data_dir': data_dir, 'train.batch_size': 64}
  )
  info = sources.get_dataset_info(config.data)
  model = pemn.mask_model(CNN(width=32), keep_fraction=0.5, strategy='random_vector_padding',
                          rp_ratio=1e-2)  # fmt: skip
  variables = model.init(RNGS, jnp.zeros((1, *info.image_shape)))
  tx = optax.adamw(optax.linear_onecycle_schedule(150, 0.02))
  state = steps.create_train_state(variables, tx)
  step = jax.jit(steps.make_train_step(model, tx), donate_argnums=(0,))
  one = dict(process_index=0, process_count=1)
  batches = pipeline.train_batches(config.data, global_batch_size=64, seed=0, epoch=0, **one)
  for _, batch in zip(range(150), batches):
    state, _ = step(state, variables['frozen'], batch)
  eval_step = jax.jit(steps.make_eval_step(model))
  result = steps.evaluate(
    eval_step,
    state.params,
    state.batch_stats,
    variables['frozen'],
    pipeline.eval_batches(config.data, global_batch_size=500, **one),
    steps.mesh_and_shardings().batch,
  )
  assert result['num_examples'] == 2000
  assert result['accuracy'] > 0.4, result  # chance is 0.1; 0.57 measured here


SHARDED = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
sys.path.insert(0, 'tests')
import pemn_jax as pemn
from pemn_jax import steps
from test_mask_model import CNN, RNGS

model = pemn.mask_model(CNN(), keep_fraction=0.5, strategy='random_vector_padding', rp_ratio=0.1)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((16, 16, 16, 3)), jnp.float32)
batch = {'image': x, 'label': jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
variables = model.init(RNGS, x[:1])
tx = optax.adamw(1e-2)
shardings = steps.mesh_and_shardings()
state = steps.create_train_state(variables, tx, shardings.replicated)
frozen = jax.device_put(variables['frozen'], shardings.replicated)
step = steps.jit_train_step(model, tx, shardings)
state, metrics = step(state, frozen, steps.to_global(batch, shardings.batch))
print(json.dumps({'devices': jax.device_count(), 'loss': float(metrics['loss']),
                  'scores': np.asarray(state.params['a_pw']['scores']).ravel()[:64].tolist()}))
"""


@pytest.mark.slow
def test_one_sharded_step_on_eight_devices_equals_one_device():
  import json
  import os
  import subprocess
  import sys

  def run(devices):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    env['XLA_FLAGS'] = ' '.join([*flags, f'--xla_force_host_platform_device_count={devices}'])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
      [sys.executable, '-c', SHARDED],
      env=env,
      cwd=root,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])

  one, eight = run(1), run(8)
  assert (one['devices'], eight['devices']) == (1, 8)
  np.testing.assert_allclose(eight['loss'], one['loss'], rtol=1e-5)
  np.testing.assert_allclose(eight['scores'], one['scores'], rtol=1e-4, atol=1e-6)


def test_train_and_evaluate_trains_a_module_the_caller_built(data_dir, tmp_path):
  from pemn_jax.configs import common, smoke

  config = common.with_overrides(
    smoke.get_config(),
    {'data.data_dir': data_dir, 'train.num_steps': 6, 'train.eval_batch_size': 500},
  )
  model = pemn.mask_model(CNN(), keep_fraction=0.5, strategy='random_vector_padding', rp_ratio=0.1)
  workdir = str(tmp_path / 'w')
  summary = pemn.train_and_evaluate(config, workdir, model=model)
  assert summary['finished'] and summary['fingerprint'].startswith('module:')
  result = pemn.evaluate_workdir(workdir, model=model)
  assert result['accuracy'] == summary['final_accuracy'] and result['step'] == 6
  # The same config with another module (or none: the config's ConvMixer) is refused.
  other = pemn.mask_model(CNN(width=8), keep_fraction=0.5)
  for wrong in (other, None):
    with pytest.raises(ValueError, match='fingerprint'):
      pemn.evaluate_workdir(workdir, model=wrong)
  # Resuming with more steps continues the same module's run.
  more = common.with_overrides(config, {'train.num_steps': 8})
  assert pemn.train_and_evaluate(more, workdir, model=model)['step'] == 8


def test_train_and_evaluate_checks_the_module_logits_against_the_data(data_dir, tmp_path):
  from pemn_jax.configs import common, smoke

  class FiveWay(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(5)(x.reshape(x.shape[0], -1))

  config = common.with_overrides(smoke.get_config(), {'data.data_dir': data_dir})
  with pytest.raises(ValueError, match=r'not to 10 logits'):
    pemn.train_and_evaluate(config, str(tmp_path / 'w'), model=pemn.mask_model(FiveWay()))
  assert not (tmp_path / 'w').exists()


def test_a_masked_class_under_nn_remat_has_the_same_variables_and_gradients():
  masked_cnn = type(pemn.mask_model(CNN(), keep_fraction=0.5))  # the masked class itself

  def outer(block):
    class Outer(nn.Module):
      @nn.compact
      def __call__(self, x, train=False):
        return block(width=16, name='backbone')(x, train)

    return Outer()

  x = cnn_input()
  plain, remat = outer(masked_cnn), outer(nn.remat(masked_cnn, static_argnums=(2,)))
  variables = plain.init(RNGS, x)
  chex.assert_trees_all_equal(variables, remat.init(RNGS, x))

  def grads(model):
    loss = lambda p: model.apply(  # noqa: E731
      {**variables, 'params': p}, x, True, mutable=['batch_stats']
    )[0].sum()
    return jax.grad(loss)(variables['params'])

  chex.assert_trees_all_close(grads(remat), grads(plain), atol=1e-6)
