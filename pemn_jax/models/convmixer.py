"""ConvMixer (Trockman & Kolter), exactly as the PEMN reference builds it.

patch conv (kernel = stride = p, 3 -> h), GELU (exact erf), BN; then ``depth`` blocks of
Residual[depthwise k x k conv (groups = h, SAME), GELU, BN] -> pointwise 1x1 conv, GELU, BN;
global average pool; dense h -> classes. No layer has a bias. The conv and dense layer classes
are attributes, so the same definition builds the dense baseline and the masked network.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pemn_jax import layers

ModuleDef = Any


def gelu(x):
  """GELU in its exact erf form (PyTorch's default), not the tanh approximation."""
  return nn.gelu(x, approximate=False)


# ``remat_blocks`` -> what the backward keeps of each block besides its input (a
# ``jax.checkpoint`` policy; the rest is recomputed from the block input, one block at a time):
# 'save_convs': the conv outputs (tagged ``layers.CHECKPOINT_NAME``), so only GELU, BatchNorm
#   and the residual add are recomputed; 'full': nothing, the whole block is recomputed.
REMAT_POLICIES = {
    'save_convs': jax.checkpoint_policies.save_only_these_names(layers.CHECKPOINT_NAME),
    'full': jax.checkpoint_policies.nothing_saveable,
}
REMAT_CHOICES = ('none', *REMAT_POLICIES)


# The four layers of one mixer block, in order; block i's are named f'block{i}_{layer}'.
BLOCK_LAYERS = ('depthwise', 'depthwise_bn', 'pointwise', 'pointwise_bn')


def mixer_block(x, depthwise, depthwise_bn, pointwise, pointwise_bn):
  """Residual[depthwise conv, GELU, BN] -> pointwise conv, GELU, BN (the layers are callables)."""
  x = x + depthwise_bn(gelu(depthwise(x)))
  return pointwise_bn(gelu(pointwise(x)))


class _Block(nn.Module):
  """One mixer block as its own module (layer names without the ``block{i}_`` prefix).

  Only the rematerialised path applies it, with variables sliced out of ConvMixer's flat tree.
  """
  dim: int
  kernel_size: int
  conv: ModuleDef
  dtype: Any
  train: bool

  @nn.compact
  def __call__(self, x):
    return mixer_block(x, *_block_layers(self.conv, self.dim, self.kernel_size, self.dtype,
                                         self.train, prefix=''))


def _block_layers(conv, dim, k, dtype, train, prefix):
  norm = layers.batch_norm(train, dtype)
  return (conv(dim, (k, k), padding='SAME', feature_group_count=dim, dtype=dtype,
               name=f'{prefix}depthwise'),
          norm(name=f'{prefix}depthwise_bn'),
          conv(dim, (1, 1), padding='VALID', dtype=dtype, name=f'{prefix}pointwise'),
          norm(name=f'{prefix}pointwise_bn'))


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
    remat_blocks: 'none' (default), or run the blocks as one ``lax.scan`` whose body is
      rematerialised (``jax.checkpoint``) with the policy ``REMAT_POLICIES[remat_blocks]``:
      'save_convs' or 'full'. Less training memory for some recomputation (measured in
      ``experiments/bench_remat.py``); same variables (the tree stays flat), same values.
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

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = layers.batch_norm(train, self.dtype)
    p, k = self.patch_size, self.kernel_size
    x = self.conv(self.dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                  name='stem')(x)
    x = norm(name='stem_bn')(gelu(x))
    if self.remat_blocks not in REMAT_CHOICES:
      raise ValueError(f'remat_blocks must be one of {REMAT_CHOICES}, got {self.remat_blocks!r}')
    if self.remat_blocks != 'none' and not self.is_initializing():
      x = self._scanned_blocks(x, train)
    else:
      for i in range(self.depth):
        x = mixer_block(x, *_block_layers(self.conv, self.dim, k, self.dtype, train,
                                          prefix=f'block{i}_'))
    x = jnp.mean(x, axis=(1, 2))
    return self.dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)

  def _scanned_blocks(self, x, train):
    """The blocks as a scan over their variables, stacked from the flat tree, under remat."""
    stacked = {}
    for col, tree in self.variables.items():
      per_layer = {name: jax.tree.map(lambda *v: jnp.stack(v),
                                      *[tree[f'block{i}_{name}'] for i in range(self.depth)])
                   for name in BLOCK_LAYERS if f'block0_{name}' in tree}
      if per_layer:
        stacked[col] = per_layer
    block = _Block(self.dim, self.kernel_size, self.conv, self.dtype, train)
    update_stats = train and self.is_mutable_collection('batch_stats')

    @functools.partial(jax.checkpoint, policy=REMAT_POLICIES[self.remat_blocks])
    def body(h, block_vars):
      if update_stats:
        h, updates = block.apply(block_vars, h, mutable=['batch_stats'])
        return h, updates['batch_stats']
      return block.apply(block_vars, h), None

    x, new_stats = jax.lax.scan(body, x, stacked)
    if update_stats:
      for name, stats in new_stats.items():
        for i in range(self.depth):
          self.put_variable('batch_stats', f'block{i}_{name}',
                            jax.tree.map(lambda v, i=i: v[i], stats))
    return x
