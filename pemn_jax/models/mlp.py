"""A multilayer perceptron, e.g. the paper's [784, 100, 100, 100, 10] illustration.

Flatten; for every hidden width: dense (no bias), BN, ReLU; then the dense classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pemn_jax import layers
from pemn_jax.models.registry import ModelSpec

ModuleDef = Any


class MLP(nn.Module):
  """Dense - BN - ReLU per hidden width, then a dense classifier."""

  hidden_dims: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  dense: ModuleDef = layers.Dense
  conv: ModuleDef = layers.Conv  # unused; accepted so every model takes the same attributes
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = layers.batch_norm(train, self.dtype)
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.hidden_dims):
      x = self.dense(width, dtype=self.dtype, name=f'dense{i}')(x)
      x = nn.relu(norm(name=f'bn{i}')(x))
    return self.dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


def _build(m, layers_):
  return MLP(hidden_dims=tuple(m.hidden_dims), **layers_)


def _validate(m):
  dims = m.hidden_dims
  if not isinstance(dims, tuple | list) or not all(
    isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims
  ):
    raise ValueError(f'model.hidden_dims must be positive integers, got {dims!r}')


SPEC = ModelSpec(build=_build, validate=_validate, fields=('hidden_dims',))
