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

ModuleDef = Any


def gelu(x):
  """GELU in its exact erf form (PyTorch's default), not the tanh approximation."""
  return nn.gelu(x, approximate=False)


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
  """
  dim: int = 256
  depth: int = 8
  kernel_size: int = 5
  patch_size: int = 2
  num_classes: int = 10
  conv: ModuleDef = layers.Conv
  dense: ModuleDef = layers.Dense
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = layers.batch_norm(train, self.dtype)
    p, k = self.patch_size, self.kernel_size
    x = self.conv(self.dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                  name='stem')(x)
    x = norm(name='stem_bn')(gelu(x))
    for i in range(self.depth):
      y = self.conv(self.dim, (k, k), padding='SAME', feature_group_count=self.dim,
                    dtype=self.dtype, name=f'block{i}_depthwise')(x)
      x = x + norm(name=f'block{i}_depthwise_bn')(gelu(y))
      x = self.conv(self.dim, (1, 1), padding='VALID', dtype=self.dtype,
                    name=f'block{i}_pointwise')(x)
      x = norm(name=f'block{i}_pointwise_bn')(gelu(x))
    x = jnp.mean(x, axis=(1, 2))
    return self.dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)
