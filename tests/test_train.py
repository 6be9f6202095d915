"""The training system, for real: ``train.train_and_evaluate`` / ``evaluate_workdir``, orbax
checkpoint-and-resume, and the ``pemn train`` / ``pemn evaluate`` CLI.

Every run is the smoke config (a tiny masked ConvMixer) on the embedded Fashion-MNIST subset,
prepared once per session into a temporary TFDS data dir (conftest's ``data_dir``), for a few
steps; TFDS catalogue datasets run on ``tfds.testing.mock_data``. The ``slow`` tests start
``python -m pemn_jax.main`` as subprocesses (conftest's ``pemn_cli``): on N host devices (the
device count is fixed when JAX starts), killed with SIGKILL or stopped with SIGTERM mid-run, or
as two processes on loopback with gloo collectives. The session's persistent compilation cache
makes the repeated compiles of the same few programs cheap.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from pemn_jax import build, checkpointing, layers, steps, train
from pemn_jax.configs import common, smoke
from pemn_jax.data import pipeline, sources

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(REPO / 'pemn_jax' / 'configs' / 'smoke.py')
# Float tolerance between device counts / process counts (BN statistics over the global batch).
TOL = dict(rtol=1e-4, atol=1e-5)
NUM_TEST = 2000  # test examples of the embedded subset
SUBPROCESS_TIMEOUT = 300  # seconds a test waits for a subprocess to reach a checkpoint

# The fields every run here overrides. eval_batch_size 384 does not divide the 2,000 test
# examples (the last batch is padded) and divides by 1, 2, 4 and 8 devices.
BASE = {
  'train.batch_size': 16,
  'train.eval_batch_size': 384,
  'train.num_steps': 4,
  'train.checkpoint_every_steps': 2,
  'train.log_every_steps': 2,
}


# ---------------------------------------------------------------------------------------------
# Helpers.


def overrides(data_dir: str, **fields) -> dict:
  """BASE + data_dir + ``fields`` (``train__num_steps=6`` is ``train.num_steps``)."""
  return {'data.data_dir': data_dir, **BASE, **{k.replace('__', '.'): v for k, v in fields.items()}}


def make_config(ov: dict):
  return common.with_overrides(smoke.get_config(), ov)


def train_args(workdir, ov: dict, *extra) -> list[str]:
  """``pemn train`` on the smoke config with ``ov`` as --config overrides (pemn_cli's ARGS)."""
  return [
    'train',
    '--config',
    SMOKE,
    '--workdir',
    workdir,
    *[f'--config.{k}={v}' for k, v in ov.items()],
    *extra,
  ]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert r.returncode == 0, (
    f'{r.args}\nexit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}'
  )
  return r


def one_line_error(r: subprocess.CompletedProcess, command: str = 'train') -> str:
  """The CLI's error contract: non-zero exit, stderr is one `pemn CMD: error: ...` line."""
  assert r.returncode != 0, f'{r.args} succeeded:\n{r.stdout}'
  assert 'Traceback' not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'pemn {command}: error: '), r.stderr
  return lines[0]


def restored(workdir, best: bool = False) -> tuple[dict[str, np.ndarray], int]:
  """Every leaf of a workdir's restored TrainState (step, params, batch_stats, opt_state)."""
  _, _, state, step = train.restore_workdir(str(workdir), best=best)
  leaves, _ = jax.tree.flatten_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}, step


