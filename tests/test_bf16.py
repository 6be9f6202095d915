"""The bfloat16 compute path on the CPU: fast matrix products and the native kernels in bf16.

``model.dtype=bfloat16`` runs (a) the layers' matrix products as ``ops.dot_bf16`` (bf16 inputs,
fp32 accumulation, one rounding) where the CPU has bf16 GEMM hardware, else in fp32; (b) the
native depthwise-conv and GELU+BN kernels with bf16 arrays, computed in fp32 inside the call.
Each is checked against the XLA formulation on random inputs, values and gradients, both
against fp32 arithmetic on the same (bf16-rounded) inputs, with a bf16 tolerance (a few units
of bf16's 2^-8 relative rounding), and against XLA's own bf16 formulation.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import native, ops
from tests.test_ops_perf import _inputs, _reference

BF16, F32 = jnp.bfloat16, jnp.float32


ON_CPU = jax.default_backend() == 'cpu'
cpu_only = pytest.mark.skipif(not ON_CPU, reason='the CPU formulations (native kernels, dispatch)')


def _close(a, b, rel=2e-2):
  """Equal to a bf16 tolerance, relative to the reference's scale."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  scale = float(np.max(np.abs(b))) or 1.0
  np.testing.assert_allclose(a, b, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize('shape', [(64, 48, 40), (300, 17, 5)], ids=['even', 'odd'])
def test_dot_bf16_matches_float32_and_xla(shape):
  m, k, n = shape
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (m, k)).astype(BF16)
  w = jax.random.normal(kw, (k, n)).astype(BF16)
  cot = jax.random.normal(kg, (m, n)).astype(BF16)

  def vjp(fn, x, w):
    y, pull = jax.vjp(fn, x, w)
    return (y, *pull(cot.astype(y.dtype)))

  got = jax.jit(lambda x, w: vjp(ops.dot_bf16, x, w))(x, w)
  assert [a.dtype for a in got] == [BF16] * 3
  ref32 = vjp(jnp.dot, x.astype(F32), w.astype(F32))  # the same inputs, fp32 arithmetic
  ref16 = vjp(jnp.dot, x, w)  # XLA's bf16 formulation
  for a, b, c in zip(got, ref32, ref16, strict=True):
    _close(a, b, rel=1e-2)  # one bf16 rounding of an fp32 sum
    _close(a, c)


@cpu_only
def test_matmul_dispatch(monkeypatch):
  """bf16 on the CPU: fp32-accumulating products where the CPU has bf16 GEMMs, fp32 products
  without; other dtypes: jnp.dot. Leading axes are flattened and restored."""
  x = jax.random.normal(jax.random.key(1), (3, 5, 16)).astype(BF16)
  w = jax.random.normal(jax.random.key(2), (16, 8)).astype(BF16)
  fwd = 'tensor<15x16xbf16>, tensor<16x8xbf16>) -> tensor<15x8xf32>'
  dx = 'tensor<15x8xbf16>, tensor<16x8xbf16>) -> tensor<15x16xf32>'
  hlo = lambda f: jax.jit(lambda x, w: f(x, w)).lower(x, w).as_text()  # a fresh trace each
  grad = jax.grad(lambda x, w: ops.matmul(x, w).astype(F32).sum(), (0, 1))
  monkeypatch.setattr(ops, 'cpu_has_bf16_gemm', lambda: True)
  assert fwd in hlo(ops.matmul) and dx in hlo(grad)
  y_fast = ops.matmul(x, w)
  monkeypatch.setattr(ops, 'cpu_has_bf16_gemm', lambda: False)
  assert fwd not in hlo(ops.matmul) and dx not in hlo(grad)
  y_fp32 = ops.matmul(x, w)
  assert y_fast.shape == y_fp32.shape == (3, 5, 8) and y_fast.dtype == BF16
  _close(y_fast, jnp.dot(x.astype(F32), w.astype(F32)), rel=1e-2)
  chex.assert_trees_all_close(y_fast.astype(F32), y_fp32.astype(F32))  # same rounding
  xf = x.astype(F32)
  assert ops.matmul(xf, w.astype(F32)).dtype == F32


def test_cpu_has_bf16_gemm_reads_cpu_flags():
  with open('/proc/cpuinfo') as f:
    flags = next((ln for ln in f if ln.startswith('flags')), '').split()
  assert ops.cpu_has_bf16_gemm() == bool({'amx_bf16', 'avx512_bf16'} & set(flags))


