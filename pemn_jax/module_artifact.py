"""The ``.pemn`` file of a model pemn-jax's configs do not describe: any Linen module.

``artifact`` rebuilds a network from the config in its header. A module a user wrote (masked
by ``mask_model`` or built from ``pemn_jax.layers``) has no such description, so its file
stores what only the caller's code cannot regenerate, and the caller brings the code back:

  pemn.export_module('net.pemn', module, variables, (x,), frozen_key=k)
  variables = pemn.load_module('net.pemn', module)

The file has the same frame as every artifact (magic, format version, zlib JSON header,
payload, sha256; format version 2, see ``artifact.FORMAT_VERSION``). Its header holds, instead
of a ``config``, a ``module`` section: the module's class name (for messages only), the shapes
and dtypes of the example inputs and the keyword arguments it was called with, and the
*structure*: every variable of ``module.init`` as (collection, path, shape, dtype), with its
sha256 (``structure_fingerprint``). The payload stores:

- each masked layer's mask (``params/<layer>/scores`` -> the mask its forward pass applies),
  bit-packed or entropy-coded by ``codec`` as in every artifact;
- every other variable as a raw little-endian array, in any collection (BN and LayerNorm,
  biases, unmatched layers, frozen leaves that are not a masked layer's kernel such as frozen
  biases);
- nothing of the masked layers' frozen kernels: they are regenerated from the recorded key with
  the module's own ``init`` and checked against ``frozen_fingerprint``.

An NNX model (``pemn_jax.nnx`` layers, or ``mask_model`` of an NNX model) holds its variables:
``export_module(path, model)`` stores them the same way (variable types as collections: Frozen
-> ``frozen``, Param -> ``params``, BatchStat -> ``batch_stats``) with no key, since its
constructor drew the frozen kernels; ``load_module(path, model)`` takes the model constructed
again with the same ``rngs`` (and strategy), checks its frozen kernels against the recorded
fingerprint and sets every other variable in place.

A layer counts as masked when it owns a ``scores`` param and either is a ``mask_model`` layer
(its rules give the keep fraction) or has the attributes ``keep_fraction`` (and ``score_abs``,
default true) and masks its scores with ``masking.score_mask``, as ``pemn_jax.layers`` does: a
layer of your own following that contract exports too. A ``scores`` param of any other layer is
refused at export, since its mask could not be recomputed on load.

Loading checks, before using anything, that the module's variable structure is the recorded
one (else a one-line ``ArtifactError`` names the first variable that differs), that each
mask keeps exactly the count the module's keep fraction gives, and that the regenerated frozen
kernels have the recorded fingerprint. Masks become scores of 1 (kept) and 0, so the module's
own top-k selects exactly the stored mask and the logits are the exported network's, bit for bit.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pemn_jax import artifact, build, fileio, layers, masking
from pemn_jax.artifact import ArtifactError, _Invalid

HEADER_FIELDS = {
  'format_version',
  'created',
  'versions',
  'step',
  'key',
  'frozen_fingerprint',
  'module',
  'entries',
  'base',  # a mask delta over a base model (artifact's base section), optional
}
MODULE_FIELDS = {
  'class',
  'inputs',
  'call_kwargs',
  'structure',
  'structure_fingerprint',
  'masked_layers',
  'init',
  'framework',
}
FRAMEWORKS = ('linen', 'nnx')
# How ``module.init`` regenerates the frozen kernels: under ``jax.jit`` or op by op. The two can
# differ in the last bit of a random draw (XLA fuses the sampling arithmetic differently), so the
# file records the one that reproduces the exported kernels.
INIT_MODES = ('jit', 'eager', 'construct')  # 'construct': an NNX model, drawn by its constructor
MAX_INPUTS = 16
_DTYPES = ('float32', 'float16', 'bfloat16', 'float64', 'int32', 'int64', 'int8', 'uint8', 'bool')
# The rng streams an init may draw from; pemn-jax's frozen stream gets the recorded key.
_INIT_STREAMS = ('params', 'dropout')


def is_module_header(header: Any) -> bool:
  """Whether a parsed header describes a module file (has ``module``, no ``config``)."""
  return isinstance(header, dict) and 'module' in header and 'config' not in header


# ----------------------------------------------------------------------------------------------
# The module's structure and masked layers.


def _input_specs(inputs) -> tuple[jax.ShapeDtypeStruct, ...]:
  if not isinstance(inputs, (tuple, list)):
    inputs = (inputs,)
  if not 1 <= len(inputs) <= MAX_INPUTS:
    raise ValueError(f'inputs must be 1 to {MAX_INPUTS} example arrays, got {len(inputs)}')
  specs = []
  for i, x in enumerate(inputs):
    if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
      raise ValueError(
        f'inputs[{i}] must be an array or jax.ShapeDtypeStruct, got {type(x).__name__}'
      )
    dtype = jnp.dtype(x.dtype).name
    if dtype not in _DTYPES:
      raise ValueError(f'inputs[{i}] has dtype {dtype}; an artifact records one of {_DTYPES}')
    specs.append(jax.ShapeDtypeStruct(tuple(int(d) for d in x.shape), jnp.dtype(dtype)))
  return tuple(specs)


def _check_call_kwargs(call_kwargs) -> dict:
  if call_kwargs is None:
    return {}
  if not isinstance(call_kwargs, Mapping):
    raise ValueError(f'call_kwargs must be a dict, got {type(call_kwargs).__name__}')
  for k, v in call_kwargs.items():
    if not isinstance(k, str) or not k.isidentifier():
      raise ValueError(f'call_kwargs keys must be argument names, got {k!r}')
    if v is not None and not isinstance(v, (bool, int, float, str)):
      raise ValueError(
        f'call_kwargs[{k!r}] must be a bool, number, string or None (it is recorded in the '
        f'file), got {type(v).__name__}'
      )
  return dict(call_kwargs)


def _init_fn(module: nn.Module, call_kwargs: dict):
  def init(frozen_key, *xs):
    rngs = {name: jax.random.key(i) for i, name in enumerate(_INIT_STREAMS)}
    rngs[layers.FROZEN] = frozen_key
    return module.init(rngs, *xs, **call_kwargs)

  return init


def _zeros(specs):
  return [jnp.zeros(s.shape, s.dtype) for s in specs]


def _structure(tree: dict) -> list[list]:
  """Every variable as [collection, path, shape, dtype], sorted: the tree's structure."""
  out = []
  for path, leaf in traverse_util.flatten_dict(flax.core.unfreeze(tree)).items():
    out.append([path[0], list(path[1:]), [int(d) for d in leaf.shape], jnp.dtype(leaf.dtype).name])
  return sorted(out, key=lambda r: (r[0], r[1]))