def assert_states_equal(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  differ = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
  assert not differ, f'not bit-identical: {differ}'


def assert_states_close(a: dict, b: dict) -> None:
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_allclose(a[k], b[k], err_msg=k, **TOL)


def checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def snapshot(path) -> dict[str, bytes]:
  """Every file under ``path`` with its bytes (to prove a failed run left it untouched)."""
  files = {}
  for root, _, names in os.walk(path):
    for n in names:
      p = os.path.join(root, n)
      with open(p, 'rb') as f:
        files[os.path.relpath(p, path)] = f.read()
  return files


def metric_lines(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def without_rate(lines: list[dict]) -> list[dict]:
  return [{k: v for k, v in ln.items() if k != 'steps_per_s'} for ln in lines]


def read_json(path):
  with open(path) as f:
    return json.load(f)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# 1. A real run: what it writes, and evaluating it.


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A finished 6-step run (checkpoints every 2 steps, keep 2): (workdir, overrides, summary)."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  ov = overrides(data_dir, train__num_steps=6, train__max_checkpoints=2)
  summary = train.train_and_evaluate(make_config(ov), workdir)
  return workdir, ov, summary


def test_run_writes_config_metrics_events_summary_and_checkpoints(trained):
  workdir, ov, summary = trained
  assert sorted(os.listdir(workdir)) == [
    '.lock',  # the workdir lock (pemn_jax.workdirs), empty once the run is over
    'checkpoints',
    'config.json',
    'metrics.jsonl',
    'summary.json',
    'tensorboard',
  ]
  assert read_json(os.path.join(workdir, 'config.json')) == json.loads(
    json.dumps(make_config(ov).to_dict())
  )

  lines = metric_lines(workdir)
  assert [(ln['kind'], ln['step']) for ln in lines] == [
    ('train', 2),
    ('train', 4),
    ('train', 6),
    ('eval', 6),
  ]
  for ln in lines[:3]:
    assert {'loss', 'accuracy', 'grad_norm', 'lr', 'steps_per_s'} <= set(ln)
    assert all(np.isfinite(ln[k]) for k in ('loss', 'accuracy', 'grad_norm', 'lr'))
    assert 0.0 <= ln['accuracy'] <= 1.0 and ln['loss'] > 0
  assert lines[2]['lr'] == 0.0  # the schedule ends at 0
  ev = lines[3]
  assert ev['num_examples'] == NUM_TEST and ev['epoch'] == 1 and 0.0 <= ev['accuracy'] <= 1.0

  events = list(pathlib.Path(workdir, 'tensorboard').glob('events.out.tfevents.*'))
  assert len(events) == 1
  raw = events[0].read_bytes()
  for tag in (b'train/loss', b'train/accuracy', b'train/lr', b'eval/accuracy', b'eval/loss'):
    assert tag in raw

  on_disk = read_json(os.path.join(workdir, 'summary.json'))
  assert on_disk == json.loads(json.dumps(summary))
  assert summary['finished'] and summary['step'] == summary['total_steps'] == 6
  assert summary['final_accuracy'] == ev['accuracy'] and summary['final_loss'] == ev['loss']
  assert summary['best_step'] == 6 and summary['best_accuracy'] == ev['accuracy']

  # Keep the latest 2 (every 2 steps) plus the best (the evaluated final one).
  assert checkpoint_steps(workdir) == [4, 6]
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'tmp' in n]


def test_evaluate_workdir_covers_every_test_example_once(trained):
  workdir, ov, summary = trained
  result = train.evaluate_workdir(workdir)
  assert set(result) == {'accuracy', 'loss', 'num_examples', 'step'}
  assert result['step'] == 6 and result['num_examples'] == NUM_TEST
  assert result['accuracy'] == summary['final_accuracy']
  assert result['loss'] == pytest.approx(summary['final_loss'], rel=1e-6)

  # Independent check: the whole test split as ONE unpadded batch, straight through the model.
  config, s, state, _ = train.restore_workdir(workdir)
  (batch,) = list(
    pipeline.eval_batches(config.data, global_batch_size=NUM_TEST, process_index=0, process_count=1)
  )
  assert batch['mask'].sum() == NUM_TEST
  variables = {'params': state.params, 'batch_stats': state.batch_stats, layers.FROZEN: s.frozen}
  logits = np.asarray(
    jax.jit(lambda v, x: s.model.apply(v, x, train=False))(variables, batch['image'])
  )
  assert result['accuracy'] * NUM_TEST == pytest.approx(np.sum(logits.argmax(-1) == batch['label']))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  assert result['loss'] == pytest.approx(float(loss), rel=1e-5)

  best = train.evaluate_workdir(workdir, best=True)
  assert best['step'] == summary['best_step'] and best['accuracy'] == summary['best_accuracy']


@pytest.mark.slow
def test_cli_evaluate_json_and_best(trained, pemn_cli):
  workdir, _, summary = trained
  before = snapshot(workdir)
  latest, best, text = [
    pemn_cli.start('evaluate', '--workdir', workdir, *flags)
    for flags in (['--json'], ['--best', '--json'], [])
  ]
  in_process = train.evaluate_workdir(workdir)
  for proc, step in ((latest, 6), (best, summary['best_step'])):
    r = ok(pemn_cli.finish(proc))
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert {'accuracy', 'loss', 'num_examples', 'step'} <= set(result)
    assert result['step'] == step and result['num_examples'] == NUM_TEST
    assert result['accuracy'] == pytest.approx(in_process['accuracy'], abs=0.5 / NUM_TEST)
    assert result['loss'] == pytest.approx(in_process['loss'], rel=1e-5)
  r = ok(pemn_cli.finish(text))
  assert f'examples {NUM_TEST}' in r.stdout and 'step 6' in r.stdout
  assert snapshot(workdir) == before  # evaluating never writes into the workdir


# ---------------------------------------------------------------------------------------------
# 2. A TFDS catalogue dataset (mock_data): one real train step, end to end.


@pytest.mark.slow  # compiles programs of its own (another step count)
def test_catalogue_dataset_on_mock_data_trains_end_to_end(tmp_path):
  # 'mnist' from the TFDS catalogue, its records generated by mock_data: one real train step,
  # evaluation over the whole mock test split (400 = 384 + 16 padded to 384).
  ov = {**BASE, 'data.name': 'mnist', 'train.num_steps': 1}
  sources.clear_cache()
  try:
    with tfds.testing.mock_data(num_examples=400, policy=tfds.testing.MockPolicy.USE_CODE):
      summary = train.train_and_evaluate(make_config(ov), str(tmp_path))
      result = train.evaluate_workdir(str(tmp_path))
  finally:
    sources.clear_cache()
  assert summary['finished'] and summary['step'] == 1
  assert read_json(tmp_path / 'config.json')['data']['name'] == 'mnist'
  lines = metric_lines(tmp_path)
  assert [(ln['kind'], ln['step']) for ln in lines] == [('train', 1), ('eval', 1)]
  assert np.isfinite(lines[0]['loss']) and lines[0]['grad_norm'] > 0
  assert lines[1]['num_examples'] == result['num_examples'] == 400
  assert checkpoint_steps(tmp_path) == [1] and result['step'] == 1


# ---------------------------------------------------------------------------------------------
# 3. Resume is the default.


def test_same_command_with_more_steps_resumes(trained, tmp_path, capsys):
  src, ov, _ = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(src, workdir)
  first_lines = metric_lines(workdir)
  first_state, _ = restored(workdir)

  ov = {**ov, 'train.num_steps': 10}
  summary = train.train_and_evaluate(make_config(ov), workdir)
  assert 'resuming from checkpoint step 6' in capsys.readouterr().out
  assert summary['step'] == 10 and summary['finished']
  lines = metric_lines(workdir)
  assert lines[:4] == first_lines  # the first run's lines are kept, not redone
  assert [(ln['kind'], ln['step']) for ln in lines[4:]] == [
    ('train', 8),
    ('train', 10),
    ('eval', 10),
  ]
  state, step = restored(workdir)
  assert step == 10 and state['.step'] == 10
  assert checkpoint_steps(workdir)[-1] == 10
  assert not np.array_equal(
    state[".params['head']['scores']"], first_state[".params['head']['scores']"]
  )

  # The same command once more: nothing left to train; the summary still has the final numbers.
  again = train.train_and_evaluate(make_config(ov), workdir)
  assert again['step'] == 10 and again['finished']
  assert again['final_accuracy'] == summary['final_accuracy']
  assert again['best_step'] == summary['best_step']
  assert metric_lines(workdir) == lines
  assert (
    read_json(os.path.join(workdir, 'summary.json'))['final_accuracy']
    == (summary['final_accuracy'])
  )


# ---------------------------------------------------------------------------------------------
# Best checkpoint bookkeeping (test accuracy patched to chosen values).


def _with_accuracies(monkeypatch, accuracies: list[float]):
  """Makes steps.evaluate return the given accuracies in turn."""
  it = iter(accuracies)
  monkeypatch.setattr(
    steps, 'evaluate', lambda *a, **k: {'accuracy': next(it), 'loss': 1.0, 'num_examples': NUM_TEST}
  )


@pytest.mark.parametrize(
  'accuracies, best',
  [
    pytest.param([0.5, 0.25], 4, id='earlier-run-best'),
    pytest.param([0.25, 0.25], 6, id='tie'),
  ],
)
@pytest.mark.slow  # two runs each
def test_best_checkpoint_is_kept_across_resume(data_dir, tmp_path, monkeypatch, accuracies, best):
  workdir = str(tmp_path)
  ov = overrides(
    data_dir, train__num_steps=4, train__checkpoint_every_steps=1, train__max_checkpoints=1
  )
  _with_accuracies(monkeypatch, accuracies)
  train.train_and_evaluate(make_config(ov), workdir)  # evaluates at step 4
  summary = train.train_and_evaluate(make_config({**ov, 'train.num_steps': 6}), workdir)
  monkeypatch.undo()

  # Latest 1 (step 6) plus the best; the summary's best step is one of them; --best restores it.
  assert summary['best_step'] == best and summary['best_accuracy'] == max(accuracies)
  assert checkpoint_steps(workdir) == sorted({best, 6})
  _, step = restored(workdir, best=True)
  assert step == best


# ---------------------------------------------------------------------------------------------
# 4 and 5. Killed (SIGKILL) or stopped (SIGTERM) mid-run, then resumed: bit-identical to an
# uninterrupted run of the same config.

KILL_STEPS = 48


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory, pemn_cli):
  """An uninterrupted `pemn train` of KILL_STEPS steps, started at once, awaited on demand."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  ov = overrides(data_dir, train__num_steps=KILL_STEPS)
  proc = pemn_cli.start(*train_args(workdir, ov))
  done = {}

  def wait():
    if not done:
      ok(pemn_cli.finish(proc))
      done['state'] = restored(workdir)
    return workdir, done['state']

  yield ov, wait
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(reference, tmp_path, pemn_cli):
  ov, reference_result = reference
  workdir = str(tmp_path)
  args = train_args(workdir, ov)
  proc = pemn_cli.start(*args)
  deadline = time.time() + SUBPROCESS_TIMEOUT
  while proc.poll() is None and not checkpoint_steps(workdir) and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  r = pemn_cli.finish(proc)
  assert r.returncode == -signal.SIGKILL, f'not killed mid-run:\n{r.stdout}\n{r.stderr}'
  killed_at = checkpoint_steps(workdir)
  assert killed_at and killed_at[-1] < KILL_STEPS
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))

  r = ok(pemn_cli(*args))
  assert 'pemn: resuming from checkpoint step' in r.stdout
  ref_dir, (ref_state, ref_step) = reference_result()
  state, step = restored(workdir)
  assert step == ref_step == KILL_STEPS
  assert_states_equal(state, ref_state)  # params, batch_stats, opt_state, step
  # One line per event, with the same values (log every 2 = checkpoint every 2).
  assert without_rate(metric_lines(workdir)) == without_rate(metric_lines(ref_dir))
  summary, ref_summary = (read_json(os.path.join(d, 'summary.json')) for d in (workdir, ref_dir))
  assert summary['final_accuracy'] == ref_summary['final_accuracy']


@pytest.mark.slow
def test_sigterm_finishes_step_checkpoints_and_exits_cleanly(reference, tmp_path, pemn_cli):
  ov, reference_result = reference
  workdir = str(tmp_path)
  # No periodic checkpoint before the end: the one written on SIGTERM is the only one.
  args = train_args(workdir, {**ov, 'train.checkpoint_every_steps': 1000})
  proc = pemn_cli.start(*args)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + SUBPROCESS_TIMEOUT
  while (
    proc.poll() is None
    and time.time() < deadline
    and not (os.path.exists(metrics) and os.path.getsize(metrics))
  ):
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  r = pemn_cli.finish(proc)
  assert r.returncode == 128 + signal.SIGTERM, r.stderr  # unfinished: not a success status
  assert 'Traceback' not in r.stderr
  (stopped,) = checkpoint_steps(workdir)
  assert 0 < stopped < KILL_STEPS, 'SIGTERM arrived after the run ended: raise KILL_STEPS'
  assert f'stopped by SIGTERM at step {stopped}/{KILL_STEPS}; checkpoint written' in r.stdout
  assert 'Resume with the same command' in r.stdout
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))

  r = ok(pemn_cli(*args))
  assert f'resuming from checkpoint step {stopped}' in r.stdout
  _, (ref_state, _) = reference_result()
  state, step = restored(workdir)
  assert step == KILL_STEPS
  assert_states_equal(state, ref_state)
  assert read_json(os.path.join(workdir, 'summary.json'))['finished']


def test_sigterm_in_process_stops_mid_run_but_not_at_the_last_step(
  data_dir, tmp_path, monkeypatch, capsys
):
  """A real SIGTERM to this process, sent while the loop prepares a given training step."""
  to_global, calls = steps.to_global, []

  def signalling(target):
    def wrapped(batch, sharding):
      if 'mask' not in batch:  # a training batch
        calls.append(1)
        if len(calls) == target:
          os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler is installed by now
      return to_global(batch, sharding)

    return wrapped

  workdir = str(tmp_path)
  config = make_config(overrides(data_dir, train__checkpoint_every_steps=1000))
  handler = signal.getsignal(signal.SIGTERM)
  monkeypatch.setattr(steps, 'to_global', signalling(2))
  summary = train.train_and_evaluate(config, workdir)  # signal during step 2 of 4
  assert not summary['finished'] and summary['step'] == 2
  assert 'stopped by SIGTERM at step 2/4; checkpoint written' in capsys.readouterr().out
  assert checkpoint_steps(workdir) == [2]
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  assert signal.getsignal(signal.SIGTERM) is handler  # restored

  calls.clear()
  monkeypatch.setattr(steps, 'to_global', signalling(2))
  summary = train.train_and_evaluate(config, workdir)  # signal during step 4, the last
  out = capsys.readouterr().out
  assert summary['finished'] and summary['step'] == 4 and 'stopped by' not in out
  assert read_json(os.path.join(workdir, 'summary.json'))['final_accuracy'] is not None


# ---------------------------------------------------------------------------------------------
# 6 and 7. Multi-device and multi-host runs match a single device.


@pytest.fixture(scope='module')
def one_device(data_dir, tmp_path_factory):
  """The 4-step run on this process's single device (in-process)."""
  assert jax.device_count() == 1
  workdir = str(tmp_path_factory.mktemp('one_device'))
  ov = overrides(data_dir)
  train.train_and_evaluate(make_config(ov), workdir)
  return workdir, ov