@cpu_only
@pytest.mark.parametrize('pads', ['SAME', ((1, 3), (0, 2))], ids=['same', 'onesided'])
@pytest.mark.parametrize('channels', [19, 40])  # a work item's line of blocks: full, partial
def test_native_depthwise_bf16_matches_float32(pads, channels):
  native.available() or pytest.skip(native.unavailable_reason())
  x, kernel = _inputs((6, 9, 8, channels), (5, 5), seed=5)
  xb, kb = x.astype(BF16), kernel.astype(BF16)
  cot = jax.random.normal(jax.random.key(6), (6, 9, 8, channels))
  if pads != 'SAME':
    cot = jax.random.normal(jax.random.key(6), _reference(x, kernel, pads).shape)

  def vjp(conv, x, k):
    y, pull = jax.vjp(conv, x, k)
    return (y, *pull(cot.astype(y.dtype)))

  native_fn = lambda x, k: ops.conv(x, k, (1, 1), pads, x.shape[-1], 'auto')
  fn = jax.jit(lambda x, k: vjp(native_fn, x, k))
  assert 'pemn_dw_kgrad' in fn.lower(xb, kb).as_text()
  got = fn(xb, kb)
  assert [a.dtype for a in got] == [BF16] * 3
  ref32 = vjp(lambda x, k: _reference(x, k, pads), xb.astype(F32), kb.astype(F32))
  xla16 = jax.jit(
    lambda x, k: vjp(lambda x, k: ops.conv(x, k, (1, 1), pads, channels, 'fast'), x, k)
  )
  ref16 = xla16(xb, kb)
  for a, b, c in zip(got, ref32, ref16, strict=True):
    _close(a, b, rel=1e-2)
    _close(a, c)


@cpu_only
@pytest.mark.parametrize('save_gelu', [True, False], ids=['gelu', 'input'])
def test_fused_gelu_batch_norm_bf16_matches_flax(save_gelu):
  """bf16 x: the fused kernels' output, gradients and running statistics match Flax's
  BatchNorm(gelu(x), dtype=bf16) (statistics and parameters fp32 in both), whichever
  residuals the fused form keeps."""
  native.available() or pytest.skip(native.unavailable_reason())
  import flax.linen as nn

  from pemn_jax import layers

  class M(nn.Module):
    fused: bool

    @nn.compact
    def __call__(self, x):
      if self.fused:
        return layers.FusedGeluBatchNorm(name='bn', save_gelu=save_gelu)(x)
      return layers.batch_norm(True, BF16)(name='bn')(layers.gelu(x))

  shape = (8, 5, 5, 24)
  x = (1.5 * jax.random.normal(jax.random.key(0), shape) + 0.3).astype(BF16)
  cot = jax.random.normal(jax.random.key(2), shape).astype(BF16)
  v = M(False).init(jax.random.key(1), x)
  params = {
    'bn': {
      'scale': 1 + 0.1 * jnp.arange(shape[-1], dtype=F32),
      'bias': 0.05 * jnp.arange(shape[-1], dtype=F32),
    }
  }

  def run(fused):
    def f(p, x):
      y, upd = M(fused).apply(
        {'params': p, 'batch_stats': v['batch_stats']}, x, mutable=['batch_stats']
      )
      return jnp.sum(y.astype(F32) * cot.astype(F32)), (y, upd)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)

  (_, (y, upd)), (gp, gx) = run(True)
  (_, (y_ref, upd_ref)), (gp_ref, gx_ref) = run(False)
  assert y.dtype == y_ref.dtype == BF16 and gx.dtype == BF16
  _close(y, y_ref)
  _close(gx, gx_ref)
  for a, b in zip(jax.tree.leaves((gp, upd)), jax.tree.leaves((gp_ref, upd_ref)), strict=True):
    assert a.dtype == b.dtype == F32
    _close(a, b)


# ---- A library's bf16 GEMM through the FFI (native feature 'gemm'; where MKL or oneDNN is) ---


def _need_gemm():
  native.available() or pytest.skip(native.unavailable_reason())
  native.gemm_available() or pytest.skip(native.gemm_unavailable_reason())


