"""The paper's sparse baselines: dense networks trained at a fixed sparsity.

Two ways to choose which weights a layer keeps (``model.sparsity_method``), at sparsity ``s``
(``model.sparsity``, the fraction REMOVED; the paper uses 0.90 / 0.92 / 0.94 / 0.96):

* ``random``: a fixed random mask of exactly ``ceil((1 - s) * n)`` entries per layer, drawn once
  from the ``frozen`` rng stream (so, like PEMN's random weights, it is regenerated from the seed
  and never stored in a checkpoint); only the kept weights train.
* ``magnitude``: the ``ceil((1 - s) * n)`` weights of largest magnitude, re-selected at every
  forward pass from the current weights (magnitude-based removal during training from scratch);
  the gradient reaches the kept weights only, and weight decay keeps removed ones small.

The weights themselves are ordinary trainable parameters (PyTorch default init), so these
layers take the place of ``layers.Conv`` / ``layers.Dense`` in any model definition. Storage is
accounted as CSR (``storage.csr_bits``): the kept values plus their indices.
"""

from __future__ import annotations

import numbers

import flax.linen as nn
import jax
import jax.numpy as jnp

from pemn_jax import layers, masking

SPARSE_METHODS = ('random', 'magnitude')


def validate(method: str | None, sparsity: float | None) -> None:
  """Raises ValueError naming ``model.sparsity_method`` / ``model.sparsity``."""
  if method is None:
    return
  if method not in SPARSE_METHODS:
    raise ValueError(
      f'model.sparsity_method must be one of {SPARSE_METHODS} or None, got {method!r}'
    )
  if (
    sparsity is None
    or isinstance(sparsity, bool)
    or not isinstance(sparsity, numbers.Real)
    or not 0.0 <= sparsity < 1.0
  ):
    raise ValueError(
      f'model.sparsity must be in [0, 1) (the fraction of weights removed), got {sparsity!r}'
    )


def _sparse_kernel(module: nn.Module, shape) -> jax.Array:
  validate(module.method, module.sparsity)
  keep = 1.0 - module.sparsity
  kernel = module.param('kernel', layers.uniform_fan_in, shape)
  if module.method == 'random':
    mask = module.variable(
      layers.FROZEN,
      'mask',
      lambda: masking.topk_mask(jax.random.uniform(module.make_rng(layers.FROZEN), shape), keep),
    ).value
  else:
    mask = masking.topk_mask(jax.lax.stop_gradient(jnp.abs(kernel)), keep)
  return kernel * jax.lax.stop_gradient(mask).astype(kernel.dtype)


class SparseDense(layers.DenseBase):
  """Dense layer keeping a fraction ``1 - sparsity`` of its trainable weights."""

  method: str = 'random'
  sparsity: float = 0.9

  def effective_kernel(self, shape):
    return _sparse_kernel(self, shape)


class SparseConv(layers.ConvBase):
  """Conv layer keeping a fraction ``1 - sparsity`` of its trainable weights."""

  method: str = 'random'
  sparsity: float = 0.9

  def effective_kernel(self, shape):
    return _sparse_kernel(self, shape)
