"""Getting the native kernels into the process: compile ``kernels.cc``, cache it, load, register.

The source ships with the package and is compiled once per machine with the system C++ compiler
(``$CXX``, else ``g++``; C++20, ``-O3 -march=native``, or the portable build when the compiler
lacks ``-march=native``) against the FFI headers that jaxlib ships. The library is cached under
``$PEMN_JAX_CACHE_DIR`` (default ``~/.cache/pemn_jax``), keyed by the source, the compiler's
version, the jaxlib FFI header and the CPU, and written atomically (``fileio.atomic_write``), so
concurrent processes never load a half-written file. Each FFI target is then registered for the
CPU platform under its ``pemn_*`` name (``TARGETS``).

``CXX`` and ``PEMN_JAX_CACHE_DIR`` are the only environment variables read here: like ``CC`` for
any build, they describe the machine (which compiler, where its output may go), not the run.
Which kernels a run uses is the config's business (``model.native_kernels``, applied by
``pemn_jax.native.kernels``); nothing here reads it.

Any failure (no compiler, a compile error, a library that does not load) makes ``available()``
false, once per process, with the reason in ``unavailable_reason()`` and one warning logged; the
callers then use their pure-XLA formulations.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time

import jax

from pemn_jax import fileio

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kernels.cc')
FLAGS = ('-O3', '-march=native', '-std=c++20', '-shared', '-fPIC')
# FFI target name -> the symbol kernels.cc exports for it.
TARGETS = {
  'pemn_dw_fwd': 'PemnDwFwd',
  'pemn_dw_kgrad': 'PemnDwKgrad',
  'pemn_topk_mask': 'PemnTopkMask',
  'pemn_gelu_stats': 'PemnGeluStats',
  'pemn_gelu_bn_fwd': 'PemnGeluBnFwd',
  'pemn_gelu_bn_bstats': 'PemnGeluBnBwdStats',
  'pemn_gelu_bn_bwd': 'PemnGeluBnBwd',
}

_lock = threading.Lock()
_state: dict = {'tried': False, 'ok': False, 'reason': 'not loaded yet', 'path': None}


def cache_dir() -> str:
  """Where compiled libraries go: ``$PEMN_JAX_CACHE_DIR``, else ``~/.cache/pemn_jax``."""
  return os.environ.get('PEMN_JAX_CACHE_DIR') or os.path.join(
    os.path.expanduser('~'), '.cache', 'pemn_jax'
  )


def _cpu_signature() -> str:
  """The CPU model and feature flags: ``-march=native`` code is only valid on a CPU like this."""
  lines = []
  try:
    with open('/proc/cpuinfo') as f:
      for ln in f:
        if ln.startswith(('model name', 'flags', 'Features')):
          lines.append(ln.strip())
          if len(lines) >= 2:
            break
  except OSError:
    pass
  return '\n'.join(lines) + platform.machine()


def _library_path(compiler: str) -> str:
  version = subprocess.run(
    [compiler, '--version'], capture_output=True, text=True, timeout=30
  ).stdout
  h = hashlib.sha256()
  with open(SOURCE, 'rb') as f:
    h.update(f.read())
  with open(os.path.join(jax.ffi.include_dir(), 'xla', 'ffi', 'api', 'ffi.h'), 'rb') as f:
    h.update(f.read())
  for part in (version, ' '.join(FLAGS), _cpu_signature()):
    h.update(part.encode())
  return os.path.join(cache_dir(), f'kernels-{h.hexdigest()[:16]}.so')


def _build(compiler: str, path: str) -> None:
  """Compiles ``SOURCE`` to ``path``. The compiler writes into a private temporary directory;
  the finished library then reaches ``path`` through ``fileio.atomic_write``, so other processes
  see no file or a complete one, and a failed build leaves nothing in the cache."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  t0 = time.time()
  with tempfile.TemporaryDirectory(prefix='pemn_jax_build_') as tmpdir:
    out = os.path.join(tmpdir, 'kernels.so')
    # -march=native first; a compiler that lacks it gets the portable build (same code, the
    # vector types then lower to the baseline instruction set).
    for flags in (FLAGS, tuple(f for f in FLAGS if f != '-march=native')):
      cmd = [compiler, *flags, '-I', jax.ffi.include_dir(), SOURCE, '-o', out]
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
      if proc.returncode == 0:
        break
    else:
      tail = ' | '.join(proc.stderr.strip().splitlines()[-3:])  # one line, for CLI errors
      raise RuntimeError(f'{" ".join(cmd)} failed: {tail}')
    with open(out, 'rb') as f:
      fileio.atomic_write(path, f.read())
  # atomic_write's temporary file is private (0600); loading needs only read access, which a
  # cache dir shared by the machine's users must grant to all of them.
  os.chmod(path, 0o644)
  logging.info('pemn_jax.native: compiled %s in %.1f s', path, time.time() - t0)


def _load() -> None:
  compiler = os.environ.get('CXX') or 'g++'
  if shutil.which(compiler) is None:
    raise RuntimeError(f'no C++ compiler: {compiler!r} is not on PATH (set $CXX)')
  path = _library_path(compiler)
  if not os.path.exists(path):
    _build(compiler, path)
  lib = ctypes.CDLL(path)
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  _state['path'] = path


def available() -> bool:
  """True once the kernels are compiled, loaded and registered (tried once per process)."""
  with _lock:
    if not _state['tried']:
      _state['tried'] = True
      try:
        _load()
        _state.update(ok=True, reason=None)
      except Exception as e:  # noqa: BLE001 - any failure means: use the XLA formulation
        _state.update(ok=False, reason=f'{type(e).__name__}: {e}')
        logging.warning(
          'pemn_jax.native: native kernels unavailable (%s); using the pure-XLA formulations',
          _state['reason'],
        )
    return _state['ok']


def unavailable_reason() -> str | None:
  """Why ``available()`` is false (None when it is true)."""
  available()
  return _state['reason']