@pytest.mark.slow
def test_eight_devices_match_one_and_resume_on_one(one_device, tmp_path, pemn_cli):
  ref_dir, ov = one_device
  w8 = str(tmp_path / 'eight')
  ok(pemn_cli(*train_args(w8, ov), devices=8))
  state8, step = restored(w8)  # written by 8 devices, restored here on 1
  assert step == 4
  ref_state, _ = restored(ref_dir)
  assert_states_close(state8, ref_state)
  ev8, ev1 = metric_lines(w8)[-1], metric_lines(ref_dir)[-1]
  assert ev8['num_examples'] == ev1['num_examples'] == NUM_TEST
  assert ev8['loss'] == pytest.approx(ev1['loss'], rel=1e-4)

  # Resume the 8-device run on 1 device, and the 1-device run likewise: still in agreement.
  w1 = str(tmp_path / 'one')
  shutil.copytree(ref_dir, w1)
  more = make_config({**ov, 'train.num_steps': 6})
  for w in (w8, w1):
    assert train.train_and_evaluate(more, w)['step'] == 6
  a, _ = restored(w8)
  b, _ = restored(w1)
  assert_states_close(a, b)


@pytest.mark.slow
def test_two_processes_with_two_devices_match_one_process_with_four(one_device, tmp_path, pemn_cli):
  _, ov = one_device
  w4, shared = str(tmp_path / 'four'), str(tmp_path / 'shared')
  port = free_port()
  procs = [pemn_cli.start(*train_args(w4, ov), devices=4)] + [
    pemn_cli.start(
      *train_args(
        shared,
        ov,
        '--cpu_collectives=gloo',
        f'--coordinator_address=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
      ),
      devices=2,
    )
    for i in range(2)
  ]
  results = [pemn_cli.finish(p) for p in procs]
  for r in results:
    ok(r)
  assert 'epoch 1/1 step 4/4' in results[1].stdout  # process 0 reports ...
  assert 'epoch 1/1' not in results[2].stdout  # ... process 1 does not

  state_mh, step = restored(shared)
  assert step == 4
  state4, _ = restored(w4)
  assert_states_close(state_mh, state4)
  lines = metric_lines(shared)  # written once, by process 0
  assert [(ln['kind'], ln['step']) for ln in lines] == [('train', 2), ('train', 4), ('eval', 4)]
  assert lines[-1]['num_examples'] == NUM_TEST
  assert lines[-1]['loss'] == pytest.approx(metric_lines(w4)[-1]['loss'], rel=1e-4)
  assert read_json(os.path.join(shared, 'summary.json'))['finished']


