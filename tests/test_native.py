"""The native kernels (pemn_jax.native): they load, they are exact, they fall back.

Values and gradients against brute-force float64 loops and XLA's conv, on shapes that reach
every code path of ``kernels.cc``: compile-time tap counts (3, 5, 7, 9) and the runtime one,
channel counts that leave a partial vector block, several kernel-gradient batch groups, pads
that are one-sided, wider than the kernel, or negative (crops). Also: the build cache, the
``model.native_kernels`` switch (``parse_kernels``, the ``kernels`` context at trace time, the
translation of the legacy environment variables), the errors of ``model.conv_impl='native'``,
and the per-shard calls under a data-parallel mesh (8 host devices, in a subprocess).
"""

from __future__ import annotations

import contextlib
import os
import textwrap
import threading

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pemn_jax import build, native, ops
from tests.test_ops_perf import _inputs, _reference, assert_vjp_matches_brute_force

TOL = dict(rtol=2e-5, atol=2e-5)


def test_native_kernels_load_on_this_machine():
  # CI builds them with the machine's g++; a silent fallback would hide a broken build.
  assert native.available(), native.unavailable_reason()
  assert native.unavailable_reason() is None
  assert os.path.exists(native.build._state['path'])


@pytest.mark.parametrize(
  'ksize, c, pads',
  [
    ((3, 3), 8, ((1, 1), (1, 1))),
    ((5, 5), 19, ((2, 2), (2, 2))),  # 19 channels: a partial vector block
    ((7, 7), 16, ((3, 3), (3, 3))),
    ((9, 9), 5, ((4, 4), (4, 4))),
    ((3, 5), 20, ((1, 3), (0, 2))),  # runtime tap count, one-sided pads
    ((3, 3), 3, ((4, 4), (5, 0))),  # pads wider than the kernel
    ((5, 3), 17, ((0, 0), (0, 0))),  # VALID
  ],
  ids=['3x3', '5x5-c19', '7x7', '9x9-c5', '3x5-onesided', 'oversized', '5x3-valid'],
)
def test_native_matches_brute_force(ksize, c, pads):
  native.available() or pytest.skip(native.unavailable_reason())
  x, kernel = _inputs((6, 11, 9, c), ksize, seed=3)
  fn = jax.jit(lambda x, k: ops.depthwise_shift_add(x, k, (1, 1), pads, use_native=True))
  assert_vjp_matches_brute_force(fn, x, kernel, pads, seed=4)


@pytest.mark.parametrize('batch', [1, 7, 12, 32])
def test_native_kernel_grad_groups(batch):
  """The kernel gradient's batch groups (several for narrow layers) sum to the full gradient."""
  native.available() or pytest.skip(native.unavailable_reason())
  assert batch % native.ops._groups(batch, 8) == 0
  x, kernel = _inputs((batch, 6, 5, 8), (3, 3), seed=batch)
  cot = jax.random.normal(jax.random.key(0), x.shape)
  dk = jax.jit(lambda x, g: native.depthwise_kernel_grad(x, g, (1, 1), 3, 3))(x, cot)
  _, vjp_ref = jax.vjp(lambda k: _reference(x, k, 'SAME'), kernel)
  chex.assert_trees_all_close(dk, vjp_ref(cot)[0], rtol=1e-5, atol=1e-4)


def _padded(x, pad, kh, kw):
  """``x`` (NHWC, float32) zero-padded for a same-size ``kh`` x ``kw`` window: ``pad`` leading."""
  n, h, w, c = x.shape
  xp = np.zeros((n, h + kh - 1, w + kw - 1, c), np.float32)
  xp[:, pad[0] : pad[0] + h, pad[1] : pad[1] + w] = x
  return xp


def _accumulate(acc, a, b, fused):
  """``acc + a * b`` in float32: one rounding (``fused``, an FMA: the float64 product is exact,
  so one rounding but for a rare double one) or two (product, then sum)."""
  if fused:
    return (np.asarray(a, np.float64) * b + acc).astype(np.float32)
  return acc + a * b


