"""TFDS builders for the project's local datasets, prepared TF-free into array_record.

Three ``tfds.core.GeneratorBasedBuilder`` subclasses turn local files into TFDS datasets:

| builder (TFDS name)      | source                                                       |
|--------------------------|--------------------------------------------------------------|
| ``fashion_mnist_embedded`` | the Fashion-MNIST subset shipped in ``pemn_jax/data_files/``   |
| ``fashion_mnist_local``    | the four official Fashion-MNIST IDX files in a directory     |
| ``cifar10_jpeg``           | ``cifar10_jpeg_q75.npz`` (CIFAR-10 as JPEGs, docs/data.md)  |

Why this works without TensorFlow: images are stored as `tfds.features.Tensor(shape=(H, W, C),
dtype=uint8)` (the ``Image`` feature would need ``tf.image.encode_png`` to write), labels as
``ClassLabel``, and the files are written with ``file_format='array_record'``, whose writer and
reader (``array_record``, ``builder.as_data_source()``) need no TensorFlow. Records keep the order
of the source files (``disable_shuffling``): record i of a split is example i of the source file.

TFDS writes into an ``incomplete.*`` directory and renames it only after ``dataset_info.json`` is
written, so a reader never sees a half-written dataset; two processes preparing at once would still
race on that rename, so ``prepare_builder`` serialises preparation with an exclusive ``fcntl`` file
lock in the data dir and re-checks under the lock (the second process finds the dataset ready and
only reads it).

The IDX reader/writer here is also used by ``experiments/make_embedded_dataset.py``, so the shipped
subset and the full official files go through one code path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import importlib.resources
import io
import os
import pathlib
import re
import shutil
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

FASHION_MNIST_CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

# Official file names (the Debian package ships them gzipped, as Zalando publishes them).
IDX_FILES = {
  'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
  'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
DEFAULT_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
CIFAR10_NPZ_ENV = 'PEMN_CIFAR10_NPZ'
CIFAR10_NPZ_KEYS = ("train_bytes", "train_offsets", "test_bytes", "test_offsets",
                    "y_train", "y_test")  # fmt: skip

_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes


def embedded_source_dir() -> pathlib.Path:
  """Directory of the Fashion-MNIST subset shipped inside the package.

  Returns:
    Path of ``pemn_jax/data_files/fashion_mnist_subset``.
  """
  root = importlib.resources.files('pemn_jax') / 'data_files' / 'fashion_mnist_subset'
  return pathlib.Path(str(root))


# ----------------------------------------------------------------------------- IDX files


def _open_maybe_gzip(path: pathlib.Path):
  return gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST / Fashion-MNIST format), gzipped or not.

  Args:
    path: file path; a ``.gz`` suffix means gzip-compressed.

  Returns:
    uint8 array with the shape stored in the header (e.g. (N, 28, 28) or (N,)).

  Raises:
    ValueError: the header is not an unsigned-byte IDX header or the size does not match.
  """
  path = pathlib.Path(path)
  try:
    with _open_maybe_gzip(path) as f:
      data = f.read()
  except FileNotFoundError:
    raise
  except (OSError, EOFError, zlib.error) as e:  # a truncated or non-gzip .gz, a directory
    kind = 'gzipped IDX file' if path.suffix == '.gz' else 'IDX file'
    raise ValueError(f'{path} is not a readable {kind}: {_first_line(e)}') from None
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
    raise ValueError(f'{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r})')
  ndim = data[3]
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise ValueError(
      f'{path} is truncated: its {ndim}-d header needs {offset} bytes, the file has {len(data)}'
    )
  shape = struct.unpack(f'>{ndim}I', data[4:offset])
  array = np.frombuffer(data, dtype=np.uint8, offset=offset)
  if array.size != int(np.prod(shape)):
    raise ValueError(
      f'{path} is truncated or corrupt: its header says shape {shape} '
      f'({int(np.prod(shape)):,} bytes of data) but it holds {array.size:,}'
    )
  return array.reshape(shape)


