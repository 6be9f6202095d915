"""From a config to a model and its variables: the one place that knows both.

``build_model(config)`` returns the Linen module a config describes; ``init_variables`` draws
its variables and applies the weight strategy, so that the ``frozen`` collection is a pure
function of (model definition, seed, strategy): the same on every call, every host and every
resume, which is why checkpoints and artifacts never store it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pemn_jax import binary, layers, masking, native, ops, pretrained, sparse, strategies
from pemn_jax.configs import common
from pemn_jax.models import REGISTRY, remat

REMAT_MODELS = tuple(name for name, spec in REGISTRY.items() if spec.identical_blocks)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks ``seed`` and every model and strategy field, naming the field and what is allowed
  on error (types, ranges and the caps of ``configs.common``; a field the chosen family does
  not read is checked all the same). The fields that need the image shape are checked by
  ``check_input_shape``, the model's size by ``check_model_size``.

  Raises:
    ValueError: one line naming the field.
  """
  common.check_int(config.seed, 'seed', common.SEED_MIN, common.SEED_MAX)
  m = config.model
  common.check_choice(m.name, 'model.name', REGISTRY)
  common.check_bool(m.masked, 'model.masked')
  caps = {
    'dim': common.MAX_DIM,
    'depth': common.MAX_DEPTH,
    'kernel_size': common.MAX_KERNEL_SIZE,
    'patch_size': common.MAX_PATCH_SIZE,
  }
  for field, cap in caps.items():  # the family's validate says which it needs set
    common.check_positive_int(m[field], f'model.{field}', allow_none=True, maximum=cap)
  common.check_positive_int(m.num_classes, 'model.num_classes', maximum=common.MAX_NUM_CLASSES)
  common.check_positive_int(m.num_heads, 'model.num_heads', allow_none=True, maximum=common.MAX_DIM)
  common.check_real(m.mlp_ratio, 'model.mlp_ratio', 0.0, common.MAX_MLP_RATIO, low_open=True)
  _check_hidden_dims(m.hidden_dims)
  common.check_positive_int(m.width, 'model.width', maximum=common.MAX_RESNET_WIDTH)
  _check_input_shape_field(m.input_shape)
  common.check_choice(m.remat_blocks, 'model.remat_blocks', remat.REMAT_CHOICES)
  if m.remat_blocks != 'none' and m.name not in REMAT_MODELS:
    raise ValueError(
      f'model.remat_blocks is implemented for model.name in {REMAT_MODELS} '
      f'(identical blocks), got {m.name!r}'
    )
  common.check_choice(m.gelu_bn_residuals, 'model.gelu_bn_residuals', layers.GELU_BN_RESIDUALS)
  common.check_choice(m.dtype, 'model.dtype', DTYPES)
  common.check_choice(m.conv_impl, 'model.conv_impl', ops.CONV_IMPLS)
  if not isinstance(m.native_kernels, str):
    raise ValueError(
      "model.native_kernels must be 'auto', 'none' or a comma list of "
      f'{native.FEATURES}, got {common.show(m.native_kernels)}'
    )
  native.parse_kernels(m.native_kernels)
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
  common.check_choice(
    m.sparsity_method, 'model.sparsity_method', sparse.SPARSE_METHODS, allow_none=True
  )
  common.check_real(m.sparsity, 'model.sparsity', 0.0, 1.0, high_open=True)
  REGISTRY[m.name].validate(m)
  if m.sparsity_method is not None and m.masked:
    raise ValueError(
      'model.sparsity_method is for the dense sparse baselines: set model.masked=False with it'
    )
  sparse.validate(m.sparsity_method, m.sparsity)
  common.check_bool(m.binary_weights, 'model.binary_weights')
  if m.binary_weights and m.masked:
    raise ValueError(
      'model.binary_weights is for the dense 1-bit-weight baseline: set model.masked=False with it'
    )
  if m.binary_weights and m.sparsity_method is not None:
    raise ValueError(
      'model.binary_weights and model.sparsity_method are two different dense baselines: set '
      f'one of them (model.sparsity_method={m.sparsity_method!r})'
    )
  s = config.strategy
  common.check_choice(s.name, 'strategy.name', strategies.STRATEGIES)
  common.check_real(s.keep_fraction, 'strategy.keep_fraction', 0.0, 1.0, low_open=True)
  masking.validate_keep_fraction(s.keep_fraction, 'strategy.keep_fraction')
  # the ratio matters for random_vector_padding only; set, it must make sense for any strategy
  allow_none = s.name != 'random_vector_padding'
  common.check_real(s.rp_ratio, 'strategy.rp_ratio', 0.0, 1.0, low_open=True, allow_none=allow_none)
  strategies.validate(s.name, s.rp_ratio)
  common.check_bool(s.score_abs, 'strategy.score_abs')
  common.check_choice(s.score_init, 'strategy.score_init', pretrained.SCORE_INITS)
  _check_masked_layers(config)
  _check_base(config)