def _fingerprint(structure: list) -> str:
  text = json.dumps(structure, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()


def _abstract_init(module: nn.Module, specs, call_kwargs: dict) -> dict:
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  try:
    return jax.eval_shape(_init_fn(module, call_kwargs), key, *specs)
  except Exception as e:  # the user's module: whatever its init raises, named in one line
    raise ArtifactError(
      f'module.init on the recorded inputs failed ({type(e).__name__}: {_first_line(e)})'
    ) from None


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ''


def _masked_layers(module: nn.Module, abstract: dict, specs, call_kwargs: dict) -> dict:
  """``{layer path: (keep_fraction, score_abs)}`` of every layer owning ``params/.../scores``.

  Found by tracing ``module.apply`` abstractly with a method interceptor: a ``mask_model``
  layer gets its keep fraction from the rules of the masked module around it; any other layer
  from its own ``keep_fraction`` / ``score_abs`` attributes.
  """
  wrappers, owners = [], {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    path = tuple(m.path)
    plan = getattr(type(m), '_pemn_plan', None)
    if plan is not None:
      wrappers.append((path, plan))
    elif isinstance(getattr(m, 'keep_fraction', None), numbers.Real):
      owners.setdefault(path, (float(m.keep_fraction), bool(getattr(m, 'score_abs', True))))
    return next_fun(*args, **kwargs)

  def apply(variables, *xs):
    with nn.intercept_methods(record):
      return module.apply(variables, *xs, mutable=True, **call_kwargs)

  try:
    jax.eval_shape(apply, abstract, *specs)
  except Exception as e:
    raise ArtifactError(
      f'module.apply on the recorded inputs failed ({type(e).__name__}: {_first_line(e)})'
    ) from None
  from pemn_jax import convert

  out = {}
  for path in traverse_util.flatten_dict(flax.core.unfreeze(abstract.get('params', {}))):
    if path[-1] != 'scores':
      continue
    layer = path[:-1]
    if layer in owners:
      out[layer] = owners[layer]
      continue
    around = [(w, p) for w, p in wrappers if layer[: len(w)] == w]
    keep = None
    if around:
      w, plan = max(around, key=lambda wp: len(wp[0]))
      keep, _ = convert._keep_of('/'.join(layer[len(w) :]), plan)
      if keep is not None:
        out[layer] = (float(keep), plan.score_abs)
    if keep is None:
      raise ArtifactError(
        f'params/{"/".join(path)}: the layer {"/".join(layer)} has scores but neither is a '
        'mask_model layer nor has a keep_fraction attribute, so its mask cannot be recomputed '
        'on load'
      )
  return out


# ----------------------------------------------------------------------------------------------
# Writing.


def export_module(
  path: str,
  module,
  variables: Mapping | None = None,
  inputs=None,
  *,
  frozen_key: jax.Array | None = None,
  step: int = 0,
  call_kwargs: Mapping | None = None,
  base=None,
) -> dict:
  """Writes ``module``'s trained ``variables`` to ``path`` atomically (``inspect``'s summary).

  Args:
    path: destination file; an existing file is replaced only once the new one is whole.
    module: the (unbound) Linen module, e.g. ``pemn.mask_model(MyNet(), ...)``; or an NNX model
      (its variables are its own: ``variables`` and ``inputs`` are not given).
    variables: all the Linen module's variables (``params``, ``frozen``, ``batch_stats``, ...),
      as ``module.init`` made them and training changed them.
    inputs: example inputs (arrays or ``jax.ShapeDtypeStruct``; a tuple for several), recorded
      by shape and dtype so that ``load_module`` can run ``module.init`` again.
    frozen_key: the key given to the ``frozen`` rng stream at init; required when the module
      has masked layers (their random kernels are regenerated from it, never stored). It is
      checked now: the key must regenerate the frozen kernels in ``variables``.
    step: the training step the variables come from (recorded).
    call_kwargs: keyword arguments for the module's call at init (JSON scalars, recorded),
      e.g. ``{'train': False}``.
    base: the ``pretrained.Base`` the masked layers' frozen kernels came from
      (``pretrained.apply_base``): the file is then a mask delta, with the base's format and
      fingerprint in place of a key (no ``frozen_key``); ``load_module`` needs the base.

  Raises:
    ArtifactError: the variables are not the module's, a layer with scores is not a masked
      layer pemn-jax knows, the key regenerates other kernels, or the file cannot be written.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ArtifactError(f'cannot write the artifact to {path}: it is a directory')
  if _is_nnx(module):
    if variables is not None or inputs is not None:
      raise ArtifactError('an NNX model holds its variables: give neither variables nor inputs')
    return _export_nnx(path, module, step)
  if not isinstance(module, nn.Module) or module.scope is not None:
    raise ArtifactError('export_module needs an unbound Linen module (not one bound by apply)')
  if variables is None or inputs is None:
    raise ArtifactError("export_module needs the Linen module's variables and example inputs")
  try:
    specs = _input_specs(inputs)
    kwargs = _check_call_kwargs(call_kwargs)
  except ValueError as e:
    raise ArtifactError(str(e)) from None
  variables = flax.core.unfreeze(dict(variables))
  abstract = _abstract_init(module, specs, kwargs)
  structure = _structure(abstract)
  given = _structure(variables)
  if given != structure:
    raise ArtifactError(
      f'the variables are not those of the module: {_difference(structure, given)}'
    )
  masked = _masked_layers(module, abstract, specs, kwargs)
  regenerated = {(layers.FROZEN, *layer, 'kernel') for layer in masked}
  flat = {}
  for collection, tree in variables.items():
    for p, leaf in traverse_util.flatten_dict(tree).items():
      flat[(collection, *p)] = leaf
  regenerated &= set(flat)
  key = fingerprint = None
  if regenerated and base is not None:  # the kernels are the base's: checked, not regenerated
    for p in sorted(regenerated):
      want = base.tree.get(('params', *p[1:]))
      if want is None or not np.array_equal(np.asarray(jax.device_get(flat[p])), want):
        raise ArtifactError(
          f"the frozen kernel {'/'.join(p)} in variables is not the base's "
          f'params/{"/".join(p[1:])}: apply the base (pretrained.apply_base) before training'
        )
    frozen = {p[1:]: flat[p] for p in flat if p[0] == layers.FROZEN}
    fingerprint = build.frozen_fingerprint(traverse_util.unflatten_dict(frozen))
    init_mode = 'jit'
  elif base is not None:
    raise ArtifactError('base= is for a module with masked layers over a base (a mask delta)')
  elif regenerated:
    if frozen_key is None:
      raise ArtifactError(
        'frozen_key is needed: the module has masked layers whose frozen random kernels are '
        'regenerated from the key given to the frozen rng stream at init'
      )
    for init_mode in INIT_MODES:
      fresh = _regenerate(module, specs, kwargs, frozen_key, init_mode)
      differ = [p for p in sorted(regenerated) if not np.array_equal(fresh[p], flat[p])]
      if not differ:
        break
    else:
      raise ArtifactError(
        f'frozen_key does not regenerate the frozen kernel {"/".join(differ[0])} in variables: '
        'pass the key the frozen rng stream had at init'
      )
    frozen = {
      p[1:]: (fresh[p] if p in regenerated else flat[p]) for p in flat if p[0] == layers.FROZEN
    }
    fingerprint = build.frozen_fingerprint(traverse_util.unflatten_dict(frozen))
    key = {
      'impl': str(jax.random.key_impl(frozen_key)),
      'data': [int(x) for x in np.asarray(jax.random.key_data(frozen_key))],
    }
  entries, payload = _payload(masked, flat, regenerated, base)
  module_section = {
    'class': _class_name(module),
    'inputs': [{'shape': list(s.shape), 'dtype': s.dtype.name} for s in specs],
    'call_kwargs': kwargs,
    'structure': structure,
    'structure_fingerprint': _fingerprint(structure),
    'masked_layers': {'/'.join(k): v[0] for k, v in masked.items()},
    'init': init_mode if regenerated else 'jit',
    'framework': 'linen',
  }
  extra = {'base': artifact._base_section(base)} if base is not None else {}
  return _write(path, step, key, fingerprint, module_section, entries, payload, **extra)


def _regenerate(module, specs, kwargs, frozen_key, mode: str) -> dict:
  """``{(collection, *path): numpy array}`` of ``module.init`` with ``frozen_key``."""
  init = _init_fn(module, kwargs)
  fresh = (jax.jit(init) if mode == 'jit' else init)(frozen_key, *_zeros(specs))
  out = {}
  for collection, tree in flax.core.unfreeze(fresh).items():
    for p, leaf in traverse_util.flatten_dict(tree).items():
      out[(collection, *p)] = np.asarray(jax.device_get(leaf))
  return out


def _class_name(module) -> str:
  return f'{type(module).__module__}.{type(module).__qualname__}'[:256]


def _payload(masked: dict, values: dict, regenerated: set, base=None) -> tuple[list[dict], bytes]:
  """(entries, payload) of a module file: each masked layer's mask (``masked``: ``{layer:
  (keep_fraction, score_abs)}``, coded by ``codec``), then every other variable of ``values``
  (``{(collection, *path): array}``) as a little-endian array, except the ``regenerated``
  frozen kernels and the masked layers' scores; in a mask delta (``base``), a variable still
  the base's value is a 'base' entry (no bytes)."""
  items = artifact._Payload()
  for layer, (keep, score_abs) in masked.items():
    scores = values[('params', *layer, 'scores')]
    mask = np.asarray(jax.device_get(masking.score_mask(scores, keep, score_abs))).astype(bool)
    items.add_mask((*layer, 'scores'), mask)
  for p, leaf in values.items():
    if p in regenerated or (p[0] == 'params' and p[1:-1] in masked and p[-1] == 'scores'):
      continue
    a = np.asarray(jax.device_get(leaf))
    kind = 'base' if base is not None and artifact._is_base_value(base, p, a) else 'array'
    data = artifact._le_bytes(a) if kind == 'array' else b''
    items.add(kind, p, data, shape=list(a.shape), dtype=a.dtype.name)
  return items.entries, items.payload()


