"""Masks over pretrained weights: mask fine-tuning (MFT) and lottery jackpots.

PEMN learns masks over frozen *random* weights. Here the frozen weights are a trained model's
(the *base*): the masked layers' ``frozen/<layer>/kernel`` is the base's ``params/<layer>/
kernel`` in place of the random draw, and every other leaf (BatchNorm, biases) starts from the
base's leaf of the same path. The masks are then learned exactly as in PEMN (straight-through
top-k of the scores, ``masking.score_mask``), at a keep fraction near 1 for mask fine-tuning
(Zhang, Bai et al. 2025, arXiv 2503.22764) or far below for lottery jackpots (Chen et al.,
"Lottery Jackpots Exist in Pre-trained Models").

A base is read into one flat tree named as the DENSE model of the same definition names its
variables (``('params', 'stem', 'kernel')``, ``('batch_stats', 'stem_bn', 'mean')``), from

* ``'workdir'``: a pemn-jax run's latest checkpoint (dense; a masked run is materialised,
  weights x masks, ``artifact.materialize_dense``), verified as every restore is;
* ``'orbax'``: a variables tree ``{'params': ..., 'batch_stats': ...}`` (or a params tree alone)
  saved with ``orbax.checkpoint`` (``StandardCheckpointer().save(path, tree)``);
* ``'flax'``: the same tree as ``flax.serialization.msgpack_serialize`` bytes;
* ``'safetensors'``: one tensor per variable, named by its path (``'params/stem/kernel'``) or by
  a name map ``{variable path: tensor name}`` (``safetensors.numpy``: no torch or TF needed).

Kernels are read in Flax layout (HWIO convs, (in, out) dense kernels), or in PyTorch's
(``layout='torch'``, ``model.base_layout``: OIHW, (out, in)), transposed on reading.

Every value is cast to float32 (the model's dtype for every variable). ``Base.fingerprint`` is
the sha256 of that tree (path, shape, dtype, bytes), so it does not depend on the format the
base came in: a checkpoint records it (a resume reloads the base and refuses another one) and
a ``.pemn`` mask delta records it instead of any weight.

``apply_base`` puts a base into a model's freshly initialised variables, checking names and
shapes (one line naming the first path that differs); ``init_scores`` sets the initial scores
(``SCORE_INITS``); ``mask_only`` wraps an optimizer so that only the scores learn. ``build.
init_variables`` calls the first two for configs with ``model.base_source`` set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from pemn_jax import layers

FORMATS = ('workdir', 'orbax', 'flax', 'safetensors')
# How a base's kernels are laid out: 'flax' (HWIO convs, (in, out) dense) or 'torch' (OIHW,
# (out, in): transposed on reading, ``layers.to_flax_layout``; kernels of other ranks as they are)
LAYOUTS = ('flax', 'torch')
UNMASKED_CHOICES = ('train', 'freeze')
# 'uniform': U(+-1/sqrt(fan_in)) (the paper's); 'magnitude': |w| of the frozen kernel (the first
# mask keeps the largest weights); 'constant': 1/sqrt(fan_in) x (1 + U(+-CONSTANT_NOISE)).
SCORE_INITS = ('uniform', 'magnitude', 'constant')
CONSTANT_NOISE = 1e-3
# What ``_normalise`` accepts at the top of a variables tree (anything else: a params tree).
_COLLECTIONS = ('params', 'batch_stats')

Path = tuple[str, ...]


class BaseError(ValueError):
  """A base model that cannot be used: missing, unreadable, or not the model's (one line)."""


@dataclasses.dataclass(frozen=True)
class Base:
  """A loaded base model.

  Attributes:
    tree: ``{(collection, *path): float32 array}`` in the dense model's names.
    fingerprint: sha256 hex digest of ``tree`` (``tree_fingerprint``).
    format: one of ``FORMATS``.
    layout: one of ``LAYOUTS``: how the file laid its kernels out (``tree`` is in Flax layout).
  """

  tree: dict
  fingerprint: str
  format: str
  layout: str = 'flax'

  @property
  def num_values(self) -> int:
    return sum(int(a.size) for a in self.tree.values())


def tree_fingerprint(tree: dict) -> str:
  """sha256 over a flat ``{path: array}`` tree: every path, shape, dtype and the bytes."""
  h = hashlib.sha256(b'pemn-base-v1')
  for path in sorted(tree):
    a = np.ascontiguousarray(np.asarray(tree[path]))
    h.update('/'.join(path).encode() + b'\0')
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(a.astype(a.dtype.newbyteorder('<')).tobytes())
  return h.hexdigest()


