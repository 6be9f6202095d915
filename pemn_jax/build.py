"""From a config to a model and its variables: the one place that knows both.

``build_model(config)`` returns the Linen module a config describes; ``init_variables`` draws
its variables and applies the weight strategy, so that the ``frozen`` collection is a pure
function of (model definition, seed, strategy): the same on every call, every host and every
resume, which is why checkpoints and artifacts never store it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pemn_jax import layers, masking, ops, sparse, strategies
from pemn_jax.models import MLP, CifarResNet, ConvMixer, ViT, remat

MODEL_NAMES = ('convmixer', 'resnet', 'vit', 'mlp')
REMAT_MODELS = ('convmixer', 'vit')  # models with identical blocks (``models.remat``)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Image shapes of the datasets we know without opening them (inspect needs no data).
KNOWN_INPUT_SHAPES = {
  'cifar10': (32, 32, 3),
  'cifar10_jpeg': (32, 32, 3),
  'cifar100': (32, 32, 3),
  'svhn_cropped': (32, 32, 3),
  'mnist': (28, 28, 1),
  'fashion_mnist': (28, 28, 1),
  'fashion_mnist_embedded': (28, 28, 1),
}


def _positive_int(cfg, field: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{field} must be a positive integer, got {value!r}')
  return value


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the model and strategy fields, naming the field and what is allowed on error."""
  m = config.model
  if m.name not in MODEL_NAMES:
    raise ValueError(f'model.name must be one of {MODEL_NAMES}, got {m.name!r}')
  if not isinstance(m.get('masked', True), bool):
    raise ValueError(f'model.masked must be True or False, got {m.masked!r}')
  for field in ('dim', 'depth', 'kernel_size', 'patch_size', 'num_classes'):
    if field in m and m[field] is not None:
      _positive_int(m, f'model.{field}', m[field])
  remat_blocks = m.get('remat_blocks', 'none')
  if remat_blocks not in remat.REMAT_CHOICES:
    raise ValueError(
      f'model.remat_blocks must be one of {remat.REMAT_CHOICES}, got {remat_blocks!r}'
    )
  if remat_blocks != 'none' and m.name not in REMAT_MODELS:
    raise ValueError(
      f'model.remat_blocks is implemented for model.name in {REMAT_MODELS} '
      f'(identical blocks), got {m.name!r}'
    )
  if m.get('dtype', 'float32') not in DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(DTYPES)}, got {m.dtype!r}')
  if m.get('conv_impl', 'auto') not in ops.CONV_IMPLS:
    raise ValueError(f'model.conv_impl must be one of {ops.CONV_IMPLS}, got {m.conv_impl!r}')
  if m.get('conv_impl', 'auto') == 'native' and m.get('dtype', 'float32') != 'float32':
    raise ValueError(
      "model.conv_impl='native' needs model.dtype='float32' (the native kernels "
      f"are float32), got model.dtype={m.dtype!r}; use model.conv_impl='auto'"
    )
  if m.name == 'resnet' and (m.depth - 2) % 6:
    raise ValueError(f'model.depth must be 6n+2 for resnet (20, 32, 56, ...), got {m.depth}')
  if m.name == 'vit':
    heads = m.get('num_heads') or max(1, m.dim // 64)
    if m.dim % heads or m.dim % 4:
      raise ValueError(
        f'model.dim ({m.dim}) must be divisible by 4 and by model.num_heads ({heads}) for vit'
      )
  if m.name == 'mlp':
    dims = m.get('hidden_dims', (100, 100, 100))
    if not all(isinstance(d, int) and d > 0 for d in dims):
      raise ValueError(f'model.hidden_dims must be positive integers, got {dims!r}')
  method = m.get('sparsity_method')
  if method is not None and m.get('masked', True):
    raise ValueError(
      'model.sparsity_method is for the dense sparse baselines: set model.masked=False with it'
    )
  sparse.validate(method, m.get('sparsity'))
  s = config.strategy
  masking.validate_keep_fraction(s.keep_fraction, 'strategy.keep_fraction')
  strategies.validate(s.name, s.get('rp_ratio'))


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of one example: ``model.input_shape`` if set, else from the dataset name."""
  if config.model.get('input_shape'):
    return tuple(config.model.input_shape)
  name = config.data.name if 'data' in config else 'cifar10'
  if name in KNOWN_INPUT_SHAPES:
    return KNOWN_INPUT_SHAPES[name]
  from pemn_jax.data import pipeline  # only for datasets we cannot name from memory

  return tuple(pipeline.get_dataset_info(config.data).image_shape)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The Linen module a config describes (dense baseline when ``model.masked`` is False)."""
  validate_config(config)
  m, s = config.model, config.strategy
  impl = m.get('conv_impl', 'auto')
  if m.get('masked', True):
    conv = functools.partial(
      layers.MaskedConv,
      keep_fraction=s.keep_fraction,
      score_abs=s.get('score_abs', True),
      conv_impl=impl,
    )
    dense = functools.partial(
      layers.MaskedDense, keep_fraction=s.keep_fraction, score_abs=s.get('score_abs', True)
    )
  elif m.get('sparsity_method'):
    conv = functools.partial(
      sparse.SparseConv, method=m.sparsity_method, sparsity=m.sparsity, conv_impl=impl
    )
    dense = functools.partial(sparse.SparseDense, method=m.sparsity_method, sparsity=m.sparsity)
  else:
    conv = functools.partial(layers.Conv, conv_impl=impl)
    dense = layers.Dense
  common = dict(
    conv=conv, dense=dense, dtype=DTYPES[m.get('dtype', 'float32')], num_classes=m.num_classes
  )
  if m.name == 'convmixer':
    return ConvMixer(
      dim=m.dim,
      depth=m.depth,
      kernel_size=m.kernel_size,
      patch_size=m.patch_size,
      remat_blocks=m.get('remat_blocks', 'none'),
      **common,
    )
  if m.name == 'resnet':
    return CifarResNet(depth=m.depth, width=m.get('width', 16), **common)
  if m.name == 'vit':
    return ViT(
      dim=m.dim,
      depth=m.depth,
      patch_size=m.patch_size,
      num_heads=m.get('num_heads'),
      mlp_ratio=m.get('mlp_ratio', 2.0),
      remat_blocks=m.get('remat_blocks', 'none'),
      **common,
    )
  return MLP(hidden_dims=tuple(m.get('hidden_dims', (100, 100, 100))), **common)


def model_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(params key, frozen key) derived from the config seed (typed threefry keys)."""
  root = jax.random.key(seed, impl='threefry2x32')
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def kernel_order(model: nn.Module, shape: tuple[int, ...]) -> list[strategies.Path]:
  """Masked kernel paths by depth, read off an abstract init (no arrays are made)."""
  order: list[strategies.Path] = []

  def init(x):
    v = model.init({'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)}, x)
    order.extend(strategies.kernel_paths(v.get(layers.FROZEN, {})))
    return v

  jax.eval_shape(init, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  return order


def _trainable_kernel_order(model: nn.Module, shape: tuple[int, ...]) -> list[strategies.Path]:
  """Trainable ``kernel`` paths by depth (dense models), read off an abstract init.

  Read inside the traced function, as in ``kernel_order``: the dict ``eval_shape`` returns has
  its keys sorted ('head' before 'stem', 'block10' before 'block2').
  """
  order: list[strategies.Path] = []

  def init(x):
    v = model.init({'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)}, x)
    order.extend(p for p in strategies.kernel_paths(v['params']) if p[-1] == 'kernel')
    return v

  jax.eval_shape(init, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  return order


def init_variables(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  shape: tuple[int, ...] | None = None,
  *,
  frozen_key: jax.Array | None = None,
) -> dict[str, Any]:
  """All variables of a fresh model, with the weight strategy applied to ``frozen``.

  Args:
    model: from ``build_model(config)``.
    config: supplies ``seed`` and ``strategy``.
    shape: (H, W, C) of one example; default ``input_shape(config)``.
    frozen_key: the key of the frozen random weights; default ``model_keys(config.seed)[1]``
      (an artifact passes the key it recorded).

  Returns:
    ``{'params': ..., 'batch_stats': ..., 'frozen': ...}`` (``frozen`` only for masked models).
  """
  shape = tuple(shape or input_shape(config))
  order = kernel_order(model, shape)
  s = config.strategy
  params_key, seed_frozen_key = model_keys(config.seed)
  frozen_key = seed_frozen_key if frozen_key is None else frozen_key

  @jax.jit
  def init(pk, fk):
    v = model.init({'params': pk, layers.FROZEN: fk}, jnp.zeros((1, *shape), jnp.float32))
    v = dict(v)
    if layers.FROZEN in v and config.model.get('masked', True):
      v[layers.FROZEN] = strategies.apply_strategy(
        v[layers.FROZEN], order, s.name, s.get('rp_ratio')
      )
    return v

  return init(params_key, frozen_key)


def frozen_fingerprint(frozen: dict) -> str:
  """sha256 over the frozen kernels (path, shape, dtype, bytes), to check a regeneration."""
  h = hashlib.sha256()
  for path in sorted(strategies.kernel_paths(frozen)):
    a = np.asarray(jax.device_get(strategies.get_path(frozen, path)))
    h.update('/'.join(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def norm_values(params: dict) -> int:
  """Values the normalisation layers need at inference: 2 per channel (scale and shift)."""
  return sum(
    2 * int(np.prod(leaf.shape))
    for path, leaf in strategies.tree_items(params)
    if path[-1] == 'scale'
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
    occasionally collide), ``norm_values``, ``trainable_params`` and ``storage``.
  """
  from pemn_jax import storage  # storage imports nothing from here; keep the module graph flat

  model = build_model(config)
  shape = input_shape(config)
  if variables is None:
    init = lambda: init_variables(model, config, shape)  # noqa: E731
    variables = jax.eval_shape(init) if abstract else init()
  masked = config.model.get('masked', True)
  s = config.strategy
  if masked:  # the masked kernels are the frozen ones (sparse baselines keep masks there)
    order = kernel_order(model, shape)
    kernels = [strategies.get_path(variables[layers.FROZEN], p) for p in order]
  else:
    order = _trainable_kernel_order(model, shape)
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
    rep = storage.report(shapes, nv, s.name, s.keep_fraction, s.get('rp_ratio'))
    out['unique_values'] = strategies.stored_value_count(shapes, s.name, s.get('rp_ratio'))
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
    if config.model.get('sparsity_method'):
      out['sparsity'] = config.model.sparsity
      out['csr_bits'] = storage.csr_bits(shapes, config.model.sparsity)
      out['csr_ratio'] = rep.dense_fp32_bits / out['csr_bits']
  out['storage'] = rep.as_dict()
  out['storage_table'] = storage.format_table(rep)
  return out