@cpu_only
@pytest.mark.parametrize('k', [37, 1299], ids=['short', 'long'])
@pytest.mark.parametrize('trans', [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_bf16_matches_xla(trans, k):
  """op(a) @ op(b) of the BLAS equals XLA's fp32-accumulated product (odd sizes: partial row
  blocks), for each transpose, with a short and a long contraction."""
  _need_gemm()
  m, n = 101, 19
  ta, tb = trans
  a = jax.random.normal(jax.random.key(0), (k, m) if ta else (m, k)).astype(BF16)
  b = jax.random.normal(jax.random.key(1), (n, k) if tb else (k, n)).astype(BF16)
  got = jax.jit(lambda a, b: native.gemm_bf16(a, b, bool(ta), bool(tb)))(a, b)
  ref = jnp.dot(a.T if ta else a, b.T if tb else b, preferred_element_type=F32)
  assert got.dtype == F32 and got.shape == (m, n)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@cpu_only
def test_dot_bf16_takes_the_gemm_kernel_and_matches_xla():
  """With 'gemm' on, dot_bf16's weight gradient is the BLAS's (the forward and input gradient
  stay XLA's, faster there); values and gradients equal the XLA formulation's (kernels without
  'gemm') up to the last bf16 rounding."""
  _need_gemm()
  x = jax.random.normal(jax.random.key(0), (200, 48)).astype(BF16)
  w = jax.random.normal(jax.random.key(1), (48, 24)).astype(BF16)
  cot = jax.random.normal(jax.random.key(2), (200, 24)).astype(BF16)

  def run(spec):
    with native.kernels(spec):
      fn = jax.jit(lambda x, w: (lambda y, pull: (y, *pull(cot)))(*jax.vjp(ops.dot_bf16, x, w)))
      text = fn.lower(x, w).as_text()
      return fn(x, w), text

  got, text = run('auto')
  ref, text_ref = run('depthwise,topk,gelu_bn')
  assert text.count('pemn_gemm_bf16') == 1 and 'pemn_gemm' not in text_ref
  for a, b in zip(got, ref, strict=True):
    assert a.dtype == BF16
    _close(a, b, rel=1e-2)


@cpu_only
def test_gemm_needs_mkl_and_bf16_hardware(monkeypatch):
  """Without MKL, or on a CPU without bf16 GEMMs, the kernel is not handed a BLAS (why says
  which); the XLA formulation is then used."""
  from pemn_jax.native import build as nbuild

  monkeypatch.setattr(nbuild, '_cpu_flags', lambda: {'avx2'})
  with pytest.raises(RuntimeError, match='none of'):
    nbuild._load_gemm(None)
  monkeypatch.setattr(nbuild, '_cpu_flags', lambda: {'amx_bf16'})
  monkeypatch.setattr(nbuild, 'gemm_candidates', lambda: [])
  with pytest.raises(RuntimeError, match='no bf16 GEMM library found'):
    nbuild._load_gemm(None)
  monkeypatch.setitem(nbuild._state, 'gemm', None)
  x = jnp.ones((8, 4), BF16)
  assert not native.gemm_usable(x)
  text = jax.jit(lambda x, w: ops.dot_bf16(x, w)).lower(x, jnp.ones((4, 2), BF16)).as_text()
  assert 'pemn_gemm' not in text


@cpu_only
def test_native_kernels_read_and_write_bf16_exactly():
  """bf16 activations go into the kernels as bf16 (no convert around the call) and come out
  rounded to nearest even from the same float32 arithmetic as the float32 call: bit-equal to
  the float32 kernel's result converted by XLA, NaN and infinities included."""
  native.available() or pytest.skip(native.unavailable_reason())
  x = jax.random.normal(jax.random.key(0), (4, 5, 6, 19)) * 3
  x = x.at[0, 0, 0, :4].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf, 0.0]))
  xb = x.astype(BF16)
  c = x.shape[-1]
  scale, bias = 1 + 0.1 * jnp.arange(c, dtype=F32), 0.05 * jnp.arange(c, dtype=F32)
  mean, var = jnp.full((c,), 0.1), jnp.full((c,), 0.7)
  bn = jax.jit(lambda x: native.gelu_batch_norm(x, scale, bias, mean, var, 1e-5))
  text = bn.lower(xb).as_text()
  assert 'pemn_gelu_bn_fwd' in text and 'tensor<4x5x6x19xf32>' not in text  # no f32 copy of x
  got, want = bn(xb), bn(xb.astype(F32)).astype(BF16)
  assert got.dtype == BF16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  k = jax.random.normal(jax.random.key(1), (3, 3, 1, c))
  dw = jax.jit(lambda x, k: native.depthwise(x, k, (1, 1), (5, 6)))
  got, want = dw(xb, k.astype(BF16)), dw(xb.astype(F32), k.astype(BF16).astype(F32))
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want.astype(BF16), F32))