def _write(path, step, key, fingerprint, module_section, entries, payload, **extra) -> dict:
  """Frames a module file, verifies its bytes as a reader would, writes it atomically and
  returns ``inspect``'s summary."""
  header = {
    'format_version': artifact.FORMAT_VERSION,
    'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'versions': {'jax': jax.__version__, 'flax': flax.__version__, 'numpy': np.__version__},
    'step': int(step),
    'key': key,
    'frozen_fingerprint': fingerprint,
    'module': module_section,
    'entries': entries,
    **extra,
  }
  blob = artifact.frame(header, payload)
  verified = artifact._verify_blob(path, blob)  # never write a file the reader would refuse
  try:
    fileio.atomic_write(path, blob)
  except OSError as e:
    raise ArtifactError(f'cannot write the artifact {path}: {e.strerror or e}') from None
  return artifact._summary(verified, path)


def _difference(want: list, got: list) -> str:
  """The first variable where two structures differ, in words."""
  w = {(r[0], *r[1]): r for r in want}
  g = {(r[0], *r[1]): r for r in got}
  for p in sorted(set(w) | set(g)):
    name = '/'.join(p)
    if p not in g:
      return f'{name} ({tuple(w[p][2])}, {w[p][3]}) is missing'
    if p not in w:
      return f'{name} is not a variable of the module'
    if w[p][2:] != g[p][2:]:
      return f'{name} is {tuple(g[p][2])} {g[p][3]}, the module has {tuple(w[p][2])} {w[p][3]}'
  return 'the structures differ'


