"""Masks over pretrained weights (``pemn_jax.pretrained``): mask fine-tuning and lottery jackpots.

A dense smoke run (a few steps on the embedded data) is the base. Its weights load from each
format with one fingerprint; a base of another definition is a one-line error naming the first
path; at keep 1.0 the masked model over it computes its logits bit for bit; magnitude init keeps
the largest |w|; a run resumes only over the same base; a mask delta ``.pemn`` stores no weight,
reloads bit-identically over its base and is refused without it or over another.
"""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from pemn_jax import artifact, build, layers, masking, pretrained, train
from pemn_jax.configs import common, smoke

SMOKE = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'pemn_jax', 'configs', 'smoke.py')
RUN = {'train.num_steps': 4, 'train.checkpoint_every_steps': 100, 'train.progress': False}


def _config(data_dir, **overrides):
  return common.with_overrides(smoke.get_config(), {'data.data_dir': data_dir, **RUN, **overrides})


def _masked(data_dir, base, **overrides):
  over = {'model.base_source': base, 'strategy.name': 'mask', **overrides}
  return _config(data_dir, **over)


@pytest.fixture(scope='module')
def dense(data_dir, tmp_path_factory):
  """(workdir, its variables) of a short dense smoke run: the base of every test here."""
  workdir = str(tmp_path_factory.mktemp('dense') / 'w')
  over = {'model.masked': False, 'train.num_steps': 30}  # trained enough to be above chance
  train.train_and_evaluate(_config(data_dir, **over), workdir)
  _, _, state, _ = train.restore_workdir(workdir)
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  return workdir, variables


def _x():
  return jnp.asarray(np.random.default_rng(0).standard_normal((8, 28, 28, 1)), jnp.float32)


def _save_flax(variables, path):
  with open(path, 'wb') as f:
    f.write(serialization.msgpack_serialize(jax.device_get(variables)))
  return str(path)


def _edited(variables, edit):
  """A copy of a variables tree, its flat dict changed by ``edit`` in place."""
  flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(variables).items()}
  edit(flat)
  return traverse_util.unflatten_dict(flat)


