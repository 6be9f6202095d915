"""``.pemn`` files of models no pemn-jax config describes: ``export_module`` / ``load_module``.

The models are written in the ordinary Flax style (no pemn-jax in their definition) and masked
by ``mask_model``, or built from pemn-jax's layers; each is "trained" a little (scores moved,
BatchNorm statistics updated) before export, so the masks and statistics are not the init's.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import pemn_jax as pemn
from pemn_jax import artifact, layers, masking, module_artifact, storage

RNGS = {'params': jax.random.key(0), 'frozen': jax.random.key(1)}


class CNN(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
    x = nn.relu(norm('bn')(nn.Conv(self.width, (3, 3), strides=2, name='z_stem')(x)))
    x = nn.Conv(self.width, (3, 3), feature_group_count=self.width, name='dw')(x)
    x = nn.relu(norm('bn_dw')(x))
    x = nn.relu(norm('bn_pw')(nn.Conv(self.width, (1, 1), name='pw')(x)))
    return nn.Dense(10, name='head')(x.mean((1, 2)))


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32, name='embed')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4, name='attn')(nn.LayerNorm()(x))
    return nn.Dense(5, name='head')(nn.LayerNorm()(x).mean(1))


class OurLayers(nn.Module):
  """A model of pemn-jax's own masked layers (keep fractions as attributes)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.MaskedDense(24, keep_fraction=0.3)(x.reshape(x.shape[0], -1)))
    return layers.MaskedDense(10, keep_fraction=0.7, score_abs=False)(x)


def _x(shape):
  return jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)


def _trained(module, x, train_kwargs=None):
  """Variables as after some training: scores moved, BN statistics of a training pass."""
  variables = module.init(RNGS, x)
  params = jax.tree.map(
    lambda a: a + 0.1 * jax.random.normal(jax.random.key(7), a.shape), variables['params']
  )
  variables = {**variables, 'params': params}
  if train_kwargs:
    _, upd = module.apply(variables, x, mutable=['batch_stats'], **train_kwargs)
    variables = {**variables, **upd}
  return variables