# ---------------------------------------------------------------------------------------------
# 8. Bad input: a clear error naming the cause; existing checkpoints untouched.


@pytest.mark.parametrize(
  'fields, error, match',
  [
    ({'data.name': 'no_such_dataset'}, ValueError, "data.name='no_such_dataset' is not a dataset"),
    (
      {'data.name': 'mnist', 'data.data_dir': '/nonexistent/tfds'},
      FileNotFoundError,
      'not prepared as array_record in data.data_dir=/nonexistent/tfds',
    ),
    (
      {'data.name': 'cifar10_jpeg', 'data.source_path': '/nonexistent/cifar.npz'},
      FileNotFoundError,
      r'data.source_path=/nonexistent/cifar.npz .* is not a file',
    ),
    (
      {'data.name': 'fashion_mnist_local', 'data.source_dir': '/nonexistent/idx'},
      FileNotFoundError,
      r'data.source_dir=/nonexistent/idx, which lacks',
    ),
  ],
  ids=['unknown-name', 'missing-data-dir', 'missing-source-path', 'missing-source-dir'],
)
def test_bad_data_config_fails_before_writing(data_dir, tmp_path, fields, error, match):
  ov = {**overrides(data_dir), **fields}
  if fields['data.name'] in ('cifar10_jpeg', 'fashion_mnist_local'):
    ov['data.data_dir'] = str(tmp_path / 'empty_tfds')  # nothing prepared there
  workdir = str(tmp_path / 'w')
  sources.clear_cache()
  with pytest.raises(error, match=match):
    train.train_and_evaluate(make_config(ov), workdir)
  assert not os.path.exists(workdir)


