"""Every configuration field, with its default. The experiment configs start from here.

Fields:
  seed: derives the score/BN init key and the frozen random-weight key (``build.model_keys``)
    and the data order.
  model.name: 'convmixer' | 'resnet' | 'vit' | 'mlp'.
  model.masked: True = PEMN (frozen random weights + learned masks); False = dense baseline.
  model.dim, depth, kernel_size, patch_size, num_classes: architecture (see ``pemn_jax.models``).
  model.num_heads, mlp_ratio (vit), hidden_dims (mlp), width (resnet base width).
  model.sparsity_method, model.sparsity: the paper's sparse baselines (``pemn_jax.sparse``):
    a dense model (masked=False) keeping 1 - sparsity of its weights, chosen at random or by
    magnitude; accounted in CSR.
  model.dtype: 'float32' | 'bfloat16' compute dtype (scores, BN and optimizer stay float32).
  model.conv_impl: 'auto' | 'xla' | 'fast' | 'native' (see ``pemn_jax.ops``, ``pemn_jax.native``).
  model.input_shape: (H, W, C) override; default from the dataset.
  model.remat_blocks: convmixer and vit: 'none' | 'save_convs' | 'full': scan over the
    identical blocks with rematerialisation (less training memory for some recomputation;
    same variables and values; see ``pemn_jax.models.remat``).
  strategy.name: 'mask' | 'one_layer' | 'max_layer_padding' | 'random_vector_padding'.
  strategy.rp_ratio: r of random vector padding, in (0, 1].
  strategy.keep_fraction: fraction of each layer's weights KEPT by the mask, in (0, 1].
  strategy.score_abs: rank |score| (reference code) or the raw score (paper's equation).
  data.*: the dataset, its augmentation and input pipeline (``pemn_jax.data``); each field
    is commented where it is set below. ``data.augment_options.*`` are the recipe's switches.
  train.*: see ``pemn_jax.train``.
"""

import ast
from typing import Any

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (a masked ConvMixer-256/8, RP 1e-3, on CIFAR-10)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.name = 'convmixer'
  c.model.masked = True
  c.model.dim = 256
  c.model.depth = 8
  c.model.kernel_size = 5
  c.model.patch_size = 2
  c.model.num_classes = 10
  c.model.num_heads = config_dict.placeholder(int)
  c.model.mlp_ratio = 2.0
  c.model.hidden_dims = (100, 100, 100)
  c.model.width = 16
  c.model.sparsity_method = config_dict.placeholder(str)  # 'random' | 'magnitude' (dense only)
  c.model.sparsity = 0.9
  c.model.dtype = 'float32'
  c.model.conv_impl = 'auto'
  c.model.input_shape = config_dict.placeholder(tuple)
  c.model.remat_blocks = 'none'

  c.strategy = ml_collections.ConfigDict()
  c.strategy.name = 'random_vector_padding'
  c.strategy.rp_ratio = 1e-3
  c.strategy.keep_fraction = 0.5
  c.strategy.score_abs = True

  c.data = ml_collections.ConfigDict()
  # our builders: fashion_mnist_embedded (shipped subset), fashion_mnist, fashion_mnist_local,
  # cifar10_jpeg; or a TFDS catalogue name prepared as array_record in data_dir
  c.data.name = 'cifar10_jpeg'
  # TFDS data dir (None: ours prepare into ~/.cache/pemn_jax/tensorflow_datasets)
  c.data.data_dir = config_dict.placeholder(str)
  # the Fashion-MNIST IDX files (None: /usr/share/datasets/fashion-mnist)
  c.data.source_dir = config_dict.placeholder(str)
  # the CIFAR-10 JPEG npz, needed only to prepare cifar10_jpeg (None: $PEMN_CIFAR10_NPZ)
  c.data.source_path = config_dict.placeholder(str)
  # augment training batches (None: on for colour datasets such as CIFAR, off for MNIST-like)
  c.data.augment = config_dict.placeholder(bool)
  # batches (train and eval) built ahead in a background thread (0: synchronous)
  c.data.prefetch = 2
  # the augmentation recipe's switches (``pemn_jax.data.augment.AugmentOptions``, same defaults)
  c.data.augment_options = ml_collections.ConfigDict()
  c.data.augment_options.flip = True  # random horizontal flip, p = 0.5
  c.data.augment_options.randaugment_num_ops = 2  # RandAugment ops per image, 0..4 (0: off)
  c.data.augment_options.randaugment_magnitude = 12  # RandAugment magnitude bin, 0..30
  c.data.augment_options.color_jitter = 0.2  # brightness/contrast/saturation, [0, 1) (0: off)
  c.data.augment_options.erase_prob = 0.2  # random-erasing probability (0: off)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 512
  c.train.eval_batch_size = 1000
  c.train.num_epochs = 100
  c.train.num_steps = config_dict.placeholder(int)  # overrides num_epochs when set
  c.train.optimizer = 'adamw'
  c.train.peak_lr = 0.05
  c.train.weight_decay = 0.005
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  # piecewise-linear lr: 0 -> peak at warmup_fraction -> peak * final_lr_scale at
  # decay_fraction -> 0 at the end (the reference's 0 / 0.4 / 0.8 / 1.0 knots)
  c.train.warmup_fraction = 0.4
  c.train.decay_fraction = 0.8
  c.train.final_lr_scale = 0.05
  c.train.checkpoint_every_steps = 500
  c.train.max_checkpoints = 2
  c.train.log_every_steps = 50
  c.train.eval_every_epochs = 1
  c.train.progress = True
  return c