# ---- bf16 products on AMX tiles (native feature 'amx'; where the CPU has AMX-BF16) ---------


def _need_amx():
  native.available() or pytest.skip(native.unavailable_reason())
  native.amx_available() or pytest.skip('no AMX-BF16 here (or the OS refused the tile state)')


@cpu_only
@pytest.mark.parametrize('trans_b', [False, True], ids=['b', 'b.T'])
@pytest.mark.parametrize(
  'm, k, n', [(77, 64, 96), (300, 256, 256), (32, 32, 32), (5, 96, 64)], ids=str
)
def test_matmul_amx_equals_xlas_rounded_product(m, k, n, trans_b):
  """``a @ op(b)`` on AMX tiles: row counts that leave a partial 32-row block (or are one),
  widths of one and several 32-column tile pairs, both layouts of b. Against the float64
  product it is within one bfloat16 rounding plus float32 summation error; against XLA's
  float32-result dot converted to bfloat16 (what dot_bf16 computes without the kernel) it is
  within one bfloat16 unit, and equal in almost every entry."""
  _need_amx()
  ka, kb = jax.random.split(jax.random.key(m + k + n))
  a = jax.random.normal(ka, (m, k)).astype(BF16)
  b = jax.random.normal(kb, (n, k) if trans_b else (k, n)).astype(BF16)
  got = jax.jit(lambda a, b: native.matmul_amx(a, b, trans_b))(a, b)
  assert got.dtype == BF16 and got.shape == (m, n)
  bm = b.T if trans_b else b
  xla = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32).astype(BF16))(a, bm)
  exact = np.asarray(a, np.float64) @ np.asarray(bm, np.float64)
  got32, xla32 = np.asarray(got, np.float32), np.asarray(xla, np.float32)
  bound = 2.0**-8 * np.abs(exact) + 1e-6 * k * np.sqrt(k)
  assert np.all(np.abs(got32 - exact) <= bound), np.max(np.abs(got32 - exact) - bound)
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(xla32), 1e-30))) - 7)
  assert np.all(np.abs(got32 - xla32) <= ulp)
  assert np.mean(got32 == xla32) > 0.99


@cpu_only
def test_matmul_amx_rejects_widths_it_does_not_tile():
  """K or N not a multiple of 32: the kernel's error names the rule (amx_usable never sends
  such a product; a direct call gets the error)."""
  _need_amx()
  a, b = jnp.ones((8, 48), BF16), jnp.ones((48, 32), BF16)
  assert not native.amx_usable(a, b) and native.amx_usable(jnp.ones((8, 64), BF16), b[:32])
  with pytest.raises(Exception, match='K and N must be multiples of 32'):
    jax.block_until_ready(jax.jit(native.matmul_amx)(a, b))


@cpu_only
def test_dot_bf16_takes_the_amx_kernel_for_forward_and_input_gradient():
  """With 'amx' on and widths of multiples of 32, dot_bf16's forward and input gradient are
  the AMX kernel's (two calls), the weight gradient not; values and gradients equal the
  formulation without it to one bfloat16 unit. A width that does not tile stays XLA's."""
  _need_amx()
  x = jax.random.normal(jax.random.key(0), (200, 64)).astype(BF16)
  w = jax.random.normal(jax.random.key(1), (64, 96)).astype(BF16)
  cot = jax.random.normal(jax.random.key(2), (200, 96)).astype(BF16)

  def run(spec, x, w, cot):
    with native.kernels(spec):
      fn = jax.jit(lambda x, w: (lambda y, pull: (y, *pull(cot)))(*jax.vjp(ops.dot_bf16, x, w)))
      return fn(x, w), fn.lower(x, w).as_text()

  got, text = run('auto', x, w, cot)
  ref, text_ref = run('depthwise,topk,gelu_bn,gemm', x, w, cot)
  assert text.count('pemn_matmul_amx') == 2 and 'pemn_matmul_amx' not in text_ref
  for a, b in zip(got, ref, strict=True):
    assert a.dtype == BF16
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(b32), 1e-30))) - 7)
    assert np.all(np.abs(a32 - b32) <= ulp)
  _, text_odd = run('auto', x[:, :48], w[:48], cot)
  assert 'pemn_matmul_amx' not in text_odd


