"""Linen layers: masked layers on frozen random weights, and their trainable dense twins.

``MaskedDense`` and ``MaskedConv`` keep

* ``params/scores``: one learned score per weight (trainable, ``U(-1/sqrt(fan_in), +)``);
* ``frozen/kernel``: the fixed random weights, plain Kaiming normal ``N(0, 2 / fan_in)``, drawn
  from the ``'frozen'`` rng stream in PyTorch layout and transposed into Flax layout (so that
  every weight strategy places values in the reference's order). This collection is NOT
  ``params``: no optimizer ever sees it, and it is regenerated from a key, never stored.

The effective weight is ``frozen * topk_mask(scores)`` (see ``masking``). ``Dense`` and ``Conv``
are the trainable baselines with the same call signature (PyTorch default init), so one model
definition builds both by injecting the layer classes. Use them like any Linen layer::

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = MaskedConv(32, (3, 3), keep_fraction=0.5)(x)
        return MaskedDense(10)(x.mean((1, 2)))

    variables = Net().init({'params': k1, 'frozen': k2}, x)   # {'params', 'frozen'}
    logits = Net().apply(variables, x)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from pemn_jax import masking, native, ops

FROZEN = 'frozen'  # collection and rng stream of the fixed random weights
# Every conv and dense output is tagged with this name (``jax.ad_checkpoint.checkpoint_name``):
# a no-op unless a ``jax.checkpoint`` policy such as
# ``jax.checkpoint_policies.save_only_these_names(CHECKPOINT_NAME)`` asks to save exactly these
# values and recompute the elementwise work (GELU, BatchNorm) between them in the backward pass.
CHECKPOINT_NAME = 'pemn_layer_out'
Dtype = Any


def torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
  """PyTorch layout of a Flax kernel shape: dense (in, out) -> (out, in); conv HWIO -> OIHW.

  Kernels of other ranks (1-D or 3-D convs, ``nn.DenseGeneral``) have no counterpart in the
  reference code: their layout is Flax's own (row-major), unchanged.
  """
  if len(flax_shape) == 2:
    return (flax_shape[1], flax_shape[0])
  if len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  return tuple(flax_shape)


def to_flax_layout(w_torch):
  """Transposes a PyTorch-layout kernel (OI or OIHW) into Flax layout (IO or HWIO)."""
  if w_torch.ndim == 2:
    return w_torch.T
  if w_torch.ndim == 4:
    return w_torch.transpose(2, 3, 1, 0)
  return w_torch


def to_torch_layout(w_flax):
  """Inverse of ``to_flax_layout``."""
  if w_flax.ndim == 2:
    return w_flax.T
  if w_flax.ndim == 4:
    return w_flax.transpose(3, 2, 0, 1)
  return w_flax


def fan_in(flax_shape: Sequence[int]) -> int:
  """(in_channels / groups) * kh * kw for a conv, in_features for a dense kernel."""
  return int(np.prod(flax_shape[:-1]))


# Random draws are made flat and reshaped. JAX's values depend only on the flat index, so the
# arrays are bit-identical to drawing with the shape directly, but XLA:CPU compiles a small
# multi-dimensional draw (e.g. a (3, 3, 16, 16) kernel) 3-4x slower than the flat one: about
# 1 s per draw, so a masked ResNet's init compile was dominated by it.


def kaiming_normal_frozen(key, flax_shape, dtype=jnp.float32):
  """Plain (untruncated) Kaiming normal, drawn in PyTorch layout, returned in Flax layout."""
  std = np.sqrt(2.0 / fan_in(flax_shape))
  shape = torch_shape(flax_shape)
  w = jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)
  return to_flax_layout(w * jnp.asarray(std, dtype))


def uniform_fan_in(key, shape, dtype=jnp.float32):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): edge-popup's score init and PyTorch's default init."""
  bound = 1.0 / np.sqrt(fan_in(shape))
  return jax.random.uniform(key, (int(np.prod(shape)),), dtype, -bound, bound).reshape(shape)


BN_MOMENTUM, BN_EPSILON = 0.9, 1e-5


def batch_norm(train: bool, dtype: Dtype | None = None):
  """The BatchNorm every model uses: PyTorch's defaults (momentum 0.1 there, 0.9 here; eps 1e-5)."""
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
  )


def gelu(x):
  """GELU in its exact erf form (PyTorch's default), not the tanh approximation."""
  return nn.gelu(x, approximate=False)


