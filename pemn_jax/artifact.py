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

Reading checks the magic, the version, the lengths and the checksum before anything is
decoded, so a truncated, corrupted or foreign file gives a clear ``ArtifactError`` (a
``ValueError``), never a wrong model. Rebuilding regenerates the random weights from the key
and checks them against the fingerprint recorded at export.

Masks become scores again on load: a score of 1 where the mask keeps and 0 elsewhere, so the
model's own top-k selects exactly the stored mask and the rebuilt network computes the trained
network's logits bit for bit.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
import zlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from pemn_jax import build, codec, layers, masking, storage, strategies
from pemn_jax.configs import common

MAGIC = b'PEMNJAX\n'
FORMAT_VERSION = 1
_PREFIX = struct.Struct('<8sIQ')
_DIGEST = 32


class ArtifactError(ValueError):
  """The file is not a valid pemn artifact (foreign, truncated, corrupted or too new)."""


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

  Returns:
    ``inspect``'s summary of the written file.
  """
  masked = config.model.get('masked', True)
  sparse_method = None if masked else config.model.get('sparsity_method')
  has_frozen = masked or sparse_method == 'random'  # random sparse masks are regenerated too
  if frozen_key is None:
    frozen_key = build.model_keys(config.seed)[1]
  entries, chunks, offset = [], [], 0

  def add(kind, path, data: bytes, **meta):
    nonlocal offset
    entries.append(
      {'kind': kind, 'path': list(path), 'offset': offset, 'length': len(data), **meta}
    )
    chunks.append(data)
    offset += len(data)

  if masked:
    for path, mask in masks_of(config, variables['params']).items():
      data = codec.encode_mask(mask)
      add(
        'mask',
        path,
        data,
        shape=list(mask.shape),
        ones=int(mask.sum()),
        codec=['packbits', 'rans'][data[0] & 0x0F],
      )
  for collection in ('params', 'batch_stats'):
    for path, leaf in strategies.tree_items(variables.get(collection, {})):
      if collection == 'params' and path[-1] == 'scores':
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
      add(
        'array',
        (collection, *path),
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder('<')).tobytes(),
        shape=list(a.shape),
        dtype=a.dtype.name,
      )
  header = {
    'format_version': FORMAT_VERSION,
    'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'versions': {'jax': jax.__version__, 'flax': flax.__version__, 'numpy': np.__version__},
    'config': config.to_dict(),
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
  hdr = zlib.compress(json.dumps(header, sort_keys=True, separators=(',', ':')).encode(), 9)
  body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(hdr)) + hdr + b''.join(chunks)
  blob = body + hashlib.sha256(body).digest()
  tmp = f'{out_path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, out_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return inspect(out_path)


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


def read(path: str) -> tuple[dict, bytes]:
  """(header, payload) of a verified artifact.

  Raises:
    ArtifactError: not an artifact, truncated, corrupted, or a newer format.
  """
  try:
    with open(path, 'rb') as f:
      blob = f.read()
  except FileNotFoundError:
    raise ArtifactError(f'artifact {path} does not exist') from None
  except IsADirectoryError:
    raise ArtifactError(f'artifact {path} is a directory, not a .pemn file') from None
  if len(blob) < _PREFIX.size or blob[:8] != MAGIC:
    raise ArtifactError(f'{path} is not a pemn artifact (no PEMNJAX magic at the start)')
  _, version, hlen = _PREFIX.unpack_from(blob)
  if version > FORMAT_VERSION:
    raise ArtifactError(
      f'{path} has artifact format version {version}; this pemn-jax reads '
      f'up to {FORMAT_VERSION}: upgrade pemn-jax'
    )
  if len(blob) < _PREFIX.size + hlen + _DIGEST:
    raise ArtifactError(
      f'{path} is truncated ({len(blob)} bytes; the header alone needs '
      f'{_PREFIX.size + hlen + _DIGEST})'
    )
  body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
  if hashlib.sha256(body).digest() != digest:
    raise ArtifactError(f'{path} is corrupted or truncated (sha256 checksum mismatch)')
  try:
    header = json.loads(zlib.decompress(body[_PREFIX.size : _PREFIX.size + hlen]))
  except (ValueError, zlib.error) as e:
    raise ArtifactError(f'{path} has an unreadable header: {e}') from None
  payload = body[_PREFIX.size + hlen :]
  end = max((e['offset'] + e['length'] for e in header['entries']), default=0)
  if end != len(payload):
    raise ArtifactError(f'{path}: payload is {len(payload)} bytes, entries need {end}')
  return header, payload


def load(path: str) -> tuple[ml_collections.ConfigDict, Any, dict, dict]:
  """Rebuilds a network from an artifact alone, regenerating its random weights.

  Returns:
    ``(config, model, variables, header)``: ``model.apply(variables, x)`` gives the trained
    network's logits.

  Raises:
    ArtifactError: invalid file, or regenerated weights that do not match the recorded
      fingerprint (a different JAX random stream).
  """
  header, payload = read(path)
  config = ml_collections.ConfigDict(header['config'])
  config = common.complete(config)
  model = build.build_model(config)
  shape = header.get('input_shape')  # files written before it was recorded: from the config
  flat: dict[tuple[str, ...], Any] = {}  # (collection, *path) -> array
  for e in header['entries']:
    data = payload[e['offset'] : e['offset'] + e['length']]
    if e['kind'] == 'mask':
      mask = codec.decode_mask(data, tuple(e['shape']))
      flat[('params', *e['path'])] = jnp.asarray(mask, jnp.float32)
    elif e['kind'] == 'sparse':
      nz = codec.decode_mask(data[: e['positions_length']], tuple(e['shape']))
      vals = np.frombuffer(data[e['positions_length'] :], dtype='<f4')
      if vals.size != int(nz.sum()):
        raise ArtifactError(
          f'{path}: sparse entry {"/".join(e["path"])} has {vals.size} '
          f'values for {int(nz.sum())} positions'
        )
      w = np.zeros(e['shape'], np.float32)
      w[nz] = vals
      flat[tuple(e['path'])] = jnp.asarray(w)
    else:
      a = np.frombuffer(data, dtype=np.dtype(e['dtype']).newbyteorder('<')).reshape(e['shape'])
      flat[tuple(e['path'])] = jnp.asarray(a.astype(e['dtype']))
  variables = {'params': {}, **traverse_util.unflatten_dict(flat)}
  if header['key'] is not None:
    key = jax.random.wrap_key_data(
      np.asarray(header['key']['data'], np.uint32), impl=header['key']['impl']
    )
    fresh = build.init_variables(model, config, shape, frozen_key=key)
    frozen = fresh[layers.FROZEN]
    fingerprint = header.get('frozen_fingerprint')
    if fingerprint:
      try:
        build.check_fingerprint(fingerprint, build.frozen_fingerprint(frozen), path)
      except ValueError as e:
        raise ArtifactError(str(e)) from None
    variables[layers.FROZEN] = frozen
  return config, model, variables, header


def evaluate(
  path: str, config_override: ml_collections.ConfigDict | None = None, native_kernels: str = 'auto'
) -> dict:
  """Evaluates an artifact on its dataset's test split; same keys as ``evaluate_workdir``.

  Args:
    path: the ``.pemn`` file.
    config_override: if given, its ``data`` section replaces the recorded one (e.g. another
      ``data_dir``).
    native_kernels: which native CPU kernels the step may use (``model.native_kernels``).
  """
  from pemn_jax import steps
  from pemn_jax.data import pipeline  # evaluating needs the data; reading the file does not

  config, model, variables, header = load(path)
  if config_override is not None and 'data' in config_override:
    config.data = config_override.data
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
  result = steps.evaluate(
    eval_step,
    variables['params'],
    variables.get('batch_stats', {}),
    variables.get(layers.FROZEN),
    batches,
    shardings.batch,
  )
  return {**result, 'step': header['step']}


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
  """What is inside an artifact, and its size against the dense model and the paper's rule."""
  header, payload = read(path)
  cfg = header['config']
  file_bytes = os.path.getsize(path)
  masks = [e for e in header['entries'] if e['kind'] == 'mask']
  arrays = [e for e in header['entries'] if e['kind'] == 'array']
  masked_weights = sum(int(np.prod(e['shape'])) for e in masks)
  mask_bytes = sum(e['length'] for e in masks)
  sparse_entries = [e for e in header['entries'] if e['kind'] == 'sparse']
  kernels = [e for e in arrays if e['path'][-1] == 'kernel'] + sparse_entries
  dense_weights = masked_weights or sum(int(np.prod(e['shape'])) for e in kernels)
  norm = sum(2 * int(np.prod(e['shape'])) for e in arrays if e['path'][-1] == 'scale')
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
    'masked_weights': masked_weights,
    'dense_fp32_bytes': dense_weights * 4,
    'mask_bytes': mask_bytes,
    'mask_bits_per_entry': 8 * mask_bytes / masked_weights if masked_weights else None,
    'mask_entropy_bits_per_entry': (
      sum(codec.entropy_bits(int(np.prod(e['shape'])), e['ones']) for e in masks) / masked_weights
      if masked_weights
      else None
    ),
    'other_bytes': sum(e['length'] for e in arrays),
    'norm_values': norm,
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
  if sparse_entries:
    m = cfg['model']
    info['strategy'] = f'sparse_{m["sparsity_method"]}'
    info['sparsity'] = m['sparsity']
    info['sparse_kernel_bytes'] = sum(e['length'] for e in sparse_entries)
    info['csr_bytes'] = (
      storage.csr_bits([tuple(e['shape']) for e in sparse_entries], m['sparsity']) / 8
    )
  info['ratio_vs_dense_fp32'] = info['dense_fp32_bytes'] / file_bytes
  info['ratio_vs_dense_fp32_with_bn'] = (info['dense_fp32_bytes'] + 4 * norm) / file_bytes
  if masks:
    rep = storage.report(
      [tuple(e['shape']) for e in masks], norm, s['name'], s['keep_fraction'], s.get('rp_ratio')
    )
    info['paper_bytes'] = rep.paper_bits / 8
    info['paper_bytes_with_bn'] = rep.paper_bits_with_bn / 8
  return info


