"""Atomic file writes: a reader sees the old file or the whole new one, never half of either.

Every file pemn-jax writes that someone may read while it is written (configs and summaries in a
workdir, metric logs being trimmed, artifacts, compiled kernels, result records) goes through
``atomic_write``: the bytes go to a temporary file in the destination's directory, are flushed to
disk, and replace the destination with one ``os.replace``. A failed write removes its temporary
file and leaves the destination as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = True) -> None:
  """Writes ``data`` (bytes, or text as UTF-8) to ``path`` atomically.

  Args:
    path: the destination; its directory must exist.
    data: the whole new content.
    fsync: flush the temporary file to disk before the rename (a crash right after the rename
      then cannot leave an empty file).
  """
  path = os.fspath(path)
  if isinstance(data, str):
    data = data.encode()
  fd, tmp = tempfile.mkstemp(
    prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=os.path.dirname(path) or '.'
  )
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
  """``obj`` as JSON (with a final newline) to ``path``, atomically."""
  atomic_write(path, json.dumps(obj, indent=indent) + '\n')
