"""Checkpoints never restore as a wrong model, and resumes keep the run's record.

- a flipped byte in a checkpoint's value files (which orbax's OCDBT format does not checksum)
  is refused by the state digest, in one line naming the step and an earlier checkpoint that
  verifies; checkpoints written before the digest existed restore with a warning;
- a resume may change only the stopping point and execution-only fields: other ``train.*`` /
  ``data.*`` changes are refused naming the fields; ``config.json`` stays the first start's and
  each resume appends to ``config_history.jsonl``;
- an empty stray step directory is skipped, not fatal;
- a non-finite loss (or state) stops the run with one line, nothing non-finite saved;
- ``pemn train`` stopped by SIGTERM / SIGINT exits 143 / 130 (``slow``: subprocesses).

Runs are the smoke config (``model.dim=128``, so the state spans several value files) for 4-8
steps on conftest's prepared dataset.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import checkpointing, steps, train
from pemn_jax.configs import common, smoke

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / 'pemn_jax' / 'configs' / 'smoke.py')
BASE = {
  'model.dim': 128,
  'train.batch_size': 16,
  'train.eval_batch_size': 500,
  'train.num_steps': 4,
  'train.checkpoint_every_steps': 2,
  'train.log_every_steps': 2,
  'train.max_checkpoints': 2,
}
ONE_LINE = r'[^\n]*'


def make_config(ov: dict):
  return common.with_overrides(smoke.get_config(), ov)


def copy_of(run, tmp_path) -> str:
  workdir = str(tmp_path / 'w')
  shutil.copytree(run['workdir'], workdir)
  return workdir


def checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def leaves(state) -> dict[str, np.ndarray]:
  flat, _ = jax.tree.flatten_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def restored_leaves(workdir) -> tuple[dict[str, np.ndarray], int]:
  _, _, state, step = train.restore_workdir(str(workdir))
  return leaves(state), step


def assert_equal_leaves(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  assert not [k for k in a if not np.array_equal(a[k], b[k])]


def snapshot(path) -> dict[str, bytes]:
  files = {}
  for root, dirs, names in os.walk(path):
    for n in names:
      p = os.path.join(root, n)
      files[os.path.relpath(p, path)] = pathlib.Path(p).read_bytes()
    for d in dirs:
      files[os.path.relpath(os.path.join(root, d), path) + '/'] = b''
  return files


def flip_byte(path, offset: int) -> None:
  data = bytearray(pathlib.Path(path).read_bytes())
  data[offset] ^= 0xFF
  pathlib.Path(path).write_bytes(bytes(data))


def value_files(workdir, step: int) -> list[pathlib.Path]:
  """The OCDBT value files of a checkpoint's state, largest first."""
  d = pathlib.Path(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd')
  return sorted(d.iterdir(), key=lambda p: -p.stat().st_size)


def silent_flips(workdir, step: int, template, values: dict, wanted: int) -> list[tuple[str, int]]:
  """Up to ``wanted`` flips (value file name, offset) that, with nothing checking, restore
  ``step`` as other numbers: the silent corruption the digest exists for.

  Each is found on a scratch copy whose meta has no digest (restored unverified, as before the
  digest existed). orbax groups the values into files differently from run to run, and not
  every byte of a value file is read back, so fixed offsets would not do.
  """
  found = []
  for rank, path in enumerate(value_files(workdir, step)[:2]):
    for frac in (0.5, 0.25, 0.75, 0.1, 0.9):
      scratch = f'{workdir}.probe-{step}-{rank}-{frac}'
      shutil.copytree(workdir, scratch)
      edit_meta(scratch, step, without_digest)
      offset = int(path.stat().st_size * frac)
      apply_flip(scratch, step, (path.name, offset))
      try:
        mngr = checkpointing.manager(scratch, read_only=True)
        got = leaves(checkpointing.restore(mngr, step, template)[0])
        altered = any(not np.array_equal(got[k], values[k]) for k in values)
      except ValueError:  # unreadable even without the digest: not a silent one
        altered = False
      shutil.rmtree(scratch)
      if altered:
        found.append((path.name, offset))
        break  # one per file, then the next file
    if len(found) == wanted:
      break
  assert found, f'no byte flip alters the restored values of step {step}'
  return found


def apply_flip(workdir, step: int, flip: tuple[str, int]) -> None:
  name, offset = flip
  flip_byte(
    pathlib.Path(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd', name), offset
  )


def edit_meta(workdir, step: int, edit) -> None:
  """Rewrites a checkpoint's JSON meta item through ``edit(meta) -> meta``."""
  p = pathlib.Path(workdir, 'checkpoints', str(step), 'meta', 'metadata')
  p.write_text(json.dumps(edit(json.loads(p.read_text()))))


def without_digest(meta: dict) -> dict:
  return {k: v for k, v in meta.items() if k != checkpointing.DIGEST_KEY}


def history(workdir) -> list[dict]:
  with open(os.path.join(workdir, train.HISTORY_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def run(data_dir, tmp_path_factory):
  """A finished 4-step run, checkpoints at steps 2 and 4: its leaves at step 4 ('state') and
  at both steps ('leaves')."""
  workdir = str(tmp_path_factory.mktemp('run'))
  ov = {'data.data_dir': data_dir, **BASE}
  train.train_and_evaluate(make_config(ov), workdir)
  _, _, state, step = train.restore_workdir(workdir)
  assert step == 4 and checkpoint_steps(workdir) == [2, 4]
  mngr = checkpointing.manager(workdir, read_only=True)
  template = checkpointing.abstract_like(state, steps.mesh_and_shardings().replicated)
  at = {s: leaves(checkpointing.restore(mngr, s, template)[0]) for s in (2, 4)}
  silent = {s: silent_flips(workdir, s, template, at[s], 2 if s == 4 else 1) for s in (2, 4)}
  return {'workdir': workdir, 'ov': ov, 'state': at[4], 'leaves': at, 'silent': silent}


# ---------------------------------------------------------------------------------------------
# The digest.


def test_digest_covers_every_leaf_path_shape_dtype_and_byte():
  tree = {'a': jnp.arange(6, dtype=jnp.float32), 'b': {'c': jnp.int32(3)}}
  d = checkpointing.state_digest(tree)
  assert d == checkpointing.state_digest(jax.tree.map(np.asarray, tree))  # host or device
  bits = np.asarray(tree['a']).copy().view(np.uint32)
  bits[2] ^= 1  # one bit of one value
  others = [
    {**tree, 'a': jnp.asarray(bits.view(np.float32))},
    {**tree, 'a': tree['a'].reshape(2, 3)},
    {**tree, 'a': jax.lax.bitcast_convert_type(tree['a'], jnp.int32)},  # same bytes
    {'z': tree['a'], 'b': tree['b']},
  ]
  assert len({d, *(checkpointing.state_digest(t) for t in others)}) == 1 + len(others)


def test_save_refuses_a_non_finite_state_and_writes_nothing(tmp_path):
  mngr = checkpointing.manager(str(tmp_path))
  state = {'params': {'w': jnp.array([1.0, jnp.nan])}, 'step': jnp.int32(1)}
  with pytest.raises(checkpointing.NonFiniteStateError, match=r"\['params'\]\['w'\]"):
    checkpointing.save(mngr, 1, state, {'fingerprint': 'dense'})
  mngr.wait_until_finished()
  assert mngr.all_steps() == [] and checkpoint_steps(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Corrupted value files.


def assert_refused_in_one_line(msg: str, step: int = 4) -> None:
  assert '\n' not in msg
  assert msg.startswith(f'cannot restore checkpoint step {step} in '), msg
  assert 'The checkpoint is corrupted' in msg and 'left untouched' in msg


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('which', [0, 1], ids=['largest-file', 'second-file'])
def test_a_flip_that_alters_values_is_refused_everywhere(run, tmp_path, which):
  workdir = copy_of(run, tmp_path)
  flips = run['silent'][4]
  if which >= len(flips):
    pytest.skip('no flip in a second value file altered values in this run')
  apply_flip(workdir, 4, flips[which])
  before = snapshot(workdir)
  for call in (
    lambda: train.restore_workdir(workdir),
    lambda: train.evaluate_workdir(workdir),
    lambda: train.export_workdir(workdir, os.path.join(tmp_path, 'model.pemn')),
    lambda: train.train_and_evaluate(make_config({**run['ov'], 'train.num_steps': 6}), workdir),
  ):
    with pytest.raises(ValueError) as e:
      call()
    assert_refused_in_one_line(str(e.value))
    assert 'sha256 digest' in str(e.value) and 'Checkpoint step 2 verifies: delete ' in str(e.value)
  assert snapshot(workdir) == before
  assert not os.path.exists(os.path.join(tmp_path, 'model.pemn'))


# Anywhere in a value file: (file rank by size, offset: an int, or a fraction of the file's size)
FLIPS = [(0, 100), (0, 0.5), (0, -40), (1, 0.25), (1, 0.9), (-1, 10)]


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('rank, where', FLIPS, ids=[f'file{r}-at-{w}' for r, w in FLIPS])
def test_a_flipped_byte_anywhere_is_refused_or_changes_nothing(run, tmp_path, rank, where):
  workdir = copy_of(run, tmp_path)
  files = value_files(workdir, 4)
  path = files[min(rank, len(files) - 1)]
  size = path.stat().st_size
  flip_byte(path, int(size * where) if isinstance(where, float) else where % size)
  before = snapshot(workdir)
  try:
    state, _ = restored_leaves(workdir)
  except ValueError as e:
    assert_refused_in_one_line(str(e))
    assert 'Checkpoint step 2 verifies: delete ' in str(e)
  else:  # a byte no value is read from (e.g. the end of a file): the same numbers restore
    assert_equal_leaves(state, run['state'])
    return
  for call in (
    lambda: train.evaluate_workdir(workdir),
    lambda: train.train_and_evaluate(make_config({**run['ov'], 'train.num_steps': 6}), workdir),
  ):
    with pytest.raises(ValueError, match='cannot restore checkpoint step 4'):
      call()
  assert snapshot(workdir) == before


def test_the_advice_works_delete_the_damaged_step_and_resume(run, tmp_path):
  workdir = copy_of(run, tmp_path)
  apply_flip(workdir, 4, run['silent'][4][0])
  with pytest.raises(ValueError) as e:
    train.evaluate_workdir(workdir)
  step_dir = os.path.join(workdir, 'checkpoints', '4')
  assert 'sha256 digest' in str(e.value)
  assert f'delete {step_dir} to resume (or evaluate, export) from step 2' in str(e.value)
  shutil.rmtree(step_dir)
  summary = train.train_and_evaluate(make_config(run['ov']), workdir)
  assert summary['finished'] and summary['step'] == 4
  # The same run from step 2 on: bit-identical (on CPU) to the undamaged one.
  assert_equal_leaves(restored_leaves(workdir)[0], run['state'])


def test_no_earlier_intact_checkpoint_is_said(run, tmp_path):
  workdir = copy_of(run, tmp_path)
  for step in (2, 4):
    apply_flip(workdir, step, run['silent'][step][0])
  with pytest.raises(ValueError, match='No earlier kept checkpoint restores intact: use a new'):
    train.evaluate_workdir(workdir)


def test_checkpoint_without_digest_restores_with_a_warning(run, tmp_path, caplog):
  workdir = copy_of(run, tmp_path)
  edit_meta(workdir, 4, without_digest)
  with caplog.at_level(logging.WARNING):
    state, step = restored_leaves(workdir)
  assert step == 4
  assert_equal_leaves(state, run['state'])
  assert 'checkpoint step 4' in caplog.text and 'has no state digest' in caplog.text
  assert 'restored unverified' in caplog.text


# ---------------------------------------------------------------------------------------------
# Resuming: what may change, and the record.


@pytest.mark.parametrize(
  'fields, named',
  [
    ({'train.peak_lr': 0.02}, ['train.peak_lr: checkpoint 0.01 vs config 0.02']),
    ({'train.batch_size': 32}, ['train.batch_size: checkpoint 16 vs config 32']),
    ({'data.augment': True}, ['data.augment: checkpoint False vs config True']),
    (
      {'train.warmup_fraction': 0.2, 'train.b2': 0.99},
      ['train.b2: checkpoint 0.999 vs config 0.99', 'train.warmup_fraction: checkpoint 0.4'],
    ),
  ],
  ids=['peak_lr', 'batch_size', 'augment', 'schedule-and-optimizer'],
)
def test_resume_with_other_training_settings_is_refused_untouched(run, tmp_path, fields, named):
  workdir = copy_of(run, tmp_path)
  before = snapshot(workdir)
  config = make_config({**run['ov'], 'train.num_steps': 6, **fields})
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, workdir)
  msg = str(e.value)
  assert '\n' not in msg
  assert 'holds a run trained with other settings (' in msg
  for words in named:
    assert words in msg
  assert 'train.num_steps' in msg and 'The existing checkpoints were left untouched' in msg
  assert snapshot(workdir) == before


def test_a_model_change_with_a_settings_change_says_different_model(run, tmp_path):
  workdir = copy_of(run, tmp_path)
  config = make_config({**run['ov'], 'model.depth': 3, 'train.peak_lr': 0.02})
  with pytest.raises(ValueError, match='holds checkpoints of a different model') as e:
    train.train_and_evaluate(config, workdir)
  assert 'model.depth: checkpoint 2 vs config 3' in str(e.value)
  assert 'train.peak_lr: checkpoint 0.01 vs config 0.02' in str(e.value)


def test_extension_and_execution_changes_resume_and_append_to_the_history(run, tmp_path):
  workdir = copy_of(run, tmp_path)
  first = pathlib.Path(workdir, 'config.json').read_bytes()
  assert not os.path.exists(os.path.join(workdir, train.HISTORY_FILE))
  changed = {
    'train.num_steps': 6,
    'train.log_every_steps': 1,
    'train.checkpoint_every_steps': 1,
    'train.eval_batch_size': 1000,
    'data.prefetch': 0,
  }
  ov = {**run['ov'], **changed}
  summary = train.train_and_evaluate(make_config(ov), workdir)
  assert summary['finished'] and summary['step'] == 6
  assert pathlib.Path(workdir, 'config.json').read_bytes() == first  # the first start's
  (line,) = history(workdir)
  assert line['step'] == 4 and line['config'] == json.loads(json.dumps(make_config(ov).to_dict()))
  assert set(line) == {'step', 'started', 'config'}
  # The log interval took effect: one train line per step after the resume.
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    train_steps = [e['step'] for e in map(json.loads, f) if e['kind'] == 'train']
  assert train_steps == [2, 4, 5, 6]
  assert train.load_config(workdir).train.num_steps == 6  # readers see the latest start

  more = {**ov, 'train.num_steps': 8}
  assert train.train_and_evaluate(make_config(more), workdir)['step'] == 8
  assert [ln['step'] for ln in history(workdir)] == [4, 6]
  assert history(workdir)[-1]['config']['train']['num_steps'] == 8


def test_checkpoints_of_earlier_versions_are_checked_against_config_json(run, tmp_path, caplog):
  """Earlier versions recorded neither digest nor data/train settings in the checkpoint."""
  workdir = copy_of(run, tmp_path)

  def earlier(meta):
    meta = without_digest(meta)
    meta['identity'] = {k: meta['identity'][k] for k in checkpointing.MODEL_FIELDS}
    return meta

  for step in (2, 4):
    edit_meta(workdir, step, earlier)
  with pytest.raises(ValueError, match='train.peak_lr: checkpoint 0.01 vs config 0.02'):
    train.train_and_evaluate(make_config({**run['ov'], 'train.peak_lr': 0.02}), workdir)
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(make_config({**run['ov'], 'train.num_steps': 6}), workdir)
  assert summary['step'] == 6 and 'has no state digest' in caplog.text


def test_a_start_with_no_checkpoint_to_keep_may_use_new_settings(run, tmp_path):
  """A workdir whose first start wrote config.json but no checkpoint keeps nothing trained."""
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  old = make_config({**run['ov'], 'train.peak_lr': 1e30})
  pathlib.Path(workdir, 'config.json').write_text(json.dumps(old.to_dict()))
  config = make_config({**run['ov'], 'train.num_steps': 2})
  assert train.train_and_evaluate(config, workdir)['finished']
  assert read_json(os.path.join(workdir, 'config.json'))['train']['peak_lr'] == 0.01
  assert not os.path.exists(os.path.join(workdir, train.HISTORY_FILE))


# ---------------------------------------------------------------------------------------------
# A stray empty step directory.


def test_an_empty_stray_step_directory_is_skipped_and_left(run, tmp_path, caplog):
  workdir = copy_of(run, tmp_path)
  stray = os.path.join(workdir, 'checkpoints', '7')
  os.makedirs(stray)
  with caplog.at_level(logging.WARNING):
    assert train.evaluate_workdir(workdir)['step'] == 4
    summary = train.train_and_evaluate(make_config({**run['ov'], 'train.num_steps': 6}), workdir)
  assert summary['finished'] and summary['step'] == 6
  assert f'{stray} is an empty step directory, not a checkpoint: skipped' in caplog.text
  assert os.path.isdir(stray) and os.listdir(stray) == []  # left as it was
  assert checkpoint_steps(workdir) == [4, 6, 7]
  assert restored_leaves(workdir)[1] == 6


# ---------------------------------------------------------------------------------------------
# A non-finite loss or state.


def _poisoned_train_step(monkeypatch, from_step: int, what: str):
  """Makes the train step's loss (``what='loss'``) or params (``'params'``) NaN from the step
  that ends at ``from_step`` on."""
  real = steps.jit_train_step

  def jit_train_step(*args, **kwargs):
    fn = real(*args, **kwargs)

    def step(state, frozen, batch):
      state, metrics = fn(state, frozen, batch)
      if int(state.step) >= from_step:
        if what == 'loss':
          metrics = {**metrics, 'loss': metrics['loss'] * jnp.nan}
        else:
          state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
      return state, metrics

    return step

  monkeypatch.setattr(steps, 'jit_train_step', jit_train_step)


def test_a_diverging_run_stops_before_its_first_checkpoint(run, tmp_path):
  workdir = str(tmp_path / 'w')
  # The log interval is past the first checkpoint: the check before the save catches it.
  ov = {**run['ov'], 'train.peak_lr': 1e30, 'train.num_steps': 6, 'train.log_every_steps': 100}
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(make_config(ov), workdir)
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith('training diverged: the train loss is nan at step 2 (train.peak_lr=1e+30)')
  assert 'no checkpoint was written. Train again with a lower train.peak_lr.' in msg
  assert checkpoint_steps(workdir) == []
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))


@pytest.mark.parametrize('what', ['loss', 'params'])
def test_a_diverging_resume_keeps_the_last_good_checkpoint(run, tmp_path, monkeypatch, what):
  workdir = copy_of(run, tmp_path)
  _poisoned_train_step(monkeypatch, 6, what)
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(make_config({**run['ov'], 'train.num_steps': 8}), workdir)
  monkeypatch.undo()
  msg = str(e.value)
  if what == 'loss':
    assert msg.startswith('training diverged: the train loss is nan at step 6 ')
  else:  # the loss is finite, the state is not: the save refuses it
    assert msg.startswith("training diverged: the state (.params['")
    assert 'is not finite at step 6' in msg
  assert 'the last good checkpoint, step 4, is kept in ' in msg
  assert 'in a new --workdir' in msg
  assert checkpoint_steps(workdir) == [2, 4]
  state, step = restored_leaves(workdir)
  assert step == 4
  assert_equal_leaves(state, run['state'])


# ---------------------------------------------------------------------------------------------
# The command line: damaged checkpoints and signals.


def _one_line_error(r, command: str) -> str:
  assert r.returncode == 1, f'{r.args}\nexit {r.returncode}\n{r.stdout}\n{r.stderr}'
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'pemn {command}: error: '), r.stderr
  return lines[0]


@pytest.mark.slow
def test_cli_refuses_a_damaged_checkpoint_in_one_line(run, tmp_path, pemn_cli):
  workdir = copy_of(run, tmp_path)
  apply_flip(workdir, 4, run['silent'][4][0])
  out = str(tmp_path / 'model.pemn')
  train_args = [
    'train',
    '--config',
    SMOKE,
    '--workdir',
    workdir,
    *[f'--config.{k}={v}' for k, v in {**run['ov'], 'train.num_steps': 6}.items()],
  ]
  procs = {
    'evaluate': pemn_cli.start('evaluate', '--workdir', workdir, '--json'),
    'export': pemn_cli.start('export', '--workdir', workdir, '--out', out),
    'train': pemn_cli.start(*train_args),
  }
  for command, proc in procs.items():
    line = _one_line_error(pemn_cli.finish(proc), command)
    assert 'cannot restore checkpoint step 4 in ' in line and 'Checkpoint step 2 verifies' in line
  assert not os.path.exists(out)


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_cli_stopped_by_a_signal_exits_128_plus_its_number(run, tmp_path, pemn_cli, sig):
  workdir = str(tmp_path / 'w')
  ov = {
    **run['ov'],
    'train.num_steps': 100000,
    'train.checkpoint_every_steps': 100000,
    'train.log_every_steps': 1,
  }
  args = ['train', '--config', SMOKE, '--workdir', workdir]
  proc = pemn_cli.start(*args, *[f'--config.{k}={v}' for k, v in ov.items()])
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if os.path.exists(metrics) and os.path.getsize(metrics):
      break
    time.sleep(0.02)
  proc.send_signal(sig)
  r = pemn_cli.finish(proc)
  assert r.returncode == 128 + sig, f'exit {r.returncode}\n{r.stdout}\n{r.stderr}'
  m = re.search(rf'stopped by {sig.name} at step (\d+)/100000; checkpoint written', r.stdout)
  assert m and 'Resume with the same command' in r.stdout, r.stdout
  # (an epoch's end, step 625, also evaluates and checkpoints, should the signal come late)
  assert checkpoint_steps(workdir)[-1] == int(m.group(1))
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
