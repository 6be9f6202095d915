"""The compact model: one ``.pemn`` file holding a trained PEMN network and nothing derivable.

A trained masked network is its random weights (a pure function of a PRNG key and the
strategy), its masks (top-k of the trained scores) and its normalisation layers. The artifact
stores exactly that: the model config, the strategy, the frozen-weight key DATA and its
implementation name (never a random value), each layer's mask bit-packed or entropy-coded
(``codec``, whichever is smaller), and every other variable the network needs at inference
(BN scale/bias and running statistics, LayerNorm, any trainable dense leaf) as raw arrays.

File layout (format version 1)::

    8 bytes   magic b'PEMNJAX\\n'
    4 bytes   format version, uint32 little-endian
    8 bytes   header length H, uint64 little-endian
    H bytes   header: zlib-compressed UTF-8 JSON (config, key, versions, and one entry per
              stored item with its offset and length in the payload, its shape, dtype and, for
              masks, the codec)
    payload   the items, back to back
    32 bytes  sha256 of everything before it

Reading trusts nothing the file claims before checking it, never allocates more than the
file's own size or the verified model justifies, and fails only with ``ArtifactError`` (a
``ValueError``, one line). ``read`` (and ``inspect``, ``load``) check, in this order:

1. the path: it exists and is a regular file (not a directory, device or pipe), whose size
   (``os.stat``) is at most ``MAX_FILE_BYTES``;
2. the magic in the first 8 bytes (read alone first: a foreign file "is not a pemn artifact"),
   and a size of at least the prefix and the digest;
3. the sha256 over everything before the last 32 bytes (the file's own size, read once), so a
   damaged file, prefix included, says "corrupted", never "newer format" or "truncated";
4. the format version, 1 to ``FORMAT_VERSION`` (newer: "upgrade pemn-jax");
5. the header length against the file; the header inflated under ``MAX_HEADER_BYTES``; strict
   UTF-8 JSON without duplicate keys;
6. the header's schema: the type and range of every field, the config's model and strategy
   fields (no unknown ones), the key and fingerprint, and the entries, which must tile the
   payload exactly in order;
7. the model: the config builds a model within the size limits below, traced abstractly
   (``jax.eval_shape``, no arrays; the trace stops as soon as the model grows layers the
   entries do not store); each of its variables has exactly one entry of the right kind,
   shape, dtype and byte length; each mask's codec header gives its shape's entry count and
   the kept count ``masking.num_kept(n, strategy.keep_fraction)`` (sparse kernels: at most
   ``num_kept(n, 1 - model.sparsity)`` positions); a key exactly when the model has frozen
   random weights, and then a fingerprint of them.

``load`` then decodes every item (each mask's count of ones checked again), regenerates the
frozen weights from the key and compares their fingerprint (for a random sparse baseline, its
stored positions must lie in the regenerated mask). ``evaluate`` takes from the file the
dataset's NAME only: where data is read and prepared comes from the caller's config or the
defaults, never from a received file.

Limits (module constants, far above the paper's largest models: ConvMixer-1536/20, ViT-512/8
and ResNet-110 have under 60M parameters, under 1,000 stored items and 32x32x3 inputs):
``MAX_PARAMETERS`` 2^30 values over all the model's variables, frozen ones included (the
trainer's limit too); ``MAX_FILE_BYTES`` 4 GiB + 2 MiB (a dense float32 model at that limit);
``MAX_HEADER_BYTES`` 4 MiB inflated; ``MAX_ENTRIES`` 8,192 stored items; ``MAX_DEPTH`` 4,096
for ``model.depth`` and ``len(model.hidden_dims)``; ``MAX_WIDTH`` 131,072 for the other size
fields (dim, width, hidden widths, classes, heads, kernel and patch sizes); an input of at most
8,192 x 8,192 x 1,024 and ``MAX_INPUT_VALUES`` 2^24 values; ``MAX_ACTIVATION_VALUES`` 2^24 for
one example's widest activation, (H/p)(W/p) times the width (p the patch size where the family
has one); ``MAX_EVAL_BATCH`` 65,536 for the recorded ``train.eval_batch_size``. ``export``
verifies the bytes it is about to write as a reader would, so it never writes a file that
``load`` refuses.

A *mask delta* (format version 2, ``export(base=...)``): a masked model over a trained base
model (``model.base_source``, ``pemn_jax.pretrained``) stores its masks and other trained leaves
and a ``base`` section (the base's format, sha256 fingerprint and value count) instead of any
weight; its recorded config names no path. ``load(path, base=PATH)`` reads the base, checks its
fingerprint and puts its kernels into the frozen collection; without it, or with another one,
the load is refused.

Masks become scores again on load: a score of 1 where the mask keeps and 0 elsewhere, so the
model's own top-k selects exactly the stored mask and the rebuilt network computes the trained
network's logits bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import numbers
import os
import re
import stat
import struct
import zlib
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from pemn_jax import build, codec, fileio, layers, masking, storage, strategies
from pemn_jax.configs import common
from pemn_jax.models import REGISTRY

MAGIC = b'PEMNJAX\n'
# Version 2 added folded BatchNorm ('bn' entries), learned 1-bit kernels ('binary' entries),
# mask deltas (a 'base' section; their 'base' entries are leaves left as the base's, no bytes) and
# module files (``module_artifact``). A file is written with the lowest version that holds it,
# so a file without any of these is still version 1, readable by every pemn-jax.
FORMAT_VERSION = 2
_V2_KINDS = ('bn', 'binary', 'base')
_ARRAY_KINDS = ('array', 'base')  # an ordinary variable: its bytes, or the base's value
# How ``export`` stores BatchNorm: 'full' (scale, bias, running mean and variance in float32:
# bit-exact) or folded into one scale and one shift per channel at inference, in float32,
# float16 or bfloat16 (``fold_batch_norm``).
BN_CHOICES = ('full', 'fp32-folded', 'fp16', 'bf16')
_BN_DTYPES = {'fp32-folded': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}
_BN_LEAVES = (
  ('params', 'scale'),
  ('params', 'bias'),
  ('batch_stats', 'mean'),
  ('batch_stats', 'var'),
)
_PREFIX = struct.Struct('<8sIQ')
_DIGEST = 32

# What the reader accepts at most (see the module docstring): a file claiming more is refused
# before anything of that size is made.
MAX_PARAMETERS = 2**30  # the trainer's own limit, so every model pemn-jax trains can be read
MAX_FILE_BYTES = 4 * MAX_PARAMETERS + 2 * 2**20  # a dense float32 model at that limit, a header
MAX_HEADER_BYTES = 4 * 2**20
MAX_ENTRIES = 8192
MAX_DEPTH = 4096
MAX_WIDTH = 2**17
MAX_IMAGE_SIDE = 8192
MAX_CHANNELS = 1024
MAX_INPUT_VALUES = 2**24
MAX_ACTIVATION_VALUES = 2**24
MAX_EVAL_BATCH = 2**16


_LINE_BREAKS = re.compile('[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]')


class ArtifactError(ValueError):
  """A ``.pemn`` file that cannot be used: foreign, truncated, corrupted, too new, malformed,
  inconsistent with the model it describes, or (on export) not writable.

  The message is one line: line breaks a crafted file put into a name are escaped.
  """

  def __init__(self, message: str):
    super().__init__(_LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], str(message)))


# ----------------------------------------------------------------------------------------------
# Writing.


def masks_of(config: ml_collections.ConfigDict, params: dict) -> dict[tuple[str, ...], np.ndarray]:
  """Each masked layer's boolean mask, exactly as the forward pass computes it."""
  k, score_abs = config.strategy.keep_fraction, config.strategy.get('score_abs', True)
  out = {}
  for path, leaf in strategies.tree_items(params):
    if path[-1] == 'scores':
      mask = masking.score_mask(leaf, k, score_abs)  # the forward pass's own function
      out[path] = np.asarray(jax.device_get(mask)).astype(bool)
  return out