# ----------------------------------------------------------------------------------------------
# Reading.


def check_header(header: dict) -> None:
  """The module section's schema and its agreement with the entries (``_Invalid`` on error).

  Called by ``artifact``'s reader after the fields every header shares were checked.
  """
  mod = artifact._obj(header['module'], 'module')
  if set(mod) != MODULE_FIELDS:
    raise _Invalid(f'module must have exactly the fields {sorted(MODULE_FIELDS)}')
  artifact._str(mod['class'], 'module.class')
  if mod['framework'] not in FRAMEWORKS:
    raise _Invalid(f'module.framework must be one of {FRAMEWORKS}')
  nnx_file = mod['framework'] == 'nnx'
  inputs = artifact._list(mod['inputs'], 'module.inputs', MAX_INPUTS)
  if not inputs and not nnx_file:
    raise _Invalid('module.inputs must name at least one input')
  for i, x in enumerate(inputs):
    artifact._obj(x, f'module.inputs[{i}]')
    if set(x) != {'shape', 'dtype'}:
      raise _Invalid(f'module.inputs[{i}] must have exactly the fields dtype and shape')
    shape = artifact._list(x['shape'], f'module.inputs[{i}].shape', 8)
    for j, d in enumerate(shape):
      artifact._int(d, f'module.inputs[{i}].shape[{j}]', 0, artifact.MAX_IMAGE_SIDE)
    if math.prod(shape) > artifact.MAX_INPUT_VALUES:
      raise _Invalid(f'module.inputs[{i}] has more than {artifact.MAX_INPUT_VALUES:,} values')
    if x['dtype'] not in _DTYPES:
      raise _Invalid(f'module.inputs[{i}].dtype must be one of {_DTYPES}')
  kwargs = artifact._obj(mod['call_kwargs'], 'module.call_kwargs')
  if len(kwargs) > 64:
    raise _Invalid('module.call_kwargs has more than 64 fields')
  for k, v in kwargs.items():
    if not k.isidentifier() or not (v is None or isinstance(v, (bool, int, float, str))):
      raise _Invalid(f'module.call_kwargs.{artifact._short(k)} must be a JSON scalar argument')
    if isinstance(v, str):
      artifact._str(v, f'module.call_kwargs.{k}')
  structure = artifact._list(mod['structure'], 'module.structure', 4 * artifact.MAX_ENTRIES)
  total, seen = 0, {}
  for i, r in enumerate(structure):
    where = f'module.structure[{i}]'
    if not isinstance(r, list) or len(r) != 4:
      raise _Invalid(f'{where} must be [collection, path, shape, dtype]')
    collection, p, shape, dtype = r
    artifact._str(collection, f'{where} collection', 64)
    p = artifact._list(p, f'{where} path', 16)
    if not p or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in p):
      raise _Invalid(f'{where} path must be 1 to 16 non-empty names')
    shape = artifact._list(shape, f'{where} shape', 8)
    for j, d in enumerate(shape):
      artifact._int(d, f'{where} shape[{j}]', 0, artifact.MAX_PARAMETERS)
    if dtype not in _DTYPES:
      raise _Invalid(f'{where} dtype must be one of {_DTYPES}, got {artifact._short(dtype)}')
    full = (collection, *p)
    if full in seen:
      raise _Invalid(f'{where} names {"/".join(full)} twice')
    seen[full] = (tuple(shape), dtype)
    total += math.prod(shape)
  if total > artifact.MAX_PARAMETERS:
    raise _Invalid(f'module.structure has {total:,} values, more than {artifact.MAX_PARAMETERS:,}')
  if structure != sorted(structure, key=lambda r: (r[0], r[1])):
    raise _Invalid('module.structure is not in sorted order')
  if mod['structure_fingerprint'] != _fingerprint(structure):
    raise _Invalid('module.structure_fingerprint is not the sha256 of module.structure')
  if mod['init'] not in INIT_MODES or (mod['init'] == 'construct') != nnx_file:
    raise _Invalid(
      f'module.init must be one of {INIT_MODES} (construct for NNX files only), got '
      f'{artifact._short(mod["init"])}'
    )
  masked_layers = artifact._obj(mod['masked_layers'], 'module.masked_layers')
  for name, keep in masked_layers.items():
    artifact._str(name, 'module.masked_layers name', 4096)
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1:
      raise _Invalid(f'module.masked_layers[{name!r}] must be a keep fraction in (0, 1]')
  # The entries against the structure: every stored variable is one of the module's, of its
  # shape and dtype; every variable is stored, except the masked layers' frozen kernels.
  masked = {tuple(n.split('/')) for n in masked_layers}
  regenerated = {(layers.FROZEN, *m, 'kernel') for m in masked} & set(seen)
  for m in masked:
    if ('params', *m, 'scores') not in seen:
      raise _Invalid(f'module.masked_layers names {"/".join(m)}, which has no params scores')
  stored = set()
  for i, e in enumerate(header['entries']):
    name = '/'.join(e['path'])
    full = ('params', *e['path']) if e['kind'] == 'mask' else tuple(e['path'])
    if e['kind'] not in ('mask', 'array', 'base'):
      raise _Invalid(f'entries[{i}] is a {e["kind"]}, which a module file does not store')
    if full not in seen:
      raise _Invalid(f'the file stores {e["kind"]} {name}, which module.structure does not list')
    if e['kind'] == 'mask' and full[1:-1] not in masked:
      raise _Invalid(f'mask {name} is of a layer module.masked_layers does not list')
    if e['kind'] in ('array', 'base') and (
      full in regenerated or (full[0] == 'params' and full[1:-1] in masked and full[-1] == 'scores')
    ):
      raise _Invalid(f"{name} is stored as an array, but it is a masked layer's")
    shape, dtype = seen[full]
    if tuple(e['shape']) != shape:
      raise _Invalid(
        f'{e["kind"]} {name} has shape {tuple(e["shape"])}, the structure says {shape}'
      )
    if e['kind'] in ('array', 'base'):
      if e['dtype'] != dtype:
        raise _Invalid(f'{e["kind"]} {name} has dtype {e["dtype"]}, the structure says {dtype}')
      size = math.prod(shape) * np.dtype(jnp.dtype(dtype)).itemsize
      if e['kind'] == 'array' and e['length'] != size:
        raise _Invalid(f'array {name} is {e["length"]} bytes, not what {shape} {dtype} needs')
    stored.add(full)
  for full in seen:
    if full not in stored and full not in regenerated:
      raise _Invalid(f'the module variable {"/".join(full)} is not stored in the file')
  key, fp = header['key'], header.get('frozen_fingerprint')
  if nnx_file and key is not None:
    raise _Invalid('an NNX file records no key: its constructor draws the frozen kernels')
  if 'base' in header and (nnx_file or not regenerated or key is not None):
    raise _Invalid('a base section needs a Linen module with masked layers and no key')
  if regenerated and key is None and not nnx_file and 'base' not in header:
    raise _Invalid('key is null, but the file has masked layers whose kernels are regenerated')
  if not regenerated and key is not None:
    raise _Invalid('the file records a key, but no kernel is regenerated from it')
  if regenerated and not (isinstance(fp, str) and artifact._HEX_DIGEST.fullmatch(fp)):
    raise _Invalid('frozen_fingerprint is missing: a file with a key must record it')


