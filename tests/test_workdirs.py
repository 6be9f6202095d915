"""The workdir checks and its exclusive lock (pemn_jax.workdirs), across real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pemn_jax import workdirs

HOLD = (
  'import sys, time\n'
  'from pemn_jax import workdirs\n'
  'with workdirs.exclusive(sys.argv[1]):\n'
  "  print('locked', flush=True)\n"
  '  time.sleep(60)\n'
)


def _holder(workdir: str) -> subprocess.Popen:
  proc = subprocess.Popen([sys.executable, '-c', HOLD, workdir], stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def test_second_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
  workdir = str(tmp_path / 'w')
  proc = _holder(workdir)
  try:
    with pytest.raises(ValueError, match=rf'is in use by pid {proc.pid} '):
      with workdirs.exclusive(workdir):
        pass
  finally:
    proc.send_signal(signal.SIGKILL)  # dies holding the lock: no clean-up runs
    proc.wait()
  with workdirs.exclusive(workdir):  # the kernel released the dead process's flock
    with open(os.path.join(workdir, workdirs.LOCK_FILE)) as f:
      assert f.read().strip() == str(os.getpid())
  with workdirs.exclusive(workdir):  # and this process's own lock is released on exit
    pass


def test_lock_is_released_when_the_block_raises(tmp_path):
  with pytest.raises(RuntimeError):
    with workdirs.exclusive(str(tmp_path)):
      raise RuntimeError('boom')
  with workdirs.exclusive(str(tmp_path)):
    pass


def test_non_main_processes_check_but_do_not_lock(tmp_path):
  with workdirs.exclusive(str(tmp_path)):
    with workdirs.exclusive(str(tmp_path), is_main=False):
      pass


def test_a_file_is_not_a_workdir(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(ValueError, match='is a file, not a directory'):
    workdirs.check(str(f))


def test_a_checkpoints_file_is_refused_before_orbax_sees_it(tmp_path):
  (tmp_path / 'checkpoints').write_text('x')
  with pytest.raises(ValueError, match='is a file, not a checkpoint directory'):
    workdirs.check(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write anywhere')
def test_read_only_workdir(tmp_path):
  tmp_path.chmod(0o500)
  try:
    with pytest.raises(ValueError, match='not writable'):
      workdirs.check(str(tmp_path))
  finally:
    tmp_path.chmod(0o700)


def test_uncreatable_workdir(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  with pytest.raises(ValueError, match='cannot be created'):
    workdirs.check(str(f / 'sub'))


def test_train_refuses_a_workdir_in_use_and_writes_nothing_there(tmp_path, data_dir):
  from pemn_jax import train
  from pemn_jax.configs import common, smoke

  workdir = str(tmp_path / 'w')
  proc = _holder(workdir)
  try:
    config = common.with_overrides(
      smoke.get_config(), {'data.data_dir': data_dir, 'train.num_steps': 2}
    )
    with pytest.raises(ValueError, match=rf'is in use by pid {proc.pid} '):
      train.train_and_evaluate(config, workdir)
    assert sorted(os.listdir(workdir)) == [workdirs.LOCK_FILE]
  finally:
    proc.kill()
    proc.wait()
