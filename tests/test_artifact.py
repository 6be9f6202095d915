"""The .pemn artifact: exact rebuild, integrity checks, inspect keys, dense materialisation."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import artifact, build, layers, strategies, train
from pemn_jax.configs import common, smoke


def _config(**over):
  c = smoke.get_config()
  c.train.num_steps = 4
  c.train.checkpoint_every_steps = 2
  return common.with_overrides(c, over)


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('art') / 'wd')
  # test_train.py's 4-step run (its batch sizes): the session's compilation cache then compiles
  # the init, train and eval programs once for both modules.
  config = _config(
    **{'data.data_dir': data_dir, 'train.batch_size': 16, 'train.eval_batch_size': 384}
  )
  train.train_and_evaluate(config, workdir)
  out = os.path.join(workdir, 'model.pemn')
  train.export_workdir(workdir, out)
  return workdir, out


def _logits(model, variables, x):
  return np.asarray(model.apply(variables, x, train=False))


def test_artifact_logits_bit_identical_to_trained_model(trained):
  workdir, path = trained
  config, s, state, _ = train.restore_workdir(workdir)
  x = jax.random.normal(jax.random.key(3), (16, 28, 28, 1))
  want = _logits(
    s.model, {'params': state.params, 'batch_stats': state.batch_stats, layers.FROZEN: s.frozen}, x
  )
  _, model, variables, header = artifact.load(path)
  got = _logits(model, variables, x)
  np.testing.assert_array_equal(got, want)
  assert header['key']['impl'] == 'threefry2x32'


def test_evaluate_artifact_equals_evaluate_workdir(trained):
  workdir, path = trained
  a = artifact.evaluate(path)
  w = train.evaluate_workdir(workdir)
  assert set(a) == set(w) == {'accuracy', 'loss', 'num_examples', 'step'}
  assert a['accuracy'] == w['accuracy'] and a['num_examples'] == w['num_examples'] == 2000
  assert a['step'] == w['step'] == 4


def test_artifact_stores_no_random_values(trained):
  _, path = trained
  header, _ = artifact.read(path)
  kinds = {(e['kind'], e['path'][-1]) for e in header['entries']}
  assert ('array', 'kernel') not in kinds and ('array', 'scores') not in kinds
  assert all(
    e['path'][0] in ('params', 'batch_stats') for e in header['entries'] if e['kind'] == 'array'
  )
  assert {e['codec'] for e in header['entries'] if e['kind'] == 'mask'} <= {'packbits', 'rans'}


def test_inspect_json_keys(trained, pemn_cli):
  _, path = trained
  proc = pemn_cli('inspect', f'--artifact={path}', '--json')
  assert proc.returncode == 0, proc.stderr
  info = json.loads(proc.stdout)
  for key in ('file_bytes', 'dense_fp32_bytes', 'mask_bits_per_entry', 'keep_fraction', 'strategy'):
    assert key in info
  assert info['file_bytes'] == os.path.getsize(path)
  assert info['strategy'] == 'random_vector_padding' and info['keep_fraction'] == 0.5


@pytest.mark.parametrize(
  'damage',  # two subprocesses each: 'truncate' is the fast run's
  [
    'truncate',
    *(pytest.param(d, marks=pytest.mark.slow) for d in ('flip', 'foreign', 'empty', 'missing')),
  ],
)
def test_bad_files_give_one_line_errors(trained, tmp_path, pemn_cli, damage):
  _, path = trained
  blob = open(path, 'rb').read()
  bad = tmp_path / 'bad.pemn'
  if damage == 'truncate':
    bad.write_bytes(blob[: len(blob) // 2])
  elif damage == 'flip':
    b = bytearray(blob)
    b[len(b) // 2] ^= 0x40
    bad.write_bytes(bytes(b))
  elif damage == 'foreign':
    bad.write_bytes(b'PK\x03\x04 this is a zip, not a model' * 10)
  elif damage == 'empty':
    bad.write_bytes(b'')
  with pytest.raises(artifact.ArtifactError):
    artifact.read(str(bad))
  commands = (['inspect', f'--artifact={bad}'], ['evaluate', f'--artifact={bad}', '--json'])
  started = [pemn_cli.start(*args) for args in commands]  # both at once
  for proc in map(pemn_cli.finish, started):
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert proc.stdout == ''


def test_newer_format_version_is_refused(trained, tmp_path):
  _, path = trained
  blob = bytearray(open(path, 'rb').read())
  blob[8:12] = (artifact.FORMAT_VERSION + 1).to_bytes(4, 'little')
  bad = tmp_path / 'new.pemn'
  bad.write_bytes(bytes(blob))
  with pytest.raises(artifact.ArtifactError, match='format version'):
    artifact.read(str(bad))


def test_export_replaces_atomically(trained, tmp_path):
  workdir, path = trained
  out = tmp_path / 'm.pemn'
  out.write_bytes(b'old')
  train.export_workdir(workdir, str(out))
  assert artifact.read(str(out))[0]['step'] == 4
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


def test_materialize_dense_matches_masked_model(trained):
  _, path = trained
  config, model, variables, _ = artifact.load(path)
  dense_config, dense_vars = artifact.materialize_dense(config, variables)
  dense_model = build.build_model(dense_config)
  assert layers.FROZEN not in dense_vars
  x = jax.random.normal(jax.random.key(4), (8, 28, 28, 1))
  np.testing.assert_allclose(
    _logits(dense_model, dense_vars, x), _logits(model, variables, x), rtol=1e-5, atol=1e-5
  )
  # Exactly half of every kernel survives (keep 0.5), the rest is zero.
  for k in jax.tree.leaves(dense_vars['params']):
    if k.ndim >= 2:
      assert int(jnp.sum(k != 0)) == -(-k.size // 2)


@pytest.mark.slow  # a 64-wide model: its own init and export
def test_entropy_coded_masks_for_small_keep_fraction(tmp_path):
  config = _config(**{'strategy.keep_fraction': 0.1, 'model.dim': 64})
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  out = str(tmp_path / 'k01.pemn')
  info = artifact.export(
    config,
    {'params': variables['params'], 'batch_stats': variables['batch_stats']},
    out,
    fingerprint=build.frozen_fingerprint(variables[layers.FROZEN]),
  )
  assert info['keep_fraction'] == 0.1
  # Far below one bit per entry, close to the entropy bound H(0.1) = 0.469.
  assert info['mask_bits_per_entry'] < 0.6
  big = [layer for layer in info['layers'] if np.prod(layer['shape']) >= 4096]
  assert big and all(layer['codec'] == 'rans' for layer in big)
  _, model2, v2, _ = artifact.load(out)
  x = jnp.ones((2, 28, 28, 1))
  np.testing.assert_array_equal(_logits(model, variables, x), _logits(model2, v2, x))


def test_fingerprint_mismatch_is_refused(trained, tmp_path, monkeypatch):
  _, path = trained
  real = build.frozen_fingerprint
  monkeypatch.setattr(build, 'frozen_fingerprint', lambda frozen: 'not-' + real(frozen))
  with pytest.raises(artifact.ArtifactError, match='fingerprint'):
    artifact.load(path)


@pytest.mark.slow  # a dense model of its own per method
@pytest.mark.parametrize('method', ['random', 'magnitude'])
def test_sparse_baselines_export_exactly_and_keep_the_right_count(tmp_path, method):
  config = _config(
    **{'model.masked': False, 'model.sparsity_method': method, 'model.sparsity': 0.9}
  )
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  x = jax.random.normal(jax.random.key(5), (4, 28, 28, 1))
  # Train-mode forward updates nothing we need; the effective kernels must keep ceil(0.1 n).
  for path, leaf in strategies.tree_items(variables['params']):
    if path[-1] == 'kernel':
      eff = artifact._sparse_effective(config, variables, path, leaf)  # noqa: SLF001
      assert int(jnp.sum(eff != 0)) == -(-leaf.size // 10)
  out = str(tmp_path / f'{method}.pemn')
  info = artifact.export(
    config,
    variables,
    out,
    fingerprint=(
      build.frozen_fingerprint(variables[layers.FROZEN]) if layers.FROZEN in variables else None
    ),
  )
  assert info['strategy'] == f'sparse_{method}' and info['csr_bytes'] > 0
  _, model2, v2, _ = artifact.load(out)
  np.testing.assert_array_equal(_logits(model, variables, x), _logits(model2, v2, x))


def test_sparse_config_errors_name_the_field():
  with pytest.raises(ValueError, match='model.sparsity_method'):
    build.build_model(_config(**{'model.masked': False, 'model.sparsity_method': 'lottery'}))
  with pytest.raises(ValueError, match='model.sparsity'):
    build.build_model(
      _config(**{'model.masked': False, 'model.sparsity_method': 'random', 'model.sparsity': 1.0})
    )
  with pytest.raises(ValueError, match='model.masked=False'):
    build.build_model(_config(**{'model.sparsity_method': 'random'}))
