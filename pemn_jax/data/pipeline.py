"""Input pipeline: what the trainer calls. TFDS data sources (array_record), no TensorFlow.

Public API
----------
- `default_data_config() -> ConfigDict`: the `config.data` block (fields below).
- `prepare(data_config) -> DatasetInfo`: makes sure the dataset is prepared (our own builders are
  prepared on first use, under a file lock) and returns its description. Safe to call from every
  process; a trainer may call it from process 0 first and barrier, so that the others only read.
- `get_dataset_info(data_config) -> DatasetInfo`: same as `prepare` (it prepares if needed).
- `steps_per_epoch(info, global_batch_size) -> int`: full training batches per epoch.
- `eval_steps(info, global_batch_size) -> int`: evaluation batches (last one padded).
- `train_batches(data_config, *, global_batch_size, seed, epoch, process_index, process_count,
  start_step_in_epoch=0) -> Iterator[dict]`: one epoch of process-local training batches
  `{'image': float32 (L, H, W, C) normalised, 'label': int32 (L,)}`, L = global / process_count.
- `eval_batches(data_config, *, global_batch_size, process_index, process_count)
  -> Iterator[dict]`: the test split once, `{'image', 'label', 'mask'}`; `mask` float32 is 1 for
  real examples and 0 for padding (only the last batch has padding).

Order and randomness: epoch e uses a permutation of all training indices that is a pure function
of (seed, e); global batch s is positions [s*G, (s+1)*G) of it (the last partial batch is
dropped), and process p takes the contiguous slice [p*L, (p+1)*L) of each global batch. The
augmentation of the example at position i is a pure function of (seed, e, i). Hence the global
batch, augmented pixels included, does not depend on the process count, and a resumed run with
`start_step_in_epoch=s` yields exactly the batches s, s+1, ... of an uninterrupted run, without
reading the skipped ones. Evaluation reads the test split in order; batch s holds test positions
[s*G, (s+1)*G), process p again its slice, padded past the end. Every process gets the same
number of batches. Batches are built in a background thread, `data.prefetch` ahead.

Config fields (`config.data`)
-----------------------------
- `name`: `fashion_mnist_embedded` (default; the subset shipped in the package),
  `fashion_mnist` (full Fashion-MNIST: the TFDS catalogue `fashion_mnist` if it is already prepared
  as array_record in `data_dir` and `source_dir` is unset, otherwise our `fashion_mnist_local`
  builder on the official IDX files in `source_dir`), `fashion_mnist_local` (always the IDX files),
  `cifar10_jpeg` (CIFAR-10 JPEG-q75 mirror npz), or any TFDS catalogue name already prepared as
  array_record in `data_dir` (e.g. `cifar10`, `cifar100`, `mnist`).
- `data_dir`: TFDS data dir. Our builders prepare into it (default
  `~/.cache/pemn_jax/tensorflow_datasets`, or `$XDG_CACHE_HOME/pemn_jax/...`); catalogue datasets
  are read from it (default: TFDS's own default, `$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
- `source_dir`: directory of the four Fashion-MNIST IDX files (default
  `/usr/share/datasets/fashion-mnist`, Debian package `dataset-fashion-mnist`).
- `source_path`: the CIFAR-10 npz (else `$PEMN_CIFAR10_NPZ`). Needed only to prepare.
- `augment`: None = dataset default (on for colour datasets such as CIFAR, off for MNIST-like),
  True/False to force. `augment_options`: the recipe's switches (see `augment.AugmentOptions`).
- `prefetch`: batches built ahead in the background thread (0 = synchronous).

A prepared dataset is reused as it is: to rebuild one of ours from other source files, delete
`<data_dir>/<builder name>/`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from pemn_jax.data import augment as augment_lib
from pemn_jax.data import builders

DEFAULT_NAME = 'fashion_mnist_embedded'
OWN_DATASETS = ('fashion_mnist_embedded', 'fashion_mnist', 'fashion_mnist_local', 'cifar10_jpeg')

# Per-channel mean / std on [0, 1] (METHOD.md section 3; MNIST-like: the usual published values).
_CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
_FASHION_STATS = ((0.2860,), (0.3530,))
KNOWN_STATS = {
  'cifar10': _CIFAR10_STATS,
  'cifar10_jpeg': _CIFAR10_STATS,
  'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
  'fashion_mnist': _FASHION_STATS,
  'fashion_mnist_local': _FASHION_STATS,
  'fashion_mnist_embedded': _FASHION_STATS,
  'mnist': ((0.1307,), (0.3081,)),
}
_STATS_SAMPLE = 10_000  # training images used to estimate mean/std of other datasets

_PERMUTATION_STREAM = 0x5045524D  # separates the order's seed from other uses of (seed, epoch)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset.

  Attributes:
      name: `data.name` as configured.
      image_shape: (H, W, C).
      num_classes: number of labels.
      num_train: training examples.
      num_test: test examples.
      mean: per-channel mean on [0, 1] used for normalisation.
      std: per-channel std on [0, 1].
      augment: whether training batches are augmented (config value or dataset default).
      tfds_name: the TFDS dataset actually read (e.g. `fashion_mnist_local`).
      data_dir: the TFDS data dir it is read from.
  """

  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_test: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  augment: bool
  tfds_name: str
  data_dir: str


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` block with its defaults.

  Returns:
      ConfigDict with `name`, `data_dir`, `source_dir`, `source_path`, `augment`,
      `augment_options` (flip, randaugment_num_ops, randaugment_magnitude, color_jitter,
      erase_prob) and `prefetch`.
  """
  opts = augment_lib.AugmentOptions()
  # Typed placeholders (value None) so that `--config.data.augment=True` etc. parse on the CLI.
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict(
    {
      'name': DEFAULT_NAME,
      'data_dir': placeholder(str),
      'source_dir': placeholder(str),
      'source_path': placeholder(str),
      'augment': placeholder(bool),
      'augment_options': dataclasses.asdict(opts),
      'prefetch': 2,
    }
  )


def default_cache_dir() -> str:
  """Where our builders prepare when `data.data_dir` is unset.

  Returns:
      `$XDG_CACHE_HOME/pemn_jax/tensorflow_datasets` (default `~/.cache/...`).
  """
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'pemn_jax', 'tensorflow_datasets')


# ----------------------------------------------------------------------------- opening


def _field(cfg: Any, name: str, default: Any = None) -> Any:
  """cfg.name, or default when cfg is None or lacks the field (ConfigDict or Mapping)."""
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    value = cfg.get(name, default)
  else:
    value = getattr(cfg, name, default)
  return default if value is None else value


@dataclasses.dataclass(frozen=True)
class _Opened:
  info: DatasetInfo
  train: Any  # random-access sequence of {'image', 'label', ...}
  test: Any


def _catalogue_builder(name: str, data_dir: str | None):
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f'data.name={name!r} is not a dataset pemn-jax knows: use one of {OWN_DATASETS} or a '
      f'TFDS catalogue name prepared as array_record in data.data_dir ({data_dir or "the"} '
      f'TFDS default). TFDS said: {str(e).splitlines()[0]}'
    ) from None


def _not_prepared_message(name: str, data_dir: str | None, builder) -> str:
  where = data_dir or 'the TFDS default data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)'
  fmt = ''
  if builders.is_prepared(builder):
    fmt = f' It is prepared at {builder.data_path} but as {builder.info.file_format}, '
    fmt += 'which needs TensorFlow to read; pemn-jax reads array_record only.'
  return (
    f'data.name={name!r}: the TFDS dataset is not prepared as array_record in '
    f'data.data_dir={where}.{fmt} There is no network here, so TFDS cannot download it. '
    'Prepare it on a machine with network access and TensorFlow (most catalogue builders need '
    f'TensorFlow to write images): `tfds build {name} --file_format=array_record '
    '--data_dir=DIR`, then copy DIR/' + name + ' into data.data_dir. Datasets pemn-jax '
    f'prepares itself without TensorFlow: {OWN_DATASETS}.'
  )