def _sequential_kernel_grad(x, g, pad, kh, kw, groups, fused):
  """Each group's ``dk`` summed one term at a time in (image, row, column) order, in float32
  (``_accumulate``); the cotangent ``g`` has ``x``'s size."""
  xp = _padded(x, pad, kh, kw)
  out = np.zeros((groups, kh, kw, x.shape[-1]), np.float32)
  per = x.shape[0] // groups
  for img in range(x.shape[0]):
    acc = out[img // per]
    for r in range(g.shape[1]):
      for s in range(g.shape[2]):
        acc[...] = _accumulate(acc, xp[img, r : r + kh, s : s + kw], g[img, r, s], fused)
  return out


def _sequential_depthwise(x, k, pad, fused):
  """The same-size depthwise conv of ``x`` with ``k`` (kh, kw, C), one tap at a time in
  (kernel row, kernel column) order, in float32 (``_accumulate``)."""
  kh, kw = k.shape[:2]
  n, h, w, c = x.shape
  xp = _padded(x, pad, kh, kw)
  acc = np.zeros(x.shape, np.float32)
  for i in range(kh):
    for j in range(kw):
      acc = _accumulate(acc, xp[:, i : i + h, j : j + w], k[i, j], fused)
  return acc


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize(
  'shape, ksize',
  [
    ((4, 6, 11, 40), (5, 5)),
    ((2, 7, 7, 16), (3, 3)),
    ((3, 5, 6, 24), (3, 5)),
    ((2, 9, 9, 8), (9, 9)),
  ],
  ids=['5x5-c40', '3x3', '3x5-runtime', '9x9'],
)
def test_depthwise_kernel_grad_sums_each_group_in_image_row_column_order(dtype, shape, ksize):
  """The kernel gradient's partial sums take their terms in a fixed order, so its values do not
  depend on how the work is split (channel blocks, output columns taken several at a time,
  threads): each group's sum equals the one-term-at-a-time float32 loop to the bit. Widths that
  leave a column tail, a partial channel block, the runtime tap count and 81 taps."""
  native.available() or pytest.skip(native.unavailable_reason())
  kh, kw = ksize
  pad = (kh // 2, kw // 2)
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
  groups = native.ops._groups(shape[0], shape[-1])
  call = lambda x, g: native.ops._call(  # noqa: E731
    'pemn_dw_kgrad', (groups, kh, kw, shape[-1]), x, g, pad_h=pad[0], pad_w=pad[1]
  )
  got = np.asarray(jax.jit(call)(x, g))
  x32, g32 = (np.asarray(a.astype(jnp.float32)) for a in (x, g))
  fused, plain = (_sequential_kernel_grad(x32, g32, pad, kh, kw, groups, f) for f in (True, False))
  assert np.array_equal(got, fused) or np.array_equal(got, plain), np.abs(got - fused).max()


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize(
  'shape, ksize',
  [
    ((2, 6, 19, 40), (5, 5)),
    ((2, 7, 7, 16), (3, 3)),
    ((3, 5, 12, 24), (3, 5)),
    ((1, 9, 9, 8), (9, 9)),
    ((16, 4, 9, 48), (3, 3)),
  ],
  ids=['5x5-c40', '3x3', '3x5-runtime', '9x9', 'batch16-c48'],
)
def test_depthwise_forward_sums_each_output_in_tap_order(dtype, shape, ksize):
  """The forward's outputs take their taps in the order (kernel row, kernel column), however
  many outputs of a row the kernel computes at once and however the channels are split into
  work items: each equals the one-tap-at-a-time float32 loop to the bit (widths that leave a
  column tail, a partial channel block, the runtime tap count, 81 taps; small batches, whose
  images are split into items by cache lines, and a batch of 16, whose items are whole images),
  then rounded to the dtype."""
  native.available() or pytest.skip(native.unavailable_reason())
  kh, kw = ksize
  pad = (kh // 2, kw // 2)
  rng = np.random.default_rng(sum(shape))
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
  k = jnp.asarray(rng.standard_normal((kh, kw, 1, shape[-1])), jnp.float32)
  got = np.asarray(jax.jit(lambda x, k: native.depthwise(x, k, pad, shape[1:3]))(x, k), np.float32)
  x32, k32 = np.asarray(x.astype(jnp.float32)), np.asarray(k, np.float32)[:, :, 0]
  outs = [
    np.asarray(jnp.asarray(_sequential_depthwise(x32, k32, pad, f)).astype(dtype), np.float32)
    for f in (True, False)
  ]
  assert np.array_equal(got, outs[0]) or np.array_equal(got, outs[1]), np.abs(got - outs[0]).max()


def test_native_negative_pads_crop():
  """``native.depthwise`` reads x as zero outside, and negative leading pads crop."""
  native.available() or pytest.skip(native.unavailable_reason())
  x, kernel = _inputs((2, 8, 8, 4), (3, 3), seed=1)
  y = native.depthwise(x, kernel, (-1, -2), (4, 3))
  full = _reference(x, kernel, 'VALID')  # y[p, q] = sum_ij x[p + i + 1, q + j + 2] k[i, j]
  chex.assert_trees_all_close(y, full[:, 1:5, 2:5], **TOL)


def test_conv_auto_uses_native_and_matches_xla():
  native.available() or pytest.skip(native.unavailable_reason())
  x, kernel = _inputs((4, 10, 10, 24), (5, 5), seed=2)
  loss = lambda impl: lambda x, k: jnp.sum(jnp.sin(ops.conv(x, k, (1, 1), 'SAME', 24, impl)))
  hlo = jax.jit(jax.grad(loss('auto'), argnums=(0, 1))).lower(x, kernel).as_text()
  assert hlo.count('pemn_dw_fwd') == 2 and hlo.count('pemn_dw_kgrad') == 1
  g = jax.jit(jax.grad(loss('auto'), argnums=(0, 1)))(x, kernel)
  g_ref = jax.grad(loss('xla'), argnums=(0, 1))(x, kernel)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-4)
  # 'fast' stays pure XLA; bfloat16 takes the kernels too (computed in float32 inside), float16
  # does not.
  assert 'pemn_dw' not in jax.jit(loss('fast')).lower(x, kernel).as_text()
  xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
  assert 'pemn_dw_kgrad' in jax.jit(jax.grad(loss('auto'), (0, 1))).lower(xb, kb).as_text()
  xh, kh = x.astype(jnp.float16), kernel.astype(jnp.float16)
  assert 'pemn_dw' not in jax.jit(loss('auto')).lower(xh, kh).as_text()


def test_native_impl_errors_name_the_field(monkeypatch):
  x, kernel = _inputs((2, 6, 6, 4), (3, 3))
  if native.available():
    with pytest.raises(ValueError, match=r"model.conv_impl='native' computes in float32"):
      ops.conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (1, 1), 'SAME', 4, 'native')
  _pretend_unavailable(monkeypatch)
  with pytest.raises(ValueError, match=r"conv_impl='native' needs the native kernels.*no C\+\+"):
    ops.conv(x, kernel, (1, 1), 'SAME', 4, 'native')
  # 'auto' falls back to the XLA formulation, with the same values.
  y = ops.conv(x, kernel, (1, 1), 'SAME', 4, 'auto')
  assert (
    'pemn_dw' not in jax.jit(lambda x: ops.conv(x, kernel, (1, 1), 'SAME', 4)).lower(x).as_text()
  )
  chex.assert_trees_all_close(y, _reference(x, kernel, 'SAME'), **TOL)


def test_validate_config_rejects_native_with_bfloat16():
  from pemn_jax.configs import convmixer_cifar10

  config = convmixer_cifar10.get_config()
  config.model.conv_impl = 'native'
  config.model.dtype = 'bfloat16'
  with pytest.raises(ValueError, match=r"model.conv_impl='native'.*model.dtype='float32'"):
    build.validate_config(config)
  config.model.conv_impl = 'nativ'
  with pytest.raises(ValueError, match=r"model.conv_impl must be one of .*'native'"):
    build.validate_config(ml_collections.ConfigDict(config))


def _pretend_unavailable(monkeypatch):
  monkeypatch.setitem(native.build._state, 'tried', True)
  monkeypatch.setitem(native.build._state, 'ok', False)
  monkeypatch.setitem(native.build._state, 'reason', 'RuntimeError: no C++ compiler')


def _stdout(proc) -> str:
  """A subprocess's stdout, once it exited 0 (``pemn_cli.python``'s result)."""
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_build_cache_and_switch(tmp_path, pemn_cli):
  """A fresh cache dir gets one complete library (no temp files left), readable by all; the
  legacy environment switch no longer reaches the build (the config field decides)."""
  native.available() or pytest.skip(native.unavailable_reason())
  code = textwrap.dedent("""
      from pemn_jax import native
      print(native.available(), native.unavailable_reason())
  """)
  run = lambda **env: _stdout(pemn_cli.python('-c', code, env=env, timeout=600))
  out = run(PEMN_JAX_CACHE_DIR=str(tmp_path))
  assert out.split() == ['True', 'None']
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith('kernels-') and files[0].endswith('.so')
  assert os.stat(tmp_path / files[0]).st_mode & 0o444 == 0o444
  assert run(PEMN_JAX_CACHE_DIR=str(tmp_path)).split() == ['True', 'None']  # cached
  assert os.listdir(tmp_path) == files
  assert run(PEMN_JAX_CACHE_DIR=str(tmp_path), PEMN_JAX_NATIVE='0').split() == [
    'True',
    'None',
  ]
  # A compiler that fails: a one-line reason, the XLA path, nothing left in the cache.
  broken = tmp_path / 'broken'
  out = run(PEMN_JAX_CACHE_DIR=str(broken), CXX='false')
  assert out.startswith('False RuntimeError: false -O3') and 'failed' in out
  assert len(out.strip().splitlines()) == 1 and os.listdir(broken) == []


@pytest.mark.slow
def test_native_under_data_parallel_mesh(pemn_cli):
  """Under the training loop's mesh (8 devices), the kernels run per batch shard: no gather of
  the batch, one kernel-gradient psum, the same values as XLA's conv."""
  native.available() or pytest.skip(native.unavailable_reason())
  code = textwrap.dedent(
    """
      import jax, jax.numpy as jnp
      from jax.sharding import NamedSharding, PartitionSpec as P
      from pemn_jax import ops, steps
      mesh, rep, batch = steps.mesh_and_shardings()
      x = jax.device_put(jax.random.normal(jax.random.key(0), (16, 8, 8, 32)), batch)
      k = jax.device_put(jax.random.normal(jax.random.key(1), (3, 3, 1, 32)), rep)
      loss = lambda impl: lambda x, k: jnp.sum(jnp.sin(ops.conv(x, k, (1, 1), 'SAME', 32, impl)))
      grad = jax.grad(loss('auto'), argnums=(0, 1))
      f = jax.jit(steps.in_mesh(grad, mesh), in_shardings=(batch, rep))
      hlo = f.lower(x, k).compile().as_text()
      dx, dk = f(x, k)
      rdx, rdk = jax.grad(loss('xla'), argnums=(0, 1))(x, k)
      plain = jax.jit(grad, in_shardings=(batch, rep)).lower(x, k).as_text()
      print(jax.device_count(), 'all-gather' in hlo, hlo.count('custom_call_target="pemn_dw'),
            'pemn_dw' in plain, float(jnp.abs(dx - rdx).max()), float(jnp.abs(dk - rdk).max()))
  """
  )
  out = _stdout(pemn_cli.python('-c', code, devices=8, timeout=600))
  devices, gathered, calls, plain_native, ddx, ddk = out.split()
  assert (devices, gathered, calls, plain_native) == ('8', 'False', '3', 'False')
  assert float(ddx) < 1e-4 and float(ddk) < 1e-3


@pytest.mark.parametrize(
  'n, kept', [(1, 1), (10, 1), (10, 5), (10, 9), (6400, 3200), (65536, 32768), (1000, 1000)]
)
def test_native_topk_mask_is_xlas_set(n, kept):
  """The same kept set as lax.top_k, including ties (index order), +-0, infinities and NaN."""
  native.available() or pytest.skip(native.unavailable_reason())
  rng = np.random.default_rng(n + kept)
  x = rng.integers(-4, 5, n).astype(np.float32) / 2  # many ties
  specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan], np.float32)
  x[rng.integers(0, n, min(n, 12))] = specials[rng.integers(0, 6, min(n, 12))]
  x = jnp.asarray(x.reshape(-1, 2) if n % 2 == 0 else x)
  got = jax.jit(lambda x: native.topk_mask(x, kept))(x)
  _, idx = jax.lax.top_k(x.reshape(-1), kept)
  want = jnp.zeros((n,), jnp.float32).at[idx].set(1).reshape(x.shape)
  assert got.shape == x.shape and got.dtype == jnp.float32
  np.testing.assert_array_equal(got, want)


