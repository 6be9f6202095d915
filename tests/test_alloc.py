"""The large-allocation cache (``pemn_jax/native/alloc.cc``, preloaded by
``pemn_jax.native.process``): correct as malloc, and reusing freed blocks; the re-execution's
environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pemn_jax.native import build, process

pytestmark = pytest.mark.skipif(sys.platform != 'linux', reason='glibc interposition: Linux only')


@pytest.fixture(scope='module')
def alloc_path():
  try:
    return build.allocator_path()
  except RuntimeError as e:
    pytest.skip(str(e))


def _run(alloc_path, code: str, **env) -> dict:
  """Runs ``code`` in a fresh Python with the cache preloaded (none if ``alloc_path`` is None);
  returns its printed JSON."""
  env = dict(os.environ, PEMN_NO_REEXEC='1', **env)
  if alloc_path is not None:
    env['LD_PRELOAD'] = alloc_path
  proc = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(code)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


_C_API = """
  import ctypes, json
  from pemn_jax.native import process
  libc = ctypes.CDLL(None)
  V, S = ctypes.c_void_p, ctypes.c_size_t
  for name, res, args in [('malloc', V, [S]), ('calloc', V, [S, S]), ('realloc', V, [V, S]),
                          ('free', None, [V]), ('aligned_alloc', V, [S, S]),
                          ('memalign', V, [S, S]), ('malloc_usable_size', S, [V]),
                          ('memset', V, [V, ctypes.c_int, S])]:
    f = getattr(libc, name); f.restype = res; f.argtypes = args
  MB = 1 << 20
  out = {'loaded': process.allocator_loaded()}
"""


def test_large_blocks_are_reused_and_behave_as_malloc(alloc_path):
  """A freed large block serves the next request of its size (same address, no new mapping);
  calloc of a reused block is zero; realloc keeps the bytes; aligned requests are aligned (and
  memalign keeps glibc's rules for other alignments); usable sizes cover the request; small
  requests still go to glibc (outside the cache)."""
  code = (
    _C_API
    + """
  a = libc.malloc(8 * MB); libc.memset(a, 7, 8 * MB); libc.free(a)
  b = libc.malloc(8 * MB)
  out['same_address'] = a == b
  out['usable'] = libc.malloc_usable_size(b) >= 8 * MB
  libc.memset(b, 9, 8 * MB); libc.free(b)
  c = libc.calloc(2 * MB, 4)  # reuses the dirty block: must read as zero
  out['calloc_zero'] = ctypes.string_at(c, 8 * MB) == bytes(8 * MB)
  libc.memset(c, 5, 8 * MB)
  d = libc.realloc(c, 20 * MB)
  out['realloc_kept'] = ctypes.string_at(d, 8 * MB) == b'\\x05' * (8 * MB)
  e = libc.realloc(libc.malloc(1000), 6 * MB)  # a glibc block grown into the cache
  out['grown'] = e is not None
  f = libc.aligned_alloc(2 * MB, 10 * MB)
  out['aligned'] = f % (2 * MB) == 0
  g = libc.memalign(48, 8 * MB)  # not a power of two: glibc's memalign serves it
  out['memalign_any'] = g is not None
  libc.free(g)
  small = libc.malloc(100)
  out['small_usable'] = libc.malloc_usable_size(small) >= 100
  for p in (d, e, f, small): libc.free(p)
  libc.free(None)
  out.update(process.allocator_stats())
  print(json.dumps(out))
"""
  )
  out = _run(alloc_path, code)
  assert out['loaded'] and out['same_address'] and out['usable'] and out['calloc_zero']
  assert out['realloc_kept'] and out['grown'] and out['aligned'] and out['small_usable']
  assert out['memalign_any']
  assert out['reused'] >= 2 and out['live_bytes'] == 0 and out['to_glibc'] == 0
  assert out['cached_bytes'] > 0


def test_a_zero_cap_gives_the_pages_back(alloc_path):
  """PEMN_ALLOC_CACHE_MB=0: freed blocks keep no pages (a reused block reads as zero)."""
  code = (
    _C_API
    + """
  a = libc.malloc(8 * MB); libc.memset(a, 7, 8 * MB); libc.free(a)
  out['cached_after_free'] = process.allocator_stats()['cached_bytes']
  b = libc.malloc(8 * MB)
  out['zero'] = ctypes.string_at(b, 8 * MB) == bytes(8 * MB)
  libc.free(b)
  print(json.dumps(out))
"""
  )
  out = _run(alloc_path, code, PEMN_ALLOC_CACHE_MB='0')
  assert out == {'loaded': True, 'cached_after_free': 0, 'zero': True}


def test_a_jitted_step_computes_the_same_under_the_cache(alloc_path):
  """A jitted function with a large scratch buffer, called repeatedly: the same values as
  without the cache, and its buffers come from the cache after the first call."""
  code = """
    import json, jax, jax.numpy as jnp, numpy as np
    from pemn_jax.native import process
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2048, 1024)), jnp.float32)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x + jnp.sort(x, axis=0))
    ys = [np.asarray(f(x + i)).sum(dtype=np.float64) for i in range(4)]
    print(json.dumps({'sums': ys, 'stats': process.allocator_stats()}))
  """
  with_cache = _run(alloc_path, code)
  without = _run(None, code)
  assert with_cache['sums'] == without['sums'] and without['stats'] is None
  assert with_cache['stats']['reused'] >= 3


def test_tuned_environment(alloc_path, monkeypatch):
  """The re-execution adds the malloc tunable and the preload, once; each can be left out."""
  monkeypatch.setattr(process, 'allocator_loaded', lambda: False)
  env = process.tuned_environment({'PATH': '/bin', 'LD_PRELOAD': 'other.so'})
  assert env['GLIBC_TUNABLES'] == process.MALLOC_TUNABLE
  assert env['LD_PRELOAD'] == f'{alloc_path}:other.so' and env[process.MARKER] == '1'
  assert process.tuned_environment({**env}) is None  # the re-executed process stops there
  assert process.tuned_environment({'PEMN_NO_REEXEC': '1'}) is None
  env = process.tuned_environment({'PEMN_JAX_ALLOC': '0'})
  assert 'LD_PRELOAD' not in env and env['GLIBC_TUNABLES'] == process.MALLOC_TUNABLE
  assert process.tuned_environment({'PEMN_JAX_ALLOC': '0', 'GLIBC_TUNABLES': ''}) is None
  for bad in ('-1', 'lots', '1.5', ''):
    with pytest.raises(ValueError, match='PEMN_ALLOC_CACHE_MB must be a whole number'):
      process.tuned_environment({'PEMN_ALLOC_CACHE_MB': bad})