def _open_sources(builder, name: str, data_dir: str | None) -> tuple[Any, Any]:
  try:
    return builder.as_data_source(split='train'), builder.as_data_source(split='test')
  except Exception as e:  # TFDS raises assorted types for "not there" / "wrong format"
    splits = list(builder.info.splits.keys()) if builders.is_prepared(builder) else []
    if splits and not {'train', 'test'} <= set(splits):
      raise ValueError(
        f"data.name={name!r} has splits {splits}; pemn-jax needs 'train' and 'test'"
      ) from e
    raise FileNotFoundError(_not_prepared_message(name, data_dir, builder)) from e


def _local_fashion_builder(name: str, cfg: Any, data_dir: str):
  source_dir = _field(cfg, 'source_dir', builders.DEFAULT_FASHION_MNIST_DIR)
  make = lambda: builders.FashionMnistLocal(source_dir=source_dir, data_dir=data_dir)
  if not builders.is_prepared(make()):
    missing = builders.missing_idx_files(source_dir)
    if missing:
      raise FileNotFoundError(
        f'data.name={name!r} reads the official Fashion-MNIST IDX files from '
        f'data.source_dir={source_dir!s}, which lacks {missing}. Set data.source_dir to '
        'the directory holding them (Debian: apt-get install dataset-fashion-mnist puts '
        f'them in {builders.DEFAULT_FASHION_MNIST_DIR}), or use '
        "data.name='fashion_mnist_embedded' (the subset shipped with pemn-jax)."
      )
  return builders.prepare_builder(make, data_dir)


