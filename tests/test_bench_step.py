"""``experiments.bench_step``'s FLOP count, the floor the step is measured against (no timing
assertion here)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_step


def _gemm(a, b, trans_a: bool):
  # the call native.gemm_bf16 makes (traced only: no library needed to count it)
  m = a.shape[1] if trans_a else a.shape[0]
  return jax.ffi.ffi_call('pemn_gemm_bf16', jax.ShapeDtypeStruct((m, b.shape[1]), np.float32))(
    a, b, trans_a=np.int64(trans_a), trans_b=np.int64(0)
  )


def _amx(a, b, trans_b: bool):
  # the call native.matmul_amx makes (traced only)
  n = b.shape[0] if trans_b else b.shape[1]
  return jax.ffi.ffi_call('pemn_matmul_amx', jax.ShapeDtypeStruct((a.shape[0], n), a.dtype))(
    a, b, trans_b=np.int64(trans_b)
  )


def test_dot_flops_counts_dots_convs_and_the_native_gemm():
  a = jnp.ones((6, 4), jnp.bfloat16)
  b = jnp.ones((4, 5), jnp.bfloat16)
  at = jnp.ones((4, 6), jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 3))
  k = jnp.ones((3, 3, 3, 7))

  def f(a, b, at, x, k):
    conv = jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    return (
      a @ b,
      _gemm(a, b, False),
      _gemm(at, b, True),
      _amx(a, b, False),
      _amx(a, b.T, True),
      conv,
    )

  jaxpr = jax.make_jaxpr(f)(a, b, at, x, k)
  conv = 2.0 * (2 * 8 * 8 * 7) * (3 * 3 * 3)
  assert bench_step.dot_flops(jaxpr) == pytest.approx(5 * 2.0 * 6 * 5 * 4 + conv)


def test_dot_flops_counts_a_scan_body_times_its_length():
  def f(w, x):
    return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=3)[0]

  jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 4)), jnp.ones((2, 4)))
  assert bench_step.dot_flops(jaxpr) == pytest.approx(3 * 2.0 * 2 * 4 * 4)


def test_short_calls_names_every_native_target_by_its_feature():
  from pemn_jax import native
  from pemn_jax.native import build

  assert bench_step.short_calls(sorted(build.TARGETS)) == ','.join(sorted(native.FEATURES))
  assert bench_step.short_calls([]) == 'none'