def format_inspect(info: dict) -> str:
  """A human-readable summary of ``inspect``'s dict."""
  m = info['model']
  strat = info['strategy'] + (f' r={info["rp_ratio"]:g}' if info['rp_ratio'] else '')
  lines = [
    f'{info["path"]}: pemn artifact v{info["format_version"]}, {info["file_bytes"]:,} bytes,'
    f' step {info["step"]}, created {info["created"]} (jax {info["versions"]["jax"]})',
    f'  model {m["name"]} dim={m.get("dim")} depth={m.get("depth")}; strategy {strat}; '
    f'keep {info["keep_fraction"]}; seed {info["seed"]}',
  ]
  if info['masked']:
    lines.append(
      f'  key {info["key"]["impl"]} {info["key"]["data"]} (the random values are '
      'regenerated, not stored)'
    )
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
  lines.append(f'  other arrays (BN/LN and any dense leaf): {info["other_bytes"]:,} bytes')
  lines.append(
    f'  dense fp32 weights: {info["dense_fp32_bytes"]:,} bytes -> this file is '
    f'{info["ratio_vs_dense_fp32"]:.2f}x smaller '
    f'({info["ratio_vs_dense_fp32_with_bn"]:.2f}x counting BN in the dense model)'
  )
  if info['masked']:
    lines.append(
      f"  the paper's convention (stored values + 1-bit masks): "
      f'{info["paper_bytes"]:,.0f} bytes without BN, '
      f'{info["paper_bytes_with_bn"]:,.0f} with BN'
    )
  return '\n'.join(lines)