def check_payload(header: dict, payload: bytes) -> None:
  """Each mask's codec header against its entry (nothing decoded)."""
  for e in header['entries']:
    if e['kind'] == 'mask':
      data = payload[e['offset'] : e['offset'] + e['length']]
      artifact._check_mask_data('/'.join(e['path']), e, data, math.prod(e['shape']), None, None)


def load_module(path: str, module, base=None, base_format=None, base_name_map=None):
  """The variables of a module file, for ``module`` (the definition it was exported from).

  ``base`` (with ``base_format``, ``base_name_map``; see ``artifact.load``): a mask delta's
  base model, whose fingerprint must be the recorded one; its kernels fill the masked layers'
  frozen collection.

  For an NNX file, ``module`` is the model constructed again as it was before training (same
  code, same ``rngs``, the same strategy applied): its variables are set from the file, in
  place, once every check has passed, and it is returned.

  Returns:
    ``{collection: tree}``: ``module.apply(variables, x)`` gives the exported network's logits
    (for NNX: the model itself).

  Raises:
    ArtifactError: an invalid file (``artifact.read``), a file of a config-described model
      (use ``artifact.load``), a module whose variables are not the recorded ones (the message
      names the first that differs), masks whose counts disagree with the module's keep
      fractions, or regenerated kernels that differ from the recorded fingerprint.
  """
  path = os.fspath(path)
  v = artifact._verify(path)
  header = v.header
  if not is_module_header(header):
    raise ArtifactError(
      f'{path} describes a model from pemn-jax configs, not a module: load it with pemn.load(path)'
    )
  mod = header['module']
  if (mod['framework'] == 'nnx') != _is_nnx(module):
    raise ArtifactError(
      f'{path} holds an {mod["framework"]} module ({mod["class"]}); load it with one of that '
      f'framework, not a {type(module).__name__}'
    )
  delta = header.get('base')
  if (delta is None) != (base is None):
    raise ArtifactError(
      f'{path} is not a mask delta (it records no base model): load it without a base'
      if delta is None
      else f'{path} is a mask delta over a {delta["format"]} base model (fingerprint '
      f'{delta["fingerprint"][:12]}...): it stores no weight; give the base (base=PATH)'
    )
  loaded_base = None
  if delta is not None:
    loaded_base = artifact._load_base(path, delta, base, base_format, base_name_map)
  if mod['framework'] == 'nnx':
    return _load_nnx(path, v, module)
  if not isinstance(module, nn.Module) or module.scope is not None:
    raise ArtifactError('load_module needs an unbound Linen module (not one bound by apply)')
  specs = tuple(
    jax.ShapeDtypeStruct(tuple(x['shape']), jnp.dtype(x['dtype'])) for x in mod['inputs']
  )
  kwargs = dict(mod['call_kwargs'])
  abstract = _abstract_init(module, specs, kwargs)
  _check_definition(path, mod, _structure(abstract), module, 'module')
  masked = _masked_layers(module, abstract, specs, kwargs)
  _check_masked(path, mod, masked, 'module')
  flat = {}
  for e in header['entries']:
    data = v.payload[e['offset'] : e['offset'] + e['length']]
    name = '/'.join(e['path'])
    shape = tuple(e['shape'])
    if e['kind'] == 'mask':
      layer = tuple(e['path'][:-1])
      keep, _ = masked[layer]
      n = math.prod(shape)
      want = masking.num_kept(n, keep)
      if e['ones'] != want:
        raise ArtifactError(
          f'{path}: mask {name} keeps {e["ones"]} of {n}, but the module keeps {want} '
          f'(keep_fraction {keep}) in that layer: the module and the file disagree'
        )
      flat[('params', *e['path'])] = artifact._decode(path, name, data, shape, e['ones'])
    elif e['kind'] == 'base':
      flat[tuple(e['path'])] = artifact._base_value(path, loaded_base, e)
    else:
      dtype = np.dtype(jnp.dtype(e['dtype']))
      a = np.frombuffer(data, dtype=dtype.newbyteorder('<') if dtype.itemsize > 1 else dtype)
      flat[tuple(e['path'])] = jnp.asarray(a.reshape(shape).astype(dtype))
  shapes = {(r[0], *r[1]): r for r in mod['structure']}
  for p, a in list(flat.items()):
    if p[0] == 'params' and p[-1] == 'scores' and p[1:-1] in masked:
      flat[p] = jnp.asarray(a, jnp.dtype(shapes[p][3]))
  regenerated = {(layers.FROZEN, *m, 'kernel') for m in masked} & set(shapes)
  if regenerated and loaded_base is not None:
    for p in sorted(regenerated):
      a = loaded_base.tree.get(('params', *p[1:]))
      if a is None or tuple(a.shape) != tuple(shapes[p][2]):
        raise ArtifactError(
          f"{path}: the base has no params/{'/'.join(p[1:])} of the module's shape "
          f'{tuple(shapes[p][2])}'
        )
      flat[p] = jnp.asarray(a, jnp.dtype(shapes[p][3]))
    frozen = {p[1:]: a for p, a in flat.items() if p[0] == layers.FROZEN}
    got = build.frozen_fingerprint(traverse_util.unflatten_dict(frozen))
    if got != header['frozen_fingerprint']:
      raise ArtifactError(f'{path}: the base kernels do not match the recorded fingerprint')
  elif regenerated:
    impl, words = header['key']['impl'], header['key']['data']
    key = jax.random.wrap_key_data(np.asarray(words, np.uint32), impl=impl)
    fresh = _regenerate(module, specs, kwargs, key, mod['init'])
    for p in regenerated:
      flat[p] = jnp.asarray(fresh[p])
    frozen = {p[1:]: a for p, a in flat.items() if p[0] == layers.FROZEN}
    got = build.frozen_fingerprint(traverse_util.unflatten_dict(frozen))
    if got != header['frozen_fingerprint']:
      raise ArtifactError(
        f'{path}: the frozen kernels the module regenerates from the recorded key ({impl} '
        f'{words}) do not match the fingerprint recorded at export '
        f'({header["frozen_fingerprint"][:12]}... '
        f'vs {got[:12]}...): the module draws other random weights (another strategy, rules or '
        f'layer names), or this JAX ({jax.__version__}) draws other values than the one that '
        f'wrote the file ({header["versions"]["jax"]}); refusing to use it'
      )
  return traverse_util.unflatten_dict(flat)


