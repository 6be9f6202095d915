"""How a model family is built and checked from its ``model`` config section.

Each model module ends with a ``SPEC``; ``pemn_jax.models.REGISTRY`` maps ``model.name`` to it,
and ``pemn_jax.build`` knows models only through it. A new family is a module with its Linen
class and a ``SPEC``, and one line in ``pemn_jax/models/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import ml_collections


def _no_checks(m: ml_collections.ConfigDict) -> None:
  del m


def _no_input_checks(m: ml_collections.ConfigDict, shape: tuple[int, int, int]) -> None:
  del m, shape


def check_patch(
  m: ml_collections.ConfigDict, shape: tuple[int, int, int], *, divide: bool
) -> tuple[int, int]:
  """The (h, w) grid of ``model.patch_size`` patches on a ``shape`` image, after checking the
  patch fits the image (and divides it, when ``divide``: the patches then tile it exactly)."""
  p, (h, w, _) = m.patch_size, shape
  if p > min(h, w):
    raise ValueError(
      f'model.patch_size ({p}) must be at most the {h}x{w} image size (a larger patch covers '
      'no position of the image)'
    )
  if divide and (h % p or w % p):
    fits = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
    raise ValueError(
      f'model.patch_size ({p}) must divide the {h}x{w} image size (the patches tile the image): '
      f'one of {fits}'
    )
  return h // p, w // p


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model family, as the config sees it.

  Attributes:
    build: ``(model config, layers) -> module``; ``layers`` holds the ``conv`` and ``dense``
      layer classes (masked, sparse or dense), ``dtype`` and ``num_classes``, which every
      family takes as attributes.
    validate: raises ValueError naming the field for a config this family cannot build (the
      generic fields are checked by ``build.validate_config`` before).
    check_input: ``(model config, (H, W, C))``: raises ValueError naming the field when the
      model does not fit images of that shape (a patch larger than the image).
    fields: the ``model.*`` fields the family reads besides the generic ones (documentation,
      and ``pemn inspect``'s description of the model).
    identical_blocks: whether ``model.remat_blocks`` applies (its blocks can be one scan).
  """

  build: Callable[[ml_collections.ConfigDict, dict[str, Any]], nn.Module]
  validate: Callable[[ml_collections.ConfigDict], None] = _no_checks
  check_input: Callable[[ml_collections.ConfigDict, tuple[int, int, int]], None] = _no_input_checks
  fields: tuple[str, ...] = ()
  identical_blocks: bool = False