def test_every_format_loads_the_same_tree(dense, tmp_path):
  import orbax.checkpoint as ocp

  workdir, variables = dense
  ref = pretrained.load_base(workdir, 'workdir')
  assert {k[0] for k in ref.tree} == {'params', 'batch_stats'}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(str(tmp_path / 'orbax'), variables)
  ckpt.wait_until_finished()
  flax_file = _save_flax(variables, tmp_path / 'base.msgpack')
  params_only = _save_flax(variables['params'], tmp_path / 'params.msgpack')
  plain = str(tmp_path / 'plain.safetensors')
  pretrained.save_safetensors(variables, plain)
  names = {'params/stem/kernel': 'stem.weight', 'batch_stats/stem_bn/mean': 'bn0.running_mean'}
  renamed = str(tmp_path / 'renamed.safetensors')
  pretrained.save_safetensors(variables, renamed, names)
  name_map = tmp_path / 'names.json'
  name_map.write_text(json.dumps(names))
  for source, fmt, mapping in [
    (str(tmp_path / 'orbax'), 'orbax', None),
    (flax_file, 'flax', None),
    (plain, 'safetensors', None),
    (renamed, 'safetensors', str(name_map)),
  ]:
    base = pretrained.load_base(source, fmt, mapping)
    assert base.fingerprint == ref.fingerprint, fmt
    assert base.format == fmt
  # PyTorch layout ((out, in) dense, OIHW convs), transposed on reading: the same tree
  torch_tree = _edited(
    variables,
    lambda f: f.update({k: layers.to_torch_layout(v) for k, v in f.items() if k[-1] == 'kernel'}),
  )
  torch_file = str(tmp_path / 'torch.safetensors')
  pretrained.save_safetensors(torch_tree, torch_file)
  torch_base = pretrained.load_base(torch_file, 'safetensors', layout='torch')
  assert torch_base.fingerprint == ref.fingerprint and torch_base.layout == 'torch'
  assert pretrained.load_base(torch_file, 'safetensors').fingerprint != ref.fingerprint
  config = _masked(None, torch_file, **{'model.base_format': 'safetensors'})
  with pytest.raises(ValueError, match=r"the base's params/block0_depthwise/kernel has shape"):
    build.init_variables(build.build_model(config), config)
  config = common.with_overrides(config, {'model.base_layout': 'torch'})
  variables_torch = build.init_variables(build.build_model(config), config)
  path = str(tmp_path / 'torch_delta.pemn')
  artifact.export(config, variables_torch, path, base=torch_base)
  assert artifact.read(path)[0]['base']['layout'] == 'torch'
  artifact.load(path, base=torch_file)  # the recorded layout: no flag needed
  artifact.load(path, base=flax_file, base_format='flax')  # the same tree in Flax layout
  only = pretrained.load_base(params_only, 'flax')  # a params tree alone: no statistics
  assert all(k[0] == 'params' for k in only.tree)
  config = _masked(None, renamed, **{'model.base_format': 'safetensors'})  # the map not given
  with pytest.raises(ValueError, match=r'the base has no batch_stats/stem_bn/mean, which') as e:
    build.init_variables(build.build_model(config), config)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize(
  'edit, message',
  [
    (lambda f: f.pop(('params', 'head', 'kernel')), r'the base has no params/head/kernel'),
    (
      lambda f: f.update({('params', 'extra', 'kernel'): np.ones(3, np.float32)}),
      r'the base has params/extra/kernel, which is no variable',
    ),
    (
      lambda f: f.update({('params', 'head', 'kernel'): f[('params', 'head', 'kernel')].T}),
      r"the base's params/head/kernel has shape \(10, 16\), the model's is \(16, 10\)",
    ),
    (
      lambda f: f.pop(('batch_stats', 'stem_bn', 'var')),
      r'the base has no batch_stats/stem_bn/var',
    ),
  ],
  ids=['missing', 'extra', 'shape', 'statistics'],
)
def test_a_base_of_another_definition_is_one_line_naming_the_path(
  dense, data_dir, tmp_path, edit, message
):
  _, variables = dense
  path = _save_flax(_edited(variables, edit), tmp_path / 'b.msgpack')
  config = _masked(data_dir, path, **{'model.base_format': 'flax'})
  with pytest.raises(ValueError, match=message) as e:
    build.init_variables(build.build_model(config), config)
  assert '\n' not in str(e.value) and 'model.base_source' in str(e.value)


def test_a_wider_model_names_its_first_differing_path(dense, data_dir):
  workdir, _ = dense
  config = _masked(data_dir, workdir, **{'model.dim': 8})
  with pytest.raises(ValueError, match=r"the base's \S+ has shape .*, the model's is") as e:
    build.init_variables(build.build_model(config), config)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize(
  'overrides, field',
  [
    ({'strategy.name': 'random_vector_padding'}, 'strategy.name'),
    ({'strategy.name': 'one_layer'}, 'strategy.name'),
    ({'model.base_source': '/nonexistent/base'}, 'model.base_source'),
    ({'model.base_format': 'flax'}, 'model.base_format'),  # a directory is no msgpack file
    ({'model.base_name_map': '/tmp/names.json'}, 'model.base_name_map'),
    ({'model.masked': False, 'model.base_unmasked': 'freeze'}, 'model.base_unmasked'),
  ],
)
def test_config_errors_name_the_field(dense, data_dir, overrides, field):
  workdir, _ = dense
  config = _masked(data_dir, workdir, **overrides)
  with pytest.raises(ValueError) as e:
    build.validate_config(config)
  assert field in str(e.value) and '\n' not in str(e.value)


