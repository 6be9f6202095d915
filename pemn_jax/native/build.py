"""Getting the native kernels into the process: compile ``kernels.cc``, cache it, load, register.

The source ships with the package and is compiled once per machine with the system C++ compiler
(``$CXX``, else ``g++``; C++20, ``-O3 -march=native``, or the portable build when the compiler
lacks ``-march=native``) against the FFI headers that jaxlib ships. The library is cached under
``$PEMN_JAX_CACHE_DIR`` (default ``~/.cache/pemn_jax``), keyed by the source, the compiler's
version, the jaxlib FFI header and the CPU, and written atomically (``fileio.atomic_write``), so
concurrent processes never load a half-written file. Each FFI target is then registered for the
CPU platform under its ``pemn_*`` name (``TARGETS``).

``CXX``, ``PEMN_JAX_CACHE_DIR``, ``MKLROOT`` and ``DNNLROOT`` are the only environment variables
read here: like ``CC`` for any build, they describe the machine (which compiler, where its
output may go, where Intel MKL or oneDNN is), not the run.

The bfloat16 GEMM kernel (``pemn_gemm_bf16``) calls MKL's ``cblas_gemm_bf16bf16f32`` or
oneDNN's ``dnnl_gemm_bf16bf16f32``, loaded at run time from ``$MKLROOT/lib`` or this Python's
``lib`` (the ``mkl`` or ``onednn-cpu-gomp`` wheel, ``requirements-gemm.txt``; or
``$DNNLROOT/lib``), only on a CPU with
AMX-BF16 or AVX512-BF16: ``gemm_available()``, ``gemm_unavailable_reason()``,
``gemm_candidates()``. Nothing is compiled against either, so the kernels build and load the
same without them.
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
# The large-allocation cache, preloaded into a process at its start (pemn_jax.native.process).
ALLOC_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'alloc.cc')
ALLOC_FLAGS = ('-O2', '-std=c++20', '-shared', '-fPIC')
FLAGS = ('-O3', '-march=native', '-std=c++20', '-shared', '-fPIC')
# FFI target name -> the symbol kernels.cc exports for it.
TARGETS = {
  'pemn_dw_fwd': 'PemnDwFwd',
  'pemn_dw_kgrad': 'PemnDwKgrad',
  'pemn_topk_mask': 'PemnTopkMask',
  'pemn_gelu_stats': 'PemnGeluStats',
  'pemn_gelu_bn_fwd': 'PemnGeluBnFwd',
  'pemn_gelu_bn_add_fwd': 'PemnGeluBnAddFwd',
  'pemn_gelu_bn_bstats': 'PemnGeluBnBwdStats',
  'pemn_gelu_bn_bwd': 'PemnGeluBnBwd',
  'pemn_gelu_stats_save': 'PemnGeluStatsSave',
  'pemn_bn_fwd': 'PemnBnFwd',
  'pemn_bn_add_fwd': 'PemnBnAddFwd',
  'pemn_add': 'PemnAdd',
  'pemn_bn_bstats': 'PemnBnBwdStats',
  'pemn_bn_bwd_saved': 'PemnBnBwdSaved',
  'pemn_gemm_bf16': 'PemnGemmBf16',
  'pemn_matmul_amx': 'PemnMatmulAmx',
}
# CPU flags under which a BLAS's bfloat16 GEMM runs in hardware (else MKL emulates it, slowly).
BF16_GEMM_FLAGS = ('amx_bf16', 'avx512_bf16')

_lock = threading.Lock()
_state: dict = {
  'tried': False,
  'ok': False,
  'reason': 'not loaded yet',
  'path': None,
  'gemm': None,  # the BLAS library behind pemn_gemm_bf16, or None
  'gemm_reason': 'not loaded yet',
  'amx': False,  # pemn_matmul_amx can run: built for AMX-BF16 and granted the tile state
}


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


def _compiler() -> tuple[str, str]:
  """The C++ compiler (``$CXX``, else ``g++``) and its ``--version`` text; raises RuntimeError
  when it is not on PATH."""
  compiler = os.environ.get('CXX') or 'g++'
  if shutil.which(compiler) is None:
    raise RuntimeError(f'no C++ compiler: {compiler!r} is not on PATH (set $CXX)')
  version = subprocess.run(
    [compiler, '--version'], capture_output=True, text=True, timeout=30
  ).stdout
  return compiler, version


def _library_path(version: str) -> str:
  h = hashlib.sha256()
  with open(SOURCE, 'rb') as f:
    h.update(f.read())
  with open(os.path.join(jax.ffi.include_dir(), 'xla', 'ffi', 'api', 'ffi.h'), 'rb') as f:
    h.update(f.read())
  for part in (version, ' '.join(FLAGS), _cpu_signature()):
    h.update(part.encode())
  return os.path.join(cache_dir(), f'kernels-{h.hexdigest()[:16]}.so')


def _build(path: str, commands: list[list[str]]) -> None:
  """Compiles a library to ``path`` with the first of ``commands`` that succeeds (each a
  compiler command line ending in ``-o``; the output file is appended). The compiler writes into
  a private temporary directory; the finished library then reaches ``path`` through
  ``fileio.atomic_write``, so other processes see no file or a complete one, and a failed build
  leaves nothing in the cache."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  t0 = time.time()
  with tempfile.TemporaryDirectory(prefix='pemn_jax_build_') as tmpdir:
    out = os.path.join(tmpdir, os.path.basename(path))
    for cmd in commands:
      cmd = [*cmd, out]
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


