"""Every configuration field, with its default. The experiment configs start from here.

Each field is set below with its default and a comment; the experiment configs change a few.
``seed`` derives the score/BN init key, the frozen random-weight key (``build.model_keys``) and
the data order. ``model.*`` describes the network (``pemn_jax.models``), ``strategy.*`` the
masks and where the random values come from (``pemn_jax.strategies``, ``pemn_jax.masking``),
``data.*`` the dataset, augmentation and input pipeline (``pemn_jax.data``), ``train.*`` the
optimizer, schedule, checkpoints and logging (``pemn_jax.train``).

The command line sets any field (``--config.model.dim=128``); it cannot add one, so a field that
is not here does not exist. Validation, with errors that name the field, is in
``build.validate_config`` (seed, model, strategy), ``train.validate_train_config`` (train) and
``data.sources.validate`` (data), all run before a run writes anything; the checks that need the
dataset are ``build.check_data`` and ``train.check_train_data``, the model's size is checked by
``build.check_model_size``. The caps (``MAX_*`` below) bound what a field can make memory, or
the time to build a model, grow to.
"""

import ast
import math
import numbers
from typing import Any

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (a masked ConvMixer-256/8, RP 1e-3, on CIFAR-10)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # any integer in [SEED_MIN, SEED_MAX]: -2**63 .. 2**63 - 1

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
  # the learned 1-bit-weight baseline (dense only, masked=False; not with sparsity_method): every
  # weight sign(latent) x a learned scale per output channel (pemn_jax.binary)
  c.model.binary_weights = False
  c.model.dtype = 'float32'  # compute dtype: float32 | bfloat16 (scores, BN, optimizer: fp32)
  c.model.conv_impl = 'auto'  # conv formulation: auto | xla | fast | native (pemn_jax.ops)
  # which native CPU kernels the steps may use (pemn_jax.native): 'auto' (all, where they
  # apply), 'none' (pure XLA), or a comma list of depthwise, topk, gelu_bn, gemm (the bf16
  # weight gradients through oneDNN / MKL, where installed and the CPU has bf16 hardware), amx
  # (the other bf16 products on AMX tiles, where the CPU has AMX-BF16). How a step runs, not
  # which network: a run may resume with it changed.
  c.model.native_kernels = 'auto'
  c.model.input_shape = config_dict.placeholder(tuple)  # (H, W, C); None: the dataset's
  # ConvMixer / ViT blocks as one rematerialised scan in training: none | save_convs | full
  # (less memory for some recomputation; same variables and values; pemn_jax.models.remat)
  c.model.remat_blocks = 'none'
  # ConvMixer's fused GELU+BN kernels (native 'gelu_bn'): what each keeps for the backward,
  # 'gelu' (gelu(x) and gelu'(x): the GELU evaluated once, the faster step) | 'input' (x alone:
  # half that memory, the GELU recomputed in each of four passes; the only form before this
  # field). How a step runs: same variables, in float32 the same values to float rounding, in
  # bfloat16 one more rounding (of gelu(x)); a run may resume with it changed.
  c.model.gelu_bn_residuals = 'gelu'
  # Masks over pretrained weights (mask fine-tuning, lottery jackpots; pemn_jax.pretrained):
  # the base model's weights instead of the random draw. None: random weights (PEMN). A path:
  # a masked model (strategy.name='mask') masks the base's kernels (its frozen collection) and
  # starts every other leaf (BN, biases) from the base's; a dense or magnitude-sparse model
  # (masked=False) starts all its leaves from the base's (fine-tuning baselines). The content is
  # fingerprinted into the checkpoints, so a resume reloads it and refuses a changed base; the
  # path itself may change on resume. A .pemn export stores the base's fingerprint, never it.
  c.model.base_source = config_dict.placeholder(str)
  # what base_source is: 'workdir' (a pemn-jax dense run of the same definition: its latest
  # checkpoint) | 'orbax' (a saved variables or params tree) | 'flax' (flax.serialization
  # msgpack bytes of one) | 'safetensors' (one tensor per variable, named by base_name_map)
  c.model.base_format = 'workdir'
  # safetensors only: a JSON file {variable path: tensor name}, e.g. {"params/stem/kernel":
  # "stem.weight"}; a variable it does not name is read from the tensor of its own path
  # ("params/stem/kernel"). None: every tensor is named by its path. Values in Flax layout.
  c.model.base_name_map = config_dict.placeholder(str)
  # how the base file lays its kernels out: 'flax' (HWIO convs, (in, out) dense kernels) or
  # 'torch' (OIHW, (out, in): e.g. a safetensors file of a PyTorch model; transposed on reading)
  c.model.base_layout = 'flax'
  # a masked model over a base: its other trainable leaves (BN scale/bias, biases) 'train' or
  # stay the base's ('freeze': only the scores learn; BN running statistics still update)
  c.model.base_unmasked = 'train'

  c.strategy = ml_collections.ConfigDict()
  # where the frozen weights' values come from (pemn_jax.strategies): mask | one_layer |
  # max_layer_padding | random_vector_padding
  c.strategy.name = 'random_vector_padding'
  c.strategy.rp_ratio = 1e-3  # random vector padding: stored values = floor(r * N) + 1, r in (0, 1]
  c.strategy.keep_fraction = 0.5  # fraction of each layer's weights the mask KEEPS, in (0, 1]
  c.strategy.score_abs = True  # rank |score| (the reference code) or the raw score (the paper)
  # initial scores: 'uniform' (the paper's U(+-1/sqrt(fan_in))), 'magnitude' (|w| of the frozen
  # kernel: the first mask keeps the largest weights, magnitude pruning at the start) or
  # 'constant' (1/sqrt(fan_in) x (1 + U(+-1e-3)): all equal up to a small noise)
  c.strategy.score_init = 'uniform'
  # which conv / dense layers a masked model masks: None (all of them) or a regular expression
  # matched (re.fullmatch) against each layer's '/'-joined module path, e.g. 'block[23]_.*' (the
  # depthwise and pointwise convs of ConvMixer blocks 2 and 3: a band of blocks, as mask
  # fine-tuning masks). The other layers are ordinary trainable layers (over a base: the base's
  # weights, frozen with model.base_unmasked='freeze')
  c.strategy.masked_layers = config_dict.placeholder(str)

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
  # global eval batch; the last one is padded and masked. One larger than the test split needs
  # (rounded up to the device count) is lowered to that, with a note (train.check_train_data)
  c.train.eval_batch_size = 1000
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
  # also evaluate the initial state, before the first step: an 'eval' line at step 0 and the
  # summary's initial_accuracy (a mask over a base with score_init='magnitude' starts as the
  # one-shot magnitude-pruned base: this is that model's accuracy, with no training at all)
  c.train.eval_at_start = False
  c.train.progress = True  # a progress bar on process 0 (else one line per evaluation)
  return c