def _check_masked_layers(config: ml_collections.ConfigDict) -> None:
  """``strategy.masked_layers``: None or a regular expression, for a masked model (whether it
  matches a layer is checked at init, ``check_masked_layers``)."""
  only = config.strategy.get('masked_layers')
  if only is None:
    return
  if not isinstance(only, str) or not only:
    raise ValueError(
      'strategy.masked_layers must be a regular expression over layer paths (e.g. '
      f"'block[23]_.*') or None, got {common.show(only)}"
    )
  try:
    re.compile(only)
  except re.error as e:
    raise ValueError(f'strategy.masked_layers {only!r} is not a regular expression: {e}') from None
  if not config.model.masked:
    raise ValueError(
      'strategy.masked_layers chooses the layers a masked model masks: set model.masked=True '
      'with it, or leave it None'
    )
  if config.model.get('remat_blocks', 'none') != 'none':
    raise ValueError(
      'strategy.masked_layers makes the blocks differ, and model.remat_blocks scans identical '
      f"blocks: set model.remat_blocks='none' with it (got {config.model.remat_blocks!r})"
    )


def check_masked_layers(
  config: ml_collections.ConfigDict, model: nn.Module, shape, order=None
) -> None:
  """Raises ValueError if ``strategy.masked_layers`` matches none of the model's layers, naming
  the layer paths it can match (read off abstract inits: no array is made). ``order``: the
  model's masked kernel paths (``kernel_order``), when the caller has them."""
  only = config.strategy.get('masked_layers')
  if only is None or not config.model.masked:
    return
  if order is None:
    order = kernel_order(model, shape)
  if order:
    return
  every = config.copy_and_resolve_references()
  every.strategy.masked_layers = None
  names = ['/'.join(p[:-1]) for p in kernel_order(build_model(every), shape)]
  raise ValueError(
    f'strategy.masked_layers {only!r} matches no layer of this {config.model.name}; its layer '
    f'paths are {", ".join(names)}'
  )


def _check_base(config: ml_collections.ConfigDict) -> None:
  """The ``model.base_*`` fields (masks over a pretrained model, ``pemn_jax.pretrained``)."""
  m, s = config.model, config.strategy
  common.check_path(m.base_source, 'model.base_source')
  common.check_choice(m.base_format, 'model.base_format', pretrained.FORMATS)
  common.check_path(m.base_name_map, 'model.base_name_map')
  common.check_choice(m.base_unmasked, 'model.base_unmasked', pretrained.UNMASKED_CHOICES)
  common.check_choice(m.base_layout, 'model.base_layout', pretrained.LAYOUTS)
  if m.base_name_map is not None and m.base_format != 'safetensors':
    raise ValueError(
      "model.base_name_map names safetensors tensors: it needs model.base_format='safetensors', "
      f'got model.base_format={m.base_format!r}'
    )
  if m.base_source is None:
    return
  if m.masked and s.name != 'mask':
    raise ValueError(
      "model.base_source (masks over a base model's weights) needs strategy.name='mask': "
      f'{s.name} places shared random values, which a base does not have'
    )
  if not m.masked and m.base_unmasked == 'freeze':
    raise ValueError(
      "model.base_unmasked='freeze' trains only the masks of a masked model over a base; a "
      "dense model over a base (model.masked=False) trains its weights: leave it 'train'"
    )
  if m.binary_weights:
    raise ValueError(
      'model.base_source cannot start model.binary_weights (learned 1-bit weights have a '
      'per-channel scale no base holds): set model.binary_weights=False'
    )
  pretrained.check_source(m.base_source, m.base_format, m.base_name_map)


def _check_hidden_dims(dims) -> None:
  ok = isinstance(dims, tuple | list) and len(dims) <= common.MAX_DEPTH
  if not ok or not all(
    isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= common.MAX_WIDTH for d in dims
  ):
    raise ValueError(
      f'model.hidden_dims must be a tuple of at most {common.MAX_DEPTH} integers in '
      f'[1, {common.MAX_WIDTH:,}] (the MLP widths), got {common.show(dims)}'
    )