def _cifar10_jpeg_builder(cfg: Any, data_dir: str):
  source_path = _field(cfg, 'source_path') or os.environ.get(builders.CIFAR10_NPZ_ENV)
  make = lambda: builders.Cifar10Jpeg(source_path=source_path, data_dir=data_dir)
  if not builders.is_prepared(make()):
    if not source_path:
      raise ValueError(
        "data.name='cifar10_jpeg' needs the npz (cifar10_jpeg_q75.npz): set "
        f'data.source_path or the environment variable {builders.CIFAR10_NPZ_ENV}.'
      )
    if not pathlib.Path(source_path).is_file():
      raise FileNotFoundError(
        f'data.source_path={source_path!s} (or ${builders.CIFAR10_NPZ_ENV}) is not a file; '
        'it must be the CIFAR-10 JPEG npz (keys train_bytes, train_offsets, test_bytes, '
        'test_offsets, y_train, y_test).'
      )
  return builders.prepare_builder(make, data_dir)


def _resolve_builder(cfg: Any):
  """(builder, data_dir as used, is_catalogue) for `cfg`."""
  name = _field(cfg, 'name', DEFAULT_NAME)
  if not isinstance(name, str) or not name:
    raise ValueError(f'data.name must be a non-empty string, got {name!r}')
  data_dir = _field(cfg, 'data_dir')
  data_dir = os.path.expanduser(str(data_dir)) if data_dir else None
  own_dir = data_dir or default_cache_dir()
  if name == 'fashion_mnist_embedded':
    make = lambda: builders.FashionMnistEmbedded(data_dir=own_dir)
    return builders.prepare_builder(make, own_dir), own_dir, False
  if name == 'fashion_mnist' and _field(cfg, 'source_dir') is None:
    catalogue = tfds.builder('fashion_mnist', data_dir=data_dir)
    if builders.is_prepared(catalogue) and (
      catalogue.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    ):
      return catalogue, data_dir, True
  if name in ('fashion_mnist', 'fashion_mnist_local'):
    return _local_fashion_builder(name, cfg, own_dir), own_dir, False
  if name == 'cifar10_jpeg':
    return _cifar10_jpeg_builder(cfg, own_dir), own_dir, False
  return _catalogue_builder(name, data_dir), data_dir, True


def _estimate_stats(source, shape) -> tuple[tuple[float, ...], tuple[float, ...]]:
  n = min(len(source), _STATS_SAMPLE)
  x = np.stack([np.asarray(source[i]['image']) for i in range(n)]).astype(np.float64) / 255.0
  x = x.reshape(-1, shape[-1])
  return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-6)) for v in x.std(0))


@functools.lru_cache(maxsize=16)
def _open_cached(key: tuple) -> _Opened:
  cfg = dict(key)
  name = _field(cfg, 'name', DEFAULT_NAME)
  builder, data_dir, _ = _resolve_builder(cfg)
  train, test = _open_sources(builder, name, data_dir)
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(
      f"data.name={name!r}: pemn-jax needs 'image' and 'label' features, the dataset has "
      f'{list(features.keys())}'
    )
  shape = tuple(features['image'].shape)
  if len(shape) != 3 or any(d is None for d in shape):
    raise ValueError(f'data.name={name!r}: images must have a fixed (H, W, C) shape, {shape}')
  num_classes = int(features['label'].num_classes)
  tfds_name = builder.name
  mean, std = KNOWN_STATS.get(tfds_name) or _estimate_stats(train, shape)
  augment = _field(cfg, 'augment')
  if augment is not None and not isinstance(augment, bool | np.bool_):
    raise ValueError(f'data.augment must be True, False or None (dataset default), {augment!r}')
  if augment is None:
    augment = tfds_name in ('cifar10', 'cifar10_jpeg', 'cifar100') or (
      tfds_name not in KNOWN_STATS and shape[-1] == 3
    )
  info = DatasetInfo(
    name=name,
    image_shape=shape,  # type: ignore[arg-type]
    num_classes=num_classes,
    num_train=len(train),
    num_test=len(test),
    mean=tuple(mean),
    std=tuple(std),
    augment=bool(augment),
    tfds_name=tfds_name,
    data_dir=str(data_dir or builder.data_dir_root),
  )
  return _Opened(info=info, train=train, test=test)


