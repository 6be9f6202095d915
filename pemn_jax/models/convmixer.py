"""ConvMixer (Trockman & Kolter), exactly as the PEMN reference builds it.

patch conv (kernel = stride = p, 3 -> h), GELU (exact erf), BN; then ``depth`` blocks of
Residual[depthwise k x k conv (groups = h, SAME), GELU, BN] -> pointwise 1x1 conv, GELU, BN;
global average pool; dense h -> classes. No layer has a bias. The conv and dense layer classes
are attributes, so the same definition builds the dense baseline and the masked network.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pemn_jax import layers
from pemn_jax.models import remat
from pemn_jax.models.registry import ModelSpec, check_patch

ModuleDef = Any


gelu = layers.gelu  # exact erf form (PyTorch's default), not the tanh approximation


# The four layers of one mixer block, in order; block i's are named f'block{i}_{layer}'.
BLOCK_LAYERS = ('depthwise', 'depthwise_bn', 'pointwise', 'pointwise_bn')


def mixer_block(x, depthwise, depthwise_bn, pointwise, pointwise_bn):
  """Residual[depthwise conv, GELU, BN] -> pointwise conv, GELU, BN (the layers are callables;
  each ``*_bn`` is GELU then BN, ``layers.gelu_batch_norm``, which takes the residual so that
  the fused kernel adds it in its pass; ``layers.fork`` sums the input's two cotangents in one
  native pass where it can)."""
  x, skip = layers.fork(x)
  x = depthwise_bn(depthwise(x), skip)
  return pointwise_bn(pointwise(x))


class _Block(nn.Module):
  """One mixer block as its own module (layer names without the ``block{i}_`` prefix).

  Only the rematerialised path applies it (``remat.scan_blocks``), with variables taken out
  of ConvMixer's flat tree.
  """

  dim: int
  kernel_size: int
  conv: ModuleDef
  dtype: Any
  train: bool
  gelu_bn_residuals: str = 'gelu'

  @nn.compact
  def __call__(self, x):
    block = _block_layers(
      self.conv, self.dim, self.kernel_size, self.dtype, self.train, '', self.gelu_bn_residuals
    )
    return mixer_block(x, *block)


def _block_layers(conv, dim, k, dtype, train, prefix, gelu_bn_residuals):
  norm = layers.gelu_batch_norm(train, dtype, gelu_bn_residuals)
  return (
    conv(
      dim, (k, k), padding='SAME', feature_group_count=dim, dtype=dtype, name=f'{prefix}depthwise'
    ),
    norm(name=f'{prefix}depthwise_bn'),
    conv(dim, (1, 1), padding='VALID', dtype=dtype, name=f'{prefix}pointwise'),
    norm(name=f'{prefix}pointwise_bn'),
  )


class ConvMixer(nn.Module):
  """ConvMixer-``dim``/``depth``.

  Attributes:
    dim: hidden width h.
    depth: number of mixer blocks d.
    kernel_size: depthwise kernel k.
    patch_size: patch (and stride) p of the stem.
    num_classes: classifier outputs.
    conv: conv layer class (``layers.Conv`` dense, ``layers.MaskedConv`` masked).
    dense: dense layer class for the classifier.
    dtype: compute dtype (``None``: the input's).
    remat_blocks: 'none' (default), or run the blocks in training as one rematerialised
      ``lax.scan`` with the policy ``remat.REMAT_POLICIES[remat_blocks]`` ('save_convs' or
      'full'; see ``pemn_jax.models.remat``). Less training memory for some recomputation
      (measured in ``experiments/bench_remat.py``); same variables (the tree stays flat), same
      values.
    gelu_bn_residuals: what each fused GELU+BN keeps for the backward, ``'gelu'`` (default:
      ``gelu(x)`` and ``gelu'(x)``, the GELU evaluated once) or ``'input'`` (``x``: half that
      memory, the GELU evaluated four times); ``layers.gelu_batch_norm``. Same variables; in
      float32 the same values to float rounding.
  """

  dim: int = 256
  depth: int = 8
  kernel_size: int = 5
  patch_size: int = 2
  num_classes: int = 10
  conv: ModuleDef = layers.Conv
  dense: ModuleDef = layers.Dense
  dtype: Any = None
  remat_blocks: str = 'none'
  gelu_bn_residuals: str = 'gelu'

  @nn.compact
  def __call__(self, x, train: bool = False):
    gelu_norm = layers.gelu_batch_norm(train, self.dtype, self.gelu_bn_residuals)
    p, k = self.patch_size, self.kernel_size
    x = self.conv(self.dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='stem')(
      x
    )
    x = gelu_norm(name='stem_bn')(x)
    remat.check(self.remat_blocks)
    if self.remat_blocks != 'none' and train and not self.is_initializing():
      block = _Block(self.dim, k, self.conv, self.dtype, train, self.gelu_bn_residuals)
      x = remat.scan_blocks(
        self,
        block,
        x,
        self.depth,
        lambda i: {name: (f'block{i}_{name}',) for name in BLOCK_LAYERS},
        self.remat_blocks,
        train,
      )
    else:
      for i in range(self.depth):
        block = _block_layers(
          self.conv, self.dim, k, self.dtype, train, f'block{i}_', self.gelu_bn_residuals
        )
        x = mixer_block(x, *block)
    x = jnp.mean(x, axis=(1, 2))
    return self.dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


def _build(m, layers_):
  return ConvMixer(
    dim=m.dim,
    depth=m.depth,
    kernel_size=m.kernel_size,
    patch_size=m.patch_size,
    remat_blocks=m.remat_blocks,
    gelu_bn_residuals=m.gelu_bn_residuals,
    **layers_,
  )


def _validate(m):
  for field in ('dim', 'depth', 'kernel_size', 'patch_size'):
    if m[field] is None:
      raise ValueError(f'model.{field} must be set for convmixer (a positive integer)')


def _check_input(m, shape):
  # The patchify stem floors (as the reference's stride-p conv does); the depthwise kernel is
  # SAME-padded, so taps farther than the feature map reaches would only ever see padding.
  h, w = check_patch(m, shape, divide=False)
  most = 2 * min(h, w) - 1
  if m.kernel_size > most:
    raise ValueError(
      f'model.kernel_size ({m.kernel_size}) must be at most {most} on the {h}x{w} feature map '
      f'({shape[0]}x{shape[1]} images / model.patch_size {m.patch_size}): wider taps only ever '
      'see padding'
    )


SPEC = ModelSpec(
  build=_build,
  validate=_validate,
  check_input=_check_input,
  fields=('dim', 'depth', 'kernel_size', 'patch_size'),
  identical_blocks=True,
)