def parse_value(raw: str) -> Any:
  """A command-line value as Python: a literal (``3``, ``1e-2``, ``True``, ``(28, 28, 1)``,
  ``None``) where it parses as one, else the string itself (``mask``)."""
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """``['--config.a.b=v', 'c.d=w']`` -> ``{'a.b': v, 'c.d': w}`` (values by ``parse_value``)."""
  out = {}
  for item in items:
    key, sep, raw = item.removeprefix('--').removeprefix('config.').partition('=')
    if not sep or not key:
      raise ValueError(f'a config override must look like --config.FIELD=VALUE, got {item!r}')
    out[key] = parse_value(raw)
  return out


def check_positive_int(value: Any, field: str, *, allow_none: bool = False) -> None:
  """Raises ValueError naming ``field`` unless ``value`` is an int >= 1 (or None if allowed)."""
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    unset = ' or unset' if allow_none else ''
    raise ValueError(f'{field} must be a positive integer{unset}, got {value!r}')


def with_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, Any] | list[str]
) -> ml_collections.ConfigDict:
  """Sets dotted fields in place, as ``--config.a.b=v`` does on the command line; returns it.

  Args:
    config: the config to change.
    overrides: ``{'model.dim': 32}``, or command-line items ``['--config.model.dim=32']``.

  Raises:
    ValueError: a field that does not exist, named with the fields that do.

  Example: ``with_overrides(smoke.get_config(), {'model.dim': 32, 'train.num_steps': 4})``.
  """
  if not isinstance(overrides, dict):
    overrides = parse_overrides(list(overrides))
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for i, p in enumerate(parents):
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise ValueError(f'no config section {".".join(parents[: i + 1])!r} (in {key!r})')
      node = node[p]
    if leaf not in node:
      raise ValueError(
        f'no config field {key!r}; {".".join(parents) or "the config"} has '
        f'{", ".join(sorted(node.keys()))}'
      )
    node[leaf] = value
  return config


def load(path: str, overrides: dict[str, Any] | list[str] = ()) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file at ``path``, with ``overrides`` applied.

  Raises:
    ValueError: the file is missing, is not a config file, or an override names no field.
  """
  import importlib.util
  import os

  if not os.path.isfile(path):
    raise ValueError(f'config file {path} does not exist or is not a file')
  spec = importlib.util.spec_from_file_location('pemn_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'config file {path} defines no get_config()')
  return with_overrides(module.get_config(), overrides)
