"""Native kernels for XLA:CPU, compiled on first use and called through the XLA FFI.

What XLA:CPU does slowly or wastefully in a PEMN training step, done here in C++
(``kernels.cc``):

* the stride-1 depthwise conv (ConvMixer), forward, input gradient and kernel gradient;
* the top-k mask of every masked layer (``pemn_jax.masking.topk_mask``): XLA's TopK sorts the
  kept entries, a linear-time selection (``std::nth_element``) finds the same set, with XLA's
  order and tie rule (ConvMixer-256/8: 18 masks, ~70 ms of a ~1 s step with TopK);
* ConvMixer's "GELU, BatchNorm" in training (``layers.FusedGeluBatchNorm``): four streaming
  passes (statistics, normalise; backward statistics, input gradient), where XLA makes ~10
  fusions and keeps several full-size residuals. By default the statistics pass stores
  ``gelu(x)`` and ``gelu'(x)`` and the others read them (the GELU, the passes' cost, evaluated
  once: ``gelu_batch_norm_saved``); ``model.gelu_bn_residuals='input'`` keeps only the input and
  recomputes the GELU in each pass (``gelu_batch_stats``, ``gelu_batch_norm``; ConvMixer-256/8:
  XLA's temp buffer 2.8 -> 1.2 GB against XLA's form, 1.7 GB with the stored GELU).

* the input of a ConvMixer block in bfloat16 training, which feeds both the depthwise conv and
  the residual: ``fork(x)`` returns it twice and its VJP sums the two cotangents in one pass
  (``add``), ~2.5 ms per block less than XLA's fusion of that add in the step.

* bfloat16 matrix products (``model.dtype=bfloat16``; the layers' ``pemn_jax.ops.dot_bf16``:
  forward, input and weight gradient) as a library's bf16 GEMM (oneDNN's
  ``dnnl_gemm_bf16bf16f32`` or MKL's ``cblas_gemm_bf16bf16f32``: AMX / AVX512-BF16), where one is
  installed (``requirements-gemm.txt``, or ``$DNNLROOT`` / ``$MKLROOT``) and the CPU has bf16
  GEMM hardware: ``gemm_available()``. XLA's own bf16 weight-gradient product is slower than its
  fp32 one; the library's is 3-5x faster (PERFORMANCE.md, attempt 38). Without a library the
  products stay in XLA (feature ``'gemm'`` then does nothing). On a CPU with AMX-BF16 the
  forward and input-gradient products (widths multiples of 32) run on AMX tiles in a loop of
  this library's own (``matmul_amx``, feature ``'amx'``, ``amx_available()``): each 32-row block
  of the product is summed in the tile registers and rounded to bf16 from L1, so the float32
  product that XLA's dot writes and its convert reads back never crosses memory (ConvMixer-256:
  6.1 -> 3.5 ms per product; PERFORMANCE.md, attempt 66).

The conv and GELU+BN kernels take float32 or bfloat16 activations (``model.dtype``), read and
written in that dtype and computed in float32 in registers: a bfloat16 step moves half the bytes
through them, with no convert around the calls.

Depthwise conv: XLA:CPU has no good lowering for its kernel gradient (the best pure-XLA form,
``ops._depthwise_kernel_grad``, is a chunked reduction at ~10 GFLOP/s), and the stride-1
shift-add forward and input gradient stream each activation once per tap. ``kernels.cc`` does
all three with one cache-resident pass per image and channel block, on XLA's intra-op thread
pool (ConvMixer-256 shapes, batch 128: kernel gradient 55 -> 5 ms, forward and input gradient
12-15 -> 7 ms; ``experiments/results/PERFORMANCE.md``, attempt 32).

Two modules:

* ``build``: compiles ``kernels.cc`` once per machine (``$CXX``, else ``g++``), caches the
  library (``$PEMN_JAX_CACHE_DIR``, default ``~/.cache/pemn_jax``), loads and registers it:
  ``available()``, ``unavailable_reason()``. Those two environment variables are the machine's
  build settings and the only ones read. It also builds ``alloc.cc`` (``allocator_path()``).
* ``ops``: which kernel is used where (``FEATURES``, ``enabled``, ``usable``, ``topk_usable``;
  per-shard calls under a data-parallel mesh), the switch (``parse_kernels``, ``kernels``,
  ``kernels_from_env``) and the JAX ops with their VJPs (``depthwise``,
  ``depthwise_kernel_grad``, ``topk_mask``, ``gelu_batch_stats``, ``gelu_batch_norm``,
  ``gelu_batch_norm_add``, ``gelu_batch_norm_saved``, ``fork``, ``add``, ``matmul_amx`` with
  ``amx_usable``, ``matmul_bf16_dw`` with ``gemm_usable``).

A third, ``process``, is about the process rather than the step: it re-executes a command once
with ``alloc.cc`` preloaded, a cache that keeps XLA's per-step scratch buffer mapped between
steps (``reexec_tuned``; the ``pemn`` command and the benchmarks call it).

Which kernels a run uses is the config field ``model.native_kernels``: ``'auto'`` (all, where
usable: the default), ``'none'`` (pure XLA) or a subset of ``FEATURES``, applied while the step
is traced by ``with native.kernels(spec):`` (trace time only: a fresh jitted function per
setting). Without a compiler ``available()`` is false; with it false or a kernel switched off,
``pemn_jax.ops``, ``pemn_jax.masking`` and ``pemn_jax.layers`` keep their pure-XLA formulations
(same masks; conv and GELU+BN values equal to float rounding); ``model.conv_impl='native'``
then fails with the reason when the library is unavailable.
"""

from __future__ import annotations

from pemn_jax.native.build import (
  amx_available,
  available,
  gemm_available,
  gemm_unavailable_reason,
  unavailable_reason,
)
from pemn_jax.native.ops import (
  FEATURES,
  add,
  amx_usable,
  depthwise,
  depthwise_kernel_grad,
  enabled,
  fork,
  gelu_batch_norm,
  gelu_batch_norm_add,
  gelu_batch_norm_saved,
  gelu_batch_stats,
  gemm_bf16,
  gemm_usable,
  kernels,
  kernels_from_env,
  matmul_amx,
  matmul_bf16_dw,
  parse_kernels,
  topk_mask,
  topk_usable,
  usable,
)

__all__ = [
  'FEATURES',
  'add',
  'amx_available',
  'amx_usable',
  'available',
  'depthwise',
  'depthwise_kernel_grad',
  'enabled',
  'fork',
  'gelu_batch_norm',
  'gelu_batch_norm_add',
  'gelu_batch_norm_saved',
  'gelu_batch_stats',
  'gemm_available',
  'gemm_bf16',
  'gemm_unavailable_reason',
  'gemm_usable',
  'kernels',
  'kernels_from_env',
  'matmul_amx',
  'matmul_bf16_dw',
  'parse_kernels',
  'topk_mask',
  'topk_usable',
  'unavailable_reason',
  'usable',
]