def test_masking_uses_native_topk_on_cpu():
  from pemn_jax import masking

  native.available() or pytest.skip(native.unavailable_reason())
  x = jax.random.normal(jax.random.key(0), (64, 48))
  hlo = jax.jit(lambda x: masking.topk_mask(x, 0.3)).lower(x).as_text()
  assert 'pemn_topk_mask' in hlo and 'TopK' not in hlo
  assert int(masking.topk_mask(x, 0.3).sum()) == masking.num_kept(x.size, 0.3)
  # bfloat16 scores stay on lax.top_k.
  assert (
    'pemn_topk_mask'
    not in jax.jit(lambda x: masking.topk_mask(x, 0.3)).lower(x.astype(jnp.bfloat16)).as_text()
  )


def _gelu_bn_pair(x, train=True, save_gelu=True):
  """(fused, reference) apply functions of layers.gelu_batch_norm's two paths, same variables."""
  import flax.linen as nn

  from pemn_jax import layers

  class Fused(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.FusedGeluBatchNorm(name='bn', save_gelu=save_gelu)(x)

  class Ref(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.batch_norm(train)(name='bn')(layers.gelu(x))

  return Fused(), Ref()


@pytest.mark.parametrize('save_gelu', [True, False], ids=['gelu', 'input'])
@pytest.mark.parametrize(
  'shape', [(8, 5, 5, 24), (3, 7, 7, 19), (64, 300)], ids=['nhwc', 'odd-channels', 'rows']
)
def test_fused_gelu_batch_norm_matches_flax(shape, save_gelu):
  """Output, gradients (x, scale, bias) and the running-statistics update equal Flax's
  BatchNorm(gelu(x)) to float rounding, with the same variable tree, whichever residuals the
  fused form keeps."""
  native.available() or pytest.skip(native.unavailable_reason())
  fused, ref = _gelu_bn_pair(None, save_gelu=save_gelu)
  x = 1.5 * jax.random.normal(jax.random.key(0), shape) + 0.3
  v_ref = ref.init(jax.random.key(1), x)
  v = fused.init(jax.random.key(1), x)
  chex.assert_trees_all_equal_structs(v, v_ref)
  chex.assert_trees_all_close(v, v_ref)
  params = {
    'bn': {
      'scale': 1 + 0.1 * jnp.arange(shape[-1], dtype=jnp.float32),
      'bias': 0.05 * jnp.arange(shape[-1], dtype=jnp.float32),
    }
  }
  stats = {'bn': {'mean': 0.2 * jnp.ones(shape[-1]), 'var': 2 * jnp.ones(shape[-1])}}
  cot = jax.random.normal(jax.random.key(2), shape)

  def loss(model):
    def f(p, x):
      y, upd = model.apply({'params': p, 'batch_stats': stats}, x, mutable=['batch_stats'])
      return jnp.sum(y * cot), (y, upd)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

  (value, (y, upd)), g = loss(fused)(params, x)
  (value_ref, (y_ref, upd_ref)), g_ref = loss(ref)(params, x)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=2e-5)
  chex.assert_trees_all_close(upd, upd_ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_kernels_built_for_avx2_pass_the_kernel_tests():
  """The kernels' 8-lane code (AVX2 without AVX-512, the AMD kind's; no AVX512-BF16 rounding):
  built with ``-march=x86-64-v3`` in a fresh pytest session (conftest's ``PEMN_TEST_MARCH``),
  the depthwise, GELU+BN and bf16 kernel tests pass against the XLA formulations."""
  native.available() or pytest.skip(native.unavailable_reason())
  from pemn_jax.native import build as native_build

  'avx2' in native_build._cpu_flags() or pytest.skip('the CPU has no AVX2')
  import subprocess
  import sys

  from tests import conftest

  select = 'depthwise or gelu or exactly or topk'
  cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', 'not slow']
  cmd += ['-k', select, 'tests/test_native.py', 'tests/test_bf16.py']
  env = dict(os.environ, **{conftest.MARCH_VARIABLE: 'x86-64-v3'})
  run = subprocess.run(cmd, cwd=conftest.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
  assert ' passed' in run.stdout and ' skipped' not in run.stdout.splitlines()[-1], run.stdout[
    -500:
  ]


def test_fused_gelu_values_against_the_exact_erf():
  """The kernels' GELU against ``x Phi(x)`` in float64 (``math.erfc``) across [-10, 10]: within
  2e-7 relative or 2.5e-7 absolute (XLA's own exact-form GELU: 3.8e-7 absolute; a rational erf
  without exp measured 9e-7 in the negative tail, PERFORMANCE.md); NaN, +-inf and +-0 as XLA's
  exact-form GELU gives them (NaN, inf, NaN, 0)."""
  native.available() or pytest.skip(native.unavailable_reason())
  import math

  from pemn_jax.native import ops as native_ops

  x = np.concatenate([np.linspace(-10, 10, 400_000), [np.nan, np.inf, -np.inf, 0.0, -0.0]])
  x = np.pad(x, (0, -x.size % 16)).astype(np.float32).reshape(-1, 16)
  coef = jnp.stack([jnp.ones(16), jnp.zeros(16)])  # y = gelu(x) * 1 + 0
  fwd = jax.jit(lambda x: native_ops._call('pemn_gelu_bn_fwd', x.shape, x, coef, dtype=x.dtype))
  z = np.asarray(fwd(jnp.asarray(x))).ravel()
  xs = x.ravel().astype(np.float64)
  finite = np.isfinite(xs)
  exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in xs[finite]])
  err = np.abs(z[finite] - exact)
  assert np.all(err <= np.maximum(2e-7 * np.abs(exact), 2.5e-7)), err.max()
  special = z[400_000:400_005]
  assert np.isnan(special[0]) and special[1] == np.inf and np.isnan(special[2])
  assert special[3] == 0 and special[4] == 0


@pytest.mark.parametrize('channels', [256, 40])
def test_bf16_stored_gelu_is_the_float32_one_rounded_on_every_bit_pattern(channels):
  """The bfloat16 statistics pass stores ``gelu(x)`` and ``gelu'(x)`` exactly as the float32
  pass computes them, rounded to bfloat16 as XLA rounds: on every one of the 2^16 bfloat16 bit
  patterns (NaNs, infinities, denormals and both zeros included), full vectors and a partial
  last block alike (NaN where XLA's rounding is NaN)."""
  native.available() or pytest.skip(native.unavailable_reason())
  from pemn_jax.native import ops as native_ops

  bits = np.arange(1 << 16, dtype=np.uint32)
  bits = np.pad(bits, (0, -bits.size % channels))
  x32 = (bits << 16).view(np.float32).reshape(-1, channels)
  x16 = jnp.asarray(x32).astype(jnp.bfloat16)  # exact: every value is a bfloat16
  _, z16, d16 = jax.jit(native_ops._stats_save)(x16)
  _, z32, d32 = jax.jit(native_ops._stats_save)(jnp.asarray(x32))
  for got, want in ((z16, z32), (d16, d32)):
    want = np.asarray(want.astype(jnp.bfloat16)).view(np.uint16)
    got = np.asarray(got).view(np.uint16)
    nan = (want & 0x7FFF) > 0x7F80
    assert np.array_equal((got & 0x7FFF) > 0x7F80, nan)
    assert np.array_equal(got[~nan], want[~nan]), np.flatnonzero(got[~nan] != want[~nan])[:10]


@pytest.mark.parametrize('residuals', ['gelu', 'input'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gelu_batch_norm_with_residual_matches_flax(dtype, residuals):
  """``gelu_bn(x, residual)``: the fused add (``pemn_bn_add_fwd`` on the stored GELU, or
  ``pemn_gelu_bn_add_fwd``) gives Flax's ``residual + BatchNorm(gelu(x))``, and the same
  gradients for x, the residual, scale and bias (bfloat16: the fused sum is rounded once,
  Flax's twice, so to bfloat16 rounding)."""
  native.available() or pytest.skip(native.unavailable_reason())
  import flax.linen as nn

  from pemn_jax import layers

  class M(nn.Module):
    @nn.compact
    def __call__(self, x, r):
      return layers.gelu_batch_norm(True, dtype, residuals)(name='bn')(x, r)

  shape = (4, 5, 5, 40)
  x = (1.5 * jax.random.normal(jax.random.key(0), shape) + 0.3).astype(dtype)
  r = jax.random.normal(jax.random.key(1), shape).astype(dtype)
  cot = jax.random.normal(jax.random.key(2), shape).astype(dtype)
  v = M().init(jax.random.key(3), x, r)
  params = {'bn': {'scale': 1 + 0.1 * jnp.arange(40.0), 'bias': 0.05 * jnp.arange(40.0)}}

  def run(spec):
    with native.kernels(spec):

      def f(p, x, r):
        vs = {'params': p, 'batch_stats': v['batch_stats']}
        y, upd = M().apply(vs, x, r, mutable=['batch_stats'])
        return jnp.sum((y * cot).astype(jnp.float32)), (y, upd)

      fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
      return fn(params, x, r), fn.lower(params, x, r).as_text()

  ((_, (y, upd)), g), text = run('auto')
  ((_, (y_ref, upd_ref)), g_ref), text_ref = run('none')
  target = 'pemn_bn_add_fwd' if residuals == 'gelu' else 'pemn_gelu_bn_add_fwd'
  assert target in text and 'pemn_gelu' not in text_ref and 'pemn_bn' not in text_ref
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert y.dtype == dtype and g[1].dtype == g[2].dtype == dtype
  chex.assert_trees_all_close(y.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=tol, atol=tol)
  chex.assert_trees_all_close(upd, upd_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(g[2], cot)  # the residual's gradient is the cotangent itself
  _assert_close_in_f32(g, g_ref, 1e-4 if dtype == jnp.float32 else 5e-2)


def _assert_close_in_f32(got, want, tol):
  """Two trees equal within ``tol`` (relative and absolute), compared in float32."""
  chex.assert_trees_all_close(
    jax.tree.map(lambda a: a.astype(jnp.float32), got),
    jax.tree.map(lambda a: a.astype(jnp.float32), want),
    rtol=tol,
    atol=tol,
  )


def test_gelu_batch_norm_factory_paths():
  """Training float32 and bfloat16 take the fused kernels; eval, a dtype other than x's and
  float16 stay Flax."""
  native.available() or pytest.skip(native.unavailable_reason())
  import flax.linen as nn

  from pemn_jax import layers

  class M(nn.Module):
    train: bool
    dtype: object = None

    @nn.compact
    def __call__(self, x):
      return layers.gelu_batch_norm(self.train, self.dtype)(name='bn')(x)

  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 8))
  v = M(True).init(jax.random.key(0), x)
  hlo = lambda m, x: jax.jit(lambda x: m.apply(v, x, mutable=['batch_stats'])).lower(x).as_text()
  assert 'pemn_gelu_stats_save' in hlo(M(True), x) and 'pemn_bn_fwd' in hlo(M(True), x)
  assert 'pemn_gelu' not in jax.jit(lambda x: M(False).apply(v, x)).lower(x).as_text()
  assert 'pemn_gelu' not in hlo(M(True, jnp.bfloat16), x)  # x float32: Flax converts
  assert 'pemn_gelu_stats_save' in hlo(M(True, jnp.bfloat16), x.astype(jnp.bfloat16))
  assert 'pemn_gelu' not in hlo(M(True, jnp.float16), x.astype(jnp.float16))
  with pytest.raises(ValueError, match="residuals must be one of \\('gelu', 'input'\\)"):
    layers.gelu_batch_norm(True, None, 'output')


def _gelu_bn_reference(x, residual, scale, bias, epsilon=1e-5):
  """(y, mean, var) of BatchNorm(gelu(x)) (+ residual) in XLA, the GELU rounded to x's dtype
  first, statistics and arithmetic in float32."""
  z = jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype).astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = z.mean(axes)
  var = jnp.maximum((z * z).mean(axes) - mean * mean, 0.0)
  y = (z - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
  if residual is not None:
    y = y + residual.astype(jnp.float32)
  return y.astype(x.dtype), mean, var


@pytest.mark.parametrize('with_residual', [False, True], ids=['plain', 'residual'])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gelu_batch_norm_saved_values_and_all_three_vjps(dtype, with_residual):
  """``native.gelu_batch_norm_saved`` returns (y, mean, var) and differentiates all three
  exactly: a loss on every output (the statistics' cotangents included) has XLA's gradients
  for x, the residual, scale and bias; in float32 its y and gradients equal those of the
  recomputing form (``gelu_batch_stats`` then ``gelu_batch_norm[_add]``) to float rounding
  (the same kernel GELU: only XLA's fusion of the per-channel coefficients may differ)."""
  native.available() or pytest.skip(native.unavailable_reason())
  keys = jax.random.split(jax.random.key(0), 7)
  shape, c = (4, 5, 6, 40), 40
  x = (1.5 * jax.random.normal(keys[0], shape) + 0.3).astype(dtype)
  r = jax.random.normal(keys[1], shape).astype(dtype) if with_residual else None
  scale = 1 + 0.1 * jax.random.normal(keys[2], (c,))
  bias = 0.1 * jax.random.normal(keys[3], (c,))
  w, wm, wv = (jax.random.normal(k, s) for k, s in zip(keys[4:], (shape, (c,), (c,))))

  def loss(fn, with_stats=True):
    def f(x, r, scale, bias):
      y, mean, var = fn(x, r, scale, bias)
      out = jnp.sum(y.astype(jnp.float32) * w)
      return out + (jnp.sum(mean * wm) + jnp.sum(var * wv) if with_stats else 0.0)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))

  saved = lambda x, r, s, b: native.gelu_batch_norm_saved(x, r, s, b, 1e-5)
  got = jax.jit(saved)(x, r, scale, bias)
  want = jax.jit(_gelu_bn_reference)(x, r, scale, bias)
  assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == jnp.float32
  _assert_close_in_f32(got, want, 2e-5 if dtype == jnp.float32 else 2e-2)
  (_, g), (_, g_ref) = loss(saved)(x, r, scale, bias), loss(_gelu_bn_reference)(x, r, scale, bias)
  for a, b in zip(g, g_ref):
    if a is None:
      assert b is None and r is None
      continue
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    big = 1e-4 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(a, b, rtol=big, atol=big * float(jnp.max(jnp.abs(b))))
  if dtype == jnp.float32:

    def recomputing(x, r, scale, bias):
      mean, var = native.gelu_batch_stats(jax.lax.stop_gradient(x))
      if r is None:
        return native.gelu_batch_norm(x, scale, bias, mean, var, 1e-5), mean, var
      return native.gelu_batch_norm_add(x, r, scale, bias, mean, var, 1e-5), mean, var

    y_old = jax.jit(recomputing)(x, r, scale, bias)[0]
    np.testing.assert_allclose(got[0], y_old, rtol=1e-6, atol=1e-6)
    (_, g_saved) = loss(saved, with_stats=False)(x, r, scale, bias)
    (_, g_old) = loss(recomputing, with_stats=False)(x, r, scale, bias)
    chex.assert_trees_all_close(g_saved, g_old, rtol=2e-6, atol=2e-6)