def _check_input_shape_field(shape) -> None:
  if shape is None or (isinstance(shape, tuple | list) and not shape):
    return  # unset: the dataset's
  caps = (common.MAX_IMAGE_SIDE, common.MAX_IMAGE_SIDE, common.MAX_CHANNELS)
  ok = isinstance(shape, tuple | list) and len(shape) == 3
  if not ok or not all(
    isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= cap for d, cap in zip(shape, caps)
  ):
    raise ValueError(
      f'model.input_shape must be unset or (height, width, channels), height and width in '
      f'[1, {common.MAX_IMAGE_SIDE}] and channels in [1, {common.MAX_CHANNELS}], got '
      f'{common.show(shape)}'
    )


def check_input_shape(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> None:
  """Checks the fields that must fit the image (patch and kernel sizes), once its shape is known.

  Raises:
    ValueError: naming the field, the image size and what is allowed.
  """
  shape = tuple(int(d) for d in image_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f'the input shape must be (height, width, channels), got {shape}')
  REGISTRY[config.model.name].check_input(config.model, shape)


def check_model_size(config: ml_collections.ConfigDict, abstract_variables) -> int:
  """The number of parameters (every variable: scores, BatchNorm, frozen kernels) of a model's
  abstract variables; raises ValueError above ``common.MAX_PARAMETERS``, naming the fields."""
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_variables))
  if n > common.MAX_PARAMETERS:
    m = config.model
    fields = ', '.join(f'model.{f}={m[f]!r}' for f in REGISTRY[m.name].fields if f in m)
    raise ValueError(
      f'the model has {n:,} parameters ({fields}), more than the {common.MAX_PARAMETERS:,} '
      'pemn-jax trains (about 20 bytes each in training, before activations); make it smaller'
    )
  return n


