"""From a config to a model and its variables: the one place that knows both.

``build_model(config)`` returns the Linen module a config describes; ``init_variables`` draws
its variables and applies the weight strategy, so that the ``frozen`` collection is a pure
function of (model definition, seed, strategy): the same on every call, every host and every
resume, which is why checkpoints and artifacts never store it.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pemn_jax import layers, masking, native, ops, sparse, strategies
from pemn_jax.configs import common
from pemn_jax.models import REGISTRY, remat

REMAT_MODELS = tuple(name for name, spec in REGISTRY.items() if spec.identical_blocks)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the model and strategy fields, naming the field and what is allowed on error."""
  m = config.model
  if m.name not in REGISTRY:
    raise ValueError(f'model.name must be one of {tuple(REGISTRY)}, got {m.name!r}')
  if not isinstance(m.masked, bool):
    raise ValueError(f'model.masked must be True or False, got {m.masked!r}')
  for field in ('dim', 'depth', 'kernel_size', 'patch_size', 'num_classes'):
    common.check_positive_int(m[field], f'model.{field}', allow_none=True)
  if m.remat_blocks not in remat.REMAT_CHOICES:
    raise ValueError(
      f'model.remat_blocks must be one of {remat.REMAT_CHOICES}, got {m.remat_blocks!r}'
    )
  if m.remat_blocks != 'none' and m.name not in REMAT_MODELS:
    raise ValueError(
      f'model.remat_blocks is implemented for model.name in {REMAT_MODELS} '
      f'(identical blocks), got {m.name!r}'
    )
  if m.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(DTYPES)}, got {m.dtype!r}')
  if m.conv_impl not in ops.CONV_IMPLS:
    raise ValueError(f'model.conv_impl must be one of {ops.CONV_IMPLS}, got {m.conv_impl!r}')
  if m.conv_impl == 'native' and m.dtype != 'float32':
    raise ValueError(
      "model.conv_impl='native' needs model.dtype='float32' (the native kernels "
      f"are float32), got model.dtype={m.dtype!r}; use model.conv_impl='auto'"
    )
  if m.conv_impl == 'native' and 'depthwise' not in native.parse_kernels(m.native_kernels):
    raise ValueError(
      "model.conv_impl='native' needs the depthwise kernel, which "
      f'model.native_kernels={m.native_kernels!r} switches off'
    )
  native.parse_kernels(m.native_kernels)
  REGISTRY[m.name].validate(m)
  if m.sparsity_method is not None and m.masked:
    raise ValueError(
      'model.sparsity_method is for the dense sparse baselines: set model.masked=False with it'
    )
  sparse.validate(m.sparsity_method, m.sparsity)
  s = config.strategy
  masking.validate_keep_fraction(s.keep_fraction, 'strategy.keep_fraction')
  strategies.validate(s.name, s.rp_ratio)


def check_data(
  config: ml_collections.ConfigDict, image_shape: tuple[int, ...], num_classes: int
) -> tuple[int, ...]:
  """The input shape of the model, after checking the config fits the dataset.

  Raises:
    ValueError: ``model.num_classes`` or ``model.input_shape`` disagree with the data.
  """
  m, image_shape = config.model, tuple(image_shape)
  if m.num_classes != num_classes:
    raise ValueError(
      f'model.num_classes ({m.num_classes}) does not match the {num_classes} classes of '
      f'data.name={config.data.name!r}'
    )
  if m.input_shape and tuple(m.input_shape) != image_shape:
    raise ValueError(
      f'model.input_shape {tuple(m.input_shape)} does not match the {image_shape} images of '
      f"data.name={config.data.name!r}; leave model.input_shape unset to take the data's"
    )
  return image_shape


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(H, W, C) of one example: ``model.input_shape`` if set, else the dataset's.

  The dataset's comes from the data package's table of the datasets it knows by name, so no
  data is opened for them (``pemn inspect`` works without a prepared dataset).
  """
  if config.model.input_shape:
    return tuple(config.model.input_shape)
  from pemn_jax.data import sources  # the table only; imports no TFDS

  return tuple(sources.image_shape(config.data))


def layer_classes(config: ml_collections.ConfigDict) -> dict:
  """The ``conv`` / ``dense`` classes, ``dtype`` and ``num_classes`` every family takes: masked
  (PEMN), sparse baseline or dense, as ``model.masked`` and ``model.sparsity_method`` say."""
  m, s = config.model, config.strategy
  impl = m.conv_impl
  if m.masked:
    masked = dict(keep_fraction=s.keep_fraction, score_abs=s.score_abs)
    conv = functools.partial(layers.MaskedConv, conv_impl=impl, **masked)
    dense = functools.partial(layers.MaskedDense, **masked)
  elif m.sparsity_method:
    sparse_ = dict(method=m.sparsity_method, sparsity=m.sparsity)
    conv = functools.partial(sparse.SparseConv, conv_impl=impl, **sparse_)
    dense = functools.partial(sparse.SparseDense, **sparse_)
  else:
    conv = functools.partial(layers.Conv, conv_impl=impl)
    dense = layers.Dense
  return dict(conv=conv, dense=dense, dtype=DTYPES[m.dtype], num_classes=m.num_classes)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The Linen module a config describes (dense baseline when ``model.masked`` is False)."""
  validate_config(config)
  return REGISTRY[config.model.name].build(config.model, layer_classes(config))


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


def trainable_kernel_order(model: nn.Module, shape: tuple[int, ...]) -> list[strategies.Path]:
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
    if layers.FROZEN in v and config.model.masked:
      v[layers.FROZEN] = strategies.apply_strategy(v[layers.FROZEN], order, s.name, s.rp_ratio)
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


def check_fingerprint(recorded: str | None, regenerated: str, where: str) -> None:
  """Raises ValueError unless the frozen weights regenerated now are the ones ``where`` (a
  checkpoint, an artifact) was made with: a state is never paired with other random weights."""
  if recorded != regenerated:
    raise ValueError(
      f'the frozen random weights regenerated for {where} do not match the fingerprint '
      f'recorded with it ({str(recorded)[:12]}... vs {regenerated[:12]}...): its model, seed or '
      'strategy differ from the config, or JAX changed its random stream; refusing to use it'
    )