def test_native_off_switch_and_require(monkeypatch):
  native.available() or pytest.skip(native.unavailable_reason())
  x = jnp.ones((2, 3, 3, 8))
  assert native.usable(x, feature='gelu_bn') and native.topk_usable(x)
  with native.kernels('depthwise'):
    assert not native.usable(x, feature='gelu_bn') and not native.topk_usable(x)
    assert native.usable(x, feature='depthwise')
  with pytest.raises(ValueError, match='feature must be one of'):
    native.enabled('gelu')
  _pretend_unavailable(monkeypatch)
  with pytest.raises(RuntimeError, match='kernels are unavailable: RuntimeError: no C'):
    native.topk_mask(x, 3)


# ---- The model.native_kernels switch -------------------------------------------------------


@pytest.mark.parametrize(
  'spec, want',
  [
    ('auto', {'depthwise', 'topk', 'gelu_bn', 'gemm', 'amx'}),
    ('none', set()),
    ('depthwise,topk', {'depthwise', 'topk'}),
    (' gelu_bn , topk ', {'gelu_bn', 'topk'}),
    ('topk', {'topk'}),
    ('topk,topk', {'topk'}),
  ],
)
def test_parse_kernels(spec, want):
  assert native.parse_kernels(spec) == frozenset(want)
  assert native.parse_kernels('auto') == frozenset(native.FEATURES)