def check_data(
  config: ml_collections.ConfigDict,
  image_shape: tuple[int, ...],
  num_classes: int,
  model: nn.Module | None = None,
) -> tuple[int, ...]:
  """The input shape of the model, after checking the config fits the dataset.

  ``model``: a module the caller built instead of the config's; then its logits (from an
  abstract init and apply on one example) must have ``num_classes`` entries, and the config's
  model section is not consulted.

  Raises:
    ValueError: ``model.num_classes`` or ``model.input_shape`` disagree with the data, a
      patch or kernel does not fit its images (``check_input_shape``), or
      ``strategy.masked_layers`` matches no layer (``check_masked_layers``).
  """
  image_shape = tuple(image_shape)
  if model is not None:
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    rngs = {'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)}
    out = jax.eval_shape(lambda x: model.apply(model.init(rngs, x), x), x)
    if getattr(out, 'shape', None) != (1, num_classes):
      raise ValueError(
        f'the model given to train_and_evaluate maps a {image_shape} image to '
        f'{getattr(out, "shape", type(out).__name__)}, not to {num_classes} logits (the classes '
        f'of data.name={config.data.name!r})'
      )
    return image_shape
  m = config.model
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
  check_input_shape(config, image_shape)
  if config.strategy.get('masked_layers') is not None:
    check_masked_layers(config, build_model(config), image_shape)
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
  (PEMN), sparse baseline, 1-bit weights or dense, as ``model.masked``, ``model.sparsity_method``
  and ``model.binary_weights`` say."""
  m, s = config.model, config.strategy
  impl = m.conv_impl
  if m.masked:
    masked = dict(
      keep_fraction=s.keep_fraction, score_abs=s.score_abs, masked_layers=s.get('masked_layers')
    )
    conv = functools.partial(layers.MaskedConv, conv_impl=impl, **masked)
    dense = functools.partial(layers.MaskedDense, **masked)
  elif m.sparsity_method:
    sparse_ = dict(method=m.sparsity_method, sparsity=m.sparsity)
    conv = functools.partial(sparse.SparseConv, conv_impl=impl, **sparse_)
    dense = functools.partial(sparse.SparseDense, **sparse_)
  elif m.binary_weights:
    conv = functools.partial(binary.BinaryConv, conv_impl=impl)
    dense = binary.BinaryDense
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
  return _abstract_init(model, shape)[1]


def _abstract_init(model: nn.Module, shape: tuple[int, ...]):
  """(abstract variables, masked kernel paths by depth) of an abstract init."""
  order: list[strategies.Path] = []

  def init(x):
    v = model.init({'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)}, x)
    order.extend(strategies.kernel_paths(v.get(layers.FROZEN, {})))
    return v

  abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((1, *shape), jnp.float32))
  return abstract, order


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

  With ``model.base_source`` set, the base's weights replace the drawn ones
  (``pretrained.apply_base``: a masked layer's frozen kernel and every other leaf but the
  scores); then a masked model's scores are set by ``strategy.score_init``
  (``pretrained.init_scores``).

  Returns:
    ``{'params': ..., 'batch_stats': ..., 'frozen': ...}`` (``frozen`` only for masked models).

  Raises:
    ValueError: the model does not fit its input (``check_input_shape``) or is larger than
      ``common.MAX_PARAMETERS`` (``check_model_size``), before anything is allocated; a base
      that cannot be read or is not this model's (``pretrained.BaseError``, naming the path).
  """
  shape = tuple(shape or input_shape(config))
  check_input_shape(config, shape)
  abstract, order = _abstract_init(model, shape)
  check_masked_layers(config, model, shape, order)
  check_model_size(config, abstract)  # before a byte of it is drawn
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

  variables = init(params_key, frozen_key)
  base = base_of(config)
  if base is not None:  # the base's weights in place of the random draw (pretrained)
    variables = pretrained.apply_base(variables, base)
  if config.model.masked:
    init_key = jax.random.fold_in(params_key, 2)
    variables = pretrained.init_scores(variables, s.get('score_init', 'uniform'), init_key)
  return variables


def base_of(config: ml_collections.ConfigDict) -> pretrained.Base | None:
  """The base model ``model.base_source`` names (``pretrained.load_base``, cached), or None."""
  m = config.model
  if not m.get('base_source'):
    return None
  layout = m.get('base_layout', 'flax')
  return pretrained.load_base(m.base_source, m.base_format, m.get('base_name_map'), layout)


def frozen_fingerprint(frozen: dict) -> str:
  """sha256 over the frozen kernels (path, shape, dtype, bytes), to check a regeneration."""
  h = hashlib.sha256()
  for path in sorted(strategies.kernel_paths(frozen)):
    a = np.asarray(jax.device_get(strategies.get_path(frozen, path)))
    h.update('/'.join(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def base_run_fingerprint(base_fingerprint: str, frozen: str) -> str:
  """The fingerprint a run over a base model records: ``'base:'`` + sha256 of the base's
  fingerprint (``pretrained.Base``) and the frozen weights' (or ``'dense'``)."""
  return 'base:' + hashlib.sha256(f'{base_fingerprint}:{frozen}'.encode()).hexdigest()


def check_fingerprint(recorded: str | None, regenerated: str, where: str) -> None:
  """Raises ValueError unless the frozen weights regenerated now are the ones ``where`` (a
  checkpoint, an artifact) was made with: a state is never paired with other random weights."""
  if recorded != regenerated and 'base:' in (str(recorded)[:5], regenerated[:5]):
    raise ValueError(
      f'the base model loaded for {where} is not the one it was trained over (fingerprint '
      f'{str(recorded)[:17]}... vs {regenerated[:17]}...): model.base_source changed, or its '
      'file did, or one of the two runs had none; refusing to use it'
    )
  if recorded != regenerated:
    raise ValueError(
      f'the frozen random weights regenerated for {where} do not match the fingerprint '
      f'recorded with it ({str(recorded)[:12]}... vs {regenerated[:12]}...): its model, seed or '
      'strategy differ from the config, or JAX changed its random stream; refusing to use it'
    )


def init_module(model: nn.Module, config: ml_collections.ConfigDict, shape) -> dict[str, Any]:
  """Variables of a module the caller built, drawn with the config seed's keys (``model_keys``:
  the ``params`` and ``frozen`` streams) on one all-zeros example, under jit.

  With ``model.base_source`` set, the base's weights replace the drawn ones and the scores are
  set by ``strategy.score_init``, as in ``init_variables`` (e.g. a ``mask_model`` of a trained
  network, masked in a band of its layers by its rules).
  """
  params_key, frozen_key = model_keys(config.seed)
  x = jnp.zeros((1, *shape), jnp.float32)
  variables = dict(
    jax.jit(lambda pk, fk: model.init({'params': pk, layers.FROZEN: fk}, x))(params_key, frozen_key)
  )
  base = base_of(config)
  if base is not None:
    variables = pretrained.apply_base(variables, base)
    init_key = jax.random.fold_in(params_key, 2)
    variables = pretrained.init_scores(variables, config.strategy.score_init, init_key)
  return variables


def structure_fingerprint(variables: dict, frozen_fingerprint: str) -> str:
  """sha256 over a variable tree's structure (collections, paths, shapes, dtypes) and the frozen
  weights' fingerprint: what identifies a module the config does not describe."""
  h = hashlib.sha256(frozen_fingerprint.encode())
  for path, leaf in sorted(
    ('/'.join(map(str, p)), x) for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]
  ):
    h.update(f'{path}:{tuple(leaf.shape)}:{leaf.dtype}'.encode())
  return 'module:' + h.hexdigest()