def _first_line(e: BaseException) -> str:
  text = re.sub(r' <_io\.\w+ object at 0x[0-9a-f]+>', '', str(e)).strip()  # no addresses
  return text.splitlines()[0] if text else type(e).__name__


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file, gzip-compressed deterministically if ``.gz``.

  The gzip header carries no file name and mtime 0, so the same array always gives the same
  bytes (for a given zlib).

  Args:
    path: output file; a ``.gz`` suffix means gzip-compressed (level 9).
    array: uint8 array of any rank (1..255).
  """
  array = np.ascontiguousarray(array, dtype=np.uint8)
  header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  payload = header + array.tobytes()
  path = pathlib.Path(path)
  if path.suffix == '.gz':
    payload = gzip.compress(payload, compresslevel=9, mtime=0)
  path.write_bytes(payload)


def read_idx_split(source_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split of an IDX dataset directory.

  Args:
    source_dir: directory holding the four official file names (see ``IDX_FILES``).
    split: 'train' or 'test'.

  Returns:
    (images uint8 (N, 28, 28, 1), labels uint8 (N,)).

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: a file is not a readable IDX file (naming it), the images are not 28x28, the
      labels are not in 0..9, or images and labels disagree in count.
  """
  source_dir = pathlib.Path(source_dir)
  image_name, label_name = IDX_FILES[split]
  images = read_idx(source_dir / image_name)
  labels = read_idx(source_dir / label_name)
  if images.ndim != 3 or images.shape[1:] != (28, 28):
    raise ValueError(f'{source_dir / image_name}: images of shape {images.shape}, not (N, 28, 28)')
  if labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(
      f'{source_dir / label_name}: {split} labels {labels.shape} do not match the '
      f'{len(images)} images of {image_name}'
    )
  _check_labels(labels, len(FASHION_MNIST_CLASSES), source_dir / label_name)
  return images[..., None], labels


def _check_labels(labels: np.ndarray, num_classes: int, where) -> None:
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    i = int(bad[0])
    raise ValueError(
      f'{where}: label {labels[i]} at index {i} is out of range 0..{num_classes - 1} '
      f'({bad.size} such labels)'
    )


def missing_idx_files(source_dir: str | os.PathLike) -> list[str]:
  """Lists the official IDX file names absent from a directory.

  Args:
    source_dir: directory to check.

  Returns:
    The missing file names (empty when all four are there).
  """
  source_dir = pathlib.Path(source_dir)
  names = [name for pair in IDX_FILES.values() for name in pair]
  return [name for name in names if not (source_dir / name).is_file()]


# ----------------------------------------------------------------------------- builders


def _image_label_features(shape: tuple[int, int, int], classes: tuple[str, ...]):
  return tfds.features.FeaturesDict(
    {
      # Tensor, not Image: Image would need TensorFlow to encode PNG at prepare time.
      'image': tfds.features.Tensor(shape=shape, dtype=np.uint8),
      'label': tfds.features.ClassLabel(names=list(classes)),
    }
  )