def export(
  config: ml_collections.ConfigDict,
  variables: dict,
  out_path: str,
  *,
  step: int = 0,
  frozen_key: jax.Array | None = None,
  fingerprint: str | None = None,
  input_shape: tuple[int, ...] | None = None,
  bn: str = 'full',
  base: Any = None,
) -> dict:
  """Writes a trained network to ``out_path`` atomically (a temporary file, then a rename).

  Args:
    config: the run's config (model, strategy, seed, data).
    variables: ``params`` and ``batch_stats`` (the frozen collection is not stored).
    out_path: destination file; an existing file is replaced only once the new one is whole.
    step: the training step the variables come from.
    frozen_key: the key the frozen weights were drawn with (default: from ``config.seed``).
    fingerprint: ``build.frozen_fingerprint`` of the frozen weights, checked on load.
    input_shape: (H, W, C) of one example (default ``build.input_shape(config)``); recorded, so
      the file rebuilds its model without asking the data what its images look like.
    bn: how BatchNorm is stored (``BN_CHOICES``): ``'full'`` (default, bit-exact) or folded to
      one scale and one shift per channel in float32 (``'fp32-folded'``: equal up to float
      reassociation), float16 (``'fp16'``) or bfloat16 (``'bf16'``); see ``fold_batch_norm``.
    base: for a masked model over a base model (``model.base_source``): the
      ``pretrained.Base`` its frozen kernels came from. The file is then a *mask delta*
      (format version 2): masks and the other trained leaves, and a ``base`` section with the
      base's format and fingerprint (never its path, never a weight); ``load`` needs the base.
      ``variables`` must then hold the frozen collection (the base's kernels).

  Every exported config has ``model.base_source`` and ``model.base_name_map`` cleared: a file
  never names a path for its reader to open.

  Returns:
    ``inspect``'s summary of the written file (its bytes verified as any reader would first).

  Raises:
    ArtifactError: ``out_path`` is a directory or cannot be written (nothing is left behind).
  """
  out_path = os.fspath(out_path)
  if bn not in BN_CHOICES:
    raise ArtifactError(f'bn must be one of {BN_CHOICES}, got {bn!r}')
  if os.path.isdir(out_path):
    raise ArtifactError(
      f'cannot write the artifact to {out_path}: it is a directory (give a file path, '
      f'e.g. {os.path.join(out_path, "model.pemn")})'
    )
  masked = config.model.get('masked', True)
  binary = not masked and bool(config.model.get('binary_weights', False))
  if base is not None and not (masked and layers.FROZEN in variables):
    raise ArtifactError(
      'base= is for a masked model over a base with its frozen collection in variables (a mask '
      'delta); a dense model stores its own weights: export it without base'
    )
  folded = {} if bn == 'full' else batch_norm_modules(variables)
  sparse_method = None if masked else config.model.get('sparsity_method')
  has_frozen = masked or sparse_method == 'random'  # random sparse masks are regenerated too
  if frozen_key is None:
    frozen_key = build.model_keys(config.seed)[1]
  if has_frozen:
    # Readers require the fingerprint of a file with a key: without it a changed key would
    # evaluate other random weights silently.
    fingerprint = _export_fingerprint(config, variables, frozen_key, fingerprint, input_shape)
  elif fingerprint != 'dense':  # what train.export_workdir records for a model without any
    fingerprint = None
  items = _Payload()
  add = items.add
  if masked:
    for path, mask in masks_of(config, variables['params']).items():
      items.add_mask(path, mask)
  for module_path, channels in folded.items():
    scale, shift = fold_batch_norm(variables, module_path, layers.BN_EPSILON)
    dtype = _BN_DTYPES[bn]
    data = b''.join(
      _le_bytes(np.asarray(a, np.float32).astype(_np_dtype(dtype))) for a in (scale, shift)
    )
    add('bn', module_path, data, shape=[channels], dtype=dtype, epsilon=layers.BN_EPSILON)
  for collection in ('params', 'batch_stats'):
    for path, leaf in strategies.tree_items(variables.get(collection, {})):
      if collection == 'params' and path[-1] == 'scores':
        continue
      if path[:-1] in folded and (collection, path[-1]) in _BN_LEAVES:
        continue  # stored folded, above
      if binary and collection == 'params' and path[-1] == 'kernel':
        # A learned 1-bit kernel: its forward pass uses only the sign (``binary.sign_ste``, 0
        # counting as +1), one bit per weight; the per-channel scale is an ordinary array.
        bits = np.packbits(np.asarray(jax.device_get(leaf)).reshape(-1) >= 0)
        add('binary', ('params', *path), bits.tobytes(), shape=list(leaf.shape))
        continue
      if sparse_method and collection == 'params' and path[-1] == 'kernel':
        # A sparse baseline's kernel is stored as what the forward pass uses: the kept values
        # (float32) and their positions (the codec's mask), i.e. values + index information.
        w = np.asarray(jax.device_get(_sparse_effective(config, variables, path, leaf)))
        nz = w != 0
        pos = codec.encode_mask(nz)
        vals = np.ascontiguousarray(w[nz]).astype('<f4').tobytes()
        add(
          'sparse',
          ('params', *path),
          pos + vals,
          shape=list(w.shape),
          ones=int(nz.sum()),
          positions_length=len(pos),
          dtype='float32',
        )
        continue
      a = np.asarray(jax.device_get(leaf))
      if base is not None and _is_base_value(base, (collection, *path), a):
        add('base', (collection, *path), b'', shape=list(a.shape), dtype=a.dtype.name)
        continue
      add(
        'array',
        (collection, *path),
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder('<')).tobytes(),
        shape=list(a.shape),
        dtype=a.dtype.name,
      )
  recorded_config = config.to_dict()
  for field in ('base_source', 'base_name_map'):  # paths: a file never chooses what is read
    if field in recorded_config.get('model', {}):
      recorded_config['model'][field] = None
  entries = items.entries
  header = {
    'format_version': 2 if base is not None or any(e['kind'] in _V2_KINDS for e in entries) else 1,
    'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'versions': {'jax': jax.__version__, 'flax': flax.__version__, 'numpy': np.__version__},
    'config': recorded_config,
    'step': int(step),
    'key': (
      {
        'impl': str(jax.random.key_impl(frozen_key)),
        'data': [int(x) for x in np.asarray(jax.random.key_data(frozen_key))],
      }
      if has_frozen
      else None
    ),
    'frozen_fingerprint': fingerprint,
    'input_shape': list(input_shape or build.input_shape(config)),
    'entries': entries,
  }
  if base is not None:
    header['base'] = _base_section(base)
  blob = frame(header, items.payload())
  verified = _verify_blob(out_path, blob)  # never write a file the reader would refuse
  try:
    fileio.atomic_write(out_path, blob)  # a failed write removes its temporary file
  except OSError as e:
    raise ArtifactError(f'cannot write the artifact {out_path}: {e.strerror or e}') from None
  return _summary(verified, out_path)


class _Payload:
  """A file's entries and payload, built item by item in payload order (each entry's offset
  is where its bytes start)."""

  def __init__(self):
    self.entries: list[dict] = []
    self._chunks: list[bytes] = []
    self._offset = 0

  def add(self, kind: str, path, data: bytes, **meta) -> None:
    self.entries.append(
      {'kind': kind, 'path': list(path), 'offset': self._offset, 'length': len(data), **meta}
    )
    self._chunks.append(data)
    self._offset += len(data)

  def add_mask(self, path, mask: np.ndarray) -> None:
    """A boolean mask coded by ``codec`` (packbits or rANS, whichever is smaller)."""
    data = codec.encode_mask(mask)
    codec_name = ['packbits', 'rans'][data[0] & 0x0F]
    self.add('mask', path, data, shape=list(mask.shape), ones=int(mask.sum()), codec=codec_name)

  def payload(self) -> bytes:
    return b''.join(self._chunks)


def _is_base_value(base, path: tuple[str, ...], a: np.ndarray) -> bool:
  """Whether leaf ``path`` (``(collection, *path)``) of a mask delta is still the base's value,
  bit for bit in its own dtype: it is then stored as a 'base' entry (no bytes)."""
  b = base.tree.get(path)
  if b is None or tuple(b.shape) != a.shape:
    return False
  return np.asarray(b).astype(a.dtype).tobytes() == np.ascontiguousarray(a).tobytes()


def _base_value(path: str, base, entry: dict) -> jax.Array:
  """The value a 'base' entry stands for: the base's leaf of that path, in the entry's dtype."""
  b = base.tree.get(tuple(entry['path']))
  if b is None or list(b.shape) != list(entry['shape']):
    raise ArtifactError(
      f'{path}: the base has no {"/".join(entry["path"])} of shape {tuple(entry["shape"])}, '
      "which the file leaves as the base's"
    )
  return jnp.asarray(np.asarray(b).astype(np.dtype(jnp.dtype(entry['dtype']))))


def _base_section(base) -> dict:
  """A mask delta's ``base`` section: format, fingerprint, value count (and a torch layout)."""
  out = {'format': base.format, 'fingerprint': base.fingerprint, 'values': int(base.num_values)}
  if getattr(base, 'layout', 'flax') != 'flax':
    out['layout'] = base.layout
  return out


def frame(header: dict, payload: bytes) -> bytes:
  """A whole file: prefix (magic, ``header['format_version']``, header length), the header as
  zlib-compressed JSON, the payload, and the sha256 of all of it."""
  hdr = zlib.compress(json.dumps(header, sort_keys=True, separators=(',', ':')).encode(), 9)
  body = _PREFIX.pack(MAGIC, header['format_version'], len(hdr)) + hdr + payload
  return body + hashlib.sha256(body).digest()


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(jnp.dtype(name))  # bfloat16 too (ml_dtypes, through jax)


def _le_bytes(a: np.ndarray) -> bytes:
  a = np.ascontiguousarray(a)
  return (a.astype(a.dtype.newbyteorder('<')) if a.dtype.itemsize > 1 else a).tobytes()


def batch_norm_modules(variables: dict) -> dict[tuple[str, ...], int]:
  """``{module path: channels}`` of every BatchNorm in ``variables``: a module with params
  ``scale`` and ``bias`` and batch_stats ``mean`` and ``var``, all of one shape ``(C,)``
  (``nn.BatchNorm`` and ``layers.FusedGeluBatchNorm``; LayerNorm has no statistics)."""
  params = traverse_util.flatten_dict(variables.get('params', {}))
  stats = traverse_util.flatten_dict(variables.get('batch_stats', {}))
  out = {}
  for path, leaf in params.items():
    if path[-1] != 'scale':
      continue
    m = path[:-1]
    leaves = [params.get(m + ('bias',)), stats.get(m + ('mean',)), stats.get(m + ('var',))]
    if all(x is not None and x.shape == leaf.shape and len(leaf.shape) == 1 for x in leaves):
      out[m] = int(leaf.shape[0])
  return out