def check_source(source: Any, fmt: Any, name_map: Any = None, field: str = 'model.base_source'):
  """Raises ``BaseError`` (one line naming the field) unless the source can be read as ``fmt``."""
  if not isinstance(source, str) or not source or '\x00' in source:
    raise BaseError(f'{field} must be a non-empty path, got {source!r}')
  if fmt not in FORMATS:
    raise BaseError(f'model.base_format must be one of {FORMATS}, got {fmt!r}')
  if not os.path.exists(source):
    raise BaseError(f'{field} {source}: no such file or directory')
  wants_dir = fmt in ('workdir', 'orbax')
  if wants_dir != os.path.isdir(source):
    kind = 'directory' if wants_dir else 'file'
    raise BaseError(f"{field} {source} is not a {kind}, as model.base_format='{fmt}' reads")
  if name_map is not None and fmt != 'safetensors':
    raise BaseError(
      f"model.base_name_map is for model.base_format='safetensors', got format {fmt!r}"
    )


def load_base(
  source: str, fmt: str = 'workdir', name_map: str | dict | None = None, layout: str = 'flax'
) -> Base:
  """Reads a base model (module docstring), cached by (path, format, map, size, mtime).

  Args:
    source: the path (a workdir or an orbax directory; a msgpack or safetensors file).
    fmt: one of ``FORMATS``.
    name_map: safetensors only: ``{variable path: tensor name}`` or a JSON file of it.
    layout: the kernels' layout in the file (``LAYOUTS``); the tree is Flax's either way.

  Raises:
    BaseError: one line naming the path and what is wrong.
  """
  check_source(source, fmt, name_map)
  if layout not in LAYOUTS:
    raise BaseError(f'model.base_layout must be one of {LAYOUTS}, got {layout!r}')
  if isinstance(name_map, str):
    name_map = _read_name_map(name_map)
  st = os.stat(source)
  mapped = tuple(sorted(name_map.items())) if name_map else ()
  real = os.path.realpath(source)
  return _load_cached(real, fmt, mapped, layout, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_cached(source, fmt, mapped, layout, size, mtime) -> Base:
  del size, mtime  # cache key only: a changed file is read again
  reader = {
    'workdir': _read_workdir,
    'orbax': _read_orbax,
    'flax': _read_flax,
    'safetensors': lambda p: _read_safetensors(p, dict(mapped)),
  }[fmt]
  tree = {}
  for path, leaf in reader(source).items():
    a = np.asarray(jax.device_get(leaf))
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype == jnp.bfloat16):
      raise BaseError(f'base {source}: {"/".join(path)} is {a.dtype}, not a floating array')
    if layout == 'torch' and path[-1] == 'kernel':
      a = layers.to_flax_layout(a)
    tree[path] = np.ascontiguousarray(a.astype(np.float32))
  if not tree:
    raise BaseError(f'base {source} holds no arrays')
  return Base(tree, tree_fingerprint(tree), fmt, layout)


def from_variables(variables: dict, fmt: str = 'flax') -> Base:
  """A ``Base`` of an in-memory variables tree (or params tree) of the dense model: the tree a
  ``'flax'`` (or ``'orbax'``) file of it would load, with the same fingerprint."""
  if fmt not in FORMATS:
    raise BaseError(f'fmt must be one of {FORMATS}, got {fmt!r}')
  tree = {}
  for path, leaf in _normalise(jax.device_get(dict(variables)), 'the given variables').items():
    tree[path] = np.ascontiguousarray(np.asarray(leaf, np.float32))
  return Base(tree, tree_fingerprint(tree), fmt)


def _read_name_map(path: str) -> dict:
  try:
    with open(path) as f:
      m = json.load(f)
  except (OSError, ValueError) as e:
    raise BaseError(f'model.base_name_map {path}: not a readable JSON file ({e})') from None
  if not isinstance(m, dict) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in m.items()
  ):
    raise BaseError(
      f'model.base_name_map {path} must be a JSON object {{variable path: tensor name}}'
    )
  return m