@cpu_only
def test_amx_needs_the_tile_state(monkeypatch):
  """Where the kernels were not built for AMX-BF16 (or Linux refused the tile state),
  amx_usable is false and dot_bf16 traces XLA's dots; the kernel itself would fail."""
  from pemn_jax.native import build as nbuild

  native.available() or pytest.skip(native.unavailable_reason())
  monkeypatch.setitem(nbuild._state, 'amx', False)
  x, w = jnp.ones((64, 32), BF16), jnp.ones((32, 32), BF16)
  assert not native.amx_usable(x, w)
  assert 'pemn_matmul_amx' not in jax.jit(ops.dot_bf16).lower(x, w).as_text()
  with pytest.raises(RuntimeError, match='pemn_matmul_amx is unavailable'):
    native.matmul_amx(x, w)


@cpu_only
@pytest.mark.slow
@pytest.mark.parametrize('kernel', ['gemm', 'amx'])
def test_bf16_product_kernels_under_data_parallel_mesh(pemn_cli, kernel):
  """Under the training loop's mesh (2 devices), dot_bf16's native products run per batch
  shard with no gather: the library GEMM (the weight gradient, psum-ed) and the AMX kernel
  (forward and input gradient; a width of 16 keeps it out of the GEMM case); the loss and
  gradients equal the XLA formulation's."""
  (_need_gemm if kernel == 'gemm' else _need_amx)()
  import textwrap

  target, width = {'gemm': ('pemn_gemm_bf16', 16), 'amx': ('pemn_matmul_amx', 64)}[kernel]
  code = textwrap.dedent(
    f"""
      import jax, jax.numpy as jnp, numpy as np
      from pemn_jax import ops, steps
      mesh, rep, batch = steps.mesh_and_shardings()
      x = jax.random.normal(jax.random.key(0), (64, 32)).astype(jnp.bfloat16)
      w = jax.random.normal(jax.random.key(1), (32, {width})).astype(jnp.bfloat16)
      loss = lambda x, w: jnp.sum(ops.dot_bf16(x, w).astype(jnp.float32) ** 2)
      out = {{}}
      for spec in ('auto', 'depthwise'):
        f = jax.jit(steps.in_mesh(jax.value_and_grad(loss, (0, 1)), mesh, spec),
                    in_shardings=(batch, rep))
        text = f.lower(x, w).compile().as_text()
        out[spec] = (text.count('{target}'), 'all-gather' in text,
                     f(jax.device_put(x, batch), jax.device_put(w, rep)))
      diff = max(
        float(np.max(np.abs(np.float32(a) - np.float32(b))) / np.max(np.abs(np.float32(b))))
        for a, b in zip(jax.tree.leaves(out['auto'][2]), jax.tree.leaves(out['depthwise'][2]))
      )
      print(jax.device_count(), out['auto'][0] > 0, out['auto'][1], out['depthwise'][0], diff)
  """
  )
  proc = pemn_cli.python('-c', code, devices=2, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  devices, calls, gathers, calls_xla, diff = proc.stdout.split()
  assert (devices, calls, gathers, calls_xla) == ('2', 'True', 'False', '0')
  assert float(diff) < 1e-2


@cpu_only
@pytest.mark.parametrize('dtype', [BF16, F32], ids=['bf16', 'fp32'])
def test_convmixer_pointwise_products_run_on_amx_in_bf16_training(dtype):
  """A bfloat16 ConvMixer of width 32 trains its pointwise layers on the AMX kernel (forward
  and input gradient of each block's layer; the stem's 12-wide patches and the 10-class head do
  not tile and stay XLA's); float32 never uses it."""
  _need_amx()
  from pemn_jax.models.convmixer import ConvMixer

  model = ConvMixer(dim=32, depth=2, kernel_size=3, patch_size=2, dtype=dtype)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3), dtype)
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params):
    out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(out)

  text = jax.jit(jax.grad(loss)).lower(variables['params']).as_text()
  assert text.count('pemn_matmul_amx') == (2 * 2 if dtype == BF16 else 0)