@pytest.mark.parametrize(
  'spec, bad',
  [
    ('gelu', 'gelu'),
    ('depthwise,gelu', 'gelu'),
    ('auto,topk', 'auto'),  # 'auto' and 'none' stand alone
    ('none,topk', 'none'),
    ('', ''),
    ('topk,', ''),
    ('Auto', 'Auto'),
    (None, None),
  ],
)
def test_parse_kernels_rejects_naming_the_field(spec, bad):
  with pytest.raises(ValueError) as e:
    native.parse_kernels(spec)
  msg = str(e.value)
  assert msg.startswith('model.native_kernels must be ') and f'got {bad!r}' in msg
  assert "'auto', 'none'" in msg and str(native.FEATURES) in msg


def _enabled_set() -> set[str]:
  return {f for f in native.FEATURES if native.enabled(f)}


def test_kernels_context_nests_and_restores(monkeypatch):
  # enabled() without a compiled library: the switch is independent of the build.
  monkeypatch.setitem(native.build._state, 'tried', True)
  monkeypatch.setitem(native.build._state, 'ok', True)
  everything = set(native.FEATURES)
  assert _enabled_set() == everything  # the default, outside any context
  with native.kernels('none') as active:
    assert active == frozenset() and _enabled_set() == set()
    with native.kernels('topk,gelu_bn'):
      assert _enabled_set() == {'topk', 'gelu_bn'}
      with pytest.raises(KeyError):
        with native.kernels('depthwise'):
          assert _enabled_set() == {'depthwise'}
          raise KeyError('restored on the way out')
      assert _enabled_set() == {'topk', 'gelu_bn'}
      with native.kernels('auto'):
        assert _enabled_set() == everything
    assert _enabled_set() == set()
    # A new thread starts from the default, not from this thread's context.
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_enabled_set()))
    thread.start()
    thread.join()
    assert seen == [everything]
  assert _enabled_set() == everything
  with pytest.raises(ValueError, match='model.native_kernels'):
    with native.kernels('gelu'):
      pass
  assert _enabled_set() == everything
  # No library, no kernel, whatever the spec.
  _pretend_unavailable(monkeypatch)
  with native.kernels('auto'):
    assert _enabled_set() == set()


