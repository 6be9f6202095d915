"""Every config field given a bad value is refused in one line naming it, before the workdir is
written; and the command line reports its own mistakes (a misspelt field, a broken config file, a
workdir it cannot write, a full disk) as one line, not a traceback.

The sweep covers every leaf field of ``configs.common.base_config()``: ``test_sweep_covers_every
_field`` fails when a field is added without bad values here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import ml_collections
import pytest

from pemn_jax import build, train, workdirs
from pemn_jax.configs import common, smoke
from pemn_jax.data import pipeline, sources

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / 'pemn_jax' / 'configs' / 'smoke.py')
INF, NAN = math.inf, math.nan
BIG = 10**30  # past every cap


@dataclasses.dataclass(frozen=True)
class FakeInfo:
  """The parts of ``sources.DatasetInfo`` the checks read: the embedded Fashion-MNIST subset."""

  name: str = 'fashion_mnist_embedded'
  image_shape: tuple = (28, 28, 1)
  num_classes: int = 10
  num_train: int = 10_000
  num_test: int = 2_000


INFO = FakeInfo()

# field -> bad values. A field the default family (convmixer) does not read is checked all the
# same; FAMILY puts the model in the family that reads it, so its own checks run too.
INT_BAD = [INF, NAN, -1, 0, 1.5, '8', True, None, BIG]
FRACTION_BAD = [INF, -INF, NAN, -0.5, 1.5, '0.5', True, None, 1e300]
BOOL_BAD = [1, 0, 'True', 'yes', None, 1.0]
BOOL_BAD_DATA = [1, 0, 'True', 'yes', 1.0]  # None in the data section is the default
BAD = {
  'seed': [1.5, '0', True, None, 2**63, -(2**63) - 1, 10**400],
  'model.name': ['densenet', '', 3, None, ['convmixer']],
  'model.masked': BOOL_BAD,
  'model.dim': [*INT_BAD, common.MAX_DIM + 1],
  'model.depth': [*INT_BAD, common.MAX_DEPTH + 1],
  'model.kernel_size': [*INT_BAD, 15],  # 15 > 2 x 7 - 1 on the 7x7 feature map
  'model.patch_size': [*INT_BAD, 64, 29],  # larger than the 28x28 image
  'model.num_classes': [*INT_BAD, 7],  # 7: not the dataset's 10
  'model.num_heads': [INF, NAN, -1, 0, 1.5, '2', True, 3, 5, BIG],  # 3, 5 do not divide 16
  'model.mlp_ratio': [INF, -INF, NAN, 0, -1, '2', True, None, 1e-3, common.MAX_MLP_RATIO * 2],
  'model.hidden_dims': [5, 'abc', (0,), (-1, 5), (1.5,), ('a',), (True,), (BIG,), None],
  'model.width': [*INT_BAD, common.MAX_RESNET_WIDTH + 1],
  'model.sparsity_method': ['bogus', '', 3, True],
  'model.sparsity': FRACTION_BAD,
  'model.binary_weights': [*BOOL_BAD, True],  # True: with the smoke config's model.masked=True
  'model.dtype': ['float16', 'fp32', '', 3, None],
  'model.conv_impl': ['cudnn', '', 3, None],
  'model.native_kernels': ['bogus', 'topk,', '', 3, None, True],
  'model.input_shape': [(28, 28), (0, 28, 1), (28.0, 28, 1), 'abc', 28, (BIG, 28, 1), (32, 32, 3)],
  'model.remat_blocks': ['bogus', '', 3, True],
  'model.gelu_bn_residuals': ['output', '', 3, None, True],
  'model.base_source': ['', 3, True, ['/tmp'], 'a\x00b', '/nonexistent/base'],
  'model.base_format': ['bogus', '', 3, None, 'Flax'],
  'model.base_name_map': ['', 3, True, ['/tmp'], '/tmp/names.json'],  # not a safetensors base
  'model.base_unmasked': ['bogus', '', 3, None, True],
  'model.base_layout': ['pytorch', '', 3, None, True],
  'strategy.name': ['bogus', '', 3, None],
  'strategy.rp_ratio': [INF, NAN, 0, -0.1, 1.5, '0.1', True, None, 10**400],
  'strategy.keep_fraction': [INF, NAN, 0, -0.1, 1.5, '0.5', True, None, 10**400],
  'strategy.score_abs': BOOL_BAD,
  'strategy.score_init': ['bogus', '', 3, None, 'Magnitude'],
  'strategy.masked_layers': ['', 3, True, 'block[', 'block9_.*'],  # block9: no such layer
  'data.name': ['', 3, ['fashion_mnist']],  # None: the default dataset
  'data.data_dir': ['', 3, True, ['/tmp'], 'a\x00b'],
  'data.source_dir': ['', 3, True, ['/tmp']],
  'data.source_path': ['', 3, True, ['/tmp']],
  'data.augment': [1, 0, 'yes', 'True', 1.0],
  'data.prefetch': [INF, NAN, -1, 1.5, '2', True, common.MAX_PREFETCH + 1, BIG],
  'data.augment_options.flip': BOOL_BAD_DATA,
  # (None in the data section stands for the default, as an unset field)
  'data.augment_options.randaugment_num_ops': [-1, 5, 1.5, '2', True, INF, BIG],
  'data.augment_options.randaugment_magnitude': [-1, 31, 1.5, '12', True, NAN, BIG],
  'data.augment_options.color_jitter': [-0.1, 1, 1.5, INF, NAN, '0.2', True],
  'data.augment_options.erase_prob': [-0.1, 1.5, INF, NAN, '0.2', True],
  'train.batch_size': [*INT_BAD, 20_000],  # 20,000 > the 10,000 training examples
  'train.eval_batch_size': [INF, NAN, -1, 0, 1.5, '8', True, None, BIG],  # big: see clamp test
  'train.num_epochs': [*INT_BAD, 2**30],  # 2**30 epochs x 156 steps overflow int32 steps
  'train.num_steps': [INF, NAN, -1, 0, 1.5, '8', True, 2**31],
  'train.peak_lr': [INF, -INF, NAN, 0, -0.1, '0.1', True, None, 1e-45, 1e39],
  'train.weight_decay': [INF, NAN, -0.1, '0.1', True, None, 1e39],
  'train.b1': [INF, NAN, -0.1, 1, 2, '0.9', True, None],
  'train.b2': [INF, NAN, -0.1, 1, 2, '0.9', True, None],
  'train.eps': [INF, NAN, 0, -1, 1e-45, '1e-8', True, None],
  'train.warmup_fraction': [*FRACTION_BAD, 0.9],  # 0.9 > decay_fraction 0.8
  'train.decay_fraction': [*FRACTION_BAD, 0.1],  # 0.1 < warmup_fraction 0.4
  'train.final_lr_scale': FRACTION_BAD,
  'train.checkpoint_every_steps': INT_BAD,
  'train.max_checkpoints': INT_BAD,
  'train.log_every_steps': INT_BAD,
  'train.eval_every_epochs': INT_BAD,
  'train.progress': BOOL_BAD,
  'train.eval_at_start': BOOL_BAD,
}
FAMILY = {
  'model.num_heads': {'model.name': 'vit'},
  'model.mlp_ratio': {'model.name': 'vit'},
  'model.width': {'model.name': 'resnet', 'model.depth': 8},
  'model.hidden_dims': {'model.name': 'mlp'},
  'model.sparsity': {'model.masked': False, 'model.sparsity_method': 'random'},
  'train.num_epochs': {'train.num_steps': None},  # the smoke config counts steps
  'model.base_source': {'strategy.name': 'mask'},  # the strategy a base needs
}
CASES = [(field, value) for field, values in BAD.items() for value in values]
IDS = [f'{field}={common.show(value, 24)}' for field, value in CASES]
# Through the trainer: the first and the last bad value of each field (the last is often one
# only the dataset shows wrong); the validators alone see every value.
TRAIN_CASES = [(f, v) for f, values in BAD.items() for v in (values[0], values[-1])]
TRAIN_IDS = [f'{field}={common.show(value, 24)}' for field, value in TRAIN_CASES]


def leaf_fields(node, prefix=''):
  for k, v in node.items():
    if isinstance(v, dict | ml_collections.ConfigDict):
      yield from leaf_fields(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}'


def config_with(field: str, value, data_dir: str | None = None) -> ml_collections.ConfigDict:
  """The smoke config with ``field`` set to ``value`` (and its family's fields), built from a
  plain dict, so that a value of any type gets in (as from a JSON record or a config file)."""
  d = smoke.get_config().to_dict()
  fields = {'data.data_dir': data_dir, **FAMILY.get(field, {}), field: value}
  for key, v in fields.items():
    *parents, leaf = key.split('.')
    node = d
    for p in parents:
      node = node[p]
    node[leaf] = v
  return ml_collections.ConfigDict(d)


def validate(config, info=INFO) -> ml_collections.ConfigDict:
  """Every check the trainer runs before a byte is written, for a dataset like ``info``."""
  build.validate_config(config)
  train.validate_train_config(config)
  sources.validate(config.data)
  build.check_data(config, info.image_shape, info.num_classes)
  return train.check_train_data(config, info)


def assert_one_line_naming(e: BaseException, field: str) -> None:
  text = str(e)
  assert '\n' not in text, text
  assert field in text, text


def test_sweep_covers_every_field():
  assert set(leaf_fields(common.base_config())) == set(BAD)


def test_unchanged_smoke_config_passes():
  validate(config_with('seed', 0))
  for field in FAMILY:  # the family switches alone are valid
    section, name = field.split('.')
    validate(config_with(field, smoke.get_config().to_dict()[section][name]))


@pytest.mark.parametrize('field, value', CASES, ids=IDS)
def test_bad_value_is_one_line_naming_the_field(field, value):
  with pytest.raises(ValueError) as e:
    validate(config_with(field, value))
  assert_one_line_naming(e.value, field)


@pytest.mark.parametrize('field, value', TRAIN_CASES, ids=TRAIN_IDS)
def test_bad_value_fails_before_the_workdir_is_written(data_dir, tmp_path, field, value):
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config_with(field, value, data_dir), str(workdir))
  assert_one_line_naming(e.value, field)
  assert not workdir.exists()


def test_a_model_too_large_is_refused_before_a_byte_is_drawn(data_dir, tmp_path):
  # each field in range; together 4.3e9 parameters (16384^2 per pointwise layer x 8 blocks)
  config = config_with('model.dim', common.MAX_DIM, data_dir)
  config.model.depth, config.model.patch_size, config.model.kernel_size = 8, 1, 1
  config.model.native_kernels = 'none'  # the check needs no kernel (compiling one takes seconds)
  workdir = tmp_path / 'w'
  with pytest.raises(ValueError, match=r'the model has 4,29\d,\d{3},\d{3} parameters') as e:
    train.train_and_evaluate(config, str(workdir))
  assert_one_line_naming(e.value, 'model.dim')
  assert not workdir.exists()


def test_huge_eval_batch_is_lowered_to_the_test_split():
  config = config_with('train.eval_batch_size', 1_000_000)
  fitted = validate(config)
  assert fitted.train.eval_batch_size == INFO.num_test  # one batch; rounded to the devices
  assert config.train.eval_batch_size == 1_000_000  # the caller's config is left as it was
  assert validate(config_with('train.eval_batch_size', 384)).train.eval_batch_size == 384
  assert pipeline.fit_eval_batch_size(INFO, 10**6, 8) == 2000
  assert pipeline.fit_eval_batch_size(INFO, 10**6, 3) == 2001


def test_huge_seed_names_the_allowed_range():
  with pytest.raises(ValueError, match=r'seed must be an integer in \[-9223372036854775808, '):
    validate(config_with('seed', 2**64))


def test_overrides_of_another_type_name_the_field():
  with pytest.raises(ValueError, match=r"config field 'model\.masked' cannot be set to 1"):
    common.with_overrides(smoke.get_config(), {'model.masked': 1})
  with pytest.raises(ValueError, match=r"did you mean 'model\.dim'"):
    common.with_overrides(smoke.get_config(), {'model.dimm': 1})


@pytest.mark.parametrize(
  'make, message',
  [
    (lambda p: None, 'no such file'),
    (lambda p: p.mkdir(), 'is a directory'),
    (lambda p: p.write_text('def get_config(:\n'), 'syntax error at line 1'),
  ],
  ids=['missing', 'directory', 'syntax'],
)
def test_config_file_checks(tmp_path, make, message):
  path = tmp_path / 'c.py'
  make(path)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    common.load(str(path))


def test_workdir_checks(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(ValueError, match='is a file, not a directory'):
    workdirs.check(str(f))
  with pytest.raises(ValueError, match=f'cannot be created: {f} is a file'):
    workdirs.check(str(f / 'sub'))
  workdirs.check(str(tmp_path / 'new' / 'deeper'))  # creatable: fine, and nothing made
  assert not (tmp_path / 'new').exists()


# ---------------------------------------------------------------------------------------------
# The command line: one stderr line, no traceback.


def one_line(proc, status: int) -> str:
  assert proc.returncode == status, (proc.returncode, proc.stderr)
  assert 'Traceback' not in proc.stderr, proc.stderr
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, proc.stderr
  return lines[0]


@pytest.fixture
def bad_configs(tmp_path):
  d = tmp_path / 'configs'
  d.mkdir()
  (d / 'syntax.py').write_text('def get_config(:\n  pass\n')
  (d / 'noget.py').write_text('x = 1\n')
  (d / 'raises.py').write_text('def get_config():\n  raise ValueError("no such option")\n')
  (d / 'typed.py').write_text(
    'from pemn_jax.configs import smoke\n'
    'def get_config():\n  c = smoke.get_config()\n  c.model.masked = 1\n  return c\n'
  )
  return d


CLI_CASES = {
  # (arguments after 'pemn inspect', exit status, what the line says)
  'misspelt-field': (
    ['--config', SMOKE, '--config.model.dimm=3'],
    2,
    "pemn inspect: --config.model.dimm: no config field 'model.dimm' (did you mean 'model.dim'?)",
  ),
  'misspelt-section': (
    ['--config', SMOKE, '--config.modle.dim=3'],
    2,
    "no config section 'modle' (did you mean 'model'?)",
  ),
  'bool-as-int': (
    ['--config', SMOKE, '--config.model.masked=1'],
    2,
    "--config.model.masked must be True or False, got '1'",
  ),
  'wrong-type': (['--config', SMOKE, '--config.model.dim=abc'], 2, '--config.model.dim=abc'),
  'unknown-flag': (['--config', SMOKE, '--workdirr=x'], 2, "Unknown command line flag 'workdirr'"),
  'missing-file': (['--config', '{d}/nope.py'], 1, 'error: --config {d}/nope.py: no such file'),
  'directory': (['--config', '{d}'], 1, 'error: --config {d} is a directory, not a config file'),
  'syntax-error': (['--config', '{d}/syntax.py'], 1, 'syntax.py: syntax error at line 1'),
  'no-get-config': (['--config', '{d}/noget.py'], 1, 'noget.py defines no get_config()'),
  'get-config-raises': (['--config', '{d}/raises.py'], 1, 'ValueError: no such option'),
  'config-sets-a-bool-to-1': (['--config', '{d}/typed.py'], 1, "Could not override field 'masked'"),
}


@pytest.mark.parametrize('case', list(CLI_CASES))
def test_cli_config_mistakes_are_one_line(pemn_cli, bad_configs, case):
  args, status, expected = CLI_CASES[case]
  proc = pemn_cli('inspect', *[a.format(d=bad_configs) for a in args])
  assert expected.format(d=bad_configs) in one_line(proc, status)
  assert proc.stdout == ''


@pytest.mark.slow
def test_cli_bad_value_is_one_line(pemn_cli, data_dir, tmp_path):
  workdir = tmp_path / 'w'
  proc = pemn_cli(
    'train', '--config', SMOKE, '--workdir', str(workdir), '--config.train.b2=2',
    f'--config.data.data_dir={data_dir}',
  )  # fmt: skip
  assert 'pemn train: error: train.b2 must be a finite number in [0, 1)' in one_line(proc, 1)
  assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize('where', ['file', 'under-a-file'])
def test_cli_workdir_that_is_a_file(pemn_cli, data_dir, tmp_path, where):
  f = tmp_path / 'file'
  f.write_text('x')
  workdir = f if where == 'file' else f / 'w'
  proc = pemn_cli(
    'train', '--config', SMOKE, '--workdir', str(workdir), f'--config.data.data_dir={data_dir}'
  )
  line = one_line(proc, 1)
  assert line.startswith(f'pemn train: error: --workdir {workdir}')
  assert 'File exists' not in line and 'is a file' in line
  assert f.read_text() == 'x'


def _in_mount_namespace(pemn_cli, script: str) -> subprocess.CompletedProcess:
  """``script`` (sh) in a private mount namespace (``unshare -m``: root and CAP_SYS_ADMIN);
  skips the test where that is not possible (read-only bind mounts and a small tmpfs cannot be
  made otherwise, and root ignores file permissions)."""
  if not shutil.which('unshare') or os.geteuid() != 0:
    pytest.skip('needs root and unshare to mount a read-only or full file system')
  probe = subprocess.run(['unshare', '-m', 'true'], capture_output=True)
  if probe.returncode:
    pytest.skip(f'unshare -m is not permitted here: {probe.stderr.strip()}')
  return subprocess.run(
    ['unshare', '-m', 'sh', '-c', script],
    capture_output=True,
    text=True,
    env=pemn_cli.env(),
    cwd=REPO,
    timeout=600,
  )


def _pemn(*args) -> str:
  return shlex.join([sys.executable, '-m', 'pemn_jax.main', *map(str, args)])


@pytest.mark.slow
def test_cli_read_only_workdir_and_data_dir(pemn_cli, data_dir, tmp_path):
  ro = tmp_path / 'ro'
  (ro / 'w').mkdir(parents=True)
  train_ = ['train', '--config', SMOKE]
  script = f"""
  mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} || exit 99
  {_pemn(*train_, '--workdir', ro / 'w', f'--config.data.data_dir={data_dir}')} 2> {tmp_path}/a
  echo $? >> {tmp_path}/a
  {_pemn(*train_, '--workdir', tmp_path / 'w', f'--config.data.data_dir={ro}/tfds')} 2> {tmp_path}/b
  echo $? >> {tmp_path}/b
  """
  proc = _in_mount_namespace(pemn_cli, script)
  if proc.returncode == 99:
    pytest.skip(f'cannot make a read-only bind mount here: {proc.stderr.strip()}')
  *a, status = (tmp_path / 'a').read_text().splitlines()
  assert status == '1' and len(a) == 1, a
  assert a[0] == (
    f'pemn train: error: --workdir {ro}/w cannot be written: {ro}/w is read-only or not '
    'writable by this user'
  )
  *b, status = (tmp_path / 'b').read_text().splitlines()
  assert status == '1' and len(b) == 1, b
  assert b[0].startswith(f'pemn train: error: data.data_dir={ro}/tfds: cannot prepare ')
  assert 'Read-only file system' in b[0]
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_cli_disk_full_mid_run_is_one_line_and_resumes(pemn_cli, data_dir, tmp_path):
  small = tmp_path / 'small'
  small.mkdir()
  run = _pemn(
    'train', '--config', SMOKE, '--workdir', small / 'w', f'--config.data.data_dir={data_dir}',
    '--config.train.num_steps=80', '--config.train.checkpoint_every_steps=5',
    '--config.train.max_checkpoints=20',
  )  # fmt: skip
  # 400 KiB hold two of the smoke run's checkpoints (~200 KiB each, in 4 KiB pages), not 16.
  script = f"""
  mount -t tmpfs -o size=400k tmpfs {small} || exit 99
  {run} > /dev/null 2> {tmp_path}/full; echo $? >> {tmp_path}/full
  ls {small}/w/checkpoints > {tmp_path}/kept
  mount -o remount,size=20m {small}
  {run} > {tmp_path}/resumed 2>&1; echo $? >> {tmp_path}/resumed
  """
  proc = _in_mount_namespace(pemn_cli, script)
  if proc.returncode == 99:
    pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()}')
  *err, status = (tmp_path / 'full').read_text().splitlines()
  assert status == '1' and len(err) == 1, err
  # what was being written when the disk filled (a checkpoint, mostly) depends on timing
  assert err[0].startswith('pemn train: error: no space left on device writing ')
  assert f'{small}/w' in err[0].split(';')[0]
  assert f'the checkpoints already written in {small}/w are intact' in err[0]
  kept = [s for s in (tmp_path / 'kept').read_text().split() if s.isdigit()]
  assert kept, 'some checkpoints fit before the disk was full'
  resumed = (tmp_path / 'resumed').read_text()
  assert f'resuming from checkpoint step {max(map(int, kept))}' in resumed
  assert resumed.splitlines()[-1] == '0', resumed