def test_batch_size_not_divisible_by_device_count(data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda *a: 8)
  with pytest.raises(
    ValueError,
    match=r'train.batch_size \(12\) must be divisible by the '
    r'number of devices \(8\)',
  ):
    train.train_and_evaluate(
      make_config(overrides(data_dir, train__batch_size=12)), str(tmp_path / 'w')
    )
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize(
  'fields, match',
  [
    ({'model.dim': 8}, 'model.dim: checkpoint 16 vs config 8'),
    ({'strategy.name': 'mask'}, "strategy.name: checkpoint 'random_vector_padding' vs config"),
    ({'seed': 1}, 'seed: checkpoint 0 vs config 1'),
  ],
  ids=['dim', 'strategy', 'seed'],
)
def test_workdir_of_a_different_model_is_refused_untouched(trained, fields, match):
  workdir, ov, _ = trained
  before = snapshot(workdir)
  with pytest.raises(ValueError, match=match) as e:
    train.train_and_evaluate(make_config({**ov, **fields}), workdir)
  assert 'holds checkpoints of a different model' in str(e.value)
  assert 'Use a new --workdir' in str(e.value)
  assert snapshot(workdir) == before


@pytest.mark.slow  # compiles the rematerialised step
def test_resume_with_remat_blocks_changed(trained, tmp_path):
  """model.remat_blocks picks how the step runs, not the network: resuming may switch it."""
  src, ov, _ = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(src, workdir)
  summary = train.train_and_evaluate(
    make_config({**ov, 'train.num_steps': 8, 'model.remat_blocks': 'full'}), workdir
  )
  assert summary['step'] == 8 and summary['finished']
  # and a record written with the field set (to anything) still matches a config without it
  saved = checkpointing.identity(make_config({**ov, 'model.remat_blocks': 'save_convs'}))
  saved['model']['remat_blocks'] = False
  checkpointing.check_identity(saved, checkpointing.identity(make_config(ov)), workdir)