def test_keep_one_is_the_base_model_bit_for_bit(dense, data_dir):
  workdir, variables = dense
  dense_model = build.build_model(_config(data_dir, **{'model.masked': False}))
  config = _masked(data_dir, workdir, **{'strategy.keep_fraction': 1.0})
  model = build.build_model(config)
  masked = build.init_variables(model, config)
  x = _x()
  want = np.asarray(dense_model.apply(variables, x))
  np.testing.assert_array_equal(np.asarray(model.apply(masked, x)), want)
  kernel = masked[layers.FROZEN]['head']['kernel']
  np.testing.assert_array_equal(np.asarray(kernel), variables['params']['head']['kernel'])


def test_eval_at_start_over_the_base_at_keep_one_is_the_base_accuracy(dense, data_dir, tmp_path):
  workdir, _ = dense
  with open(os.path.join(workdir, 'summary.json')) as f:
    base_accuracy = json.load(f)['final_accuracy']
  assert base_accuracy > 0.2
  over = {'strategy.keep_fraction': 1.0, 'train.eval_at_start': True, 'train.num_steps': 2}
  run = str(tmp_path / 'mft')
  summary = train.train_and_evaluate(_masked(data_dir, workdir, **over), run)
  assert summary['initial_accuracy'] == base_accuracy
  with open(os.path.join(run, 'metrics.jsonl')) as f:
    first = json.loads(f.readline())
  assert (first['kind'], first['step'], first['accuracy']) == ('eval', 0, base_accuracy)


@pytest.mark.parametrize('score_abs', [True, False])
def test_magnitude_init_keeps_the_largest_weights(dense, data_dir, score_abs):
  workdir, _ = dense
  config = _masked(
    data_dir,
    workdir,
    **{
      'strategy.keep_fraction': 0.3,
      'strategy.score_init': 'magnitude',
      'strategy.score_abs': score_abs,
    },
  )
  variables = build.init_variables(build.build_model(config), config)
  masks = artifact.masks_of(config, variables['params'])
  assert len(masks) == 6
  for path, mask in masks.items():
    w = np.abs(np.asarray(variables[layers.FROZEN][path[0]]['kernel']))
    assert mask.sum() == masking.num_kept(w.size, 0.3)
    assert w[mask].min() >= w[~mask].max(), path  # exactly the largest |w|
    np.testing.assert_array_equal(mask, np.asarray(masking.topk_mask(jnp.asarray(w), 0.3)) > 0)


def test_constant_init_is_nearly_constant(dense, data_dir):
  workdir, _ = dense
  config = _masked(data_dir, workdir, **{'strategy.score_init': 'constant'})
  variables = build.init_variables(build.build_model(config), config)
  for path, scores in traverse_util.flatten_dict(variables['params']).items():
    if path[-1] == 'scores':
      c = 1 / np.sqrt(layers.fan_in(scores.shape))
      s = np.asarray(scores)
      assert np.all(np.abs(s / c - 1) <= pretrained.CONSTANT_NOISE * (1 + 1e-6)), path
      assert len(np.unique(s)) > 1  # the noise breaks the ties


def test_freeze_trains_only_the_scores_and_resume_checks_the_base(dense, data_dir, tmp_path):
  workdir, variables = dense
  flax_file = _save_flax(variables, tmp_path / 'base.msgpack')
  over = {'model.base_format': 'flax', 'model.base_unmasked': 'freeze'}
  config = _masked(data_dir, flax_file, **over, **{'train.checkpoint_every_steps': 2})
  run = str(tmp_path / 'mft')
  train.train_and_evaluate(config, run)
  _, s, state, _ = train.restore_workdir(run)
  trained = traverse_util.flatten_dict(jax.device_get(state.params))
  base = traverse_util.flatten_dict(variables['params'])
  start = traverse_util.flatten_dict(build.init_variables(s.model, config)['params'])
  for path, leaf in trained.items():
    if path[-1] == 'scores':
      assert not np.array_equal(leaf, start[path]), path  # the scores learned
    else:
      np.testing.assert_array_equal(leaf, base[path])  # BN scale and bias: the base's
  # A resume reloads the base: the same content under another path resumes ...
  moved = shutil.copy(flax_file, tmp_path / 'moved.msgpack')
  longer = {'train.num_steps': 6}
  train.train_and_evaluate(_masked(data_dir, str(moved), **over, **longer), run)
  # ... other weights are refused in one line, the checkpoints left as they were
  changed = _edited(variables, lambda f: f[('params', 'head', 'kernel')].__iadd__(1e-3))
  other = _save_flax(changed, tmp_path / 'other.msgpack')
  with pytest.raises(ValueError, match='is not the one it was trained over') as e:
    train.train_and_evaluate(_masked(data_dir, other, **over, **{'train.num_steps': 8}), run)
  assert '\n' not in str(e.value)