def clear_cache() -> None:
  """Forgets opened datasets (they are cached per process by their config fields).

  Tests use it between `tfds.testing.mock_data` contexts; a trainer never needs it.
  """
  _open_cached.cache_clear()


def _open(cfg: Any) -> _Opened:
  fields = ('name', 'data_dir', 'source_dir', 'source_path', 'augment')
  return _open_cached(tuple((f, _field(cfg, f)) for f in fields))


def _augment_options(cfg: Any) -> augment_lib.AugmentOptions:
  raw = _field(cfg, 'augment_options')
  if raw is None:
    return augment_lib.AugmentOptions()
  raw = dict(raw.to_dict() if hasattr(raw, 'to_dict') else raw)
  allowed = {f.name for f in dataclasses.fields(augment_lib.AugmentOptions)}
  unknown = set(raw) - allowed
  if unknown:
    raise ValueError(f"data.augment_options has unknown fields {sorted(unknown)}; "
                         f"allowed: {sorted(allowed)}")  # fmt: skip
  try:
    return augment_lib.AugmentOptions(**raw)
  except ValueError as e:
    raise ValueError(f'data.augment_options: {e}') from None


# ----------------------------------------------------------------------------- public API


def prepare(data_config: Any) -> DatasetInfo:
  """Prepares the configured dataset if needed (lock-guarded) and describes it.

  Args:
      data_config: the `config.data` ConfigDict (or a mapping with the same fields).

  Returns:
      The dataset's `DatasetInfo`.

  Raises:
      ValueError: unknown `data.name`, missing `data.source_path`, bad `data.augment_options`.
      FileNotFoundError: source files or a prepared catalogue dataset are absent (the message
          names the config field and what to do).
  """
  return _open(data_config).info


def get_dataset_info(data_config: Any) -> DatasetInfo:
  """Describes the configured dataset (preparing it first if needed).

  Args:
      data_config: the `config.data` ConfigDict.

  Returns:
      Its `DatasetInfo`.
  """
  return prepare(data_config)


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
  """Full global training batches per epoch (the last partial batch is dropped).

  Args:
      info: the dataset.
      global_batch_size: examples per step over all processes.

  Returns:
      floor(num_train / global_batch_size).
  """
  return info.num_train // int(global_batch_size)