def fold_batch_norm(variables: dict, module_path, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
  """The inference-time affine map of one BatchNorm: ``y = x * scale + shift`` per channel.

  ``scale = gamma / sqrt(running_var + epsilon)`` and ``shift = beta - running_mean * scale``,
  computed in float64 (rounded once, to the stored precision, by the caller). The model computes
  ``(x - mean) * (gamma * rsqrt(var + eps)) + beta``; the folded form differs from it by float
  reassociation only, plus the rounding of the chosen precision.
  """
  p = tuple(module_path)
  get = strategies.get_path
  gamma = np.asarray(get(variables['params'], p + ('scale',)), np.float64)
  beta = np.asarray(get(variables['params'], p + ('bias',)), np.float64)
  mean = np.asarray(get(variables['batch_stats'], p + ('mean',)), np.float64)
  var = np.asarray(get(variables['batch_stats'], p + ('var',)), np.float64)
  scale = gamma / np.sqrt(var + epsilon)
  return scale, beta - mean * scale


def unit_variance(epsilon: float) -> np.float32:
  """The float32 running variance ``v`` with ``v + epsilon`` closest to 1, so that a folded
  BatchNorm (mean 0, variance ``v``, gamma = the folded scale) computes ``x * scale + shift``."""
  eps = np.float32(epsilon)
  v = np.float32(1) - eps
  for candidate in (v, np.nextafter(v, np.float32(2)), np.nextafter(v, np.float32(0))):
    if candidate + eps == np.float32(1):
      return candidate
  return v


def _export_fingerprint(config, variables, frozen_key, fingerprint, input_shape) -> str:
  """The fingerprint to record: the given one, else that of the frozen weights the variables
  were trained with, else that of the weights the key regenerates."""
  if fingerprint is not None:
    if not isinstance(fingerprint, str) or not _HEX_DIGEST.fullmatch(fingerprint):
      raise ValueError(
        f'fingerprint must be build.frozen_fingerprint of the frozen weights, got {fingerprint!r}'
      )
    return fingerprint
  frozen = variables.get(layers.FROZEN)
  if frozen is None:
    model = build.build_model(config)
    frozen = build.init_variables(model, config, input_shape, frozen_key=frozen_key)[layers.FROZEN]
  return build.frozen_fingerprint(frozen)


def _sparse_effective(config, variables, path, kernel):
  """The kernel a sparse baseline's forward pass uses (kernel x its mask)."""
  keep = 1.0 - config.model.sparsity
  if config.model.sparsity_method == 'random':
    mask = strategies.get_path(variables[layers.FROZEN], path[:-1] + ('mask',))
  else:
    mask = masking.topk_mask(jnp.abs(kernel), keep)
  return kernel * mask.astype(kernel.dtype)


# ----------------------------------------------------------------------------------------------
# Reading.


_HEX_DIGEST = re.compile('[0-9a-f]{64}')
# A dataset name (ours or a TFDS catalogue name, version and config): a name, never a path.
_DATASET_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}')
_KEY_IMPLS = ('threefry2x32', 'rbg', 'unsafe_rbg')
_HEADER_FIELDS = {
  'format_version',
  'created',
  'versions',
  'config',
  'step',
  'key',
  'frozen_fingerprint',
  'input_shape',
  'entries',
  'base',  # version 2: a mask delta's base model (format, fingerprint, value count)
}
_OPTIONAL_FIELDS = {'frozen_fingerprint', 'input_shape', 'base'}
_REQUIRED_FIELDS = _HEADER_FIELDS - _OPTIONAL_FIELDS
_BASE_FIELDS = {'format', 'fingerprint', 'values'}  # and 'layout' when not 'flax'
_BASE_FORMATS = ('workdir', 'orbax', 'flax', 'safetensors')  # pretrained.FORMATS
_ENTRY_FIELDS = {
  'mask': {'kind', 'path', 'offset', 'length', 'shape', 'ones', 'codec'},
  'sparse': {'kind', 'path', 'offset', 'length', 'shape', 'ones', 'positions_length', 'dtype'},
  'array': {'kind', 'path', 'offset', 'length', 'shape', 'dtype'},
  # version 2
  'bn': {'kind', 'path', 'offset', 'length', 'shape', 'dtype', 'epsilon'},
  'binary': {'kind', 'path', 'offset', 'length', 'shape'},
  'base': {'kind', 'path', 'offset', 'length', 'shape', 'dtype'},  # a mask delta's: no bytes
}
_CODECS = {'packbits': codec.METHOD_PACKBITS, 'rans': codec.METHOD_RANS}
_MAX_NESTING = 8  # of the config's sections (the defaults nest 3 deep)
_INT64 = 2**63


class _Invalid(Exception):
  """A header field that fails its check; ``read`` reports it as an ArtifactError."""