def test_mask_delta_reloads_bit_for_bit_and_only_over_its_base(dense, data_dir, tmp_path):
  workdir, variables = dense
  config = _masked(data_dir, workdir, **{'strategy.keep_fraction': 0.9})
  run = str(tmp_path / 'mft')
  train.train_and_evaluate(config, run)
  path = str(tmp_path / 'delta.pemn')
  info = train.export_workdir(run, path)
  header, _ = artifact.read(path)
  assert header['format_version'] == 2
  assert header['base']['fingerprint'] == pretrained.load_base(workdir).fingerprint
  assert header['config']['model']['base_source'] is None  # no path in the file
  assert not any(e['path'][0] == layers.FROZEN for e in header['entries'])
  assert all(e['kind'] in ('mask', 'array') for e in header['entries'])
  assert info['base_fp32_bytes'] == 4 * sum(a.size for a in jax.tree.leaves(variables))
  assert info['lora_equal_params_fp32_bytes'] == 4 * info['masked_weights'] + info['other_bytes']
  assert 'mask delta over a workdir base' in artifact.format_inspect(info)

  _, s, state, _ = train.restore_workdir(run)
  x = _x()
  want = np.asarray(
    s.model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats, layers.FROZEN: s.frozen}, x
    )
  )
  cfg, model, loaded, _ = artifact.load(path, base=workdir)
  np.testing.assert_array_equal(np.asarray(model.apply(loaded, x)), want)
  assert cfg.model.base_source == workdir
  flax_file = _save_flax(variables, tmp_path / 'base.msgpack')  # another format, same weights
  _, _, loaded2, _ = artifact.load(path, base=flax_file, base_format='flax')
  np.testing.assert_array_equal(np.asarray(model.apply(loaded2, x)), want)

  dense_config, dense_vars = artifact.materialize_dense(cfg, loaded)
  assert dense_config.model.base_source is None
  dense_model = build.build_model(dense_config)
  np.testing.assert_array_equal(np.asarray(dense_model.apply(dense_vars, x)), want)

  with pytest.raises(artifact.ArtifactError, match='is a mask delta over a workdir base') as e:
    artifact.load(path)
  assert '\n' not in str(e.value)
  changed = _edited(variables, lambda f: f[('batch_stats', 'stem_bn', 'mean')].__iadd__(1e-3))
  other = _save_flax(changed, tmp_path / 'other.msgpack')
  with pytest.raises(artifact.ArtifactError, match='is not the base model this mask delta') as e:
    artifact.load(path, base=other, base_format='flax')
  assert '\n' not in str(e.value)
  dense_file = str(tmp_path / 'dense.pemn')
  train.export_workdir(workdir, dense_file)
  assert 'base' not in artifact.read(dense_file)[0]
  with pytest.raises(artifact.ArtifactError, match='is not a mask delta'):
    artifact.load(dense_file, base=workdir)