def parse_value(raw: str) -> Any:
  """A command-line value as Python: a literal (``3``, ``1e-2``, ``True``, ``(28, 28, 1)``,
  ``None``) where it parses as one, else the string itself (``mask``)."""
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return raw  # TypeError: '{[]: 1}'; the last two: absurdly nested input


def parse_overrides(items: list[str]) -> dict[str, Any]:
  """``['--config.a.b=v', 'c.d=w']`` -> ``{'a.b': v, 'c.d': w}`` (values by ``parse_value``)."""
  out = {}
  for item in items:
    key, sep, raw = item.removeprefix('--').removeprefix('config.').partition('=')
    if not sep or not key:
      raise ValueError(f'a config override must look like --config.FIELD=VALUE, got {item!r}')
    out[key] = parse_value(raw)
  return out


def check_positive_int(
  value: Any, field: str, *, allow_none: bool = False, maximum: int | None = None
) -> None:
  """Raises ValueError naming ``field`` unless ``value`` is an int >= 1 (and <= ``maximum`` when
  given), or None if allowed."""
  if value is None and allow_none:
    return
  if not _is_int(value) or value < 1 or (maximum is not None and value > maximum):
    unset = ' or unset' if allow_none else ''
    most = f' at most {maximum:,}' if maximum is not None else ''
    raise ValueError(f'{field} must be a positive integer{most}{unset}, got {show(value)}')


# ----------------------------------------------------------------------------------------------
# Limits. A field past one would only make memory (or the time to trace the model) grow beyond
# anything a run here needs; each is far above the paper's largest setting.

