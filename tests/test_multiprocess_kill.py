"""Two processes on loopback (gloo collectives); one is killed mid-run: the survivor leaves at
once with one line (not after JAX's 90 s distributed heartbeat, with an abort), and the run
resumes from its checkpoints."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, 'pemn_jax', 'configs', 'smoke.py')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_survivor_of_a_killed_peer_exits_in_seconds_with_one_line(tmp_path, data_dir, pemn_cli):
  workdir, port = str(tmp_path / 'w'), _free_port()
  args = [
    'train',
    f'--config={SMOKE}',
    f'--workdir={workdir}',
    f'--config.data.data_dir={data_dir}',
    '--config.train.num_steps=100000',  # would run for long: the kill lands mid-run
    '--config.train.checkpoint_every_steps=5',
    '--config.train.batch_size=16',
    '--cpu_collectives=gloo',
    f'--coordinator_address=127.0.0.1:{port}',
    '--num_processes=2',
  ]
  procs = [pemn_cli.start(*args, f'--process_id={i}') for i in range(2)]
  try:
    ckpts = os.path.join(workdir, 'checkpoints')
    deadline = time.time() + 240
    while not (os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))):
      assert time.time() < deadline, 'no checkpoint written'
      assert all(p.poll() is None for p in procs), [pemn_cli.finish(p).stderr for p in procs]
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    survivor = pemn_cli.finish(procs[0], timeout=60)
    waited = time.time() - t0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  lines = [ln for ln in survivor.stderr.splitlines() if ln.strip()]
  assert survivor.returncode == 1, survivor.stderr[-3000:]
  assert waited < 30, f'the survivor took {waited:.0f} s'
  errors = [ln for ln in lines if ln.startswith(('pemn train: error:', 'pemn: error:'))]
  assert len(errors) == 1, lines[-20:]
  # The peer's death is seen either by the collective in flight (its error) or by the watch on
  # the coordination service (which names the dead process): one line either way.
  assert 'Gloo' in errors[0] or 'process(es) [1]' in errors[0], errors
  assert 'Fatal Python error' not in survivor.stderr