def _normalise(tree: Any, source: str) -> dict:
  """A nested variables tree (or a params tree alone) as ``{(collection, *path): leaf}``."""
  if not isinstance(tree, dict) or not tree:
    raise BaseError(f'base {source} is not a tree of arrays')
  if any(k in _COLLECTIONS for k in tree):
    unknown = sorted(k for k in tree if k not in (*_COLLECTIONS, layers.FROZEN))
    if unknown:
      raise BaseError(
        f'base {source} has a collection {unknown[0]!r}; a variables tree holds {_COLLECTIONS}'
      )
    tree = {k: tree[k] for k in _COLLECTIONS if k in tree}
  else:
    tree = {'params': tree}
  return {tuple(str(p) for p in k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _read_workdir(path: str) -> dict:
  from pemn_jax import artifact, train  # the trainer, only for a workdir base

  try:
    config, s, state, _ = train.restore_workdir(path)
  except (FileNotFoundError, ValueError) as e:
    raise BaseError(f'base workdir {path}: {str(e).splitlines()[0]}') from None
  m = config.model
  if m.sparsity_method or m.binary_weights or m.base_source:
    raise BaseError(
      f'base workdir {path} is a sparse, 1-bit or mask-over-base run; a base is a dense run '
      '(model.masked=False) or a PEMN run'
    )
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if m.masked:  # weights x masks: the network that run computes, as a dense tree
    _, variables = artifact.materialize_dense(config, {**variables, layers.FROZEN: s.frozen})
  return _normalise(variables, path)


def _read_orbax(path: str) -> dict:
  import orbax.checkpoint as ocp

  try:
    tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
  except Exception as e:  # orbax raises many kinds
    raise BaseError(f'base {path}: not an orbax checkpoint ({type(e).__name__})') from None
  return _normalise(tree, path)


def _read_flax(path: str) -> dict:
  from flax import serialization

  try:
    with open(path, 'rb') as f:
      tree = serialization.msgpack_restore(f.read())
  except Exception as e:  # msgpack raises many kinds
    raise BaseError(f'base {path}: not flax.serialization msgpack ({type(e).__name__})') from None
  return _normalise(tree, path)


def _read_safetensors(path: str, name_map: dict) -> dict:
  from safetensors.numpy import load_file

  try:
    tensors = load_file(path)
  except Exception as e:  # safetensors raises its own kinds
    raise BaseError(f'base {path}: not a safetensors file ({type(e).__name__})') from None
  by_name = {v: k for k, v in name_map.items()}
  missing = sorted(v for v in by_name if v not in tensors)
  if missing:
    raise BaseError(
      f'base {path} has no tensor {missing[0]!r}, which model.base_name_map names for '
      f'{by_name[missing[0]]}'
    )
  out = {}
  for name, a in tensors.items():
    out[tuple(by_name.get(name, name).split('/'))] = a
  return out


def save_safetensors(variables: dict, path: str, name_map: dict | None = None) -> None:
  """Writes a variables tree's ``params`` and ``batch_stats`` as safetensors (tensor names: the
  variable paths, or ``name_map[path]``): the inverse of the ``'safetensors'`` reader."""
  from safetensors.numpy import save_file

  name_map = name_map or {}
  flat = _normalise({k: variables[k] for k in _COLLECTIONS if k in variables}, path)
  tensors = {}
  for p, leaf in flat.items():
    key = '/'.join(p)
    tensors[name_map.get(key, key)] = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
  save_file(tensors, path)


def dense_names(variables: dict) -> dict[Path, Path]:
  """``{dense-model name: (collection, *path) in variables}`` for every leaf a base supplies.

  A masked layer's kernel (``frozen/L/kernel``) is the dense model's ``params/L/kernel``; its
  scores are not in a base; every other ``params`` and ``batch_stats`` leaf keeps its path. The
  other ``frozen`` leaves (a random sparse baseline's masks) are not a base's.
  """
  out = {}
  params = traverse_util.flatten_dict(variables.get('params', {}))
  frozen = traverse_util.flatten_dict(variables.get(layers.FROZEN, {}))
  for p in params:
    if p[-1] != 'scores':
      out[('params', *p)] = ('params', *p)
  for p in frozen:
    if p[-1] == 'kernel' and p[:-1] + ('scores',) in params:
      out[('params', *p)] = (layers.FROZEN, *p)
  for p in traverse_util.flatten_dict(variables.get('batch_stats', {})):
    out[('batch_stats', *p)] = ('batch_stats', *p)
  return out


def check_base(variables: dict, base: Base, where: str = 'model.base_source') -> dict:
  """``{(collection, *path) in variables: base array}``, after checking the base holds exactly
  the model's leaves with their shapes.

  Raises:
    BaseError: one line naming the first path (sorted) that differs.
  """
  names = dense_names(variables)
  flat = {
    k: v
    for c in (*_COLLECTIONS, layers.FROZEN)
    for k, v in traverse_util.flatten_dict({c: variables.get(c, {})}).items()
  }
  missing = sorted(set(names) - set(base.tree))
  if missing:
    raise BaseError(
      f'{where}: the base has no {"/".join(missing[0])}, which the model needs '
      f'({len(missing)} of its {len(names)} leaves missing): not a base of this model definition'
    )
  extra = sorted(set(base.tree) - set(names))
  if extra:
    raise BaseError(
      f'{where}: the base has {"/".join(extra[0])}, which is no variable of the model '
      f'({len(extra)} such): not a base of this model definition'
    )
  out = {}
  for name in sorted(names):
    target = names[name]
    want, got = tuple(flat[target].shape), tuple(base.tree[name].shape)
    if want != got:
      raise BaseError(
        f"{where}: the base's {'/'.join(name)} has shape {got}, the model's is {want}"
      )
    out[target] = base.tree[name]
  return out


def apply_base(variables: dict, base: Base, where: str = 'model.base_source') -> dict:
  """``variables`` with every leaf a base supplies replaced by the base's (``check_base``)."""
  flat = {
    k: v for c, tree in variables.items() for k, v in traverse_util.flatten_dict({c: tree}).items()
  }
  for target, a in check_base(variables, base, where).items():
    flat[target] = jnp.asarray(a, flat[target].dtype)
  return traverse_util.unflatten_dict(flat)


def init_scores(variables: dict, how: str, key: jax.Array | None = None) -> dict:
  """``variables`` with every masked layer's scores initialised as ``how`` (``SCORE_INITS``).

  'uniform' leaves them as drawn; 'magnitude' sets them to ``|frozen kernel|``, so that the first
  mask is the top-k of ``|w|`` (magnitude pruning) under either ``score_abs``; 'constant' sets
  ``1/sqrt(fan_in) x (1 + U(+-CONSTANT_NOISE))`` (``key`` folded with the layer's index in
  sorted path order).
  """
  if how not in SCORE_INITS:
    raise ValueError(f'strategy.score_init must be one of {SCORE_INITS}, got {how!r}')
  if how == 'uniform':
    return variables
  params = traverse_util.flatten_dict(variables['params'])
  frozen = traverse_util.flatten_dict(variables.get(layers.FROZEN, {}))
  key = jax.random.key(0) if key is None else key
  for i, p in enumerate(sorted(q for q in params if q[-1] == 'scores')):
    s = params[p]
    if how == 'magnitude':
      params[p] = jnp.abs(frozen[p[:-1] + ('kernel',)]).astype(s.dtype)
    else:
      noise = jax.random.uniform(jax.random.fold_in(key, i), s.shape, s.dtype, -1.0, 1.0)
      params[p] = (1.0 + CONSTANT_NOISE * noise) / np.sqrt(layers.fan_in(s.shape))
  return {**variables, 'params': traverse_util.unflatten_dict(params)}


def is_score(path) -> bool:
  """Whether a params path (a tuple of keys or of ``jax.tree_util`` key entries) is a score."""
  last = path[-1]
  return getattr(last, 'key', last) == 'scores'


def mask_only(
  tx: optax.GradientTransformation, trainable: Sequence[str] = ()
) -> optax.GradientTransformation:
  """``tx`` with every update but the scores' set to zero: only the masks learn (weight decay
  included, as ``tx`` computes it before the zeroing). BatchNorm running statistics are no
  params and still update in train mode.

  ``trainable``: rules (``re.fullmatch`` on ``'/'``-joined params paths such as
  ``'block0_bn/scale'``, as ``mask_model``'s) naming leaves that keep their updates too, e.g.
  ``('.*_bn/.*',)`` to train BatchNorm over frozen weights, or ``('head/.*',)`` an unmasked head.
  """
  rules = [re.compile(r) for r in trainable]

  def frozen_leaves(params):
    def frozen(path, _):
      if is_score(path):
        return False
      name = '/'.join(str(getattr(k, 'key', k)) for k in path)
      return not any(r.fullmatch(name) for r in rules)

    return jax.tree_util.tree_map_with_path(frozen, params)

  return optax.chain(tx, optax.masked(optax.set_to_zero(), frozen_leaves))