def test_a_file_naming_a_base_path_is_refused(dense, data_dir, tmp_path):
  # A crafted header whose config names a path to read: refused, nothing is opened.
  workdir, _ = dense
  config = _masked(data_dir, workdir)
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  # every stored leaf moved off the base's value: all are arrays, none a 'base' entry (which
  # would need the base section that the crafted file below drops)
  trained = {c: jax.tree.map(lambda a: a + 1e-3, variables[c]) for c in ('params', 'batch_stats')}
  variables = {**variables, **trained}
  path = str(tmp_path / 'd.pemn')
  artifact.export(config, variables, path, base=pretrained.load_base(workdir))
  header, payload = artifact.read(path)
  assert not any(e['kind'] == 'base' for e in header['entries'])
  header['config']['model']['base_source'] = workdir
  crafted = str(tmp_path / 'crafted.pemn')
  with open(crafted, 'wb') as f:
    f.write(artifact.frame(header, payload))
  with pytest.raises(artifact.ArtifactError, match='base_source must be null'):
    artifact.load(crafted, base=workdir)
  del header['base']
  header['config']['model']['base_source'] = None
  header['format_version'] = 1
  with open(crafted, 'wb') as f:
    f.write(artifact.frame(header, payload))
  # Without its base section the file reads as a PEMN file, whose random weights are not the
  # base's it records the fingerprint of: refused, never evaluated over random weights.
  with pytest.raises(artifact.ArtifactError, match='do not match the fingerprint'):
    artifact.load(crafted)
  header['base'] = {'format': 'workdir', 'fingerprint': '0' * 64, 'values': 1}
  with open(crafted, 'wb') as f:
    f.write(artifact.frame(header, payload))
  with pytest.raises(artifact.ArtifactError, match='needs format version 2'):
    artifact.read(crafted)
  header['format_version'] = 2
  for base, message in [
    ({'format': 'workdir', 'fingerprint': 'abc', 'values': 1}, 'base.fingerprint must be'),
    ({'format': '/etc', 'fingerprint': '0' * 64, 'values': 1}, 'base.format must be one of'),
    ({'format': 'flax', 'fingerprint': '0' * 64, 'values': 1, 'path': '/x'}, 'have the fields'),
    ({'format': 'flax', 'fingerprint': '0' * 64, 'values': 1, 'layout': 'x'}, 'base.layout must'),
    ({'format': 'flax', 'fingerprint': '0' * 64, 'values': 0}, 'base.values must be'),
  ]:
    header['base'] = base
    with open(crafted, 'wb') as f:
      f.write(artifact.frame(header, payload))
    with pytest.raises(artifact.ArtifactError, match=message) as e:
      artifact.read(crafted)
    assert '\n' not in str(e.value)


def test_mask_only_zeroes_every_update_but_the_scores():
  import optax

  params = {'a': {'scores': jnp.ones(3), 'bias': jnp.ones(3)}, 'bn': {'scale': jnp.ones(2)}}
  tx = pretrained.mask_only(optax.adamw(0.1, weight_decay=0.1))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates['a']['scores']).min()) > 0
  assert float(jnp.abs(updates['a']['bias']).max()) == 0
  assert float(jnp.abs(updates['bn']['scale']).max()) == 0
  tx = pretrained.mask_only(optax.adamw(0.1), trainable=('bn/.*',))  # rules as mask_model's
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates['bn']['scale']).min()) > 0
  assert float(jnp.abs(updates['a']['bias']).max()) == 0


