"""Format version 2 of the ``.pemn`` file: folded BatchNorm and learned 1-bit kernels.

Folding stores each BatchNorm as one scale and one shift per channel (float32, float16 or
bfloat16) instead of four float32 values; binary models store one bit per weight. A file that
uses neither stays version 1 (tests/test_artifact_compat.py loads committed version-1 files).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import artifact, build, layers, train
from pemn_jax.configs import common, smoke

SHAPE = (28, 28, 1)


def _variables(config):
  """Freshly initialised variables with BatchNorm statistics of one training pass and moved
  scores / weights (so the masks, signs and statistics are not the init's)."""
  model = build.build_model(config)
  v = build.init_variables(model, config, SHAPE)
  v['params'] = jax.tree.map(
    lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), v['params']
  )
  x = jax.random.normal(jax.random.key(5), (32, *SHAPE))
  _, updates = model.apply(v, x, train=True, mutable=['batch_stats'])
  return model, {**v, **updates}


def _x():
  return jax.random.normal(jax.random.key(9), (16, *SHAPE))


def _logits(model, variables, x):
  return np.asarray(model.apply(variables, x, train=False))


@pytest.fixture(scope='module')
def masked():
  config = smoke.get_config()
  model, variables = _variables(config)
  return config, model, variables


@pytest.mark.parametrize('bn, rtol', [('fp32-folded', 1e-5), ('fp16', 2e-3), ('bf16', 2e-2)])
def test_folded_batch_norm_matches_the_full_model_to_its_precision(masked, tmp_path, bn, rtol):
  config, model, variables = masked
  full = artifact.export(config, variables, tmp_path / 'full.pemn', input_shape=SHAPE)
  folded = artifact.export(config, variables, tmp_path / 'f.pemn', input_shape=SHAPE, bn=bn)
  assert full['format_version'] == 1 and folded['format_version'] == 2
  assert full['bn_storage'] == 'full' and folded['bn_storage'].startswith('folded ')
  assert folded['norm_values'] == full['norm_values']
  itemsize = 4 if bn == 'fp32-folded' else 2
  assert folded['bn_bytes'] == itemsize * folded['norm_values']  # 2 values a channel
  assert full['bn_bytes'] == 2 * 4 * full['norm_values']  # 4 float32 values a channel
  assert folded['file_bytes'] < full['file_bytes']
  _, m2, v2, _ = artifact.load(tmp_path / 'f.pemn')
  x = _x()
  want, got = _logits(model, variables, x), _logits(m2, v2, x)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)
  assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_fold_batch_norm_is_the_inference_map():
  bn = nn.BatchNorm(use_running_average=True, epsilon=layers.BN_EPSILON)
  x = jax.random.normal(jax.random.key(0), (5, 7))
  rng = np.random.default_rng(1)
  v = {
    'params': {'scale': rng.normal(size=7), 'bias': rng.normal(size=7)},
    'batch_stats': {'mean': rng.normal(size=7), 'var': rng.uniform(0.1, 3, size=7)},
  }
  v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), v)
  scale, shift = artifact.fold_batch_norm(v, (), layers.BN_EPSILON)
  want = np.asarray(bn.apply(v, x))
  np.testing.assert_allclose(np.asarray(x) * scale + shift, want, rtol=1e-5, atol=1e-6)
  # And the reconstruction a folded file loads as: mean 0, the unit variance, gamma = scale.
  u = artifact.unit_variance(layers.BN_EPSILON)
  assert np.float32(u) + np.float32(layers.BN_EPSILON) == np.float32(1)
  rebuilt = {
    'params': {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(shift, jnp.float32)},
    'batch_stats': {'mean': jnp.zeros(7), 'var': jnp.full(7, u)},
  }
  np.testing.assert_allclose(np.asarray(bn.apply(rebuilt, x)), want, rtol=1e-5, atol=1e-6)


def test_binary_model_exports_one_bit_a_weight_and_reloads_bit_identically(tmp_path):
  config = common.with_overrides(
    smoke.get_config(), {'model.masked': False, 'model.binary_weights': True}
  )
  model, variables = _variables(config)
  info = artifact.export(config, variables, tmp_path / 'b.pemn', input_shape=SHAPE)
  assert info['format_version'] == 2 and info['strategy'] == 'binary'
  header, _ = artifact.read(tmp_path / 'b.pemn')
  kernels = [e for e in header['entries'] if e['kind'] == 'binary']
  n = sum(int(np.prod(e['shape'])) for e in kernels)
  assert kernels and info['binary_kernel_bytes'] == sum(
    (int(np.prod(e['shape'])) + 7) // 8 for e in kernels
  )
  assert info['binary_kernel_bytes'] <= n / 8 + len(kernels)
  assert info['dense_fp32_bytes'] == 4 * n
  _, m2, v2, _ = artifact.load(tmp_path / 'b.pemn')
  x = _x()
  np.testing.assert_array_equal(_logits(m2, v2, x), _logits(model, variables, x))
  text = artifact.format_inspect(info)
  assert 'learned 1-bit kernels' in text
  # Folded BN composes with binary kernels.
  both = artifact.export(config, variables, tmp_path / 'bf.pemn', input_shape=SHAPE, bn='fp16')
  assert both['file_bytes'] < info['file_bytes']


def test_version_2_kinds_are_refused_in_a_version_1_header(masked, tmp_path):
  config, _, variables = masked
  artifact.export(config, variables, tmp_path / 'f.pemn', input_shape=SHAPE, bn='fp16')
  header, payload = artifact.read(tmp_path / 'f.pemn')
  header['format_version'] = 1
  bad = tmp_path / 'bad.pemn'
  bad.write_bytes(artifact.frame(header, payload))
  with pytest.raises(artifact.ArtifactError, match='kind must be one of .* in format version 1'):
    artifact.read(bad)


def test_bad_bn_choice_is_one_line(masked, tmp_path):
  config, _, variables = masked
  with pytest.raises(artifact.ArtifactError, match='bn must be one of'):
    artifact.export(config, variables, tmp_path / 'x.pemn', bn='int8')
  assert not (tmp_path / 'x.pemn').exists()


def test_evaluate_against_a_reference_reports_agreement(tmp_path, data_dir):
  workdir = str(tmp_path / 'wd')
  config = common.with_overrides(
    smoke.get_config(),
    {
      'data.data_dir': data_dir,
      'train.num_steps': 4,
      'train.batch_size': 16,
      'train.eval_batch_size': 384,
      'train.checkpoint_every_steps': 2,
    },
  )
  train.train_and_evaluate(config, workdir)
  full, folded = str(tmp_path / 'full.pemn'), str(tmp_path / 'fp32.pemn')
  train.export_workdir(workdir, full)
  train.export_workdir(workdir, folded, bn='fp32-folded')
  override = common.with_overrides(smoke.get_config(), {'data.data_dir': data_dir})
  r = artifact.evaluate(folded, override, reference=full)
  plain = artifact.evaluate(full, override)
  assert r['reference_accuracy'] == plain['accuracy']
  assert r['num_examples'] == plain['num_examples']
  assert r['agreement'] >= 0.999 and r['max_logit_difference'] < 1e-3
  assert abs(r['accuracy'] - plain['accuracy']) <= 1 / plain['num_examples']
