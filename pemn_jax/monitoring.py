"""What a training run tells the world and hears from it: metric files, progress, stop signals.

The trainer (``pemn_jax.train``) calls these; none of them touches a device or a model. In a
multi-process run only process 0 writes files and prints, and every process agrees on when to
stop.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import jax
import numpy as np
from absl import logging

from pemn_jax import fileio


class MetricWriter:
  """``metrics.jsonl`` (one JSON object per event) and TensorBoard events, on process 0 only.

  Args:
    workdir: where ``metrics.jsonl`` and ``tensorboard/`` go.
    resume_step: the step the run starts from. Lines past it were written by an earlier run
      after its last checkpoint; the resumed run writes them again, so they are dropped to keep
      one line per event.
  """

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [ln for ln in f if ln.strip() and json.loads(ln).get('step', 0) <= resume_step]
      fileio.atomic_write(self.path, ''.join(kept))
    from tensorboardX import SummaryWriter  # only the writing process needs it

    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, kind: str, step: int, values: dict) -> None:
    """One event: ``kind`` ('train' or 'eval'), its step, and scalar ``values``."""
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'kind': kind, 'step': step, **values}) + '\n')
    for k, v in values.items():
      if isinstance(v, (int, float)):
        self.tb.add_scalar(f'{kind}/{k}', v, step)
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


class Progress:
  """A tqdm bar over the run's steps on process 0 (when asked for), else plain printed lines.

  ``note`` writes a line (an evaluation result) without breaking the bar.
  """

  def __init__(self, total: int, initial: int, enabled: bool):
    self.is_main = jax.process_index() == 0
    self.bar = None
    if self.is_main and enabled and initial < total:
      from tqdm import tqdm

      self.bar = tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True, desc='train')

  def update(self, metrics: dict | None = None) -> None:
    """One step done; ``metrics`` (loss, accuracy) are shown beside the bar when given."""
    if self.bar is None:
      return
    self.bar.update(1)
    if metrics:
      self.bar.set_postfix(loss=f'{metrics["loss"]:.3f}', acc=f'{metrics["accuracy"]:.3f}')

  def note(self, line: str) -> None:
    logging.info(line)
    if self.bar is not None:
      self.bar.write(line)
    elif self.is_main:
      print(line, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class StopSignal:
  """SIGTERM/SIGINT set a flag; the trainer finishes its step, checkpoints and returns.

  Installed by ``with StopSignal() as stop:``; the previous handlers come back on exit. Outside
  the main thread (a notebook worker) no handler can be installed and the run is not stoppable
  this way.
  """

  def __init__(self):
    self.received: str | None = None
    self._old = {}

  def __enter__(self) -> StopSignal:
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def __exit__(self, *exc) -> None:
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def should_stop(self) -> bool:
    """True on every process once any process got a signal (they must stop at one step)."""
    stop = self.received is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
    return stop

  @property
  def reason(self) -> str:
    return self.received or 'a signal on another process'


def announce(message: str, *, warning: bool = False) -> None:
  """Logs ``message`` and prints it on process 0 (what a user at the terminal must see)."""
  (logging.warning if warning else logging.info)(message)
  if jax.process_index() == 0:
    print(message, file=sys.stdout, flush=True)