def allocator_path() -> str:
  """The large-allocation cache (``alloc.cc``) compiled for this machine, from the cache or
  built now (atomically, as the kernels are); raises RuntimeError why not (no compiler, a
  failed build). Linux with glibc only: it interposes glibc's malloc."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    raise RuntimeError('the allocation cache needs Linux with glibc')
  compiler, version = _compiler()
  h = hashlib.sha256()
  with open(ALLOC_SOURCE, 'rb') as f:
    h.update(f.read())
  h.update((version + ' '.join(ALLOC_FLAGS) + platform.machine()).encode())
  path = os.path.join(cache_dir(), f'alloc-{h.hexdigest()[:16]}.so')
  if not os.path.exists(path):
    _build(path, [[compiler, *ALLOC_FLAGS, ALLOC_SOURCE, '-ldl', '-o']])
  return path


def _load() -> None:
  compiler, version = _compiler()
  path = _library_path(version)
  if not os.path.exists(path):
    # -march=native first; a compiler that lacks it gets the portable build (same code, the
    # vector types then lower to the baseline instruction set).
    portable = tuple(f for f in FLAGS if f != '-march=native')
    include = ['-I', jax.ffi.include_dir()]
    _build(path, [[compiler, *flags, *include, SOURCE, '-o'] for flags in (FLAGS, portable)])
  lib = ctypes.CDLL(path)
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform='cpu')
  _state['path'] = path
  _state['amx'] = bool(lib.PemnAmxReady())
  try:
    _state['gemm'] = _load_gemm(lib)
    _state['gemm_reason'] = None
  except Exception as e:  # noqa: BLE001 - no BLAS: the bfloat16 GEMMs stay in XLA
    _state['gemm'], _state['gemm_reason'] = None, f'{type(e).__name__}: {e}'


def _cpu_flags() -> set[str]:
  try:
    with open('/proc/cpuinfo') as f:
      for ln in f:
        if ln.startswith('flags'):
          return set(ln.split(':', 1)[1].split())
  except OSError:
    pass
  return set()


def gemm_candidates() -> list[tuple[str, str]]:
  """(kind, path) of the bf16 GEMM libraries found, in order of preference: MKL's single
  dynamic library in ``$MKLROOT/lib``, then in this Python's prefix (the ``mkl`` wheel puts it
  in e.g. ``.venv/lib``); then oneDNN's ``libdnnl.so.3`` in ``$DNNLROOT/lib``, then there (the
  ``onednn-cpu-gomp`` wheel)."""
  import glob
  import sys

  prefix = os.path.join(sys.prefix, 'lib')
  found = []
  for kind, root, pattern in (
    ('mkl', 'MKLROOT', 'libmkl_rt.so*'),
    ('onednn', 'DNNLROOT', 'libdnnl.so.3*'),
  ):
    dirs = [os.path.join(os.environ[root], 'lib')] if os.environ.get(root) else []
    for d in [*dirs, prefix]:
      found += [(kind, p) for p in sorted(glob.glob(os.path.join(d, pattern)), key=len)]
  return found


def _load_gemm(lib) -> str:
  """Hands a bf16 GEMM to the kernels: MKL's ``cblas_gemm_bf16bf16f32`` (sequential, LP64; the
  kernel splits the rows over XLA's pool), else oneDNN's ``dnnl_gemm_bf16bf16f32``. Returns
  ``'KIND PATH'``; raises why none."""
  flags = _cpu_flags()
  if not flags & set(BF16_GEMM_FLAGS):
    raise RuntimeError(f'the CPU has none of {BF16_GEMM_FLAGS}')
  found = gemm_candidates()
  if not found:
    raise RuntimeError(
      'no bf16 GEMM library found (pip install -r requirements-gemm.txt; or set $DNNLROOT '
      'or $MKLROOT)'
    )
  kind, path = found[0]
  blas = ctypes.CDLL(path)
  if kind == 'mkl':
    blas.MKL_Set_Threading_Layer(ctypes.c_int(1))  # MKL_THREADING_SEQUENTIAL
    blas.MKL_Set_Interface_Layer(ctypes.c_int(0))  # MKL_INTERFACE_LP64: 32-bit integers
    fn, code = blas.cblas_gemm_bf16bf16f32, 0
  else:
    fn, code = blas.dnnl_gemm_bf16bf16f32, 1
  lib.PemnSetGemmBf16.argtypes = [ctypes.c_void_p, ctypes.c_int]
  lib.PemnSetGemmBf16(ctypes.cast(fn, ctypes.c_void_p), code)
  _state['gemm_lib'] = blas  # kept loaded for the life of the process
  return f'{kind} {path}'


def gemm_available() -> bool:
  """True when ``pemn_gemm_bf16`` has a library behind it (MKL or oneDNN found, on a CPU with
  bf16 GEMMs)."""
  return available() and _state['gemm'] is not None


def amx_available() -> bool:
  """True when ``pemn_matmul_amx`` runs here: the kernels were built for a CPU with AMX-BF16
  (``-march=native``) and Linux granted the process the tile state."""
  return available() and _state['amx']


def gemm_unavailable_reason() -> str | None:
  """Why ``gemm_available()`` is false (None when it is true)."""
  if not available():
    return unavailable_reason()
  return _state['gemm_reason']


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