def _truncate_state(step_dir):
  (data,) = pathlib.Path(step_dir, 'state', 'd').iterdir()  # the state's OCDBT data file
  data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])


def _garble_state_metadata(step_dir):
  p = pathlib.Path(step_dir, 'state', '_METADATA')
  p.write_bytes(bytes(b ^ 0x5A for b in p.read_bytes()))


def _garble_meta(step_dir):
  p = pathlib.Path(step_dir, 'meta', 'metadata')
  p.write_bytes(p.read_bytes()[:-20] + b'\x00garbage')


# orbax's failed concurrent reads leave 'Event loop is closed' callbacks behind (the CLI drops
# them, see main._ignore_closed_loop_callbacks); in-process they are unraisable-exception noise.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize(
  'damage',
  [
    pytest.param(_truncate_state, id='truncated-data', marks=pytest.mark.slow),  # trains again
    pytest.param(_garble_state_metadata, id='garbled-array-metadata'),
    pytest.param(_garble_meta, id='garbled-meta'),
  ],
)
def test_corrupted_checkpoint_is_a_clear_error_and_left_untouched(trained, tmp_path, damage):
  src, ov, _ = trained
  workdir = str(tmp_path / 'w')
  shutil.copytree(src, workdir)
  damage(os.path.join(workdir, 'checkpoints', '6'))
  before = snapshot(workdir)

  mngr = checkpointing.manager(workdir, read_only=True)
  replicated = steps.mesh_and_shardings().replicated
  template = checkpointing.abstract_like(train.restore_workdir(src)[2], replicated)
  with pytest.raises(ValueError, match='cannot restore checkpoint step 6'):
    checkpointing.restore(mngr, 6, template)
  for call in (
    lambda: train.train_and_evaluate(make_config({**ov, 'train.num_steps': 8}), workdir),
    lambda: train.evaluate_workdir(workdir),
  ):
    with pytest.raises(
      ValueError,
      match=r'cannot restore checkpoint step 6 in .*checkpoints: '
      r'.*The checkpoint is corrupted',
    ) as e:
      call()
    assert len(str(e.value)) < 1500  # the cause, not kilobytes of tensorstore spec
    assert snapshot(workdir) == before

  if damage is _truncate_state:  # the advice works: delete the step, resume from the earlier
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
    summary = train.train_and_evaluate(make_config(ov), workdir)
    assert summary['finished'] and summary['step'] == 6
    assert_states_equal(restored(workdir)[0], restored(src)[0])