def _check_definition(path: str, mod: dict, structure: list, obj, noun: str) -> None:
  """Raises ArtifactError unless ``obj`` (the given module or model, its variable structure
  ``structure``) is the definition the file's module section records."""
  if structure != mod['structure']:
    cls = f'{type(obj).__module__}.{type(obj).__qualname__}'
    raise ArtifactError(
      f'{path} was exported from another {noun} definition (file: {mod["class"]}, given: '
      f'{cls}): {_difference_for_load(mod["structure"], structure)}'
    )


def _check_masked(path: str, mod: dict, masked: dict, noun: str) -> None:
  """Raises ArtifactError unless the given module or model masks the layers the file does."""
  recorded = {tuple(n.split('/')) for n in mod['masked_layers']}
  if set(masked) != recorded:
    diff = sorted(set(masked) ^ recorded)[0]
    raise ArtifactError(
      f'{path}: layer {"/".join(diff)} is masked in '
      f'{f"the {noun}" if diff in masked else "the file"} only'
    )


def _difference_for_load(recorded: list, given: list) -> str:
  """The first variable where the module given differs from the file's, in words."""
  r = {(x[0], *x[1]): x for x in recorded}
  g = {(x[0], *x[1]): x for x in given}
  for p in sorted(set(r) | set(g)):
    name = '/'.join(p)
    if p not in g:
      return f'the file has {name} {tuple(r[p][2])} {r[p][3]}, the module has no such variable'
    if p not in r:
      return f'the module has {name} {tuple(g[p][2])} {g[p][3]}, the file has no such variable'
    if r[p][2:] != g[p][2:]:
      return (
        f'{name} is {tuple(r[p][2])} {r[p][3]} in the file, '
        f'{tuple(g[p][2])} {g[p][3]} in the module'
      )
  return 'the structures differ'


