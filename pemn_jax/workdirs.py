"""A training directory before anything is written to it: its checks and its exclusive lock.

``check(workdir)`` writes nothing: the trainer calls it with the other checks, before anything is
written. ``exclusive(workdir)`` is what ``train.train_and_evaluate`` holds while it runs: it checks
again, creates the directory, then takes an exclusive ``fcntl.flock`` on ``workdir/.lock`` and
writes its pid there. A second ``pemn train`` on the same directory fails at once with "workdir ...
is in use by pid N" instead of two runs interleaving checkpoints and metric lines.

The kernel releases a flock when its process dies, however it dies, so a lock left by a killed
run is taken over by the next one without any clean-up. Only process 0 of a multi-process run
locks (the others write nothing of their own there). flock is reliable on local filesystems; on
network filesystems it depends on the server (NFSv4 supports it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

LOCK_FILE = '.lock'


def check(workdir: str) -> None:
  """Raises ValueError unless ``workdir`` is a directory this process can write in, or one it
  can create (its nearest existing parent is a writable directory); writes nothing."""
  if not isinstance(workdir, str | os.PathLike) or not os.fspath(workdir):
    raise ValueError(f'--workdir must be a directory path, got {workdir!r}')
  path = os.path.abspath(os.fspath(workdir))
  if os.path.lexists(path) and not os.path.isdir(path):
    what = 'a broken link' if not os.path.exists(path) else 'a file'
    raise ValueError(f'--workdir {workdir} is {what}, not a directory')
  probe = path
  while not os.path.lexists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f'--workdir {workdir} cannot be created: {probe} is a file')
  if not os.access(probe, os.W_OK | os.X_OK):
    made = '' if probe == path else ', where it would be created,'
    raise ValueError(
      f'--workdir {workdir} cannot be written: {probe}{made} is read-only or not writable '
      'by this user'
    )
  ckpt = os.path.join(path, 'checkpoints')
  if os.path.lexists(ckpt) and not os.path.isdir(ckpt):
    raise ValueError(
      f'{ckpt} is a file, not a checkpoint directory; move it away or use a new --workdir'
    )


@contextlib.contextmanager
def exclusive(workdir: str, *, is_main: bool = True) -> Iterator[None]:
  """Holds the workdir's exclusive lock (on process 0) for the duration of the block.

  Raises:
    ValueError: the workdir is unusable (``check``) or another live process holds its lock.
  """
  check(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'cannot create --workdir {workdir}: {e.strerror}') from None
  if not is_main:
    yield
    return
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'another process'
      raise ValueError(
        f'--workdir {workdir} is in use by pid {holder} (a pemn train running there); wait for '
        'it to finish or stop it, or use another --workdir'
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # no stale pid for the next reader; the flock goes with the fd
  finally:
    os.close(fd)