class _IdxBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common part of the two Fashion-MNIST builders: IDX files in a directory."""

  VERSION = tfds.core.Version('1.0.0')
  _DESCRIPTION = ''

  def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
    self._source_dir = pathlib.Path(source_dir or self._default_source_dir())
    super().__init__(**kwargs)

  def _default_source_dir(self) -> pathlib.Path:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self._DESCRIPTION,
      features=_image_label_features((28, 28, 1), FASHION_MNIST_CLASSES),
      supervised_keys=('image', 'label'),
      disable_shuffling=True,  # records in source-file order (the pipeline shuffles)
      homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded: the files are local
    return {split: self._generate_examples(split) for split in ('train', 'test')}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    images, labels = read_idx_split(self._source_dir, split)
    for i in range(len(labels)):
      yield i, {'image': images[i], 'label': int(labels[i])}


class FashionMnistEmbedded(_IdxBuilder):
  """The Fashion-MNIST subset shipped in the package (10,000 train / 2,000 test)."""

  # Bump when the shipped subset changes, so cached preparations are rebuilt.
  VERSION = tfds.core.Version('1.0.0')
  _DESCRIPTION = (
    'Class-balanced subset of Fashion-MNIST shipped with pemn-jax: the first 1,000 training '
    'and first 200 test images of each class, in file order (see PROVENANCE.md).'
  )

  def _default_source_dir(self) -> pathlib.Path:
    return embedded_source_dir()


class FashionMnistLocal(_IdxBuilder):
  """Full Fashion-MNIST (60,000 / 10,000) from the official IDX files in a local directory."""

  _DESCRIPTION = 'Fashion-MNIST from the official IDX files (e.g. Debian dataset-fashion-mnist).'

  def _default_source_dir(self) -> pathlib.Path:
    return pathlib.Path(DEFAULT_FASHION_MNIST_DIR)


class Cifar10Jpeg(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 from the JPEG-q75 mirror npz, decoded with Pillow at prepare time."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, source_path: str | os.PathLike | None = None, **kwargs):
    self._source_path = source_path or os.environ.get(CIFAR10_NPZ_ENV)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(
        'CIFAR-10 (JPEG-q75 mirror): the official split, each image decoded from the '
        'quality-75 JPEG of the public mirror. Not byte-identical to CIFAR-10.'
      ),
      features=_image_label_features((32, 32, 3), CIFAR10_CLASSES),
      supervised_keys=('image', 'label'),
      disable_shuffling=True,  # records in source-file order (the pipeline shuffles)
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._source_path:
      raise ValueError(f'cifar10_jpeg needs the npz: set data.source_path or ${CIFAR10_NPZ_ENV}')
    arrays = read_cifar10_npz(self._source_path)
    return {
      split: self._generate_examples(
        split, arrays[f'{split}_bytes'], arrays[f'{split}_offsets'], arrays[f'y_{split}']
      )
      for split in ('train', 'test')
    }

  def _generate_examples(self, split, blob, offsets, labels) -> Iterator[tuple[int, dict]]:
    from PIL import Image

    for i in range(len(labels)):
      a, b = int(offsets[i]), int(offsets[i + 1])
      try:
        with Image.open(io.BytesIO(blob[a:b].tobytes())) as im:
          image = np.asarray(im.convert('RGB'), dtype=np.uint8)
      except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(
          f'{self._source_path}: {split} image {i} ({split}_bytes[{a}:{b}]) is not a '
          f'decodable JPEG: {_first_line(e)}'
        ) from None
      if image.shape != (32, 32, 3):
        raise ValueError(
          f'{self._source_path}: {split} image {i} is {image.shape[1]}x{image.shape[0]}, '
          'not the 32x32 of CIFAR-10'
        )
      yield i, {'image': image, 'label': int(labels[i])}


# What numpy raises for a file that is not an npz (or one cut short): numpy's own message for
# a non-zip file advises loading it as a pickle, which is never what is wanted here.
_NPZ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)


def _npz_error(path, e: BaseException) -> ValueError:
  reason = _first_line(e)
  if 'pickle' in reason:
    reason = 'it is neither a zip archive of .npy arrays nor a .npy file'
  return ValueError(
    f'{path} is not a valid npz file ({reason}); data.source_path must be the CIFAR-10 JPEG '
    f'npz (keys {", ".join(CIFAR10_NPZ_KEYS)})'
  )


def read_cifar10_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of the CIFAR-10 JPEG npz, after checking they describe a dataset.

  Args:
    path: the npz (``data.source_path``).

  Returns:
    ``{key: array}`` for ``CIFAR10_NPZ_KEYS``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: one line naming the file and what is wrong: not an npz (random bytes, cut
      short), a key missing, offsets that do not cut the bytes into one JPEG per label, labels
      out of 0..9.
  """
  try:
    npz = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise
  except _NPZ_ERRORS as e:
    raise _npz_error(path, e) from None
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f'{path} holds one .npy array, not the npz archive of CIFAR10_NPZ_KEYS')
  with npz:
    missing = [k for k in CIFAR10_NPZ_KEYS if k not in npz.files]
    if missing:
      raise ValueError(f'{path} lacks the npz keys {missing}')
    try:
      arrays = {k: npz[k] for k in CIFAR10_NPZ_KEYS}
    except _NPZ_ERRORS as e:  # a member cut short or corrupt
      raise _npz_error(path, e) from None
  for split in ('train', 'test'):
    keys = (f'{split}_bytes', f'{split}_offsets', f'y_{split}')
    blob, offsets, labels = (arrays[k] for k in keys)
    if blob.ndim != 1 or blob.dtype != np.uint8:
      raise ValueError(f'{path}: {split}_bytes must be 1-d uint8, got {blob.dtype} {blob.shape}')
    for key, a in ((f'{split}_offsets', offsets), (f'y_{split}', labels)):
      if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f'{path}: {key} must be a 1-d integer array, got {a.dtype} {a.shape}')
    if len(offsets) != len(labels) + 1:
      raise ValueError(
        f'{path}: {split}_offsets has {len(offsets)} entries, y_{split} {len(labels)} labels; '
        f'there must be one offset more than labels (one JPEG per label)'
      )
    if len(offsets) and (
      offsets[0] < 0 or offsets[-1] > len(blob) or np.any(np.diff(offsets.astype(np.int64)) < 0)
    ):
      raise ValueError(
        f'{path}: {split}_offsets must rise from >= 0 to at most the {len(blob):,} bytes of '
        f'{split}_bytes, got {offsets[0]} .. {offsets[-1]}'
      )
    _check_labels(labels, len(CIFAR10_CLASSES), f'{path}: y_{split}')
  return arrays