# jax.random.key takes a signed 64-bit seed (the data order reduces it mod 2**64).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Step counts, intervals and batch sizes: the train state counts steps in int32.
INT32_MAX = 2**31 - 1
# model.dim (ConvMixer h, ViT width): the paper's largest is 512; one 16384-wide pointwise layer
# is already 2**28 weights.
MAX_DIM = 16384
# model.depth (blocks or ResNet layers): each block is traced when the model is built, so a deep
# model costs seconds before its first step (the paper's deepest is ResNet-56; ResNet-1202 fits).
MAX_DEPTH = 2048
# model.hidden_dims entries (MLP widths) and model.width (ResNet base width, x4 in stage 3).
MAX_WIDTH = 65536
MAX_RESNET_WIDTH = 4096
# model.kernel_size and model.patch_size, in pixels (the image itself is checked against them
# once its shape is known: build.check_input_shape).
MAX_KERNEL_SIZE = 255
MAX_PATCH_SIZE = 4096
# model.num_classes: ImageNet-21k has 21,841.
MAX_NUM_CLASSES = 100_000
# model.mlp_ratio: the ViT MLP is mlp_ratio x dim wide (ViTs use 4).
MAX_MLP_RATIO = 64.0
# model.input_shape: height and width in pixels, and channels.
MAX_IMAGE_SIDE = 4096
MAX_CHANNELS = 1024
# Every variable of the model (scores, BatchNorm, frozen random kernels): training holds ~5
# float32 values per parameter (value, gradient, two Adam moments, the frozen kernel), so 2**30
# parameters are ~20 GiB before activations; the paper's largest model has ~17M.
MAX_PARAMETERS = 2**30
# data.prefetch: batches built ahead by one thread; more than a few only hold memory.
MAX_PREFETCH = 16
# The smallest normal float32: a positive value below it (eps, a learning rate) is 0 or a
# denormal once on the device.
FLOAT32_TINY = 1.1754943508222875e-38
FLOAT32_MAX = 3.4028234663852886e38


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def show(value: Any, limit: int = 80) -> str:
  """``repr(value)`` on one line, cut to ``limit`` characters (for error messages)."""
  try:
    text = repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
  except ValueError:  # an int too long to print (Python's digit limit)
    text = f'<an integer of {value.bit_length()} bits>'
  if '\n' in text:
    text = ' '.join(text.split())
  return text if len(text) <= limit else text[: limit - 3] + '...'


def check_int(value: Any, field: str, low: int, high: int, *, allow_none: bool = False) -> None:
  """Raises ValueError naming ``field`` unless ``value`` is an int in [low, high] (or None if
  allowed; bools are not ints here)."""
  if value is None and allow_none:
    return
  if not _is_int(value) or not low <= value <= high:
    unset = ' or unset' if allow_none else ''
    raise ValueError(f'{field} must be an integer in [{low}, {high}]{unset}, got {show(value)}')


def check_real(
  value: Any,
  field: str,
  low: float,
  high: float,
  *,
  low_open: bool = False,
  high_open: bool = False,
  allow_none: bool = False,
) -> float:
  """Raises ValueError naming ``field`` unless ``value`` is a finite number in the interval
  (``low`` / ``high`` included unless open); returns it as a float.

  An interval open at 0 also needs the value to stay nonzero in float32 (>= ``FLOAT32_TINY``),
  and every value must be finite in float32 (what the device computes with).
  """
  if value is None and allow_none:
    return value
  interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
  unset = ' or unset' if allow_none else ''
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f'{field} must be a number in {interval}{unset}, got {show(value)}')
  try:
    v = float(value)
  except OverflowError:  # an int beyond any float
    v = math.inf
  ok = (
    math.isfinite(v)
    and abs(v) <= FLOAT32_MAX
    and (low < v if low_open else low <= v)
    and (v < high if high_open else v <= high)
    and not (low_open and low == 0 and v < FLOAT32_TINY)
  )
  if not ok:
    raise ValueError(f'{field} must be a finite number in {interval}{unset}, got {show(value)}')
  return v


