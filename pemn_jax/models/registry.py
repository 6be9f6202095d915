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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model family, as the config sees it.

  Attributes:
    build: ``(model config, layers) -> module``; ``layers`` holds the ``conv`` and ``dense``
      layer classes (masked, sparse or dense), ``dtype`` and ``num_classes``, which every
      family takes as attributes.
    validate: raises ValueError naming the field for a config this family cannot build (the
      generic fields are checked by ``build.validate_config`` before).
    fields: the ``model.*`` fields the family reads besides the generic ones (documentation,
      and ``pemn inspect``'s description of the model).
    identical_blocks: whether ``model.remat_blocks`` applies (its blocks can be one scan).
  """

  build: Callable[[ml_collections.ConfigDict, dict[str, Any]], nn.Module]
  validate: Callable[[ml_collections.ConfigDict], None] = _no_checks
  fields: tuple[str, ...] = ()
  identical_blocks: bool = False