# ----------------------------------------------------------------------------------------------
# NNX models: the caller constructs the model again (same code, same rngs, same strategy); the
# file restores every variable but the masked layers' frozen kernels, which the constructor drew
# and the recorded fingerprint checks.


def _is_nnx(model) -> bool:
  import sys

  return 'flax.nnx' in sys.modules and isinstance(model, sys.modules['flax.nnx'].Module)


def _nnx_variables(model) -> dict:
  """``{(collection, *path): nnx.Variable}``: Frozen -> 'frozen', Param -> 'params',
  BatchStat -> 'batch_stats', any other type under its class name."""
  from flax import nnx

  from pemn_jax import nnx as pnnx

  names = {pnnx.Frozen: layers.FROZEN, nnx.Param: 'params', nnx.BatchStat: 'batch_stats'}
  out = {}
  for p, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable):
      collection = next((n for t, n in names.items() if type(node) is t), type(node).__name__)
      out[(collection, *(str(k) for k in p))] = node
  return out


def _nnx_masked(model) -> dict:
  from pemn_jax import nnx as pnnx

  return {
    tuple(str(k) for k in p): (float(layer.keep_fraction), bool(layer.score_abs))
    for p, layer in pnnx.masked_layers(model)
  }


def _nnx_structure(variables: dict) -> list[list]:
  out = []
  for (collection, *p), var in variables.items():
    a = var.get_value()
    out.append([collection, list(p), [int(d) for d in a.shape], jnp.dtype(a.dtype).name])
  return sorted(out, key=lambda r: (r[0], r[1]))