def _short(value: Any) -> str:
  """A value for an error message: scalars as repr (cut short), containers by their size."""
  if isinstance(value, dict):
    return f'an object with {len(value)} fields'
  if isinstance(value, list):
    return f'a list of {len(value)} items'
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def _int(value: Any, field: str, lo: int, hi: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
    raise _Invalid(f'{field} must be an integer in [{lo}, {hi}], got {_short(value)}')
  return value


def _real(value: Any, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise _Invalid(f'{field} must be a finite number, got {_short(value)}')
  return float(value)


def _str(value: Any, field: str, max_len: int = 256) -> str:
  if not isinstance(value, str) or len(value) > max_len:
    raise _Invalid(f'{field} must be a string of at most {max_len} characters, got {_short(value)}')
  return value


def _obj(value: Any, field: str) -> dict:
  if not isinstance(value, dict):
    raise _Invalid(f'{field} must be an object, got {_short(value)}')
  return value


def _list(value: Any, field: str, max_len: int) -> list:
  if not isinstance(value, list) or len(value) > max_len:
    raise _Invalid(f'{field} must be a list of at most {max_len} items, got {_short(value)}')
  return value


def _no_duplicate_keys(pairs: list) -> dict:
  out = dict(pairs)
  if len(out) != len(pairs):
    seen = set()
    dup = next(k for k, _ in pairs if k in seen or seen.add(k))
    raise ValueError(f'duplicate key {dup!r} in an object')
  return out


def _read_file(path: str) -> bytes:
  """The whole file, after the checks on the path, its size and its magic (steps 1-2)."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise ArtifactError(f'artifact {path} does not exist') from None
  except OSError as e:
    raise ArtifactError(f'cannot read artifact {path}: {e.strerror or e}') from None
  if stat.S_ISDIR(st.st_mode):
    raise ArtifactError(f'artifact {path} is a directory, not a .pemn file')
  if not stat.S_ISREG(st.st_mode):
    # A device or pipe has no size to check before reading (/dev/zero never ends).
    raise ArtifactError(f'artifact {path} is not a regular file (a device, pipe or socket)')
  try:
    with open(path, 'rb') as f:
      size = os.fstat(f.fileno()).st_size  # of the file opened, should the path have changed
      _check_start(path, f.read(_PREFIX.size), size)  # a bounded prefix before the rest
      f.seek(0)
      blob = f.read(size + 1)  # one byte more: a file that grew since the stat is noticed
  except OSError as e:
    raise ArtifactError(f'cannot read artifact {path}: {e.strerror or e}') from None
  if len(blob) != size:
    raise ArtifactError(f'{path} changed while it was read ({size:,} bytes, then {len(blob):,})')
  return blob


def _check_start(path: str, prefix: bytes, size: int) -> None:
  """The magic and the size, from the first bytes and the file's length alone."""
  if not prefix:
    raise ArtifactError(f'{path} is empty, not a pemn artifact')
  if prefix[: len(MAGIC)] != MAGIC[: len(prefix)]:
    raise ArtifactError(f'{path} is not a pemn artifact (no PEMNJAX magic at the start)')
  if size < _PREFIX.size + _DIGEST:
    raise ArtifactError(
      f'{path} is truncated ({size} bytes; an artifact has at least {_PREFIX.size + _DIGEST})'
    )
  if size > MAX_FILE_BYTES:
    raise ArtifactError(
      f'{path} is {size:,} bytes, more than the {MAX_FILE_BYTES:,} bytes this reader accepts'
    )


def _check_digest(path: str, blob: bytes) -> int:
  """The format version, once the checksum over everything before it holds (steps 3-4)."""
  _check_start(path, blob[: _PREFIX.size], len(blob))
  _, version, _ = _PREFIX.unpack_from(blob)
  # The checksum comes before the version and lengths it covers: a damaged prefix is a
  # damaged file, not a newer format or a truncation.
  if hashlib.sha256(memoryview(blob)[:-_DIGEST]).digest() != blob[-_DIGEST:]:
    hint = ''
    if not 1 <= version <= FORMAT_VERSION:
      hint = (
        f'; its prefix names format version {version}, which this pemn-jax does not read '
        f'(it reads 1 to {FORMAT_VERSION}): a damaged file, or one from a newer pemn-jax'
      )
    raise ArtifactError(f'{path} is corrupted or truncated (sha256 checksum mismatch){hint}')
  if version > FORMAT_VERSION:
    raise ArtifactError(
      f'{path} has artifact format version {version}; this pemn-jax reads versions 1 to '
      f'{FORMAT_VERSION}: upgrade pemn-jax'
    )
  if version < 1:
    raise ArtifactError(
      f'{path} has artifact format version {version}, which no pemn-jax writes (versions '
      'start at 1)'
    )
  return version


def _parse_header(path: str, blob: bytes) -> tuple[Any, bytes]:
  """(the header's JSON value, the payload) of a verified file (step 5)."""
  _, _, hlen = _PREFIX.unpack_from(blob)
  room = len(blob) - _PREFIX.size - _DIGEST
  if hlen > room:
    raise ArtifactError(
      f'{path}: its prefix gives a {hlen:,}-byte header but only {room:,} bytes follow (the '
      'checksum is valid, so the file was written wrongly)'
    )
  d = zlib.decompressobj()
  try:
    # Inflated under a cap: a few MB of header could otherwise inflate to GBs.
    raw = d.decompress(memoryview(blob)[_PREFIX.size : _PREFIX.size + hlen], MAX_HEADER_BYTES + 1)
  except zlib.error as e:
    raise ArtifactError(f'{path} has an unreadable header (zlib: {e})') from None
  if len(raw) > MAX_HEADER_BYTES:
    raise ArtifactError(
      f'{path}: the header inflates to more than {MAX_HEADER_BYTES:,} bytes, the limit of '
      'this reader'
    )
  if not d.eof or d.unused_data:
    raise ArtifactError(
      f'{path} has an unreadable header (incomplete zlib stream or bytes after it)'
    )
  try:
    header = json.loads(raw.decode('utf-8'), object_pairs_hook=_no_duplicate_keys)
  except RecursionError:
    raise ArtifactError(f'{path} has an unreadable header (JSON nested too deeply)') from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too many digits
    raise ArtifactError(f'{path} has an unreadable header (not UTF-8 JSON: {e})') from None
  return header, blob[_PREFIX.size + hlen : -_DIGEST]


def _check_tree(value: Any, field: str, depth: int) -> None:
  """The config's JSON: identifier keys, scalars, short lists, bounded nesting."""
  if isinstance(value, dict):
    if depth > _MAX_NESTING:
      raise _Invalid(f'{field} nests more than {_MAX_NESTING} levels deep')
    for k, v in value.items():
      if not k.isidentifier() or k.startswith('_'):
        raise _Invalid(f'{field} has a field named {_short(k)}, which is not a config field name')
      _check_tree(v, f'{field}.{k}', depth + 1)
  elif isinstance(value, list):
    _list(value, field, MAX_DEPTH)
    for i, v in enumerate(value):
      if isinstance(v, (dict, list)):
        raise _Invalid(f'{field}[{i}] must be a number, string, boolean or null')
  elif isinstance(value, str):
    _str(value, field, 4096)


def _check_schema(header: Any, version: int, payload_len: int) -> None:
  """Step 6: the type and range of every header field (``_Invalid`` names the first bad one)."""
  from pemn_jax import module_artifact

  _obj(header, 'the header')
  module_file = module_artifact.is_module_header(header)
  if module_file and version < 2:
    raise _Invalid('a module file (a module section, no config) needs format version 2')
  fields = module_artifact.HEADER_FIELDS if module_file else _HEADER_FIELDS
  required = fields - _OPTIONAL_FIELDS
  unknown = sorted(set(header) - fields)
  if unknown:
    raise _Invalid(f'unknown field {_short(unknown[0])} (a newer format would have a new version)')
  missing = sorted(required - set(header))
  if missing:
    raise _Invalid(f'the field {missing[0]!r} is missing')
  if _int(header['format_version'], 'format_version', 1, FORMAT_VERSION) != version:
    raise _Invalid(f'format_version is {header["format_version"]} but the prefix says {version}')
  _str(header['created'], 'created', 64)
  versions = _obj(header['versions'], 'versions')
  if len(versions) > 16 or 'jax' not in versions:
    raise _Invalid('versions must name at most 16 packages, jax among them')
  for name, v in versions.items():
    _str(v, f'versions.{name}', 64)
  _int(header['step'], 'step', 0, _INT64 - 1)
  key = header['key']
  if key is not None:
    _obj(key, 'key')
    if set(key) != {'impl', 'data'}:
      raise _Invalid(f'key must have exactly the fields impl and data, got {sorted(key)}')
    if key['impl'] not in _KEY_IMPLS:
      raise _Invalid(f'key.impl must be one of {_KEY_IMPLS}, got {_short(key["impl"])}')
    words = _key_words(key['impl'])
    data = key['data']
    if not isinstance(data, list) or len(data) != words:
      raise _Invalid(
        f'key.data must be a list of {words} words for {key["impl"]}, got {_short(data)}'
      )
    for i, w in enumerate(data):
      _int(w, f'key.data[{i}]', 0, 2**32 - 1)
  fp = header.get('frozen_fingerprint')
  if fp is not None and fp != 'dense' and not (isinstance(fp, str) and _HEX_DIGEST.fullmatch(fp)):
    raise _Invalid(f'frozen_fingerprint must be a sha256 hex digest, got {_short(fp)}')
  if header.get('input_shape') is not None:
    _check_input_shape(header['input_shape'], 'input_shape')
  if 'base' in header:
    _check_base_section(header['base'], version)
  if module_file:
    _check_entries(header['entries'], payload_len, version, 'base' in header)
    module_artifact.check_header(header)
    return
  _check_config(header['config'])
  _check_entries(header['entries'], payload_len, version, 'base' in header)


def _check_base_section(base: Any, version: int) -> None:
  if version < 2:
    raise _Invalid('a base section (a mask delta) needs format version 2')
  _obj(base, 'base')
  if not _BASE_FIELDS <= set(base) <= _BASE_FIELDS | {'layout'}:
    raise _Invalid(
      f'base must have the fields {sorted(_BASE_FIELDS)} (and layout), got {sorted(base)}'
    )
  if base.get('layout', 'torch') != 'torch':
    raise _Invalid(f"base.layout must be 'torch' when given, got {_short(base['layout'])}")
  if base['format'] not in _BASE_FORMATS:
    raise _Invalid(f'base.format must be one of {_BASE_FORMATS}, got {_short(base["format"])}')
  fp = base['fingerprint']
  if not (isinstance(fp, str) and _HEX_DIGEST.fullmatch(fp)):
    raise _Invalid(f'base.fingerprint must be a sha256 hex digest, got {_short(fp)}')
  _int(base['values'], 'base.values', 1, MAX_PARAMETERS)


@functools.cache
def _key_words(impl: str) -> int:
  """How many uint32 words a key of ``impl`` holds (2 for threefry2x32, 4 for rbg)."""
  return int(jax.random.key_data(jax.random.key(0, impl=impl)).shape[0])


def _check_input_shape(value: Any, field: str) -> tuple[int, int, int]:
  if not isinstance(value, list) or len(value) != 3:
    raise _Invalid(f'{field} must be [height, width, channels], got {_short(value)}')
  h = _int(value[0], f'{field}[0]', 1, MAX_IMAGE_SIDE)
  w = _int(value[1], f'{field}[1]', 1, MAX_IMAGE_SIDE)
  c = _int(value[2], f'{field}[2]', 1, MAX_CHANNELS)
  if h * w * c > MAX_INPUT_VALUES:
    raise _Invalid(f'{field} {value} has more than {MAX_INPUT_VALUES:,} values')
  return h, w, c


def _check_config(config: Any) -> None:
  _obj(config, 'config')
  _check_tree(config, 'config', 1)
  defaults = common.base_config()
  for section in ('model', 'strategy', 'data', 'train'):
    if section in config:
      _obj(config[section], f'config.{section}')
  for section in ('model', 'strategy'):  # they define the network: no field this code ignores
    unknown = sorted(set(config.get(section, {})) - set(defaults[section]))
    if unknown:
      raise _Invalid(f'config.{section}.{unknown[0]} is not a field this pemn-jax knows')
  if 'seed' in config:
    _int(config['seed'], 'config.seed', -_INT64, _INT64 - 1)
  name = config.get('data', {}).get('name', defaults.data.name)
  if not isinstance(name, str) or not _DATASET_NAME.fullmatch(name) or '..' in name:
    raise _Invalid(f'config.data.name must be a dataset name, got {_short(name)}')
  bs = config.get('train', {}).get('eval_batch_size', defaults.train.eval_batch_size)
  _int(bs, 'config.train.eval_batch_size', 1, MAX_EVAL_BATCH)


def _check_entries(entries: Any, payload_len: int, version: int, delta: bool) -> None:
  _list(entries, 'entries', MAX_ENTRIES)
  offset, seen = 0, set()
  kinds = tuple(k for k in _ENTRY_FIELDS if version >= 2 or k not in _V2_KINDS)
  for i, e in enumerate(entries):
    where = f'entries[{i}]'
    _obj(e, where)
    kind = e.get('kind')
    if not isinstance(kind, str) or kind not in kinds:
      raise _Invalid(
        f'{where}.kind must be one of {kinds} in format version {version}, got {_short(kind)}'
      )
    if set(e) != _ENTRY_FIELDS[kind]:
      raise _Invalid(f'{where} ({kind}) must have the fields {sorted(_ENTRY_FIELDS[kind])}')
    path = _list(e['path'], f'{where}.path', 16)
    if not path or not all(isinstance(p, str) and 0 < len(p) <= 256 for p in path):
      raise _Invalid(f'{where}.path must be 1 to 16 non-empty names, got {_short(path)}')
    full = {'mask': ('params', *path), 'bn': ('bn', *path)}.get(kind, tuple(path))
    if full in seen:
      raise _Invalid(f'{where}.path {"/".join(path)} is stored twice')
    seen.add(full)
    shape = _list(e['shape'], f'{where}.shape', 8)
    for j, d in enumerate(shape):
      _int(d, f'{where}.shape[{j}]', 0, MAX_PARAMETERS)
    n = math.prod(shape)
    if n > MAX_PARAMETERS:
      raise _Invalid(f'{where}.shape {shape} has more than {MAX_PARAMETERS:,} entries')
    if _int(e['offset'], f'{where}.offset', 0, payload_len) != offset:
      raise _Invalid(f'{where}.offset is {e["offset"]}, but the items before it end at {offset}')
    length = _int(e['length'], f'{where}.length', 0, payload_len - offset)
    offset += length
    if kind in ('mask', 'sparse'):
      _int(e['ones'], f'{where}.ones', 0, n)
    if kind == 'mask' and (not isinstance(e['codec'], str) or e['codec'] not in _CODECS):
      raise _Invalid(f'{where}.codec must be one of {tuple(_CODECS)}, got {_short(e["codec"])}')
    if kind == 'sparse':
      _int(e['positions_length'], f'{where}.positions_length', 0, length)
    if kind in ('sparse', 'array', 'base'):
      _str(e['dtype'], f'{where}.dtype', 32)
    if kind == 'base' and length:
      raise _Invalid(f"{where} (base) is {length} bytes; the base's value is stored as none")
    if kind == 'base' and not delta:
      raise _Invalid(
        f"{where} is a 'base' entry (a leaf left as the base's): it needs a base section"
      )
    if kind == 'bn':
      if len(shape) != 1 or e['dtype'] not in _BN_DTYPES.values():
        raise _Invalid(
          f'{where} (bn) must have a shape [channels] and a dtype of {tuple(_BN_DTYPES.values())}'
        )
      if not 0 < _real(e['epsilon'], f'{where}.epsilon') < 1:
        raise _Invalid(f'{where}.epsilon must be in (0, 1), got {_short(e["epsilon"])}')
      need = 2 * n * _np_dtype(e['dtype']).itemsize
      if length != need:
        raise _Invalid(
          f'{where} (bn) is {length} bytes; {n} channels of scale and shift need {need}'
        )
    if kind == 'binary' and length != (n + 7) // 8:
      raise _Invalid(f'{where} (binary) is {length} bytes; {n} packed bits need {(n + 7) // 8}')
  if offset != payload_len:
    raise _Invalid(f'the entries end at byte {offset} of a {payload_len}-byte payload')


@dataclasses.dataclass(frozen=True)
class _Verified:
  """A file that passed every check short of decoding: what ``load`` builds from."""

  header: dict
  payload: bytes
  file_bytes: int
  config: ml_collections.ConfigDict
  model: nn.Module
  input_shape: tuple[int, int, int]
  has_frozen: bool
  # (entry, the model variable it is: its abstract value, and for masks the kept count, for
  # sparse kernels the most positions it may keep)
  plan: tuple[tuple[dict, jax.ShapeDtypeStruct, int | None], ...]


def _verify(path: str) -> _Verified:
  """Every check of the module docstring's steps 1-7; nothing is decoded."""
  path = os.fspath(path)
  return _verify_blob(path, _read_file(path))


def _verify_blob(path: str, blob: bytes) -> _Verified:
  """Steps 2-7 on a file's bytes (``path`` names it in messages)."""
  version = _check_digest(path, blob)
  header, payload = _parse_header(path, blob)
  file_bytes = len(blob)
  del blob
  try:
    _check_schema(header, version, len(payload))
  except _Invalid as e:
    raise ArtifactError(f'{path}: invalid header: {e}') from None
  from pemn_jax import module_artifact

  try:
    if module_artifact.is_module_header(header):  # checked against the caller's module on load
      module_artifact.check_payload(header, payload)
      return _Verified(header, payload, file_bytes, None, None, None, header['key'] is not None, ())
    config, model, shape = _build(header)
    abstract = _abstract_variables(model, shape, header['entries'])
    has_frozen, plan = _plan(header, config, abstract, payload)
  except _Invalid as e:
    raise ArtifactError(f'{path}: {e}') from None
  return _Verified(header, payload, file_bytes, config, model, shape, has_frozen, plan)


def _build(header: dict) -> tuple[ml_collections.ConfigDict, nn.Module, tuple[int, int, int]]:
  """The config and model the header describes, within the reader's limits (no arrays)."""
  config = common.complete(ml_collections.ConfigDict(copy.deepcopy(header['config'])))
  m, s = config.model, config.strategy
  # Types first, so that build.validate_config compares only what it expects.
  for field in (
    'name',
    'dtype',
    'conv_impl',
    'native_kernels',
    'remat_blocks',
    'gelu_bn_residuals',
  ):
    _str(m[field], f'config.model.{field}')
  if m.sparsity_method is not None:
    _str(m.sparsity_method, 'config.model.sparsity_method')
  _str(s.name, 'config.strategy.name')
  for field in ('base_source', 'base_name_map'):
    if m[field] is not None:
      raise _Invalid(
        f'config.model.{field} must be null: a file never names a path to read (a mask delta '
        'records its base in the base section, and the reader gives the path)'
      )
  if 'base' in header and not m.masked:
    raise _Invalid('a base section (a mask delta) needs a masked model (config.model.masked)')
  for section, field in (
    ('model', 'masked'),
    ('model', 'binary_weights'),
    ('strategy', 'score_abs'),
  ):
    if not isinstance(config[section][field], bool):
      raise _Invalid(
        f'config.{section}.{field} must be true or false, got {_short(config[section][field])}'
      )
  for field in ('dim', 'depth', 'kernel_size', 'patch_size', 'num_classes', 'num_heads', 'width'):
    if m[field] is not None:
      _int(m[field], f'config.model.{field}', 1, MAX_DEPTH if field == 'depth' else MAX_WIDTH)
  hidden = list(m.hidden_dims) if isinstance(m.hidden_dims, tuple) else m.hidden_dims
  for i, d in enumerate(_list(hidden, 'config.model.hidden_dims', MAX_DEPTH)):
    _int(d, f'config.model.hidden_dims[{i}]', 1, MAX_WIDTH)
  if not 0 < _real(m.mlp_ratio, 'config.model.mlp_ratio') <= 64:
    raise _Invalid(f'config.model.mlp_ratio must be in (0, 64], got {m.mlp_ratio!r}')
  if m.sparsity is not None:
    _real(m.sparsity, 'config.model.sparsity')
  if s.rp_ratio is not None:
    _real(s.rp_ratio, 'config.strategy.rp_ratio')
  _real(s.keep_fraction, 'config.strategy.keep_fraction')
  if m.name not in REGISTRY:
    raise _Invalid(f'config.model.name must be one of {tuple(REGISTRY)}, got {_short(m.name)}')
  fields = REGISTRY[m.name].fields
  recorded = header.get('input_shape')
  if m.input_shape is not None:
    given = list(m.input_shape) if isinstance(m.input_shape, tuple) else m.input_shape
    configured = _check_input_shape(given, 'config.model.input_shape')
    if recorded is not None and tuple(recorded) != configured:
      raise _Invalid(
        f'input_shape {recorded} differs from config.model.input_shape {list(configured)}'
      )
    recorded = recorded or list(configured)
  if recorded is None:
    from pemn_jax.data import sources  # the table of known shapes only; opens nothing

    known = sources.IMAGE_SHAPES.get(config.data.name)
    if known is None:
      raise _Invalid(
        'the header records no input_shape and config.data.name '
        f'{config.data.name!r} is not a dataset whose image shape this pemn-jax knows'
      )
    recorded = list(known)
  shape = tuple(recorded)
  p = (m.patch_size if 'patch_size' in fields else None) or 1
  widths = [m[f] for f in ('dim', 'width') if f in fields and m[f]]
  widest = max(1, shape[0] // p) * max(1, shape[1] // p) * max(widths, default=shape[2])
  if widest > MAX_ACTIVATION_VALUES:
    raise _Invalid(
      f'the model has an activation of {widest:,} values per example (input {list(shape)}), '
      f'more than the limit of {MAX_ACTIVATION_VALUES:,}'
    )
  try:
    model = build.build_model(config)
  except (ValueError, TypeError) as e:  # validate_config names the field
    raise _Invalid(f'the header config describes no model pemn-jax can build: {e}') from None
  return config, model, shape


class _Unstored(Exception):
  """The traced model grew a layer the header's entries do not store."""


def _abstract_variables(model: nn.Module, shape: tuple[int, ...], entries: list) -> dict:
  """``model.init``'s variables as shapes (``jax.eval_shape``: no arrays are made).

  Every stored item names the module that owns it, so the trace calls nothing but those
  modules and their parents (and few parameterless ones); a header whose config claims a far
  bigger model than its entries (``model.depth=1000000``) is stopped after a few calls instead
  of being traced for minutes.
  """
  owners = set()
  for e in entries:
    module = tuple({'mask': e['path'][:-1], 'bn': e['path']}.get(e['kind'], e['path'][1:-1]))
    owners.update(module[:i] for i in range(len(module) + 1))
  budget = len(entries) + 64  # no model here calls any module it stores nothing of
  calls = {'all': 0, 'unstored': 0, 'first': None}

  def guard(next_fun, args, kwargs, context):
    path = tuple(context.module.path)
    calls['all'] += 1
    if path not in owners:
      calls['unstored'] += 1
      calls['first'] = calls['first'] or '/'.join(path)
    if calls['unstored'] > budget or calls['all'] > 16 * budget:
      raise _Unstored(calls['first'] or 'the model')
    return next_fun(*args, **kwargs)

  def init(x):
    with nn.intercept_methods(guard):
      return model.init({'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)}, x)

  try:
    return jax.eval_shape(init, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  except _Unstored as e:
    raise _Invalid(
      f'the header config describes a model with layers its {len(entries)} entries do not '
      f'store (the first: {e}): the config and the entries disagree'
    ) from None
  except (ValueError, TypeError) as e:
    raise _Invalid(f'the header config describes no model pemn-jax can build: {e}') from None


def _plan(header: dict, config, abstract: dict, payload: bytes):
  """Step 7: pairs each entry with the model variable it must be; checks they agree."""
  m, s = config.model, config.strategy
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))
  if total > MAX_PARAMETERS:
    raise _Invalid(
      f'the header config describes a model of {total:,} values, more than the '
      f'{MAX_PARAMETERS:,} this reader accepts'
    )
  expected = {}  # (collection, *path) -> (kind, abstract leaf, kept count or bound)
  folded = {tuple(e['path']): e for e in header['entries'] if e['kind'] == 'bn'}
  norms = batch_norm_modules(abstract)
  for module_path, e in folded.items():
    if module_path not in norms:
      raise _Invalid(
        f'the file stores a folded BatchNorm {"/".join(module_path)}, which is no BatchNorm of '
        'the model its config describes'
      )
    if e['shape'] != [norms[module_path]]:
      raise _Invalid(
        f'folded BatchNorm {"/".join(module_path)} has {e["shape"][0]} channels, the '
        f"model's has {norms[module_path]}"
      )
  binary = not m.masked and m.get('binary_weights', False)
  for collection in ('params', 'batch_stats'):
    for p, leaf in strategies.tree_items(abstract.get(collection, {})):
      n = math.prod(leaf.shape)
      if p[:-1] in folded and (collection, p[-1]) in _BN_LEAVES:
        if leaf.dtype != jnp.float32:
          raise _Invalid(f'BatchNorm {"/".join(p)} is {leaf.dtype}, not float32')
        continue  # one 'bn' entry stands for the four
      if binary and collection == 'params' and p[-1] == 'kernel':
        expected[(collection, *p)] = ('binary', leaf, None)
      elif collection == 'params' and m.masked and p[-1] == 'scores':
        expected[(collection, *p)] = ('mask', leaf, masking.num_kept(n, s.keep_fraction))
      elif collection == 'params' and m.sparsity_method and p[-1] == 'kernel':
        expected[(collection, *p)] = ('sparse', leaf, masking.num_kept(n, 1.0 - m.sparsity))
      else:
        expected[(collection, *p)] = ('array', leaf, None)
  plan = []
  for e in header['entries']:
    if e['kind'] == 'bn':  # checked above, against the model's BatchNorm modules
      plan.append((e, jax.ShapeDtypeStruct(tuple(e['shape']), jnp.float32), None))
      continue
    full = ('params', *e['path']) if e['kind'] == 'mask' else tuple(e['path'])
    name = '/'.join(e['path'])
    if full not in expected:
      raise _Invalid(
        f'the file stores {e["kind"]} {name}, which is no variable of the model its config '
        'describes'
      )
    kind, leaf, count = expected.pop(full)
    if kind == 'array' and e['kind'] == 'base':
      kind = 'base'  # a leaf left as the base's (a mask delta)
    if e['kind'] != kind:
      raise _Invalid(f'{name} is stored as a {e["kind"]} but the model needs a {kind}')
    shape = tuple(leaf.shape)
    if tuple(e['shape']) != shape:
      raise _Invalid(f"{kind} {name} has shape {tuple(e['shape'])}, the model's is {shape}")
    data = payload[e['offset'] : e['offset'] + e['length']]
    n = math.prod(shape)
    if kind == 'mask':
      _check_mask_data(name, e, data, n, count, s.keep_fraction)
    elif kind == 'binary':
      if leaf.dtype != jnp.float32:
        raise _Invalid(f'binary kernel {name} is {leaf.dtype} in the model, not float32')
      if n % 8 and data[-1] & (0xFF >> (n % 8)):
        raise _Invalid(f'binary kernel {name} has bits set after its {n} weights')
    elif kind == 'sparse':
      if e['ones'] > count:
        raise _Invalid(
          f'sparse kernel {name} keeps {e["ones"]} of {n} weights, more than the {count} '
          f'that model.sparsity={m.sparsity} allows'
        )
      if e['dtype'] != 'float32' or leaf.dtype != jnp.float32:
        raise _Invalid(f'sparse kernel {name} has dtype {e["dtype"]}, not float32')
      if e['length'] != e['positions_length'] + 4 * e['ones']:
        raise _Invalid(
          f'sparse kernel {name} is {e["length"]} bytes; {e["ones"]} float32 values after '
          f'{e["positions_length"]} bytes of positions need {e["positions_length"] + 4 * e["ones"]}'
        )
      _check_mask_data(name, e, data[: e['positions_length']], n, None, None)
    else:
      dtype = np.dtype(leaf.dtype)
      if e['dtype'] != dtype.name:
        raise _Invalid(f"{kind} {name} has dtype {e['dtype']}, the model's is {dtype.name}")
      if kind == 'array' and e['length'] != n * dtype.itemsize:
        raise _Invalid(
          f'array {name} is {e["length"]} bytes; shape {shape} of {dtype.name} needs '
          f'{n * dtype.itemsize}'
        )
    plan.append((e, leaf, count))
  if expected:
    missing = '/'.join(next(iter(expected)))
    raise _Invalid(f"the model's variable {missing} is not stored in the file")
  has_frozen = bool(jax.tree.leaves(abstract.get(layers.FROZEN, {})))
  key, fp = header['key'], header.get('frozen_fingerprint')
  if has_frozen and key is None:
    raise _Invalid(
      'key is null, but the model has frozen random weights (masked or random sparse) that '
      'are regenerated from it'
    )
  if not has_frozen and key is not None:
    raise _Invalid('the file records a key, but its model has no frozen random weights')
  if has_frozen and not (isinstance(fp, str) and _HEX_DIGEST.fullmatch(fp)):
    raise _Invalid(
      'frozen_fingerprint is missing: a file with a key must record the fingerprint of its '
      'frozen weights (else a changed key would give other weights silently)'
    )
  return has_frozen, tuple(plan)


def _check_mask_data(name, e, data, n, kept, keep_fraction) -> None:
  """A mask's codec header against its entry and the model (nothing decoded)."""
  try:
    head = codec.peek(data)
  except ValueError as err:
    raise _Invalid(f'{name}: {err}') from None
  if head.n != n:
    raise _Invalid(f'{name}: the coded mask holds {head.n} entries, the layer has {n}')
  if e['kind'] == 'mask' and head.method != _CODECS[e['codec']]:
    raise _Invalid(f'{name}: the entry says codec {e["codec"]}, the data is coded otherwise')
  if head.method == codec.METHOD_PACKBITS and head.payload_length != (n + 7) // 8:
    raise _Invalid(
      f'{name}: {head.payload_length} bytes of packed bits for {n} entries, not {(n + 7) // 8}'
    )
  if head.ones is not None and head.ones != e['ones']:
    raise _Invalid(f'{name}: the coded mask keeps {head.ones}, the entry says {e["ones"]}')
  if kept is not None and e['ones'] != kept:
    raise _Invalid(
      f'mask {name} keeps {e["ones"]} of {n} entries, but strategy.keep_fraction='
      f'{keep_fraction} keeps {kept}: the header and its masks disagree'
    )


def read(path: str) -> tuple[dict, bytes]:
  """(header, payload) of a verified artifact: every check but decoding (module docstring).

  Raises:
    ArtifactError: not an artifact, truncated, corrupted, a newer format, a malformed header,
      or a header whose entries are not the model its config describes.
  """
  v = _verify(path)
  return v.header, v.payload


def load(
  path: str,
  base: Any = None,
  base_format: str | None = None,
  base_name_map: str | dict | None = None,
) -> tuple[ml_collections.ConfigDict, Any, dict, dict]:
  """Rebuilds a network from an artifact alone, regenerating its random weights.

  Args:
    path: the ``.pemn`` file.
    base: a mask delta's base model (a file with a ``base`` section: masks over a trained
      model's weights, ``export(base=...)``): its path, or a loaded ``pretrained.Base``. Its
      fingerprint must be the recorded one. None for every other file.
    base_format: how to read ``base`` (``pretrained.FORMATS``); default: the recorded format.
    base_name_map: a safetensors base's name map (``model.base_name_map``).

  Returns:
    ``(config, model, variables, header)``: ``model.apply(variables, x)`` gives the trained
    network's logits.

  Raises:
    ArtifactError: invalid file (see ``read``), an item that does not decode to what its entry
      says, regenerated weights that do not match the recorded fingerprint, or a mask delta
      without its base, with another base (or a base given for a file that is no delta).
  """
  path = os.fspath(path)
  v = _verify(path)
  delta = v.header.get('base')
  if delta is None and base is not None:
    raise ArtifactError(
      f'{path} is not a mask delta (it records no base model): load it without a base'
    )
  if delta is not None and base is None:
    raise ArtifactError(
      f'{path} is a mask delta over a {delta["format"]} base model (fingerprint '
      f'{delta["fingerprint"][:12]}...): it stores no weight; give the base (pemn evaluate '
      '--base PATH, artifact.load(path, base=PATH))'
    )
  loaded_base = _load_base(path, delta, base, base_format, base_name_map) if delta else None
  if v.config is None:
    raise ArtifactError(
      f'{path} holds a module not described by a pemn-jax config (exported with '
      'export_module): load it with pemn.load_module(path, module)'
    )
  flat: dict[tuple[str, ...], Any] = {}  # (collection, *path) -> array
  sparse_positions = {}
  for e, leaf, _ in v.plan:
    data = v.payload[e['offset'] : e['offset'] + e['length']]
    name = '/'.join(e['path'])
    shape = tuple(leaf.shape)
    if e['kind'] == 'mask':
      mask = _decode(path, name, data, shape, e['ones'])
      flat[('params', *e['path'])] = jnp.asarray(mask, jnp.float32)
    elif e['kind'] == 'bn':
      # The folded map as the model's own BatchNorm: gamma = scale, beta = shift, mean 0 and
      # the variance whose rsqrt(v + eps) is 1, so (x - 0) * scale * 1 + shift.
      c, dtype = shape[0], _np_dtype(e['dtype'])
      vals = np.frombuffer(data, dtype.newbyteorder('<') if dtype.itemsize > 1 else dtype)
      vals = vals.astype(np.float32)
      p = tuple(e['path'])
      flat[('params', *p, 'scale')] = jnp.asarray(vals[:c])
      flat[('params', *p, 'bias')] = jnp.asarray(vals[c:])
      flat[('batch_stats', *p, 'mean')] = jnp.zeros((c,), jnp.float32)
      flat[('batch_stats', *p, 'var')] = jnp.full((c,), unit_variance(e['epsilon']), jnp.float32)
    elif e['kind'] == 'binary':
      n = math.prod(shape)
      bits = np.unpackbits(np.frombuffer(data, np.uint8), count=n).reshape(shape)
      flat[tuple(e['path'])] = jnp.asarray(np.where(bits, 1.0, -1.0).astype(np.float32))
    elif e['kind'] == 'sparse':
      nz = _decode(path, name, data[: e['positions_length']], shape, e['ones'])
      w = np.zeros(shape, np.float32)
      w[nz] = np.frombuffer(data[e['positions_length'] :], dtype='<f4')
      flat[tuple(e['path'])] = jnp.asarray(w)
      sparse_positions[tuple(e['path'][1:])] = nz
    elif e['kind'] == 'base':
      flat[tuple(e['path'])] = _base_value(path, loaded_base, e)
    else:
      dtype = np.dtype(leaf.dtype)
      a = np.frombuffer(data, dtype=dtype.newbyteorder('<') if dtype.itemsize > 1 else dtype)
      flat[tuple(e['path'])] = jnp.asarray(a.reshape(shape).astype(dtype))
  variables = {'params': {}, **traverse_util.unflatten_dict(flat)}
  header = v.header
  if v.has_frozen:
    key = jax.random.wrap_key_data(
      np.asarray(header['key']['data'], np.uint32), impl=header['key']['impl']
    )
    try:
      fresh = build.init_variables(v.model, v.config, v.input_shape, frozen_key=key)
      if loaded_base is not None:
        from pemn_jax import pretrained

        fresh = pretrained.apply_base(fresh, loaded_base, f'the base of {path}')
    except ValueError as e:  # the model's own checks of its input and size, naming the field
      raise ArtifactError(f'{path}: the header config describes no usable model: {e}') from None
    frozen = fresh[layers.FROZEN]
    got, recorded = build.frozen_fingerprint(frozen), header['frozen_fingerprint']
    if got != recorded:
      s = v.config.strategy
      raise ArtifactError(
        f'{path}: the frozen random weights regenerated from the recorded key '
        f'({header["key"]["impl"]} {header["key"]["data"]}, strategy {s.name}) do not match the '
        f'fingerprint recorded at export ({recorded[:12]}... vs {got[:12]}...). The model, its '
        'masks and arrays were checked against the header and agree, so the weights differ: '
        'the key, seed or strategy were changed after export, or this JAX '
        f'({jax.__version__}) draws other random values than the one that wrote the file '
        f'({header["versions"]["jax"]}); refusing to use it'
      )
    for p, nz in sparse_positions.items():  # random sparse baselines: kept within the mask
      mask = np.asarray(strategies.get_path(frozen, p[:-1] + ('mask',))).astype(bool)
      if (nz & ~mask).any():
        raise ArtifactError(
          f'{path}: sparse kernel {"/".join(p)} stores weights outside the random mask its key '
          'regenerates, which the layer would drop'
        )
    variables[layers.FROZEN] = frozen
  if loaded_base is not None and isinstance(base, str | os.PathLike):
    v.config.model.base_source = os.fspath(base)  # the reader's path, as a run over it names it
    v.config.model.base_format = loaded_base.format
  return v.config, v.model, variables, header


def _load_base(path: str, delta: dict, base: Any, base_format, base_name_map):
  """The base a mask delta was trained over, checked against the recorded fingerprint."""
  from pemn_jax import pretrained

  if isinstance(base, pretrained.Base):
    loaded, shown = base, f'the given {base.format} base'
  else:
    fmt = base_format or delta['format']
    layout = delta.get('layout', 'flax') if fmt == delta['format'] else 'flax'
    try:
      loaded = pretrained.load_base(os.fspath(base), fmt, base_name_map, layout)
    except ValueError as e:
      raise ArtifactError(f'{path}: {e}') from None
    shown = f'the base {os.fspath(base)}'
  if loaded.fingerprint != delta['fingerprint']:
    raise ArtifactError(
      f'{path}: {shown} (fingerprint {loaded.fingerprint[:12]}...) is not the base model this '
      f'mask delta was trained over ({delta["fingerprint"][:12]}...); refusing to use it'
    )
  return loaded


def _decode(path: str, name: str, data: bytes, shape: tuple[int, ...], ones: int) -> np.ndarray:
  try:
    mask = codec.decode_mask(data, shape)
  except ValueError as e:
    raise ArtifactError(f'{path}: {name}: {e}') from None
  if int(np.count_nonzero(mask)) != ones:
    raise ArtifactError(
      f'{path}: {name} decodes to {int(np.count_nonzero(mask))} kept entries, the header says '
      f'{ones}'
    )
  return mask


def evaluate(
  path: str,
  config_override: ml_collections.ConfigDict | None = None,
  native_kernels: str = 'auto',
  reference: str | None = None,
  base: Any = None,
  base_format: str | None = None,
  base_name_map: str | dict | None = None,
) -> dict:
  """Evaluates an artifact on its dataset's test split; same keys as ``evaluate_workdir``.

  With ``reference`` (another artifact of the same network, e.g. its ``bn='full'`` export when
  ``path`` is folded), also ``reference_accuracy``, ``agreement`` (the share of test examples
  whose top-1 class the two files agree on) and ``max_logit_difference``.

  Args:
    path: the ``.pemn`` file.
    config_override: the caller's config (``pemn evaluate --config``); its ``data`` section
      says where the data is read and prepared (``data_dir``, ``source_dir``, ``source_path``).
      The file gives only the dataset's name: a received file never chooses where pemn
      writes. Default: the data defaults.
    native_kernels: which native CPU kernels the step may use (``model.native_kernels``).
    reference: a ``.pemn`` file to compare predictions with.
    base, base_format, base_name_map: a mask delta's base model (``load``); a reference that
      is a mask delta is loaded over the same base.
  """
  from pemn_jax import steps
  from pemn_jax.data import pipeline, sources  # evaluating needs the data; reading does not

  base_args = dict(base=base, base_format=base_format, base_name_map=base_name_map)
  config, model, variables, header = load(path, **base_args)
  if reference is not None:
    ref_base = base_args if 'base' in read(reference)[0] else {}
    ref_config, ref_model, ref_variables, ref_header = load(reference, **ref_base)
    shape = header.get('input_shape') or list(build.input_shape(config))
    ref_shape = ref_header.get('input_shape') or list(build.input_shape(ref_config))
    if ref_config.data.name != config.data.name or ref_shape != shape:
      raise ArtifactError(
        f'{reference} is a model of {ref_config.data.name} {ref_shape} images, {path} of '
        f'{config.data.name} {shape}: no common test split to compare them on'
      )
  given = None
  if config_override is not None and 'data' in config_override:
    given = config_override.data
  data = sources.complete(given)
  data.name = config.data.name  # the recorded NAME, nothing else of the recorded data section
  config.data = data
  info = sources.get_dataset_info(config.data)
  shape = tuple(header.get('input_shape') or build.input_shape(config))
  if tuple(info.image_shape) != shape or config.model.num_classes != info.num_classes:
    raise ArtifactError(
      f'{path}: the model takes {list(shape)} images and {config.model.num_classes} classes, '
      f'but data.name={data.name!r} has {list(info.image_shape)} and {info.num_classes}'
    )
  n = jax.device_count()
  eval_bs = config.train.eval_batch_size
  eval_bs = eval_bs - eval_bs % n or n  # the largest multiple of the device count below it
  shardings = steps.mesh_and_shardings()
  variables = jax.device_put(variables, shardings.replicated)
  eval_step = steps.jit_eval_step(model, shardings, native_kernels)
  batches = pipeline.eval_batches(
    config.data,
    global_batch_size=eval_bs,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  if reference is None:
    result = steps.evaluate(
      eval_step,
      variables['params'],
      variables.get('batch_stats', {}),
      variables.get(layers.FROZEN),
      batches,
      shardings.batch,
    )
    return {**result, 'step': header['step']}
  ref_variables = jax.device_put(ref_variables, shardings.replicated)
  compare = jax.jit(
    steps.in_mesh(_compare_step(model, ref_model), shardings.mesh, native_kernels),
    in_shardings=(shardings.replicated, shardings.replicated, shardings.batch),
    out_shardings=shardings.replicated,
  )
  totals = {}
  for batch in batches:
    sums = jax.device_get(
      compare(variables, ref_variables, steps.to_global(batch, shardings.batch))
    )
    for k, value in sums.items():
      totals[k] = (
        max(totals.get(k, 0.0), float(value))
        if k == 'max_diff'
        else totals.get(k, 0.0) + float(value)
      )
  n = max(totals['count'], 1.0)
  return {
    'accuracy': totals['correct'] / n,
    'loss': totals['loss'] / n,
    'num_examples': int(totals['count']),
    'step': header['step'],
    'reference_accuracy': totals['ref_correct'] / n,
    'agreement': totals['agree'] / n,
    'max_logit_difference': totals['max_diff'],
  }


def _compare_step(model: nn.Module, ref_model: nn.Module):
  """``(variables, ref_variables, batch) -> sums`` over the real rows: both models' correct
  counts, the loss of the first, their top-1 agreements and largest logit difference."""
  from pemn_jax import steps

  def compare(variables, ref_variables, batch):
    logits = model.apply(variables, batch['image'], train=False)
    ref = ref_model.apply(ref_variables, batch['image'], train=False)
    mask, label = batch['mask'], batch['label']
    top, ref_top = jnp.argmax(logits, -1), jnp.argmax(ref, -1)
    diff = jnp.max(jnp.abs(logits.astype(jnp.float32) - ref.astype(jnp.float32)), -1)
    return {
      'correct': jnp.sum((top == label) * mask),
      'ref_correct': jnp.sum((ref_top == label) * mask),
      'agree': jnp.sum((top == ref_top) * mask),
      'loss': jnp.sum(steps.cross_entropy(logits, label) * mask),
      'count': jnp.sum(mask),
      'max_diff': jnp.max(diff * mask),
    }

  return compare


# ----------------------------------------------------------------------------------------------
# Dense materialisation.


def materialize_dense(
  config: ml_collections.ConfigDict, variables: dict
) -> tuple[ml_collections.ConfigDict, dict]:
  """An ordinary dense Flax parameter tree of a masked network (weights = random x mask).

  The returned config has ``model.masked = False``; ``build.build_model`` of it applied to the
  returned variables computes the masked network's function with plain dense layers, so the
  model can be used (or ported) without pemn-jax's masked layers. BatchNorm is kept as is.

  Returns:
    ``(dense_config, {'params': ..., 'batch_stats': ...})``.
  """
  dense_config = ml_collections.ConfigDict(config.to_dict())
  dense_config.model.masked = False
  if 'base_source' in dense_config.model:  # the weights are in the tree: no base to read
    dense_config.model.base_source = None
    dense_config.model.base_name_map = None
  flat = {}
  masks = masks_of(config, variables['params'])
  for path, leaf in strategies.tree_items(variables['params']):
    if path[-1] == 'scores':
      frozen = strategies.get_path(variables[layers.FROZEN], path[:-1] + ('kernel',))
      flat[path[:-1] + ('kernel',)] = frozen * jnp.asarray(masks[path], frozen.dtype)
    else:
      flat[path] = leaf
  out = {'params': traverse_util.unflatten_dict(flat)}
  if variables.get('batch_stats'):
    out['batch_stats'] = variables['batch_stats']
  return dense_config, out


# ----------------------------------------------------------------------------------------------
# Inspecting.


def inspect(path: str) -> dict:
  """What is inside an artifact, and its size against the dense model and the paper's rule.

  Raises:
    ArtifactError: as ``read`` (the file is verified against its model first).
  """
  return _summary(_verify(path), path)


def _mask_fields(masks: list) -> dict:
  """The summary's mask counts and per-layer table, from the mask entries."""
  masked_weights = sum(int(np.prod(e['shape'])) for e in masks)
  mask_bytes = sum(e['length'] for e in masks)
  return {
    'masked_weights': masked_weights,
    'mask_bytes': mask_bytes,
    'mask_bits_per_entry': 8 * mask_bytes / masked_weights if masked_weights else None,
    'mask_entropy_bits_per_entry': (
      sum(codec.entropy_bits(int(np.prod(e['shape'])), e['ones']) for e in masks) / masked_weights
      if masked_weights
      else None
    ),
    'layers': [
      {
        'path': '/'.join(e['path'][:-1]),
        'shape': e['shape'],
        'codec': e['codec'],
        'bytes': e['length'],
        'keep': e['ones'] / max(1, int(np.prod(e['shape']))),
      }
      for e in masks
    ],
  }


def _norm_fields(entries: list) -> dict:
  """How the normalisation layers are stored: BatchNorm in full or folded, and their bytes."""
  arrays = {tuple(e['path']): e for e in entries if e['kind'] in _ARRAY_KINDS}
  folded = [e for e in entries if e['kind'] == 'bn']
  kernel_owners = {tuple(e['path'][1:-1]) for e in entries if e['kind'] in ('binary', 'sparse')}
  kernel_owners |= {p[1:-1] for p in arrays if p[-1] == 'kernel'}
  full_bn = [
    p[1:-1]
    for p in arrays
    if p[0] == 'params'
    and p[-1] == 'scale'
    and all((c, *p[1:-1], leaf) in arrays for c, leaf in _BN_LEAVES)
  ]
  bn_bytes = sum(e['length'] for e in folded) + sum(
    arrays[(c, *m, leaf)]['length'] for m in full_bn for c, leaf in _BN_LEAVES
  )
  # Values inference needs: 2 per channel (scale and shift) of every BN / LN; a binary or
  # sparse layer's per-channel scale is part of its weights, not a normalisation.
  norm = sum(2 * e['shape'][0] for e in folded) + sum(
    2 * int(np.prod(e['shape']))
    for p, e in arrays.items()
    if p[-1] == 'scale' and p[1:-1] not in kernel_owners
  )
  dtypes = sorted({e['dtype'] for e in folded})
  return {
    'norm_values': norm,
    'bn_storage': ('folded ' + '/'.join(dtypes)) if folded else ('full' if full_bn else None),
    'bn_bytes': bn_bytes,
  }


def _module_summary(v: _Verified, path: str) -> dict:
  """``inspect`` of a module file (``module_artifact``): what the file itself can say."""
  header, mod = v.header, v.header['module']
  entries = header['entries']
  masks = [e for e in entries if e['kind'] == 'mask']
  arrays = [e for e in entries if e['kind'] in _ARRAY_KINDS]
  info = {
    'path': path,
    'file_bytes': v.file_bytes,
    'format_version': header['format_version'],
    'created': header['created'],
    'versions': header['versions'],
    'step': header['step'],
    'module': mod['class'],
    'inputs': mod['inputs'],
    'masked_layers': mod['masked_layers'],
    'masked': bool(masks),
    'strategy': 'module',
    'key': header['key'],
    **_mask_fields(masks),
    'other_bytes': sum(e['length'] for e in arrays),
    **_norm_fields(entries),
  }
  unmasked = sum(
    int(np.prod(e['shape']))
    for e in arrays
    if e['path'][0] == 'params' and e['path'][-1] in ('kernel', 'embedding')
  )
  info['dense_fp32_bytes'] = 4 * (info['masked_weights'] + unmasked)
  info['ratio_vs_dense_fp32'] = info['dense_fp32_bytes'] / v.file_bytes
  info['ratio_vs_dense_fp32_with_bn'] = (
    info['dense_fp32_bytes'] + 4 * info['norm_values']
  ) / v.file_bytes
  if 'base' in header:
    info.update(_delta_fields(header, info, v.file_bytes))
  return info


def _summary(v: _Verified, path: str) -> dict:
  if v.config is None:
    return _module_summary(v, path)
  header, file_bytes = v.header, v.file_bytes
  cfg = v.config.to_dict()  # completed: fields the file lacks read as their defaults
  masks = [e for e in header['entries'] if e['kind'] == 'mask']
  arrays = [e for e in header['entries'] if e['kind'] in _ARRAY_KINDS]
  masked_weights = sum(int(np.prod(e['shape'])) for e in masks)
  sparse_entries = [e for e in header['entries'] if e['kind'] == 'sparse']
  binary_entries = [e for e in header['entries'] if e['kind'] == 'binary']
  kernels = [e for e in arrays if e['path'][-1] == 'kernel'] + sparse_entries + binary_entries
  dense_weights = masked_weights or sum(int(np.prod(e['shape'])) for e in kernels)
  norms = _norm_fields(header['entries'])
  norm = norms['norm_values']
  s = cfg['strategy']
  info = {
    'path': path,
    'file_bytes': file_bytes,
    'format_version': header['format_version'],
    'created': header['created'],
    'versions': header['versions'],
    'step': header['step'],
    'model': cfg['model'],
    'masked': bool(masks),
    'strategy': s['name'] if masks else 'dense',
    'rp_ratio': (s.get('rp_ratio') if masks and s['name'] == 'random_vector_padding' else None),
    'keep_fraction': s['keep_fraction'] if masks else 1.0,
    'seed': cfg['seed'],
    'key': header['key'],
    'dense_fp32_bytes': dense_weights * 4,
    **_mask_fields(masks),
    'other_bytes': sum(e['length'] for e in arrays)
    + sum(e['length'] for e in header['entries'] if e['kind'] == 'bn'),
    **norms,
  }
  if sparse_entries:
    m = cfg['model']
    info['strategy'] = f'sparse_{m["sparsity_method"]}'
    info['sparsity'] = m['sparsity']
    info['sparse_kernel_bytes'] = sum(e['length'] for e in sparse_entries)
    info['csr_bytes'] = (
      storage.csr_bits([tuple(e['shape']) for e in sparse_entries], m['sparsity']) / 8
    )
  if binary_entries:
    info['strategy'] = 'binary'
    info['binary_kernel_bytes'] = sum(e['length'] for e in binary_entries)
    info['binary_bytes'] = storage.binary_bits([tuple(e['shape']) for e in binary_entries]) / 8
  info['ratio_vs_dense_fp32'] = info['dense_fp32_bytes'] / file_bytes
  info['ratio_vs_dense_fp32_with_bn'] = (info['dense_fp32_bytes'] + 4 * norm) / file_bytes
  if masks:
    rep = storage.report(
      [tuple(e['shape']) for e in masks], norm, s['name'], s['keep_fraction'], s.get('rp_ratio')
    )
    info['paper_bytes'] = rep.paper_bits / 8
    info['paper_bytes_with_bn'] = rep.paper_bits_with_bn / 8
  if 'base' in header:
    info.update(_delta_fields(header, info, file_bytes))
  return info


def _delta_fields(header: dict, info: dict, file_bytes: int) -> dict:
  """A mask delta's size against its base model and a LoRA adapter (accounting only).

  The base is counted as float32 values (``base.values``: every leaf of it, BN included). The
  LoRA adapter has as many trainable parameters as the masks have scores (one per masked
  weight), stored in float32, plus the same other arrays the delta stores (``other_bytes``; the
  leaves left as the base's, ``from_base_values``, are stored by neither).
  """
  base = header['base']
  base_bytes = 4 * base['values']
  lora_bytes = 4 * info['masked_weights'] + info['other_bytes']
  from_base = [e for e in header['entries'] if e['kind'] == 'base']
  return {
    'base': dict(base),
    'from_base_leaves': len(from_base),
    'from_base_values': sum(math.prod(e['shape']) for e in from_base),
    'base_fp32_bytes': base_bytes,
    'ratio_vs_base_fp32': base_bytes / file_bytes,
    'lora_equal_params_fp32_bytes': lora_bytes,
    'ratio_vs_lora_equal_params': lora_bytes / file_bytes,
  }


def format_inspect(info: dict) -> str:
  """A human-readable summary of ``inspect``'s dict."""
  lines = [
    f'{info["path"]}: pemn artifact v{info["format_version"]}, {info["file_bytes"]:,} bytes,'
    f' step {info["step"]}, created {info["created"]} (jax {info["versions"]["jax"]})',
  ]
  if 'module' in info:
    shapes = ', '.join(f'{tuple(x["shape"])} {x["dtype"]}' for x in info['inputs'])
    lines.append(
      f'  module {info["module"]} (load it with pemn.load_module and that module); '
      f'inputs {shapes}; {len(info["masked_layers"])} masked layers'
    )
  else:
    m = info['model']
    strat = info['strategy'] + (f' r={info["rp_ratio"]:g}' if info['rp_ratio'] else '')
    lines.append(
      f'  model {m["name"]} dim={m.get("dim")} depth={m.get("depth")}; strategy {strat}; '
      f'keep {info["keep_fraction"]}; seed {info["seed"]}'
    )
  if 'base' in info:
    b = info['base']
    lines.append(
      f'  mask delta over a {b["format"]} base model (fingerprint {b["fingerprint"][:16]}..., '
      f"{b['values']:,} values): its weights are the base's, not stored; load with --base"
    )
    if info.get('from_base_leaves'):
      lines.append(
        f'  {info["from_base_leaves"]} other leaves ({info["from_base_values"]:,} values) '
        "left as the base's: not stored either"
      )
  elif info['masked']:
    lines.append(
      f'  key {info["key"]["impl"]} {info["key"]["data"]} (the random values are '
      'regenerated, not stored)'
    )
  if info['masked']:
    lines.append(f'  {"layer":40s} {"shape":>20s} {"codec":>9s} {"bytes":>9s} {"keep":>6s}')
    for layer in info['layers']:
      lines.append(
        f'  {layer["path"]:40s} {str(tuple(layer["shape"])):>20s} '
        f'{layer["codec"]:>9s} {layer["bytes"]:>9,} {layer["keep"]:6.3f}'
      )
    lines.append(
      f'  masks: {info["mask_bytes"]:,} bytes = {info["mask_bits_per_entry"]:.4f} '
      f'bits/entry (entropy bound {info["mask_entropy_bits_per_entry"]:.4f})'
    )
  if 'csr_bytes' in info:
    lines.append(
      f'  sparse kernels ({info["sparsity"]:.0%} removed): '
      f'{info["sparse_kernel_bytes"]:,} bytes as values + coded positions; '
      f'{info["csr_bytes"]:,.0f} bytes in CSR (32-bit values and indices)'
    )
  if 'binary_bytes' in info:
    lines.append(
      f'  learned 1-bit kernels: {info["binary_kernel_bytes"]:,} bytes of packed signs '
      f'(+ fp32 per-channel scales: {info["binary_bytes"]:,.0f} bytes in all)'
    )
  if info.get('bn_storage'):
    lines.append(f'  BatchNorm: {info["bn_storage"]}, {info["bn_bytes"]:,} bytes')
  lines.append(f'  other arrays (BN/LN and any dense leaf): {info["other_bytes"]:,} bytes')
  lines.append(
    f'  dense fp32 weights: {info["dense_fp32_bytes"]:,} bytes -> this file is '
    f'{info["ratio_vs_dense_fp32"]:.2f}x smaller '
    f'({info["ratio_vs_dense_fp32_with_bn"]:.2f}x counting BN in the dense model)'
  )
  if 'base' in info:
    lines.append(
      f'  the base model in fp32: {info["base_fp32_bytes"]:,} bytes -> this delta is '
      f'{info["ratio_vs_base_fp32"]:.2f}x smaller; a LoRA adapter of as many trainable '
      f'parameters ({info["masked_weights"]:,}, fp32, same other arrays): '
      f'{info["lora_equal_params_fp32_bytes"]:,} bytes ({info["ratio_vs_lora_equal_params"]:.2f}x)'
    )
  if info['masked'] and 'paper_bytes' in info and 'base' not in info:  # a delta stores no value
    lines.append(
      f"  the paper's convention (stored values + 1-bit masks): "
      f'{info["paper_bytes"]:,.0f} bytes without BN, '
      f'{info["paper_bytes_with_bn"]:,.0f} with BN'
    )
  return '\n'.join(lines)