@pytest.mark.parametrize(
  'env, want',
  [
    ({}, None),
    ({'HOME': '/x'}, None),
    ({'PEMN_JAX_NATIVE': '1'}, None),
    ({'PEMN_JAX_NATIVE': ''}, None),
    ({'PEMN_JAX_NATIVE': 'on'}, None),
    ({'PEMN_JAX_NATIVE_OFF': ''}, None),
    ({'PEMN_JAX_NATIVE_OFF': ' , '}, None),
    ({'PEMN_JAX_NATIVE': '0'}, 'none'),
    ({'PEMN_JAX_NATIVE': 'False'}, 'none'),
    ({'PEMN_JAX_NATIVE': 'no'}, 'none'),
    ({'PEMN_JAX_NATIVE': ' OFF '}, 'none'),
    ({'PEMN_JAX_NATIVE_OFF': 'gelu_bn'}, 'depthwise,topk,gemm,amx'),
    ({'PEMN_JAX_NATIVE_OFF': 'topk, depthwise'}, 'gelu_bn,gemm,amx'),
    ({'PEMN_JAX_NATIVE_OFF': 'depthwise,topk,gelu_bn,gemm,amx'}, 'none'),
    ({'PEMN_JAX_NATIVE': '0', 'PEMN_JAX_NATIVE_OFF': 'topk'}, 'none'),
    ({'PEMN_JAX_NATIVE': '1', 'PEMN_JAX_NATIVE_OFF': 'topk'}, 'depthwise,gelu_bn,gemm,amx'),
  ],
)
def test_kernels_from_env(env, want):
  got = native.kernels_from_env(env)
  assert got == want
  if got is not None:
    native.parse_kernels(got)