def _nnx_fingerprint(variables: dict, masked: dict) -> str | None:
  frozen = {p[1:]: np.asarray(v.get_value()) for p, v in variables.items() if p[0] == layers.FROZEN}
  if not any((*m, 'kernel') in frozen for m in masked):
    return None
  return build.frozen_fingerprint(traverse_util.unflatten_dict(frozen))


def _export_nnx(path: str, model, step: int) -> dict:
  variables = _nnx_variables(model)
  masked = _nnx_masked(model)
  structure = _nnx_structure(variables)
  regenerated = {(layers.FROZEN, *m, 'kernel') for m in masked} & set(variables)
  values = {p: var.get_value() for p, var in variables.items()}
  entries, payload = _payload(masked, values, regenerated)
  module_section = {
    'class': _class_name(model),
    'inputs': [],
    'call_kwargs': {},
    'structure': structure,
    'structure_fingerprint': _fingerprint(structure),
    'masked_layers': {'/'.join(k): v[0] for k, v in masked.items()},
    'init': 'construct',
    'framework': 'nnx',
  }
  fingerprint = _nnx_fingerprint(variables, masked)
  return _write(path, step, None, fingerprint, module_section, entries, payload)


def _load_nnx(path: str, v, model):
  header, mod = v.header, v.header['module']
  variables = _nnx_variables(model)
  _check_definition(path, mod, _nnx_structure(variables), model, 'model')
  masked = _nnx_masked(model)
  _check_masked(path, mod, masked, 'model')
  got = _nnx_fingerprint(variables, masked)
  if got != header['frozen_fingerprint']:
    raise ArtifactError(
      f"{path}: the model's frozen kernels are not those it was exported with (fingerprint "
      f'{str(header["frozen_fingerprint"])[:12]}... vs {str(got)[:12]}...): construct it with the '
      "same rngs (the frozen stream's seed) and apply the same strategy before loading"
    )
  values = {}
  for e in header['entries']:
    data = v.payload[e['offset'] : e['offset'] + e['length']]
    name, shape = '/'.join(e['path']), tuple(e['shape'])
    if e['kind'] == 'mask':
      layer = tuple(e['path'][:-1])
      keep, _ = masked[layer]
      n = math.prod(shape)
      if e['ones'] != masking.num_kept(n, keep):
        raise ArtifactError(
          f'{path}: mask {name} keeps {e["ones"]} of {n}, but the model keeps '
          f'{masking.num_kept(n, keep)} (keep_fraction {keep}) in that layer'
        )
      full = ('params', *e['path'])
      mask = artifact._decode(path, name, data, shape, e['ones'])
      values[full] = jnp.asarray(mask, variables[full].get_value().dtype)
    else:
      dtype = np.dtype(jnp.dtype(e['dtype']))
      a = np.frombuffer(data, dtype=dtype.newbyteorder('<') if dtype.itemsize > 1 else dtype)
      values[tuple(e['path'])] = jnp.asarray(a.reshape(shape).astype(dtype))
  for p, value in values.items():  # every check passed: only now is the model changed
    variables[p].set_value(value)
  return model