def eval_steps(info: DatasetInfo, global_batch_size: int) -> int:
  """Evaluation batches covering the test split once (the last one padded).

  Args:
      info: the dataset.
      global_batch_size: examples per evaluation step over all processes.

  Returns:
      ceil(num_test / global_batch_size).
  """
  return math.ceil(info.num_test / int(global_batch_size))


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The training order of one epoch: a pure function of (seed, epoch).

  Args:
      num_examples: size of the training split.
      seed: run seed.
      epoch: epoch number.

  Returns:
      int64 permutation of range(num_examples).
  """
  entropy = [int(seed) % 2**64, int(epoch) % 2**64, _PERMUTATION_STREAM]
  return np.random.default_rng(entropy).permutation(num_examples)


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if int(global_batch_size) != global_batch_size or global_batch_size <= 0:
    raise ValueError(f'train.batch_size must be a positive integer, got {global_batch_size}')
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count})')
  if global_batch_size % process_count:
    raise ValueError(
      f'train.batch_size={global_batch_size} must be divisible by the number of processes '
      f'({process_count}); choose a multiple of {process_count}'
    )
  return global_batch_size // process_count


def _read(source, indices: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
  records = [source[int(i)] for i in indices]
  images = np.zeros((len(records), *shape), np.uint8)
  labels = np.zeros((len(records),), np.int32)
  for j, record in enumerate(records):
    images[j] = np.asarray(record['image']).reshape(shape)
    labels[j] = int(record['label'])
  return images, labels


def _prefetch(items: Iterator[dict], size: int) -> Iterator[dict]:
  """Runs `items` in a daemon thread, `size` ahead; errors re-raise in the consumer."""
  if size <= 0:
    yield from items
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(entry) -> bool:
    while not stop.is_set():
      try:
        q.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for item in items:
        if not put(('item', item)):
          return
      put(('end', None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer
      put(('error', e))

  thread = threading.Thread(target=work, name='pemn-data-prefetch', daemon=True)
  thread.start()
  try:
    while True:
      kind, value = q.get()
      if kind == 'item':
        yield value
      elif kind == 'end':
        return
      else:
        raise value
  finally:
    stop.set()
    thread.join(timeout=5.0)


def train_batches(
  data_config: Any,
  *,
  global_batch_size: int,
  seed: int,
  epoch: int,
  process_index: int,
  process_count: int,
  start_step_in_epoch: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of this process's training batches.

  Args:
      data_config: the `config.data` ConfigDict.
      global_batch_size: examples per step over all processes (`train.batch_size`).
      seed: run seed; the order and augmentation are pure functions of (seed, epoch).
      epoch: epoch number (0-based).
      process_index: this process (`jax.process_index()`).
      process_count: number of processes (`jax.process_count()`).
      start_step_in_epoch: first step to yield (a resumed run skips the steps done).

  Returns:
      Iterator over `steps_per_epoch - start_step_in_epoch` dicts with 'image' float32
      (L, H, W, C) normalised and 'label' int32 (L,), L = global_batch_size / process_count.

  Raises:
      ValueError: batch size not divisible by the process count or larger than the training
          split, start step out of range, bad config (see `prepare`).
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  opened = _open(data_config)
  info = opened.info
  steps = steps_per_epoch(info, global_batch_size)
  if steps == 0:
    raise ValueError(
      f'train.batch_size={global_batch_size} exceeds the {info.num_train} training examples '
      f'of data.name={info.name!r}'
    )
  if not 0 <= start_step_in_epoch <= steps:
    raise ValueError(f'start_step_in_epoch={start_step_in_epoch} not in [0, {steps}]')
  options = _augment_options(data_config) if info.augment else None
  order = epoch_permutation(info.num_train, seed, epoch)
  offset = process_index * local + np.arange(local)

  def make(step: int) -> dict[str, np.ndarray]:
    positions = step * global_batch_size + offset
    images, labels = _read(opened.train, order[positions], info.image_shape)
    if options is None:
      x = augment_lib.normalize(images, info.mean, info.std)
    else:
      u = augment_lib.example_uniforms(seed, epoch, positions)
      x = augment_lib.augment_batch(images, u, info.mean, info.std, options)
    return {'image': x, 'label': labels}

  size = int(_field(data_config, 'prefetch', 2))
  return _prefetch(map(make, range(start_step_in_epoch, steps)), size)


def eval_batches(
  data_config: Any,
  *,
  global_batch_size: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """The test split once, in order, as this process's padded batches.

  Args:
      data_config: the `config.data` ConfigDict.
      global_batch_size: examples per evaluation step over all processes.
      process_index: this process.
      process_count: number of processes.

  Returns:
      Iterator over `eval_steps(info, global_batch_size)` dicts with 'image' float32
      (L, H, W, C) normalised (zeros where padded), 'label' int32 (0 where padded) and 'mask'
      float32 (1 real, 0 padding).

  Raises:
      ValueError: batch size not divisible by the process count; bad config (see `prepare`).
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  opened = _open(data_config)
  info = opened.info
  offset = process_index * local + np.arange(local)

  def make(step: int) -> dict[str, np.ndarray]:
    positions = step * global_batch_size + offset
    valid = positions < info.num_test
    images, labels = _read(opened.test, positions[valid], info.image_shape)
    x = np.zeros((local, *info.image_shape), np.float32)
    x[valid] = augment_lib.normalize(images, info.mean, info.std)
    y = np.zeros((local,), np.int32)
    y[valid] = labels
    return {'image': x, 'label': y, 'mask': valid.astype(np.float32)}

  size = int(_field(data_config, 'prefetch', 2))
  return _prefetch(map(make, range(eval_steps(info, global_batch_size))), size)
