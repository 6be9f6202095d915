"""CIFAR ResNet-20/32/56 (He et al. 2016, section 4.2) with option-A shortcuts.

3x3 conv 3 -> 16, BN, ReLU; three stages of ``n = (depth - 2) / 6`` basic blocks with widths
16/32/64 and strides 1/2/2; global average pool; dense 64 -> classes. Option A: where a block
changes shape, the shortcut subsamples by 2 and zero-pads the new channels (no weights), so
every conv and dense weight is in the main path. No biases. The paper publishes no ResNet
recipe for PEMN; this is the standard CIFAR ResNet of the original paper.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pemn_jax import layers
from pemn_jax.models.registry import ModelSpec

ModuleDef = Any
DEPTHS = (20, 32, 44, 56, 110)


class BasicBlock(nn.Module):
  """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus an option-A shortcut, then ReLU."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    s = self.strides
    y = self.conv(
      self.features,
      (3, 3),
      strides=(s, s),
      padding=((1, 1), (1, 1)),
      dtype=self.dtype,
      name='conv1',
    )(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name='conv2')(
      y
    )
    y = self.norm(name='bn2')(y)
    shortcut = x
    if s != 1 or x.shape[-1] != self.features:
      shortcut = x[:, ::s, ::s, :]
      extra = self.features - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """ResNet-``depth`` for 32x32 inputs (depth = 6n + 2)."""

  depth: int = 32
  num_classes: int = 10
  width: int = 16
  conv: ModuleDef = layers.Conv
  dense: ModuleDef = layers.Dense
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6:
      raise ValueError(
        f'model.depth must be 6n+2 for a CIFAR ResNet (e.g. {DEPTHS}), got {self.depth}'
      )
    n = (self.depth - 2) // 6
    norm = layers.batch_norm(train, self.dtype)
    x = self.conv(self.width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name='stem')(x)
    x = nn.relu(norm(name='stem_bn')(x))
    for stage in range(3):
      for b in range(n):
        strides = 2 if stage > 0 and b == 0 else 1
        x = BasicBlock(
          self.width * 2**stage, strides, self.conv, norm, self.dtype, name=f'stage{stage}_block{b}'
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    return self.dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


def _build(m, layers_):
  return CifarResNet(depth=m.depth, width=m.width, **layers_)


def _validate(m):
  if not isinstance(m.depth, int) or m.depth < 8 or (m.depth - 2) % 6:
    raise ValueError(
      f'model.depth must be 6n+2, n >= 1, for resnet (8, 20, 32, 56, ...), got {m.depth}'
    )
  if isinstance(m.width, bool) or not isinstance(m.width, int) or m.width < 1:
    raise ValueError(f'model.width must be a positive integer, got {m.width!r}')


SPEC = ModelSpec(build=_build, validate=_validate, fields=('depth', 'width'))
