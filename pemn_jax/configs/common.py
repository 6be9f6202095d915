"""Every configuration field, with its default. The experiment configs start from here.

Each field is set below with its default and a comment; the experiment configs change a few.
``seed`` derives the score/BN init key, the frozen random-weight key (``build.model_keys``) and
the data order. ``model.*`` describes the network (``pemn_jax.models``), ``strategy.*`` the
masks and where the random values come from (``pemn_jax.strategies``, ``pemn_jax.masking``),
``data.*`` the dataset, augmentation and input pipeline (``pemn_jax.data``), ``train.*`` the
optimizer, schedule, checkpoints and logging (``pemn_jax.train``).

The command line sets any field (``--config.model.dim=128``); it cannot add one, so a field that
is not here does not exist. Validation, with errors that name the field, is in
``build.validate_config`` (model, strategy), ``train.validate_train_config`` and the data
package.
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
  c.model.name = 'convmixer'  # a key of pemn_jax.models.REGISTRY: convmixer | resnet | vit | mlp
  c.model.masked = True  # True: PEMN (frozen random weights x learned masks); False: dense
  c.model.dim = 256  # width: ConvMixer h, ViT embedding (ResNet and MLP ignore it)
  c.model.depth = 8  # blocks (ConvMixer, ViT) or layers (ResNet, 6n+2)
  c.model.kernel_size = 5  # ConvMixer's depthwise kernel
  c.model.patch_size = 2  # ConvMixer / ViT patch (and stem stride)
  c.model.num_classes = 10  # classifier outputs; must equal the dataset's classes
  c.model.num_heads = config_dict.placeholder(int)  # ViT heads (None: dim // 64)
  c.model.mlp_ratio = 2.0  # ViT MLP width / dim
  c.model.hidden_dims = (100, 100, 100)  # MLP hidden widths
  c.model.width = 16  # ResNet base width (channels of the first stage)
  # the paper's sparse baselines (dense only, masked=False): 'random' | 'magnitude' removal of
  # ``sparsity`` of each layer's weights (pemn_jax.sparse)
  c.model.sparsity_method = config_dict.placeholder(str)
  c.model.sparsity = 0.9
  c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (scores, BN, optimizer: fp32)
  c.model.conv_impl = 'auto'  # conv formulation: auto | xla | fast | native (pemn_jax.ops)
  # which native CPU kernels the steps may use (pemn_jax.native): 'auto' (all, where they
  # apply), 'none' (pure XLA), or a comma list of depthwise, topk, gelu_bn. How a step runs,
  # not which network: a run may resume with it changed.
  c.model.native_kernels = 'auto'
  c.model.input_shape = config_dict.placeholder(tuple)  # (H, W, C); None: the dataset's
  # ConvMixer / ViT blocks as one rematerialised scan in training: none | save_convs | full
  # (less memory for some recomputation; same variables and values; pemn_jax.models.remat)
  c.model.remat_blocks = 'none'

  c.strategy = ml_collections.ConfigDict()
  # where the frozen weights' values come from (pemn_jax.strategies): mask | one_layer |
  # max_layer_padding | random_vector_padding
  c.strategy.name = 'random_vector_padding'
  c.strategy.rp_ratio = 1e-3  # random vector padding: stored values = floor(r * N) + 1, r in (0, 1]
  c.strategy.keep_fraction = 0.5  # fraction of each layer's weights the mask KEEPS, in (0, 1]
  c.strategy.score_abs = True  # rank |score| (the reference code) or the raw score (the paper)

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
  c.train.batch_size = 512  # global batch (all processes), a multiple of the device count
  c.train.eval_batch_size = 1000  # global eval batch; the last one is padded and masked
  c.train.num_epochs = 100  # training length in epochs ...
  c.train.num_steps = config_dict.placeholder(int)  # ... or in steps, when set
  # AdamW on every trainable leaf (scores and BN; kernels too in the dense baseline)
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
  c.train.checkpoint_every_steps = 500  # and after every evaluation
  c.train.max_checkpoints = 2  # the latest N are kept, plus the best by test accuracy
  c.train.log_every_steps = 50  # a 'train' line in metrics.jsonl and TensorBoard
  c.train.eval_every_epochs = 1  # test-split evaluation (always after the last step)
  c.train.progress = True  # a progress bar on process 0 (else one line per evaluation)
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


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with every field it lacks set to ``base_config()``'s default; returns it.

  For configs recorded by earlier versions (a workdir's ``config.json``, an artifact's header):
  a field added since then reads as its default, which is what those runs used.
  """

  def fill(node, defaults):
    for k, v in defaults.items():
      if k not in node:
        node[k] = v
      elif isinstance(v, ml_collections.ConfigDict) and isinstance(
        node[k], ml_collections.ConfigDict
      ):
        fill(node[k], v)

  fill(config, base_config())
  return config


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