@pytest.mark.parametrize(
  'env, match',
  [
    ({'PEMN_JAX_NATIVE': 'maybe'}, r"PEMN_JAX_NATIVE must be one of .*got 'maybe'"),
    ({'PEMN_JAX_NATIVE_OFF': 'topk,gelu'}, r"PEMN_JAX_NATIVE_OFF must be .*'gelu' in 'topk,gelu'"),
    ({'PEMN_JAX_NATIVE_OFF': 'none'}, r"PEMN_JAX_NATIVE_OFF must be .*got 'none'"),
  ],
)
def test_kernels_from_env_rejects(env, match):
  with pytest.raises(ValueError, match=match):
    native.kernels_from_env(env)


def _site_programs() -> dict:
  """Per feature, a function that traces (with a fresh jit) the caller that picks it: the masks'
  ``masking.topk_mask``, ``ops.conv`` with its gradient, and ``layers.gelu_batch_norm`` in
  training; each returns the lowered program's text."""
  import flax.linen as nn

  from pemn_jax import layers, masking

  class GeluBn(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.gelu_batch_norm(True)(name='bn')(x)

  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
  k = jax.random.normal(jax.random.key(1), (3, 3, 1, 8))
  scores = jax.random.normal(jax.random.key(2), (32, 16))
  with native.kernels('none'):  # same variables on both paths; no kernel needed to make them
    v = GeluBn().init(jax.random.key(3), x)
  conv_loss = lambda x, k: jnp.sum(jnp.sin(ops.conv(x, k, (1, 1), 'SAME', 8)))
  return {
    'topk': lambda: jax.jit(lambda s: masking.topk_mask(s, 0.5)).lower(scores).as_text(),
    'depthwise': lambda: jax.jit(jax.grad(conv_loss, argnums=(0, 1))).lower(x, k).as_text(),
    'gelu_bn': lambda: (
      jax.jit(lambda x: GeluBn().apply(v, x, mutable=['batch_stats'])).lower(x).as_text()
    ),
  }


def test_kernels_none_traces_pure_xla():
  """Under ``kernels('none')`` no caller emits a native custom call (compiler or not)."""
  for feature, program in _site_programs().items():
    with native.kernels('none'):
      text = program()
    assert 'pemn_' not in text, feature


@pytest.mark.parametrize('spec', [None, 'auto', 'depthwise', 'topk', 'gelu_bn', 'depthwise,topk'])
def test_kernels_spec_picks_the_native_sites(spec):
  """Each caller takes its kernel exactly when the active spec (default: all) names it."""
  native.available() or pytest.skip(native.unavailable_reason())
  programs = _site_programs()
  with native.kernels(spec) if spec else contextlib.nullcontext():
    texts = {feature: program() for feature, program in programs.items()}
  on = native.parse_kernels(spec or 'auto')
  for feature, text in texts.items():
    assert ('pemn_' in text) == (feature in on), feature


@pytest.mark.slow
@pytest.mark.parametrize('residuals', ['gelu', 'input'])
def test_fused_gelu_batch_norm_under_data_parallel_mesh(pemn_cli, residuals):
  """Per-shard kernels with psum-ed statistics equal the single-device computation."""
  native.available() or pytest.skip(native.unavailable_reason())
  code = textwrap.dedent(
    """
      import jax, jax.numpy as jnp
      import flax.linen as nn
      from pemn_jax import layers, steps
      mesh, rep, batch = steps.mesh_and_shardings()
      class M(nn.Module):
        @nn.compact
        def __call__(self, x):
          return layers.gelu_batch_norm(True, None, RESIDUALS)(name='bn')(x)
      x = jax.random.normal(jax.random.key(0), (16, 4, 4, 24)) + 0.5
      v = M().init(jax.random.key(1), x)
      cot = jax.random.normal(jax.random.key(2), x.shape)
      def f(p, x):
        y, upd = M().apply({'params': p, 'batch_stats': v['batch_stats']}, x,
                           mutable=['batch_stats'])
        return jnp.sum(y * cot), upd
      g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
      sharded = jax.jit(steps.in_mesh(g, mesh), in_shardings=(rep, batch))
      hlo = sharded.lower(v['params'], x).compile().as_text()
      (val, upd), grads = sharded(v['params'], jax.device_put(x, batch))
      (val1, upd1), grads1 = jax.jit(g)(v['params'], x)  # no mesh: plain Flax path
      err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves((upd, grads)), jax.tree.leaves((upd1, grads1))))
      calls = sum(hlo.count(f'custom_call_target="pemn_{k}') for k in ('gelu', 'bn'))
      print('all-gather' in hlo, calls, err, abs(float(val - val1)))
  """
  ).replace('RESIDUALS', repr(residuals))
  out = _stdout(pemn_cli.python('-c', code, devices=8, timeout=600))
  gathered, calls, err, dval = out.split()
  assert (gathered, calls) == ('False', '4')
  assert float(err) < 1e-4 and float(dval) < 1e-3


@pytest.mark.parametrize('channels', [256, 40])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_native_add_and_fork_match_xla_bit_for_bit(dtype, channels):
  """``native.add`` is XLA's ``a + b`` to the bit (summed in float32, rounded once), and
  ``native.fork``'s VJP, which calls it, gives the gradient autodiff gives when ``x`` is simply
  used twice: to the bit in bfloat16, to float rounding in float32 (where XLA may fuse the
  sum with a product into one FMA)."""
  native.available() or pytest.skip(native.unavailable_reason())
  keys = jax.random.split(jax.random.key(3), 4)
  shape = (3, 5, 7, channels)
  a, b, w1, w2 = (jax.random.normal(k, shape).astype(dtype) for k in keys)
  np.testing.assert_array_equal(jax.jit(native.add)(a, b), jax.jit(jnp.add)(a, b))

  def loss(split):
    def f(x):
      p, q = split(x)
      return jnp.sum((p * w1).astype(jnp.float32)) + jnp.sum((jnp.sin(q) * w2).astype(jnp.float32))

    return jax.jit(jax.grad(f))

  got, want = loss(native.fork)(a), loss(lambda x: (x, x))(a)
  assert got.dtype == dtype
  if dtype == jnp.bfloat16:
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert 'pemn_add' in jax.jit(jax.grad(lambda x: jnp.sum(native.fork(x)[1]))).lower(a).as_text()


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_convmixer_block_input_forks_natively_in_bf16_training(dtype):
  """A bfloat16 ConvMixer's training gradient sums each block input's two cotangents in the
  native add (``layers.fork``); float32 and the pure-XLA setting leave that sum to XLA."""
  native.available() or pytest.skip(native.unavailable_reason())
  from pemn_jax.models.convmixer import ConvMixer

  model = ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3), dtype)
  variables = model.init(jax.random.key(1), x, train=False)

  def grad_hlo(spec):
    def loss(params):
      out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(out)

    with native.kernels(spec):
      return jax.jit(jax.grad(loss)).lower(variables['params']).as_text()

  assert ('pemn_add' in grad_hlo('auto')) == (dtype == jnp.bfloat16)
  assert 'pemn_add' not in grad_hlo('none')