@pytest.mark.slow
def test_cli_bad_input_is_one_line_error(trained, tmp_path, pemn_cli):
  src, ov, _ = trained
  other, corrupt = str(tmp_path / 'other'), str(tmp_path / 'corrupt')
  shutil.copytree(src, other)
  shutil.copytree(src, corrupt)
  _truncate_state(os.path.join(corrupt, 'checkpoints', '6'))
  before = {w: snapshot(w) for w in (other, corrupt)}
  fresh = str(tmp_path / 'fresh')
  cases = {  # name: (pemn_cli's ARGS, devices, words the error line must contain)
    'unknown dataset': (
      train_args(fresh, {**ov, 'data.name': 'no_such_dataset'}),
      1,
      ["data.name='no_such_dataset'", 'is not a dataset'],
    ),
    'missing data dir': (
      train_args(fresh, {**ov, 'data.name': 'mnist', 'data.data_dir': '/nonexistent/tfds'}),
      1,
      ['data.data_dir=/nonexistent/tfds', 'tfds build mnist'],
    ),
    'batch size': (
      train_args(fresh, {**ov, 'train.batch_size': 12}),
      8,
      ['train.batch_size (12)', 'number of devices (8)'],
    ),
    'other model': (
      train_args(other, {**ov, 'model.dim': 8}),
      1,
      ['different model', 'model.dim: checkpoint 16 vs config 8'],
    ),
    'corrupted': (
      train_args(corrupt, {**ov, 'train.num_steps': 8}),
      1,
      ['cannot restore checkpoint step 6', 'corrupted'],
    ),
    'corrupted evaluate': (
      ['evaluate', '--workdir', corrupt, '--json'],
      1,
      ['cannot restore checkpoint step 6', 'corrupted'],
    ),
  }
  procs = {
    name: pemn_cli.start(*args, devices=devices) for name, (args, devices, _) in cases.items()
  }
  for name, proc in procs.items():
    r = pemn_cli.finish(proc)
    line = one_line_error(r, 'evaluate' if 'evaluate' in name else 'train')
    for words in cases[name][2]:
      assert words in line, (name, line)
    assert r.stdout.strip() == '', (name, r.stdout)
  assert not os.path.exists(fresh)
  for w, files in before.items():
    assert snapshot(w) == files


