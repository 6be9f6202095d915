"""Identical blocks run as one rematerialised ``lax.scan``, on the model's usual variable tree.

A model with ``depth`` identical blocks normally unrolls them, and its variables hold one
subtree per block (``block3_depthwise``, ``block3/attn``, ...). Every strategy, checkpoint and
artifact walks that tree, so it must not change. ``scan_blocks`` keeps it: at apply time it
stacks the blocks' variables along a new leading axis, scans one unbound block module over
them under ``jax.checkpoint``, and writes the updated BatchNorm statistics back under the
original names. The values are the unrolled network's (up to float reassociation).

Why a scan: ``jax.checkpoint`` on the unrolled blocks did not lower XLA:CPU's memory, because
its scheduler hoists all the recomputation to the start of the backward pass
(experiments/results/PERFORMANCE.md, attempts 8-9). Inside a loop the recomputation can only
happen one block at a time (attempt 28).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from pemn_jax import layers, strategies
from pemn_jax.strategies import Path

# What the backward keeps of each block besides its input (a ``jax.checkpoint`` policy; the
# rest is recomputed from the block input, one block at a time):
# 'save_convs': the outputs of every conv and dense layer (tagged ``layers.CHECKPOINT_NAME``),
#   so only the elementwise work between them (GELU, normalisation, residual adds, and in a
#   ViT the attention softmax) is recomputed; 'full': nothing, the whole block is recomputed.
REMAT_POLICIES = {
  'save_convs': jax.checkpoint_policies.save_only_these_names(layers.CHECKPOINT_NAME),
  'full': jax.checkpoint_policies.nothing_saveable,
}
REMAT_CHOICES = ('none', *REMAT_POLICIES)


def check(remat_blocks: str) -> None:
  if remat_blocks not in REMAT_CHOICES:
    raise ValueError(f'remat_blocks must be one of {REMAT_CHOICES}, got {remat_blocks!r}')


def _has(tree: dict, path: Path) -> bool:
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return False
    tree = tree[k]
  return True


def scan_blocks(
  parent: nn.Module,
  block: nn.Module,
  x: jax.Array,
  depth: int,
  paths: Callable[[int], dict[str, Path]],
  remat_blocks: str,
  train: bool,
):
  """Applies ``block`` ``depth`` times to ``x`` with block i's variables taken from ``parent``.

  Args:
    parent: the bound module that owns the blocks' variables (call from its ``__call__`` in
      training only: init must create the unrolled tree, and evaluation has no backward pass
      to save memory in, so the models run their blocks unrolled there).
    block: an unbound module for one block.
    x: the input of the first block.
    depth: number of blocks.
    paths: ``paths(i)`` maps each top-level name of ``block``'s variables to the path of block
      i's corresponding subtree in ``parent``'s variables, e.g.
      ``{'depthwise': ('block3_depthwise',)}`` or ``{'attn': ('block3', 'attn')}``.
    remat_blocks: a key of ``REMAT_POLICIES``.
    train: whether BatchNorm statistics are updated (when ``parent`` may write them).
  """
  stacked = {}
  for col, tree in parent.variables.items():
    per_name = {
      name: jax.tree.map(
        lambda *v: jnp.stack(v), *[strategies.get_path(tree, paths(i)[name]) for i in range(depth)]
      )
      for name, path in paths(0).items()
      if _has(tree, path)
    }
    if per_name:
      stacked[col] = per_name
  update_stats = train and 'batch_stats' in stacked and parent.is_mutable_collection('batch_stats')

  @functools.partial(jax.checkpoint, policy=REMAT_POLICIES[remat_blocks])
  def body(h, block_vars):
    if update_stats:
      h, updates = block.apply(block_vars, h, mutable=['batch_stats'])
      return h, updates['batch_stats']
    return block.apply(block_vars, h), None

  x, new_stats = jax.lax.scan(body, x, stacked)
  if update_stats:
    flat = {  # path in the parent -> block i's (nested) statistics
      paths(i)[name]: jax.tree.map(lambda v, i=i: v[i], stats)
      for i in range(depth)
      for name, stats in new_stats.items()
    }
    for key, value in traverse_util.unflatten_dict(flat).items():
      parent.put_variable('batch_stats', key, value)
  return x
