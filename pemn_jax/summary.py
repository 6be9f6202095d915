"""What ``pemn inspect --config`` reports: a model's layers, counts and storage, before training.

``summarize(config)`` builds the model a config describes, draws (or only shapes) its variables
and returns a JSON-ready report; ``format_summary`` prints it as the command shows it. An
artifact's report is ``artifact.inspect``.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from pemn_jax import build, layers, storage, strategies


def norm_values(params: dict) -> int:
  """Values the normalisation layers need at inference: 2 per channel (scale and shift).

  A ``scale`` next to a ``kernel`` is a 1-bit layer's per-channel scale (``pemn_jax.binary``),
  counted with its kernel (``storage.binary_bits``), not here.
  """
  items = strategies.tree_items(params)
  with_kernel = {path[:-1] for path, _ in items if path[-1] == 'kernel'}
  return sum(
    2 * int(np.prod(leaf.shape))
    for path, leaf in items
    if path[-1] == 'scale' and path[:-1] not in with_kernel
  )


def summarize(
  config: ml_collections.ConfigDict, variables: dict | None = None, *, abstract: bool = False
) -> dict:
  """Per-layer shapes, counts and the storage report of the model a config describes.

  Args:
    config: a full config (model, strategy, seed, data).
    variables: already-initialised variables (else they are drawn here).
    abstract: work from shapes only (``jax.eval_shape``; no random values are drawn, so
      ``distinct_values_present`` is left out). Cheap for large models.

  Returns:
    A JSON-ready dict: ``layers`` (path, Flax shape, PyTorch shape, size), ``masked_weights``,
    ``unique_values`` (random values the strategy stores), ``distinct_values_present``
    (``np.unique`` over the regenerated weights; can be a few lower, as float32 normal draws
    occasionally collide), ``norm_values``, ``trainable_params`` and ``storage`` (for a
    masked model also ``unmasked_weights``, the kernels of the layers ``strategy.masked_layers``
    leaves out); for a sparse baseline ``sparsity``, ``csr_bits`` and ``csr_ratio``, for 1-bit
    weights ``binary_bits`` and ``binary_ratio`` (vs dense fp32, BN excluded).
  """
  model = build.build_model(config)
  shape = build.input_shape(config)
  if variables is None:
    init = lambda: build.init_variables(model, config, shape)  # noqa: E731
    variables = jax.eval_shape(init) if abstract else init()
  masked = config.model.masked
  s = config.strategy
  if masked:  # the masked kernels are the frozen ones (sparse baselines keep masks there)
    order = build.kernel_order(model, shape)
    kernels = [strategies.get_path(variables[layers.FROZEN], p) for p in order]
  else:
    order = build.trainable_kernel_order(model, shape)
    kernels = [strategies.get_path(variables['params'], p) for p in order]
  shapes = [tuple(k.shape) for k in kernels]
  nv = norm_values(variables['params'])
  out = {
    'model': config.model.name,
    'masked': masked,
    'layers': [
      {
        'path': '/'.join(p[:-1]),
        'shape': list(sh),
        'torch_shape': list(layers.torch_shape(sh)),
        'size': int(np.prod(sh)),
      }
      for p, sh in zip(order, shapes)
    ],
    'masked_weights': int(sum(np.prod(sh) for sh in shapes)),
    'norm_values': nv,
    'trainable_params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables['params']))),
  }
  if masked:
    # Layers strategy.masked_layers leaves unmasked are ordinary fp32 kernels: the report counts
    # them with the normalisation values, 32 bits each (a mask delta over a base stores neither
    # when they are the base's; its .pemn file, ``artifact.inspect``, is the measured size).
    out['unmasked_weights'] = sum(
      int(np.prod(leaf.shape))
      for p, leaf in strategies.tree_items(variables['params'])
      if p[-1] == 'kernel'
    )
    rep = storage.report(shapes, nv + out['unmasked_weights'], s.name, s.keep_fraction, s.rp_ratio)
    out['unique_values'] = strategies.stored_value_count(shapes, s.name, s.rp_ratio)
    if not abstract:
      out['distinct_values_present'] = strategies.unique_values(variables[layers.FROZEN])
  else:
    rep = storage.report(shapes, nv, 'mask', 1.0)
    rep = dataclasses.replace(
      rep,
      strategy='dense',
      paper_bits=rep.dense_fp32_bits,
      key_only_bits=rep.dense_fp32_bits,
      entropy_bits=float(rep.dense_fp32_bits),
    )
    out['unique_values'] = out['masked_weights']
    if config.model.sparsity_method:
      out['sparsity'] = config.model.sparsity
      out['csr_bits'] = storage.csr_bits(shapes, config.model.sparsity)
      # CSR with 16-bit values (and 32-bit indices): what a compressed sparse file would hold
      out['csr16_bits'] = storage.csr_bits(shapes, config.model.sparsity, value_bits=16)
      out['csr_ratio'] = rep.dense_fp32_bits / out['csr_bits']
    if config.model.get('binary_weights'):
      out['binary_bits'] = storage.binary_bits(shapes)
      out['binary_ratio'] = rep.dense_fp32_bits / out['binary_bits']
  out['storage'] = rep.as_dict()
  out['storage_table'] = storage.format_table(rep)
  return out


def format_summary(summary: dict) -> str:
  """``summarize``'s report as text: one line per masked layer, the counts, the storage table."""
  kind = 'masked' if summary['masked'] else 'dense baseline'
  if 'binary_bits' in summary:
    kind += ', learned 1-bit weights'
  lines = [
    f'model {summary["model"]} ({kind})',
    f'  {"layer":40s} {"Flax shape":>20s} {"size":>10s}',
  ]
  for layer in summary['layers']:
    lines.append(f'  {layer["path"]:40s} {str(tuple(layer["shape"])):>20s} {layer["size"]:>10,}')
  lines.append(
    f'masked weights {summary["masked_weights"]:,}; unique random values '
    f'{summary["unique_values"]:,}; norm values {summary["norm_values"]:,}; trainable '
    f'parameters {summary["trainable_params"]:,}'
  )
  lines.append(summary['storage_table'])
  if 'binary_bits' in summary:  # the storage table's columns: 1 bit a weight + a scale a channel
    st = summary['storage']
    bits = summary['binary_bits']
    bits_bn = bits + storage.FLOAT_BITS * st['norm_values']
    lines.append(
      f'  {"learned 1-bit weights + fp32 scales":42s} {bits / 8 / 2**20:9.3f} MiB '
      f'{summary["binary_ratio"]:7.2f}x {bits_bn / 8 / 2**20:9.3f} MiB '
      f'{st["dense_fp32_bits_with_bn"] / bits_bn:7.2f}x'
    )
  return '\n'.join(lines)