class FusedGeluBatchNorm(nn.Module):
  """Training-mode ``BatchNorm(gelu(x))`` in ``pemn_jax.native``'s fused kernels.

  Same variables as ``nn.BatchNorm`` (params ``scale``, ``bias``; batch_stats ``mean``,
  ``var``), same statistics (biased batch variance, ``E[z^2] - E[z]^2``), same running-average
  update and the same gradients; float32, or bfloat16 computed in float32 (statistics and
  parameters float32, output bfloat16), only in training (``gelu_batch_norm`` decides). With
  ``residual`` (x's shape and dtype), returns ``residual + BatchNorm(gelu(x))`` from the same
  pass (``native.gelu_batch_norm_add``: one rounding of the sum in bfloat16).

  ``save_gelu``: keep ``gelu(x)`` and ``gelu'(x)`` for the backward, the GELU evaluated once
  (``native.gelu_batch_norm_saved``); else keep ``x`` and recompute it in every pass
  (``native.gelu_batch_stats``, then ``native.gelu_batch_norm`` or ``gelu_batch_norm_add``).
  """

  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  save_gelu: bool = True

  @nn.compact
  def __call__(self, x, residual=None):
    feat = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), feat)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), feat)
    scale = self.param('scale', nn.initializers.ones, feat, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, feat, jnp.float32)
    if self.save_gelu:
      y, mean, var = native.gelu_batch_norm_saved(x, residual, scale, bias, self.epsilon)
      mean, var = jax.lax.stop_gradient((mean, var))  # the running averages take no gradient
    else:
      # The statistics carry no gradient of their own: gelu_batch_norm's VJP includes theirs.
      mean, var = native.gelu_batch_stats(jax.lax.stop_gradient(x))
      if residual is not None:
        y = native.gelu_batch_norm_add(x, residual, scale, bias, mean, var, self.epsilon)
      else:
        y = native.gelu_batch_norm(x, scale, bias, mean, var, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


GELU_BN_RESIDUALS = ('gelu', 'input')


def fork(x):
  """``(x, x)`` for an activation that feeds two branches (a ConvMixer block's input: the
  depthwise conv and the residual). In bfloat16 where ``native.usable`` (feature
  ``'gelu_bn'``, the rest of the block's fused path), ``native.fork``, whose VJP sums the two
  cotangents in one native pass; otherwise autodiff sums them. The same values either way."""
  if x.dtype == jnp.bfloat16 and native.usable(x, feature='gelu_bn'):
    return native.fork(x)
  return x, x


def gelu_batch_norm(train: bool, dtype: Dtype | None = None, residuals: str = 'gelu'):
  """``gelu_bn(name=...)(x) = batch_norm(train, dtype)(name=...)(gelu(x))``, the "GELU, BN" of
  a ConvMixer: in training, in float32 or bfloat16, where ``native.usable``, as
  ``FusedGeluBatchNorm`` (4 streaming passes instead of XLA's ~10 fusions and residuals);
  otherwise literally that. Both register the same variables under ``name``.
  ``gelu_bn(name=...)(x, residual)`` adds ``residual`` to the result (in the fused kernel's
  pass where it is used).

  ``residuals`` (one of ``GELU_BN_RESIDUALS``, ``model.gelu_bn_residuals``) is what the fused
  form keeps for its backward: ``'gelu'``, ``gelu(x)`` and ``gelu'(x)`` (the GELU evaluated
  once); ``'input'``, ``x`` alone (half the memory; the GELU recomputed in each of the four
  passes).
  """
  if residuals not in GELU_BN_RESIDUALS:
    raise ValueError(f'residuals must be one of {GELU_BN_RESIDUALS}, got {residuals!r}')

  def make(name: str):
    def apply(x, residual=None):
      # The fused kernels return x's dtype: what Flax returns for dtype=x.dtype, or for None
      # with a float32 x (bfloat16 is computed in float32 inside them, native.DTYPES).
      same = x.dtype == (jnp.float32 if dtype is None else jnp.dtype(dtype))
      others = () if residual is None else (residual,)
      if train and same and native.usable(x, *others, feature='gelu_bn'):
        return FusedGeluBatchNorm(name=name, save_gelu=residuals == 'gelu')(x, residual)
      y = batch_norm(train, dtype)(name=name)(gelu(x))
      return y if residual is None else residual + y

    return apply

  return make


def _trainable_kernel(module: nn.Module, shape) -> jax.Array:
  """An ordinary trainable kernel in ``params``."""
  return module.param('kernel', uniform_fan_in, shape)


def _masked_kernel(module: nn.Module, shape) -> jax.Array:
  """Frozen random kernel x straight-through top-k mask of the module's trainable scores; an
  ordinary trainable kernel where ``module.masked_layers`` (a pattern) does not match the
  module's path."""
  only = module.masked_layers
  if only is not None and not re.fullmatch(only, '/'.join(module.path)):
    return _trainable_kernel(module, shape)
  masking.validate_keep_fraction(module.keep_fraction)
  frozen = module.variable(
    FROZEN, 'kernel', lambda: kaiming_normal_frozen(module.make_rng(FROZEN), shape)
  ).value
  scores = module.param('scores', uniform_fan_in, shape)
  mask = masking.score_mask(scores, module.keep_fraction, module.score_abs)
  return jax.lax.stop_gradient(frozen) * mask.astype(frozen.dtype)


class DenseBase(nn.Module):
  """A dense layer whose kernel comes from ``effective_kernel(shape)``: the extension seam.

  Subclasses define ``effective_kernel(self, shape) -> jax.Array``, called inside the compact
  ``__call__`` (so it may create variables: ``self.param``, ``self.variable``) with the Flax
  kernel shape ``(in_features, features)``; the layer computes ``x @ kernel`` (+ bias). ``Dense``
  (a trainable kernel), ``MaskedDense`` (frozen random kernel x top-k mask) and the sparse
  baselines are such subclasses; a new kind of masked layer is a few lines::

    class SignedConstantMaskedDense(layers.DenseBase):  # frozen weights +-std, masked
      keep_fraction: float = 0.5

      def effective_kernel(self, shape):
        draw = lambda: jnp.sign(jax.random.normal(self.make_rng(layers.FROZEN), shape))
        sign = self.variable(layers.FROZEN, 'kernel', draw).value
        scores = self.param('scores', layers.uniform_fan_in, shape)
        std = (2.0 / shape[0]) ** 0.5
        return std * sign * masking.score_mask(scores, self.keep_fraction)

  (``tests/test_layers.py`` runs this example.)
  """

  features: int
  use_bias: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    kernel = self.effective_kernel((x.shape[-1], self.features))
    dtype = self.dtype or x.dtype
    y = ops.matmul(x.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(dtype)
    return checkpoint_name(y, CHECKPOINT_NAME)


class ConvBase(nn.Module):
  """A 2-D conv (NHWC, HWIO kernels) whose kernel comes from ``effective_kernel(shape)``.

  The same seam as ``DenseBase``, with the kernel shape ``(*kernel_size, in / groups,
  features)`` and the conv computed by ``pemn_jax.ops.conv`` (strides, padding, groups, the
  CPU-fast formulations).
  """

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = False
  dtype: Dtype | None = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    cin = x.shape[-1]
    g = self.feature_group_count
    if cin % g or self.features % g:
      raise ValueError(
        f'feature_group_count={g} must divide input channels ({cin}) and features ({self.features})'
      )
    shape = (*self.kernel_size, cin // g, self.features)
    kernel = self.effective_kernel(shape)
    dtype = self.dtype or x.dtype
    y = ops.conv(
      x.astype(dtype), kernel.astype(dtype), tuple(self.strides), self.padding, g, self.conv_impl
    )
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(dtype)
    return checkpoint_name(y, CHECKPOINT_NAME)


class Dense(DenseBase):
  """Trainable dense layer (the dense baseline), no bias by default."""

  def effective_kernel(self, shape):
    return _trainable_kernel(self, shape)


class Conv(ConvBase):
  """Trainable 2-D conv (the dense baseline), NHWC / HWIO, no bias by default."""

  def effective_kernel(self, shape):
    return _trainable_kernel(self, shape)


class MaskedDense(DenseBase):
  """Dense layer on a frozen random kernel with a learned top-k mask."""

  keep_fraction: float = 0.5
  score_abs: bool = True
  masked_layers: str | None = None  # a pattern: masked only if it fullmatches the path

  def effective_kernel(self, shape):
    return _masked_kernel(self, shape)


class MaskedConv(ConvBase):
  """2-D conv on a frozen random kernel with a learned top-k mask (groups, strides, padding)."""

  keep_fraction: float = 0.5
  score_abs: bool = True
  masked_layers: str | None = None  # a pattern: masked only if it fullmatches the path

  def effective_kernel(self, shape):
    return _masked_kernel(self, shape)
