"""Which dataset a ``config.data`` names and what it is: resolution, opening, metadata.

Public API
----------
- ``complete(data_config) -> ConfigDict``: the data config with every field; fields it lacks (a
  partial config in a test, the recorded config of an older artifact) come from
  ``pemn_jax.configs.common.base_config().data``, the one place the defaults live.
- ``validate(data_config) -> ConfigDict``: the completed config after checking every field (types,
  ranges, ``data.prefetch`` at most ``common.MAX_PREFETCH``, the augmentation switches); opens
  nothing. ``open_dataset`` and ``image_shape`` call it first.
- ``prepare(data_config) -> DatasetInfo``: makes sure the dataset is prepared (our own builders are
  prepared on first use, under a file lock) and returns its description. Safe to call from every
  process; a trainer may call it from process 0 first and barrier, so that the others only read.
- ``get_dataset_info(data_config) -> DatasetInfo``: same as ``prepare`` (it prepares if needed).
- ``image_shape(data_config) -> (H, W, C)``: from ``IMAGE_SHAPES`` for the datasets we know, without
  opening (or importing) anything; otherwise from the opened dataset.
- ``open_dataset(data_config) -> OpenedDataset``: its ``DatasetInfo`` and random-access train and
  test sources (what ``pemn_jax.data.pipeline`` reads batches from), cached per process.
- ``clear_cache()``, ``default_cache_dir()``, ``KNOWN_STATS`` (normalisation statistics).

What ``data.name`` means
------------------------
``fashion_mnist_embedded`` (the subset shipped in the package), ``fashion_mnist`` (full
Fashion-MNIST: the TFDS catalogue ``fashion_mnist`` if it is already prepared as array_record in
``data_dir`` and ``source_dir`` is unset, otherwise our ``fashion_mnist_local`` builder on the
official IDX files in ``source_dir``), ``fashion_mnist_local`` (always the IDX files),
``cifar10_jpeg`` (CIFAR-10 JPEG-q75 mirror npz at ``source_path``), or any TFDS catalogue name
already prepared as array_record in ``data_dir`` (e.g. ``cifar10``, ``cifar100``, ``mnist``). Our
builders prepare into ``data_dir`` (default ``default_cache_dir()``); catalogue datasets are read
from it (default: TFDS's own default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). The other
fields are described in ``pemn_jax/configs/common.py``.

A prepared dataset is reused as it is: to rebuild one of ours from other source files, delete
``<data_dir>/<builder name>/``.

tensorflow_datasets (and ``builders``, which imports it) is imported inside the functions that open
a dataset, so that importing this module, its tables and ``image_shape`` of a known dataset cost no
TFDS import (the model builder asks for shapes before any data is needed).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from pemn_jax.configs import common

OWN_DATASETS = ('fashion_mnist_embedded', 'fashion_mnist', 'fashion_mnist_local', 'cifar10_jpeg')

# Per-channel mean / std on [0, 1]: CIFAR's are the reference code's, the MNIST-like ones the
# usual published values.
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

# (H, W, C) of the datasets we know without opening them (a model can be built with no data).
IMAGE_SHAPES = {
  'cifar10': (32, 32, 3),
  'cifar10_jpeg': (32, 32, 3),
  'cifar100': (32, 32, 3),
  'svhn_cropped': (32, 32, 3),
  'mnist': (28, 28, 1),
  'fashion_mnist': (28, 28, 1),
  'fashion_mnist_embedded': (28, 28, 1),
}

# The fields that decide which dataset is opened and how it is described (the cache key).
_OPEN_FIELDS = ('name', 'data_dir', 'source_dir', 'source_path', 'augment')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset.

  Attributes:
    name: ``data.name`` as configured.
    image_shape: (H, W, C).
    num_classes: number of labels.
    num_train: training examples.
    num_test: test examples.
    mean: per-channel mean on [0, 1] used for normalisation.
    std: per-channel std on [0, 1].
    augment: whether training batches are augmented (config value or dataset default).
    tfds_name: the TFDS dataset actually read (e.g. ``fashion_mnist_local``).
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


@dataclasses.dataclass(frozen=True)
class OpenedDataset:
  """A dataset ready to read.

  Attributes:
    info: its description.
    train: random-access sequence of training records {'image', 'label', ...}.
    test: the same for the test split.
  """

  info: DatasetInfo
  train: Any
  test: Any


# ----------------------------------------------------------------------------- the config


def _as_dict(cfg: Any, what: str) -> dict:
  """A ConfigDict or mapping as a plain dict (None: empty), without the None-valued fields."""
  if cfg is None:
    return {}
  if hasattr(cfg, 'to_dict'):
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise ValueError(f'{what} must be a ConfigDict or a mapping, got {common.show(cfg)}')
  # None stands for "the default" (the placeholders' value), so a None field is a missing one.
  return {k: v for k, v in cfg.items() if v is not None}


def complete(data_config: Any) -> ml_collections.ConfigDict:
  """The data config with every field, the missing ones filled with their defaults.

  The defaults are ``pemn_jax.configs.common.base_config().data`` (nothing else in the data
  package holds one). A field set to None counts as missing; ``augment_options`` is completed
  field by field. Unknown fields are kept (and rejected where they are read).

  Args:
    data_config: the ``config.data`` ConfigDict, a mapping with some of its fields, or None.

  Returns:
    A new ConfigDict; ``data_config`` is not changed.
  """
  fields = common.base_config().data.to_dict()
  given = _as_dict(data_config, 'the data config')
  options = _as_dict(given.pop('augment_options', None), 'data.augment_options')
  fields.update(given)
  fields['augment_options'].update(options)
  return ml_collections.ConfigDict(fields)


def validate(data_config: Any) -> ml_collections.ConfigDict:
  """The completed data config (``complete``), after checking every field; opens nothing.

  Raises:
    ValueError: one line naming the field and what is allowed.
  """
  from pemn_jax.data import augment  # NumPy only; no TFDS

  cfg = complete(data_config)
  if not isinstance(cfg.name, str) or not cfg.name:
    raise ValueError(f'data.name must be a non-empty string, got {common.show(cfg.name)}')
  for field in ('data_dir', 'source_dir', 'source_path'):
    common.check_path(cfg[field], f'data.{field}')
  if cfg.augment is not None and not isinstance(cfg.augment, bool | np.bool_):
    raise ValueError(
      f'data.augment must be True, False or None (the dataset default), got '
      f'{common.show(cfg.augment)}'
    )
  common.check_int(cfg.prefetch, 'data.prefetch', 0, common.MAX_PREFETCH)
  options = cfg.augment_options.to_dict()
  allowed = {f.name for f in dataclasses.fields(augment.AugmentOptions)}
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise ValueError(
      f'data.augment_options has unknown fields {unknown}; allowed: {sorted(allowed)}'
    )
  augment.AugmentOptions(**options)  # checks each field, naming it
  return cfg


def default_cache_dir() -> str:
  """Where our builders prepare when ``data.data_dir`` is unset.

  Returns:
    ``$XDG_CACHE_HOME/pemn_jax/tensorflow_datasets`` (default ``~/.cache/...``).
  """
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'pemn_jax', 'tensorflow_datasets')


# ----------------------------------------------------------------------------- resolution


def _catalogue_builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds

  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f'data.name={name!r} is not a dataset pemn-jax knows: use one of {OWN_DATASETS} or a '
      f'TFDS catalogue name prepared as array_record in data.data_dir ({data_dir or "the"} '
      f'TFDS default). TFDS said: {str(e).splitlines()[0]}'
    ) from None


def _not_prepared_message(name: str, data_dir: str | None, builder) -> str:
  from pemn_jax.data import builders

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
  from pemn_jax.data import builders

  try:
    return builder.as_data_source(split='train'), builder.as_data_source(split='test')
  except Exception as e:  # TFDS raises assorted types for "not there" / "wrong format"
    splits = list(builder.info.splits.keys()) if builders.is_prepared(builder) else []
    if splits and not {'train', 'test'} <= set(splits):
      raise ValueError(
        f"data.name={name!r} has splits {splits}; pemn-jax needs 'train' and 'test'"
      ) from e
    raise FileNotFoundError(_not_prepared_message(name, data_dir, builder)) from e


def _local_fashion_builder(name: str, cfg: dict, data_dir: str):
  from pemn_jax.data import builders

  source_dir = cfg['source_dir']
  if source_dir is None:
    source_dir = builders.DEFAULT_FASHION_MNIST_DIR
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


def _cifar10_jpeg_builder(cfg: dict, data_dir: str):
  from pemn_jax.data import builders

  source_path = cfg['source_path'] or os.environ.get(builders.CIFAR10_NPZ_ENV)
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


def _resolve_builder(cfg: dict):
  """(builder, data_dir as used, is_catalogue) for the ``_OPEN_FIELDS`` of a completed config."""
  import tensorflow_datasets as tfds

  from pemn_jax.data import builders

  name = cfg['name']
  if not isinstance(name, str) or not name:
    raise ValueError(f'data.name must be a non-empty string, got {name!r}')
  data_dir = cfg['data_dir']
  data_dir = os.path.expanduser(str(data_dir)) if data_dir else None
  own_dir = data_dir or default_cache_dir()
  if name == 'fashion_mnist_embedded':
    make = lambda: builders.FashionMnistEmbedded(data_dir=own_dir)
    return builders.prepare_builder(make, own_dir), own_dir, False
  if name == 'fashion_mnist' and cfg['source_dir'] is None:
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


# ----------------------------------------------------------------------------- opening


def _estimate_stats(source, shape) -> tuple[tuple[float, ...], tuple[float, ...]]:
  n = min(len(source), _STATS_SAMPLE)
  x = np.stack([np.asarray(source[i]['image']) for i in range(n)]).astype(np.float64) / 255.0
  x = x.reshape(-1, shape[-1])
  return tuple(float(v) for v in x.mean(0)), tuple(float(max(v, 1e-6)) for v in x.std(0))


@functools.lru_cache(maxsize=16)
def _open_cached(key: tuple) -> OpenedDataset:
  cfg = dict(key)
  name = cfg['name']
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
  augment = cfg['augment']
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
  return OpenedDataset(info=info, train=train, test=test)


def open_dataset(data_config: Any) -> OpenedDataset:
  """The configured dataset, prepared if needed and opened (cached per process).

  Args:
    data_config: the ``config.data`` ConfigDict (or a mapping with some of its fields).

  Returns:
    Its ``OpenedDataset``.

  Raises:
    ValueError, FileNotFoundError: as ``prepare``.
  """
  cfg = validate(data_config)
  return _open_cached(tuple((f, cfg[f]) for f in _OPEN_FIELDS))


def clear_cache() -> None:
  """Forgets opened datasets (they are cached per process by their config fields).

  Tests use it between ``tfds.testing.mock_data`` contexts; a trainer never needs it.
  """
  _open_cached.cache_clear()


# ----------------------------------------------------------------------------- public API


def prepare(data_config: Any) -> DatasetInfo:
  """Prepares the configured dataset if needed (lock-guarded) and describes it.

  Args:
    data_config: the ``config.data`` ConfigDict (or a mapping with some of its fields).

  Returns:
    The dataset's ``DatasetInfo``.

  Raises:
    ValueError: unknown ``data.name``, missing ``data.source_path``, bad ``data.augment``.
    FileNotFoundError: source files or a prepared catalogue dataset are absent (the message
        names the config field and what to do).
  """
  return open_dataset(data_config).info


def get_dataset_info(data_config: Any) -> DatasetInfo:
  """Describes the configured dataset (preparing it first if needed).

  Args:
    data_config: the ``config.data`` ConfigDict.

  Returns:
    Its ``DatasetInfo``.
  """
  return prepare(data_config)


def image_shape(data_config: Any) -> tuple[int, int, int]:
  """(H, W, C) of the configured dataset's images.

  Args:
    data_config: the ``config.data`` ConfigDict (or a mapping with some of its fields, or None
        for the default dataset).

  Returns:
    ``IMAGE_SHAPES[data.name]`` for the datasets we know (nothing is opened or imported);
    otherwise the opened dataset's ``image_shape`` (which prepares it if needed).
  """
  name = validate(data_config).name
  if name in IMAGE_SHAPES:
    return IMAGE_SHAPES[name]
  return tuple(get_dataset_info(data_config).image_shape)