def check_bool(value: Any, field: str, *, allow_none: bool = False) -> None:
  """Raises ValueError naming ``field`` unless ``value`` is True or False (or None if allowed):
  ``1`` or ``'true'`` are not booleans here."""
  if value is None and allow_none:
    return
  if not isinstance(value, bool):
    unset = ' or None' if allow_none else ''
    raise ValueError(f'{field} must be True or False{unset}, got {show(value)}')


def check_choice(value: Any, field: str, choices, *, allow_none: bool = False) -> None:
  """Raises ValueError naming ``field`` unless ``value`` is one of the strings ``choices``."""
  if value is None and allow_none:
    return
  if not isinstance(value, str) or value not in tuple(choices):
    unset = ' or None' if allow_none else ''
    raise ValueError(f'{field} must be one of {tuple(choices)}{unset}, got {show(value)}')


def check_path(value: Any, field: str, *, allow_none: bool = True) -> None:
  """Raises ValueError naming ``field`` unless ``value`` is a non-empty path string (or None)."""
  if value is None and allow_none:
    return
  if not isinstance(value, str) or not value or '\x00' in value:
    unset = ' or None' if allow_none else ''
    raise ValueError(f'{field} must be a non-empty path{unset}, got {show(value)}')


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
    ValueError: a field that does not exist (named with the closest one and the fields that
      do), or a value of another type than the field's.

  Example: ``with_overrides(smoke.get_config(), {'model.dim': 32, 'train.num_steps': 4})``.
  """
  if not isinstance(overrides, dict):
    overrides = parse_overrides(list(overrides))
  for key, value in overrides.items():
    problem = missing_field(config, key)
    if problem:
      raise ValueError(problem)
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except TypeError as e:  # a ConfigDict keeps each field's type
      reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(f'config field {key!r} cannot be set to {show(value)}: {reason}') from None
  return config


def missing_field(config: ml_collections.ConfigDict, key: str) -> str | None:
  """None if the dotted ``key`` is a field (or section) of ``config``, else the one-line error:
  the first name that is not there, the closest one that is, and what its section holds."""
  import difflib

  names = key.split('.')
  node = config
  for i, name in enumerate(names):
    where = '.'.join(names[:i]) or 'the config'
    if not isinstance(node, ml_collections.ConfigDict):
      return f'no config field {key!r}: {where} is a field, not a section'
    if name not in node:
      close = difflib.get_close_matches(name, list(node.keys()), n=1)
      hint = f' (did you mean {".".join([*names[:i], close[0]])!r}?)' if close else ''
      kind = 'section' if i < len(names) - 1 else 'field'
      return (
        f'no config {kind} {".".join(names[: i + 1])!r}{hint}; {where} has '
        f'{", ".join(sorted(node.keys()))}'
      )
    node = node[name]
  return None


def check_config_file(path: Any, what: str = 'config file') -> None:
  """Raises FileNotFoundError or ValueError (one line naming ``path``) unless it is a readable
  Python file that compiles; nothing is executed."""
  import os

  if not isinstance(path, str) or not path:
    raise ValueError(f'{what} must be the path of a Python config file, got {show(path)}')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{what} {path}: no such file')
  if os.path.isdir(path):
    raise ValueError(f'{what} {path} is a directory, not a config file')
  try:
    with open(path, 'rb') as f:
      source = f.read()
  except OSError as e:
    raise ValueError(f'{what} {path} cannot be read: {e.strerror or e}') from None
  try:
    compile(source, path, 'exec')
  except SyntaxError as e:
    raise ValueError(f'{what} {path}: syntax error at line {e.lineno}: {e.msg}') from None
  except ValueError as e:  # e.g. a NUL byte: not a text file
    raise ValueError(f'{what} {path} is not a Python file: {e}') from None


def load(path: str, overrides: dict[str, Any] | list[str] = ()) -> ml_collections.ConfigDict:
  """``get_config()`` of the config file at ``path``, with ``overrides`` applied.

  Raises:
    FileNotFoundError: the file is missing.
    ValueError: it is not a config file (a directory, a syntax error, no ``get_config``), or an
      override names no field.
  """
  import importlib.util

  check_config_file(path)
  spec = importlib.util.spec_from_file_location('pemn_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'config file {path} defines no get_config()')
  return with_overrides(module.get_config(), overrides)