def test_pemn_train_fine_tunes_masks_from_a_dense_workdir_in_one_command(
  dense, data_dir, pemn_cli, tmp_path
):
  workdir, _ = dense
  run, out = str(tmp_path / 'mft'), str(tmp_path / 'mft.pemn')
  proc = pemn_cli(
    'train',
    f'--config={SMOKE}',
    f'--workdir={run}',
    f'--config.model.base_source={workdir}',
    '--config.strategy.name=mask',
    '--config.strategy.keep_fraction=0.9',
    '--config.train.num_steps=4',
    f'--config.data.data_dir={data_dir}',
  )
  assert proc.returncode == 0, proc.stderr
  proc = pemn_cli('export', f'--workdir={run}', f'--out={out}')
  assert proc.returncode == 0, proc.stderr
  proc = pemn_cli(
    'evaluate', f'--artifact={out}', f'--base={workdir}', f'--config={SMOKE}', '--json',
    f'--config.data.data_dir={data_dir}',
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr
  with open(os.path.join(run, 'summary.json')) as f:
    final = json.load(f)['final_accuracy']
  assert json.loads(proc.stdout.strip().splitlines()[-1])['accuracy'] == final
  proc = pemn_cli('evaluate', f'--artifact={out}')
  assert proc.returncode == 1
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and 'give the base' in lines[0], proc.stderr


class CNN(nn.Module):
  """An ordinary Linen network (no pemn-jax inside): the base, and masked in a band by rules."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=2, name='stem')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name='bn')(x))
    x = nn.relu(nn.Conv(8, (3, 3), name='mid')(x))
    return nn.Dense(10, name='head')(x.mean((1, 2)))


def test_mask_model_in_a_band_over_a_base_trains_only_its_masks(data_dir, tmp_path):
  import pemn_jax as pemn

  x = jnp.zeros((1, 28, 28, 1))
  trained = CNN().init({'params': jax.random.key(3)}, x)  # stands in for a trained network
  base = _save_flax(trained, tmp_path / 'cnn.msgpack')
  band = pemn.mask_model(CNN(), {'mid': 1.0, '.*': None})  # only 'mid' masked
  over = {'model.base_format': 'flax', 'strategy.score_init': 'magnitude'}
  config = _masked(data_dir, base, **over)
  variables = build.init_module(band, config, (28, 28, 1))
  xs = _x()
  np.testing.assert_array_equal(  # keep 1.0: the base network, bit for bit
    np.asarray(band.apply(variables, xs)), np.asarray(CNN().apply(trained, xs))
  )
  band = pemn.mask_model(CNN(), {'mid': 0.9, '.*': None})
  config = _masked(data_dir, base, **over, **{'model.base_unmasked': 'freeze'})
  run = str(tmp_path / 'band')
  train.train_and_evaluate(config, run, model=band)
  _, _, state, _ = train.restore_workdir(run, model=band)
  got = traverse_util.flatten_dict(jax.device_get(state.params))
  want = traverse_util.flatten_dict(trained['params'])
  assert set(got) == (set(want) - {('mid', 'kernel')}) | {('mid', 'scores')}
  for path, leaf in got.items():
    if path[-1] != 'scores':
      np.testing.assert_array_equal(leaf, want[path])  # unmasked layers and BN: the base's
  start = np.abs(np.asarray(trained['params']['mid']['kernel']))
  assert not np.array_equal(got[('mid', 'scores')], start)  # the band's masks learned


def test_a_module_mask_delta_reloads_bit_for_bit_and_only_over_its_base(tmp_path):
  import pemn_jax as pemn

  x = _x()
  trained = CNN().init({'params': jax.random.key(3)}, x[:1])
  base_file = _save_flax(trained, tmp_path / 'cnn.msgpack')
  base = pretrained.from_variables(trained)
  assert base.fingerprint == pretrained.load_base(base_file, 'flax').fingerprint
  band = pemn.mask_model(CNN(), {'mid': 0.5, '.*': None})
  variables = band.init({'params': jax.random.key(1), layers.FROZEN: jax.random.key(2)}, x[:1])
  with pytest.raises(artifact.ArtifactError, match="is not the base's params/mid/kernel"):
    pemn.export_module(str(tmp_path / 'x.pemn'), band, variables, x[:1], base=base)
  variables = pretrained.apply_base(variables, base)  # scores as drawn: a mask of its own
  path = str(tmp_path / 'band.pemn')
  info = pemn.export_module(path, band, variables, x[:1], base=base)
  header, _ = artifact.read(path)
  assert header['key'] is None and header['base']['fingerprint'] == base.fingerprint
  untouched = {'/'.join(e['path']) for e in header['entries'] if e['kind'] == 'base'}
  assert 'params/stem/kernel' in untouched and 'batch_stats/bn/mean' in untouched
  assert all(e['length'] == 0 for e in header['entries'] if e['kind'] == 'base')
  assert not any(e['kind'] == 'array' for e in header['entries'])  # no weight is stored
  assert info['from_base_values'] == base.num_values - 8 * 8 * 9  # all but the band's kernel
  assert info['base_fp32_bytes'] == 4 * base.num_values
  assert 'mask delta over a flax base' in artifact.format_inspect(artifact.inspect(path))
  loaded = pemn.load_module(path, band, base=base_file)
  want = np.asarray(band.apply(variables, x))
  np.testing.assert_array_equal(np.asarray(band.apply(loaded, x)), want)
  with pytest.raises(artifact.ArtifactError, match='is a mask delta over a flax base'):
    pemn.load_module(path, band)
  changed = _edited(trained, lambda f: f[('params', 'mid', 'kernel')].__imul__(2))
  with pytest.raises(artifact.ArtifactError, match='is not the base model this mask delta'):
    pemn.load_module(path, band, base=_save_flax(changed, tmp_path / 'o.msgpack'))


def test_a_dense_fine_tuning_from_a_base_exports_its_own_weights(dense, data_dir, tmp_path):
  # The fine-tuning baselines: a dense run started from the base is no mask delta; its file
  # stores its weights and loads without the base.
  workdir, _ = dense
  run = str(tmp_path / 'ft')
  over = {'model.masked': False, 'model.base_source': workdir, 'train.num_steps': 2}
  train.train_and_evaluate(_config(data_dir, **over), run)
  path = str(tmp_path / 'ft.pemn')
  info = train.export_workdir(run, path)
  assert 'base' not in artifact.read(path)[0]
  _, model, variables, _ = artifact.load(path)
  _, _, state, _ = train.restore_workdir(run)
  want = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, _x())
  np.testing.assert_array_equal(np.asarray(model.apply(variables, _x())), np.asarray(want))
  assert info['file_bytes'] > 0


BAND = 'block1_.*'  # the smoke ConvMixer's second (last) block: its depthwise and pointwise convs


def test_masked_layers_masks_a_band_and_leaves_the_rest_the_base(dense, data_dir):
  workdir, variables = dense
  over = {'strategy.masked_layers': BAND, 'strategy.keep_fraction': 1.0}
  config = _masked(data_dir, workdir, **over)
  model = build.build_model(config)
  band = build.init_variables(model, config)
  assert sorted(band[layers.FROZEN]) == ['block1_depthwise', 'block1_pointwise']
  params = traverse_util.flatten_dict(band['params'])
  assert ('stem', 'kernel') in params and ('block0_pointwise', 'kernel') in params
  assert ('block1_pointwise', 'scores') in params and ('block1_pointwise', 'kernel') not in params
  dense_model = build.build_model(_config(data_dir, **{'model.masked': False}))
  np.testing.assert_array_equal(  # keep 1.0: the base network, bit for bit
    np.asarray(model.apply(band, _x())), np.asarray(dense_model.apply(variables, _x()))
  )


@pytest.mark.parametrize(
  'value, message',
  [
    ('block9_.*', r'matches no layer of this convmixer; its layer paths are stem, block0_depth'),
    ('block[', 'is not a regular expression'),
    ('', 'must be a regular expression'),
  ],
)
def test_masked_layers_errors_name_the_field(data_dir, value, message):
  config = _config(data_dir, **{'strategy.masked_layers': value})
  with pytest.raises(ValueError, match=message) as e:
    build.init_variables(build.build_model(config), config)
  assert 'strategy.masked_layers' in str(e.value) and '\n' not in str(e.value)
  dense_config = _config(data_dir, **{'strategy.masked_layers': 'stem', 'model.masked': False})
  with pytest.raises(ValueError, match='strategy.masked_layers chooses the layers a masked'):
    build.validate_config(dense_config)
  remat = _config(data_dir, **{'strategy.masked_layers': 'stem', 'model.remat_blocks': 'full'})
  with pytest.raises(ValueError, match='model.remat_blocks scans identical blocks'):
    build.validate_config(remat)


def test_band_fine_tuning_stores_only_the_band_and_reloads_bit_for_bit(dense, data_dir, tmp_path):
  workdir, variables = dense
  over = {
    'strategy.masked_layers': BAND,
    'strategy.keep_fraction': 0.9,
    'strategy.score_init': 'magnitude',
    'model.base_unmasked': 'freeze',
  }
  config = _masked(data_dir, workdir, **over)
  run = str(tmp_path / 'band')
  train.train_and_evaluate(config, run)
  _, s, state, _ = train.restore_workdir(run)
  trained = traverse_util.flatten_dict(jax.device_get(state.params))
  base = traverse_util.flatten_dict(variables['params'])
  for path, leaf in trained.items():
    if path[-1] != 'scores':  # the layers outside the band, and BN: the base's
      np.testing.assert_array_equal(leaf, base[path])
  path = str(tmp_path / 'band.pemn')
  info = train.export_workdir(run, path)
  header, _ = artifact.read(path)
  kinds = {'/'.join(e['path']): e['kind'] for e in header['entries']}
  assert kinds['params/stem/kernel'] == kinds['params/head/kernel'] == 'base'
  assert kinds['params/block0_pointwise/kernel'] == 'base'
  assert kinds['batch_stats/stem_bn/mean'] == 'array'  # running statistics still update
  assert {p for p, k in kinds.items() if k == 'mask'} == {
    'block1_depthwise/scores',
    'block1_pointwise/scores',
  }
  assert info['from_base_leaves'] == sum(k == 'base' for k in kinds.values()) > 0
  assert 'left as the base' in artifact.format_inspect(info)
  want = s.model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats, layers.FROZEN: s.frozen}, _x()
  )
  _, model, loaded, _ = artifact.load(path, base=workdir)
  np.testing.assert_array_equal(np.asarray(model.apply(loaded, _x())), np.asarray(want))
  changed = _edited(variables, lambda f: f[('params', 'stem', 'kernel')].__iadd__(1e-3))
  other = _save_flax(changed, tmp_path / 'other.msgpack')
  with pytest.raises(artifact.ArtifactError, match='is not the base model this mask delta'):
    artifact.load(path, base=other, base_format='flax')
  # 'base' entries without the base section that says which base: refused on reading
  from tests.test_artifact_hostile import pack

  header, payload = artifact.read(path)
  del header['base']
  crafted = tmp_path / 'no_base.pemn'
  crafted.write_bytes(pack(header, payload))
  with pytest.raises(artifact.ArtifactError, match='needs a base section'):
    artifact.read(str(crafted))


def test_masked_layers_over_random_weights_trains_the_other_layers(data_dir, tmp_path):
  config = _config(data_dir, **{'strategy.masked_layers': 'block.*', 'strategy.name': 'mask'})
  run = str(tmp_path / 'pemn_band')
  train.train_and_evaluate(config, run)
  _, s, state, _ = train.restore_workdir(run)
  start = traverse_util.flatten_dict(build.init_variables(s.model, config)['params'])
  got = traverse_util.flatten_dict(jax.device_get(state.params))
  assert not np.array_equal(got[('stem', 'kernel')], start[('stem', 'kernel')])  # trained
  assert sorted(s.frozen) == [f'block{i}_{k}' for i in (0, 1) for k in ('depthwise', 'pointwise')]
  path = str(tmp_path / 'band.pemn')
  train.export_workdir(run, path)
  _, model, loaded, _ = artifact.load(path)
  want = s.model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats, layers.FROZEN: s.frozen}, _x()
  )
  np.testing.assert_array_equal(np.asarray(model.apply(loaded, _x())), np.asarray(want))