CASES = {
  'cnn_rp': lambda: (
    pemn.mask_model(CNN(), keep_fraction=0.5, strategy='random_vector_padding', rp_ratio=1e-2),
    _x((4, 16, 16, 3)),
    {'train': True},
  ),
  'transformer_rules': lambda: (
    pemn.mask_model(Transformer(), rules={'attn/.*': 0.2, 'head': None, '.*': 0.6}),
    _x((3, 7, 12)),
    None,
  ),
  'cnn_frozen_bias': lambda: (pemn.mask_model(CNN(), bias='freeze'), _x((2, 16, 16, 3)), None),
  'our_layers': lambda: (OurLayers(), _x((2, 6, 6, 1)), None),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_export_load_gives_bit_identical_logits(case, tmp_path):
  module, x, train = CASES[case]()
  variables = _trained(module, x, train)
  path = tmp_path / 'net.pemn'
  info = pemn.export_module(path, module, variables, x, frozen_key=RNGS['frozen'], step=12)
  assert info['format_version'] == 2 and info['step'] == 12 and info['masked']
  loaded = pemn.load_module(path, module)
  flat_l = traverse_util.flatten_dict(loaded)
  assert set(flat_l) == set(traverse_util.flatten_dict(variables))
  np.testing.assert_array_equal(
    np.asarray(jax.jit(module.apply)(loaded, x)), np.asarray(jax.jit(module.apply)(variables, x))
  )
  # No random kernel of a masked layer is in the file, and no scores: only the masks.
  header, _ = artifact.read(path)
  stored = {tuple(e['path']) for e in header['entries']}
  for layer in header['module']['masked_layers']:
    assert (layers.FROZEN, *layer.split('/'), 'kernel') not in stored
    assert ('params', *layer.split('/'), 'scores') not in stored
    assert (*layer.split('/'), 'scores') in stored  # the mask entry
  text = artifact.format_inspect(artifact.inspect(path))
  assert 'load_module' in text and 'masked layers' in text


def test_masks_keep_the_layers_own_fractions(tmp_path):
  module, x, _ = CASES['transformer_rules']()
  variables = _trained(module, x)
  path = tmp_path / 'net.pemn'
  pemn.export_module(path, module, variables, x, frozen_key=RNGS['frozen'])
  info = artifact.inspect(path)
  keeps = {layer['path']: layer for layer in info['layers']}
  assert 'head' not in keeps and set(info['masked_layers']) == set(keeps)
  for name, layer in keeps.items():
    k = 0.2 if name.startswith('attn/') else 0.6
    n = int(np.prod(layer['shape']))
    assert round(layer['keep'] * n) == masking.num_kept(n, k), name


def test_loading_with_another_module_is_one_line_naming_the_variable(tmp_path):
  module, x, train = CASES['cnn_rp']()
  path = tmp_path / 'net.pemn'
  pemn.export_module(path, module, _trained(module, x, train), x, frozen_key=RNGS['frozen'])
  other = pemn.mask_model(CNN(width=8), keep_fraction=0.5)
  with pytest.raises(artifact.ArtifactError) as e:
    pemn.load_module(path, other)
  msg = str(e.value)
  assert '\n' not in msg and 'another module definition' in msg and 'in the file' in msg
  # The same shapes but another keep fraction: the masks' counts disagree.
  with pytest.raises(artifact.ArtifactError, match='the module keeps'):
    pemn.load_module(
      path,
      pemn.mask_model(CNN(), keep_fraction=0.3, strategy='random_vector_padding', rp_ratio=1e-2),
    )
  # Another strategy draws other frozen kernels: refused by the fingerprint.
  with pytest.raises(artifact.ArtifactError, match='fingerprint'):
    pemn.load_module(path, pemn.mask_model(CNN(), keep_fraction=0.5))
  # A config loader refuses a module file, and says what to use.
  with pytest.raises(artifact.ArtifactError, match='load_module'):
    artifact.load(path)


def test_export_checks_key_variables_and_layers(tmp_path):
  module, x, train = CASES['cnn_rp']()
  variables = _trained(module, x, train)
  path = tmp_path / 'net.pemn'
  with pytest.raises(artifact.ArtifactError, match='frozen_key is needed'):
    pemn.export_module(path, module, variables, x)
  with pytest.raises(artifact.ArtifactError, match='does not regenerate'):
    pemn.export_module(path, module, variables, x, frozen_key=jax.random.key(99))
  other = pemn.mask_model(CNN(width=8), keep_fraction=0.5)
  with pytest.raises(artifact.ArtifactError, match='not those of the module'):
    pemn.export_module(path, other, variables, x, frozen_key=RNGS['frozen'])
  assert not path.exists()

  class Scored(nn.Module):  # owns scores but is no masked layer pemn-jax can recompute
    @nn.compact
    def __call__(self, x):
      return x * self.param('scores', nn.initializers.ones, x.shape[-1:])

  v = Scored().init(RNGS, x)
  with pytest.raises(artifact.ArtifactError, match='mask cannot be recomputed'):
    pemn.export_module(path, Scored(), v, x)
  assert not path.exists()


def test_a_damaged_structure_section_is_refused(tmp_path):
  module, x, _ = CASES['our_layers']()
  path = tmp_path / 'net.pemn'
  pemn.export_module(path, module, _trained(module, x), x, frozen_key=RNGS['frozen'])
  header, payload = artifact.read(path)
  header['module']['structure'][0][2] = [1, 2, 3]
  bad = tmp_path / 'bad.pemn'
  bad.write_bytes(artifact.frame(header, payload))
  with pytest.raises(artifact.ArtifactError, match='structure_fingerprint'):
    artifact.inspect(bad)


def test_storage_report_of_any_masked_tree():
  module, x, _ = CASES['transformer_rules']()
  variables = module.init(RNGS, x)
  flat = traverse_util.flatten_dict(variables['params'])
  scores = {'/'.join(p[:-1]): a for p, a in flat.items() if p[-1] == 'scores'}
  keeps = {name: 0.2 if name.startswith('attn/') else 0.6 for name in scores}
  r = storage.report_tree(variables, keeps)
  n = sum(a.size for a in scores.values())
  assert r.masked_weights == n and r.dense_fp32_bits == 32 * n
  assert r.keep_fraction == sum(masking.num_kept(a.size, keeps[k]) for k, a in scores.items()) / n
  ln = sum(a.size for p, a in flat.items() if p[-1] == 'scale')  # the two LayerNorms
  assert r.norm_values == 2 * ln
  assert r.entropy_bits < r.key_only_bits < r.dense_fp32_bits
  with pytest.raises(ValueError, match='names no keep'):
    storage.report_tree(variables, {})


def test_nnx_model_round_trip_and_wrong_rngs(tmp_path):
  from flax import nnx

  from pemn_jax import nnx as pnnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = pnnx.MaskedConv(1, 8, 3, keep_fraction=0.5, rngs=rngs)
      self.bn = nnx.BatchNorm(8, rngs=rngs)
      self.head = pnnx.MaskedLinear(8, 10, keep_fraction=0.3, rngs=rngs)
      self.out = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(self.head(jax.nn.relu(self.bn(self.conv(x))).mean((1, 2))))

  x = _x((4, 8, 8, 1))
  model = Net(nnx.Rngs(params=0, frozen=1))
  model.conv.scores.set_value(
    model.conv.scores[...] + 0.1 * jax.random.normal(jax.random.key(3), model.conv.scores.shape)
  )
  model.train()
  model(x)  # BN statistics of a training pass
  model.eval()
  want = np.asarray(model(x))
  path = tmp_path / 'nnx.pemn'
  info = pemn.export_module(path, model, step=3)
  assert info['masked'] and set(info['masked_layers']) == {'conv', 'head'}
  fresh = Net(nnx.Rngs(params=5, frozen=1))  # other scores/BN init, same frozen draws
  fresh.eval()
  assert not np.array_equal(np.asarray(fresh(x)), want)
  loaded = pemn.load_module(path, fresh)
  np.testing.assert_array_equal(np.asarray(loaded(x)), want)
  with pytest.raises(artifact.ArtifactError, match='same rngs'):
    pemn.load_module(path, Net(nnx.Rngs(params=0, frozen=2)))
  with pytest.raises(artifact.ArtifactError, match='nnx module'):
    pemn.load_module(path, OurLayers())


@pytest.mark.parametrize('field', sorted(module_artifact.MODULE_FIELDS))
def test_a_malformed_module_section_is_one_line_never_a_crash(field, tmp_path):
  module, x, _ = CASES['our_layers']()
  path = tmp_path / 'net.pemn'
  pemn.export_module(path, module, _trained(module, x), x, frozen_key=RNGS['frozen'])
  header, payload = artifact.read(path)
  bad_values = [
    None,
    True,
    -1,
    1.5,
    'x' * 300,
    [],
    [[]],
    {},
    {'a': [1]},
    [['params', ['a'], [2], 'float32']],
  ]
  for value in bad_values:
    if value == header['module'][field]:
      continue  # a valid value of this field
    h = json.loads(json.dumps(header))
    h['module'][field] = value
    bad = tmp_path / 'bad.pemn'
    bad.write_bytes(artifact.frame(h, payload))
    with pytest.raises(artifact.ArtifactError) as e:
      artifact.inspect(bad)
    assert '\n' not in str(e.value)
    with pytest.raises(artifact.ArtifactError):
      pemn.load_module(bad, module)
