"""The PEMN weight strategies: which random values fill the frozen kernels.

Every function here is pure: it maps the freshly initialised ``frozen`` collection (one
independent Kaiming-normal draw per layer, the "Mask" strategy) to the collection a strategy
prescribes. Masked layers are ordered by depth (the order the model calls them). Values are
placed in the reference's order: a kernel is flattened in PyTorch layout (conv OIHW, dense OI),
filled, then transposed into Flax layout.

=========================  ================================================================
``mask``                   each layer keeps its own draw
``one_layer``              the first layer of each shape is the prototype, later layers of
                           that shape copy it; the classifier (last layer) keeps its own draw
``max_layer_padding``      u = flattened largest layer (first on ties, length N); layer l gets
                           u[:d_l]
``random_vector_padding``  v = u[:floor(N * r) + 1] tiled to length N; layer l gets the prefix
                           of length d_l
=========================  ================================================================
"""

from __future__ import annotations

import fractions
import functools
import math
import numbers
import operator
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pemn_jax import layers

STRATEGIES = ('mask', 'one_layer', 'max_layer_padding', 'random_vector_padding')
RP_RATIOS_OF_THE_PAPER = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)
Path = tuple[str, ...]


def validate(name: str, rp_ratio: float | None = None) -> None:
  """Checks a strategy name (and the RP ratio where it matters).

  Raises:
    ValueError: naming ``strategy.name`` or ``strategy.rp_ratio`` and what is allowed.
  """
  if name not in STRATEGIES:
    raise ValueError(f'strategy.name must be one of {STRATEGIES}, got {name!r}')
  if name == 'random_vector_padding':
    if (
      rp_ratio is None
      or isinstance(rp_ratio, bool)
      or not isinstance(rp_ratio, numbers.Real)
      or math.isnan(rp_ratio)
      or not 0.0 < rp_ratio <= 1.0
    ):
      raise ValueError(
        'strategy.rp_ratio must be a number in (0, 1] for random_vector_padding '
        f'(the paper uses {RP_RATIOS_OF_THE_PAPER}), got {rp_ratio!r}'
      )


def rp_vector_length(largest_size: int, rp_ratio: float) -> int:
  """floor(N * r) + 1, computed on the rational r (so 1e-3 * 65536 floors to 65, exactly)."""
  r = fractions.Fraction(float(rp_ratio)).limit_denominator(10**12)
  return min(largest_size, math.floor(r * largest_size) + 1)


def get_path(tree: dict, path: Path):
  """The leaf (or subtree) of a nested dict at ``path``."""
  return functools.reduce(operator.getitem, path, tree)


def tree_items(tree) -> list[tuple[Path, Any]]:
  """``(path, leaf)`` of a nested dict in the dict's own (insertion) order, depth first."""
  return list(traverse_util.flatten_dict(tree).items())


def kernel_paths(frozen: dict) -> list[Path]:
  """Paths of the kernels in ``frozen`` in the dict's own (insertion) order.

  Flax builds the collection in call order, so on a collection straight out of ``model.init``
  (before any pytree flattening, which sorts keys) this is the order by depth.
  """
  return [path for path, _ in tree_items(frozen)]


def _place(flat_torch_values, flax_shape):
  """Fills a kernel of ``flax_shape`` from values given in PyTorch-layout flat order."""
  w = flat_torch_values.reshape(layers.torch_shape(flax_shape))
  return layers.to_flax_layout(w)


def largest_index(shapes: Sequence[tuple[int, ...]]) -> int:
  """Index of the layer with most entries (first on ties)."""
  sizes = [int(np.prod(s)) for s in shapes]
  return sizes.index(max(sizes))


def apply_strategy(
  frozen: dict, order: Sequence[Path], name: str, rp_ratio: float | None = None
) -> dict:
  """Rewrites the frozen kernels as the strategy prescribes (pure; works under ``jit``).

  Args:
    frozen: the ``frozen`` collection from ``model.init`` (independent draws per layer).
    order: kernel paths ordered by depth (``kernel_paths`` of the un-flattened collection).
    name: one of ``STRATEGIES``.
    rp_ratio: r for ``random_vector_padding``.

  Returns:
    A collection of the same structure, shapes and dtypes.
  """
  validate(name, rp_ratio)
  if name == 'mask':
    return frozen
  kernels = [get_path(frozen, p) for p in order]
  shapes = [tuple(k.shape) for k in kernels]
  new = list(kernels)
  if name == 'one_layer':
    prototypes: dict[tuple[int, ...], Any] = {}
    for i, (k, s) in enumerate(zip(kernels, shapes)):
      if i == len(kernels) - 1:  # the classifier keeps its own draw
        break
      if s in prototypes:
        new[i] = prototypes[s]
      else:
        prototypes[s] = k
  else:
    big = largest_index(shapes)
    u = layers.to_torch_layout(kernels[big]).reshape(-1)
    if name == 'random_vector_padding':
      v = u[: rp_vector_length(u.size, rp_ratio)]
      reps = -(-u.size // v.size)
      u = jnp.tile(v, reps)[: u.size]
    for i, s in enumerate(shapes):
      new[i] = _place(u[: int(np.prod(s))], s)
  flat = traverse_util.flatten_dict(frozen)  # keeps the collection's own key order
  flat.update(zip(order, new))
  return traverse_util.unflatten_dict(flat)


def stored_value_count(
  shapes: Sequence[tuple[int, ...]], name: str, rp_ratio: float | None = None
) -> int:
  """How many random values the paper's convention stores for a strategy.

  Args:
    shapes: kernel shapes ordered by depth (Flax or PyTorch layout alike).
    name: one of ``STRATEGIES``.
    rp_ratio: r for ``random_vector_padding``.

  Returns:
    Mask: every weight; one-layer: one prototype per repeated shape plus the classifier and
    every unrepeated layer; MP: the largest layer; RP: ``floor(N * r) + 1``.
  """
  validate(name, rp_ratio)
  sizes = [int(np.prod(s)) for s in shapes]
  if name == 'mask':
    return sum(sizes)
  if name == 'one_layer':
    seen, total = set(), 0
    for i, (s, d) in enumerate(zip(shapes, sizes)):
      if i == len(shapes) - 1 or tuple(s) not in seen:
        total += d
      seen.add(tuple(s))
    return total
  n = max(sizes)
  if name == 'max_layer_padding':
    return n
  return rp_vector_length(n, rp_ratio)


def unique_values(frozen: dict) -> int:
  """Distinct values actually present in a frozen collection (counted, not derived)."""
  leaves = [np.asarray(get_path(frozen, p)).reshape(-1) for p in kernel_paths(frozen)]
  if not leaves:
    return 0
  return int(np.unique(np.concatenate(leaves)).size)
