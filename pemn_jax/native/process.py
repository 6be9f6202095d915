"""The process-level settings a CPU training process starts with: huge pages for glibc's
malloc, and the large-allocation cache preloaded.

XLA:CPU mallocs each step's whole scratch buffer (hundreds of MB to GB) and frees it when the
step ends; glibc serves that with a fresh ``mmap`` each time, so the kernel faults in and
zeroes every page of it every step. ``glibc.malloc.hugetlb=1`` (``GLIBC_TUNABLES``) makes
those pages 2 MB ones, ~500x fewer faults; the zeroing remains (a quarter of a 2-core machine's
CPU time in a ConvMixer-256/8 step). The cache (``alloc.cc``, ``LD_PRELOAD``) keeps large
blocks mapped after ``free`` and serves the next step's buffers from them, so a steady loop
stops faulting (experiments/results/PERFORMANCE.md).

Both are read when a process starts, so ``reexec_tuned`` re-executes the current command once
with them set. The ``pemn`` command, ``experiments.demo``, ``experiments.bench_step`` and
``experiments.profile_step`` call it first. ``PEMN_NO_REEXEC=1`` keeps the process as it is;
``PEMN_JAX_ALLOC=0`` leaves the cache out (``PEMN_ALLOC_CACHE_MB`` caps the bytes it keeps,
default a quarter of physical memory).
A library user starts their own process so: ``LD_PRELOAD=$(python -c 'from pemn_jax.native
import process; print(process.allocator())')``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Mapping

MALLOC_TUNABLE = 'glibc.malloc.hugetlb=1'
# Set in the re-executed process's environment, so that it never re-executes again.
MARKER = 'PEMN_JAX_REEXECUTED'


def allocator() -> str | None:
  """The compiled cache library's path, or None (with a warning) where it cannot be built."""
  from pemn_jax.native import build

  try:
    return build.allocator_path()
  except Exception as e:  # noqa: BLE001 - without it the process runs as before, slower
    logging.warning('pemn_jax: no allocation cache (%s: %s)', type(e).__name__, e)
    return None


def allocator_loaded() -> bool:
  """Whether this process runs with the cache preloaded."""
  try:
    ctypes.CDLL(None).pemn_alloc_stats  # noqa: B018 - the lookup is the test
  except (AttributeError, OSError):
    return False
  return True


def allocator_stats() -> dict | None:
  """The cache's counters (None without it): blocks served from it (``reused``), blocks newly
  mapped (``mapped``), bytes it holds free (``cached_bytes``) and handed out (``live_bytes``),
  and requests it passed to glibc for want of address space (``to_glibc``)."""
  if not allocator_loaded():
    return None
  out = (ctypes.c_int64 * 5)()
  ctypes.CDLL(None).pemn_alloc_stats(out)
  return dict(zip(('reused', 'mapped', 'cached_bytes', 'live_bytes', 'to_glibc'), out))


def tuned_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
  """The environment to re-execute with, or None when there is nothing to add (not Linux, a
  re-executed process, ``PEMN_NO_REEXEC``, both settings already there or switched off).

  Raises:
    ValueError: ``PEMN_ALLOC_CACHE_MB`` is set but not a whole number.
  """
  cap = environ.get('PEMN_ALLOC_CACHE_MB')
  if cap is not None and not cap.isdigit():
    raise ValueError(
      f'PEMN_ALLOC_CACHE_MB must be a whole number of megabytes (0 or more), got {cap!r}'
    )
  if sys.platform != 'linux' or environ.get(MARKER) or environ.get('PEMN_NO_REEXEC'):
    return None
  env = dict(environ)
  changed = False
  if 'GLIBC_TUNABLES' not in env:
    env['GLIBC_TUNABLES'] = MALLOC_TUNABLE
    changed = True
  if environ.get('PEMN_JAX_ALLOC', '1') != '0' and not allocator_loaded():
    path = allocator()
    if path is not None:
      env['LD_PRELOAD'] = ':'.join(p for p in (path, environ.get('LD_PRELOAD')) if p)
      changed = True
  if not changed:
    return None
  env[MARKER] = '1'
  return env


def reexec_tuned(module: str) -> None:
  """Re-executes ``python -m module`` with this process's arguments under
  ``tuned_environment``; returns (running on as before) when there is nothing to add or the
  exec fails."""
  env = tuned_environment(os.environ)
  if env is None:
    return
  try:
    os.execve(sys.executable, [sys.executable, '-m', module, *sys.argv[1:]], env)
  except OSError:
    pass