# ---------------------------------------------------------------------------------------------
# 9. The jitted steps trace once; the frozen collection stays out of gradients, optimizer state
# and checkpoints.


@pytest.mark.slow  # two more runs; test_steps.py checks the trace counts in the fast run
def test_steps_trace_once_and_frozen_weights_stay_out(data_dir, tmp_path, monkeypatch):
  traces = {'train': 0, 'eval': 0}
  grad_paths, opt_paths = [], []
  make_train_step, make_eval_step = steps.make_train_step, steps.make_eval_step
  make_optimizer = steps.make_optimizer

  def counting(kind, fn):
    @functools.wraps(fn)  # same name, same program: the compilation cache still applies
    def traced(*args):
      traces[kind] += 1
      return fn(*args)

    return traced

  def recording_optimizer(config, total_steps):
    tx = make_optimizer(config, total_steps)

    def init(params):
      state = tx.init(params)
      opt_paths.extend(jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(state)[0])
      return state

    def update(grads, state, params=None):
      grad_paths.append({jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(grads)[0]})
      return tx.update(grads, state, params)

    return optax.GradientTransformation(init, update)

  monkeypatch.setattr(
    steps, 'make_train_step', lambda m, tx: counting('train', make_train_step(m, tx))
  )
  monkeypatch.setattr(steps, 'make_eval_step', lambda m: counting('eval', make_eval_step(m)))
  monkeypatch.setattr(steps, 'make_optimizer', recording_optimizer)

  workdir = str(tmp_path)
  ov = overrides(data_dir, train__num_steps=4)
  train.train_and_evaluate(make_config(ov), workdir)  # 4 steps, 6 eval batches
  assert traces == {'train': 1, 'eval': 1}
  traces.update(train=0, eval=0)
  train.train_and_evaluate(make_config({**ov, 'train.num_steps': 6}), workdir)  # restored state
  assert traces == {'train': 1, 'eval': 1}

  config = make_config(ov)
  variables = build.init_variables(build.build_model(config), config)
  frozen_paths = {
    jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(variables[layers.FROZEN])[0]
  }
  param_paths = {
    jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(variables['params'])[0]
  }
  assert frozen_paths and all(p.endswith("['kernel']") for p in frozen_paths)
  # Gradients are exactly the params (scores and BN), never a frozen kernel.
  assert grad_paths and all(g == param_paths for g in grad_paths)
  assert not any('kernel' in p or layers.FROZEN in p for p in set().union(*grad_paths))
  assert opt_paths and not any('kernel' in p or layers.FROZEN in p for p in opt_paths)
  # The checkpoint holds no frozen weights either.
  state, _ = restored(workdir)
  assert not any('kernel' in k or layers.FROZEN in k for k in state)
  stored = read_json(os.path.join(workdir, 'checkpoints', '6', 'state', '_METADATA'))
  assert not any('kernel' in k or layers.FROZEN in k for k in stored['tree_metadata'])