def test_fork_under_data_parallel_mesh(pemn_cli):
  """Under a data mesh the native add of ``fork``'s VJP runs per shard (no gather) and gives
  the single-device gradient to the bit."""
  native.available() or pytest.skip(native.unavailable_reason())
  code = textwrap.dedent(
    """
      import jax, jax.numpy as jnp
      from pemn_jax import layers, steps
      mesh, rep, batch = steps.mesh_and_shardings()
      x = jax.random.normal(jax.random.key(0), (16, 4, 4, 24)).astype(jnp.bfloat16)
      w = jax.random.normal(jax.random.key(1), x.shape).astype(jnp.bfloat16)
      def f(x):
        p, q = layers.fork(x)
        return jnp.sum((p * w).astype(jnp.float32)) + jnp.sum(jnp.sin(q).astype(jnp.float32))
      sharded = jax.jit(steps.in_mesh(jax.grad(f), mesh), in_shardings=(batch,))
      hlo = sharded.lower(x).compile().as_text()
      g = sharded(jax.device_put(x, batch))
      g1 = jax.jit(jax.grad(lambda x: f(x)))(x)
      print('all-gather' in hlo, 'pemn_add' in hlo, bool(jnp.all(g == g1)))
  """
  )
  out = _stdout(pemn_cli.python('-c', code, devices=8, timeout=600))
  assert out.split() == ['False', 'True', 'True']