# ----------------------------------------------------------------------------- preparation


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout_s: float = 3600.0):
  """Holds an exclusive advisory lock on ``path`` (created if absent) for the block.

  Works across processes on one machine (and on file systems with working ``flock``).

  Args:
    path: lock file path.
    timeout_s: give up with TimeoutError after this long.

  Yields:
    None, while the lock is held.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'a') as f:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise TimeoutError(f'could not lock {path} within {timeout_s} s') from None
        time.sleep(0.1)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether the builder's version dir holds a finished preparation.

  TFDS renames its ``incomplete.*`` dir into place only after writing both JSON files, so their
  presence means the dataset is complete. (Same test as ``builder.is_prepared()``, without its
  warning about an absent folder.)

  Args:
    builder: a TFDS builder bound to a data dir.

  Returns:
    True when ``dataset_info.json`` and ``features.json`` exist in ``builder.data_path``.
  """
  path = pathlib.Path(os.fspath(builder.data_path))
  return (path / 'dataset_info.json').is_file() and (path / 'features.json').is_file()


def prepare_builder(make_builder, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """Prepares a builder into ``data_dir`` as array_record once, safely across processes.

  Args:
    make_builder: zero-argument callable returning a fresh builder bound to ``data_dir``
        (called again under the lock, because a builder made before another process
        finished preparing does not see the new files).
    data_dir: the TFDS data dir (holds the lock file).

  Returns:
    A builder whose dataset is prepared and readable with ``as_data_source()``.
  """
  builder = make_builder()
  if is_prepared(builder):
    return builder
  lock = pathlib.Path(data_dir) / f'.{builder.name}-{builder.version}.prepare.lock'
  try:
    with file_lock(lock):
      builder = make_builder()
      if not is_prepared(builder):
        _remove_incomplete(builder)  # left by a process killed while preparing
        try:
          builder.download_and_prepare(
            file_format='array_record',
            download_config=tfds.download.DownloadConfig(
              download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
            ),
          )
        except BaseException:
          _remove_incomplete(builder)  # nothing half-written stays behind
          raise
        builder = make_builder()
  except OSError as e:
    if not _is_data_dir_error(e, data_dir):
      raise
    raise ValueError(
      f'data.data_dir={data_dir}: cannot prepare {builder.name} there '
      f'({e.strerror or _first_line(e)}{f": {e.filename}" if e.filename else ""}); set '
      'data.data_dir to a writable directory with free space. Nothing was prepared.'
    ) from None
  return builder


def _remove_incomplete(builder: tfds.core.DatasetBuilder) -> None:
  """Removes the builder's ``incomplete.*`` TFDS preparation dirs (call under the lock)."""
  parent = pathlib.Path(os.fspath(builder.data_path)).parent
  for tmp in parent.glob('incomplete.*'):
    shutil.rmtree(tmp, ignore_errors=True)


def _is_data_dir_error(e: OSError, data_dir) -> bool:
  """Whether ``e`` is about writing into ``data_dir`` (not, say, a missing source file)."""
  if e.filename:
    root = os.path.abspath(os.fspath(data_dir))
    return os.path.abspath(os.fspath(e.filename)).startswith(root)
  return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
