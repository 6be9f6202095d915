"""Broken input files: each is refused in one line naming the file and what is wrong, and a
failed preparation leaves nothing that later reads as a prepared dataset.

The files are built in temporary directories: the CIFAR-10 JPEG npz (truncated, random bytes,
a bad JPEG, labels out of range or of the wrong length, offsets past the bytes) and the
Fashion-MNIST IDX files (truncated, not gzip, labels out of range, counts that disagree).
"""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from pemn_jax import fileio
from pemn_jax.configs import common
from pemn_jax.data import builders, sources


@pytest.fixture(autouse=True)
def _fresh_cache():
  sources.clear_cache()
  yield
  sources.clear_cache()


def _jpeg(rng, size=32) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format='JPEG')
  return np.frombuffer(buf.getvalue(), np.uint8)


def cifar_arrays(n_train=6, n_test=3) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  out = {}
  for split, n in (('train', n_train), ('test', n_test)):
    blobs = [_jpeg(rng) for _ in range(n)]
    out[f'{split}_bytes'] = np.concatenate(blobs)
    out[f'{split}_offsets'] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
    out[f'y_{split}'] = (np.arange(n) % 10).astype(np.uint8)
  return out


def write_npz(path: pathlib.Path, **changes) -> pathlib.Path:
  arrays = cifar_arrays()
  arrays.update(changes)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


def one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
  text = str(e.value)
  assert '\n' not in text, text
  for part in parts:
    assert part in text, text
  return text


def cifar_cfg(tmp_path, source: pathlib.Path):
  cfg = common.base_config().data
  cfg.name, cfg.data_dir, cfg.source_path = 'cifar10_jpeg', str(tmp_path / 'tfds'), str(source)
  return cfg


def assert_nothing_prepared(data_dir: pathlib.Path, name: str) -> None:
  assert not list(data_dir.glob('**/incomplete*')), list(data_dir.rglob('*'))
  assert not list(data_dir.glob(f'{name}/*/dataset_info.json'))


# ----------------------------------------------------------------------------- the npz


def _truncated(tmp_path):
  good = write_npz(tmp_path / 'good.npz')
  path = tmp_path / 'bad.npz'
  path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  return path


def _random_bytes(tmp_path):
  path = tmp_path / 'bad.npz'
  path.write_bytes(np.random.default_rng(1).bytes(4096))
  return path


def _corrupt_member(tmp_path):
  good = write_npz(tmp_path / 'good.npz')
  raw = bytearray(good.read_bytes())
  raw[200:260] = bytes(60)  # inside the first member: its data no longer matches its CRC
  path = tmp_path / 'bad.npz'
  path.write_bytes(bytes(raw))
  return path


def _one_npy(tmp_path):
  path = tmp_path / 'bad.npz'
  with open(path, 'wb') as f:
    np.save(f, np.zeros(3))
  return path


NPZ_CASES = {
  'truncated': (_truncated, 'is not a valid npz file'),
  'random-bytes': (_random_bytes, 'is not a valid npz file (it is neither a zip archive'),
  'corrupt-member': (_corrupt_member, 'is not a valid npz file'),
  'one-npy-array': (_one_npy, 'holds one .npy array'),
  'missing-key': (
    lambda t: write_npz(t / 'bad.npz', y_test=None),
    "lacks the npz keys ['y_test']",
  ),
  'label-out-of-range': (
    lambda t: write_npz(t / 'bad.npz', y_train=np.array([0, 1, 2, 12, 4, 5], np.uint8)),
    'y_train: label 12 at index 3 is out of range 0..9',
  ),
  'labels-too-few': (
    lambda t: write_npz(t / 'bad.npz', y_test=np.array([0, 1], np.uint8)),
    'test_offsets has 4 entries, y_test 2 labels',
  ),
  'labels-not-integers': (
    lambda t: write_npz(t / 'bad.npz', y_test=np.array([0.0, 1.0, 2.0])),
    'y_test must be a 1-d integer array',
  ),
  'offsets-past-the-bytes': (
    lambda t: write_npz(t / 'bad.npz', test_offsets=np.array([0, 10, 20, 10**9])),
    'test_offsets must rise from >= 0 to at most the',
  ),
  'offsets-falling': (
    lambda t: write_npz(t / 'bad.npz', test_offsets=np.array([0, 900, 10, 1000])),
    'test_offsets must rise',
  ),
}


@pytest.mark.parametrize('case', list(NPZ_CASES))
def test_bad_npz_is_one_line_naming_the_file(tmp_path, case):
  make, message = NPZ_CASES[case]
  path = make(tmp_path)
  with pytest.raises(ValueError) as e:
    builders.read_cifar10_npz(path)
  text = one_line(e, str(path), message)
  assert 'allow_pickle' not in text and 'unsafely' not in text


def test_a_good_npz_reads(tmp_path):
  arrays = builders.read_cifar10_npz(write_npz(tmp_path / 'good.npz'))
  assert set(arrays) == set(builders.CIFAR10_NPZ_KEYS) and len(arrays['y_train']) == 6


def _bad_jpeg(tmp_path):
  arrays = cifar_arrays()
  blob = arrays['test_bytes'].copy()
  a, b = arrays['test_offsets'][1:3]
  blob[a:b] = 7  # the second test image is no JPEG
  return write_npz(tmp_path / 'bad.npz', test_bytes=blob), 'test image 1 ('


def _small_jpeg(tmp_path):
  arrays = cifar_arrays()
  rng = np.random.default_rng(2)
  blobs = [_jpeg(rng, 16)] + [
    arrays['test_bytes'][arrays['test_offsets'][i] : arrays['test_offsets'][i + 1]] for i in (1, 2)
  ]
  offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
  path = write_npz(tmp_path / 'bad.npz', test_bytes=np.concatenate(blobs), test_offsets=offsets)
  return path, 'test image 0 is 16x16, not the 32x32 of CIFAR-10'


@pytest.mark.parametrize(
  'make, message',
  [
    (_bad_jpeg, 'is not a decodable JPEG'),
    (_small_jpeg, ''),
    (_truncated, 'is not a valid npz file'),
    (lambda t: write_npz(t / 'bad.npz', y_train=np.full(6, 10, np.uint8)), 'out of range 0..9'),
  ],
  ids=['bad-jpeg', 'small-jpeg', 'truncated', 'bad-labels'],
)
def test_failed_cifar_preparation_leaves_nothing_prepared(tmp_path, make, message):
  made = make(tmp_path)
  path, where = made if isinstance(made, tuple) else (made, '')
  cfg = cifar_cfg(tmp_path, path)
  with pytest.raises(ValueError) as e:
    sources.prepare(cfg)
  one_line(e, str(path), where, message)
  assert_nothing_prepared(tmp_path / 'tfds', 'cifar10_jpeg')
  # the same data dir prepares from a good npz afterwards (nothing stale is in the way)
  sources.clear_cache()
  cfg.source_path = str(write_npz(tmp_path / 'good.npz'))
  info = sources.prepare(cfg)
  assert (info.num_train, info.num_test) == (6, 3)


# ----------------------------------------------------------------------------- IDX files


def idx_dir(tmp_path) -> pathlib.Path:
  """A copy of the shipped Fashion-MNIST subset (the four official file names)."""
  d = tmp_path / 'idx'
  shutil.copytree(builders.embedded_source_dir(), d)
  return d


def _gz_payload(path: pathlib.Path) -> bytes:
  return gzip.decompress(path.read_bytes())


IDX_CASES = {
  'truncated-gzip': (
    lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    'is not a readable gzipped IDX file: Compressed file ended',
  ),
  'not-gzip': (lambda f: f.write_bytes(b'plain bytes'), 'is not a readable gzipped IDX file'),
  'truncated-header': (
    lambda f: f.write_bytes(gzip.compress(_gz_payload(f)[:6])),
    'is truncated: its 3-d header needs 16 bytes, the file has 6',
  ),
  'truncated-payload': (
    lambda f: f.write_bytes(gzip.compress(_gz_payload(f)[:1000])),
    'is truncated or corrupt: its header says shape (10000, 28, 28)',
  ),
  'bad-magic': (lambda f: f.write_bytes(gzip.compress(b'\x01\x02\x03\x04')), 'bad magic'),
}


@pytest.mark.parametrize('case', list(IDX_CASES))
def test_bad_idx_is_one_line_naming_the_file(tmp_path, case):
  spoil, message = IDX_CASES[case]
  f = idx_dir(tmp_path) / 'train-images-idx3-ubyte.gz'
  spoil(f)
  with pytest.raises(ValueError) as e:
    builders.read_idx(f)
  one_line(e, str(f), message)


def test_idx_labels_out_of_range_and_counts_that_disagree(tmp_path):
  d = idx_dir(tmp_path)
  labels = d / 't10k-labels-idx1-ubyte.gz'
  good = builders.read_idx(labels)
  bad = good.copy()
  bad[5] = 42
  builders.write_idx(labels, bad)
  with pytest.raises(ValueError) as e:
    builders.read_idx_split(d, 'test')
  one_line(e, str(labels), 'label 42 at index 5 is out of range 0..9')
  builders.write_idx(labels, good[:-1])
  with pytest.raises(ValueError) as e:
    builders.read_idx_split(d, 'test')
  one_line(e, str(labels), 'do not match the 2000 images')
  builders.write_idx(labels, good)
  images = d / 't10k-images-idx3-ubyte.gz'
  builders.write_idx(images, builders.read_idx(images)[:, :27, :27])
  with pytest.raises(ValueError) as e:
    builders.read_idx_split(d, 'test')
  one_line(e, str(images), 'not (N, 28, 28)')


def test_failed_idx_preparation_leaves_nothing_prepared(tmp_path):
  d = idx_dir(tmp_path)
  f = d / 't10k-images-idx3-ubyte.gz'  # the test split: the train split is written first
  good = f.read_bytes()
  f.write_bytes(good[: len(good) // 2])
  cfg = common.base_config().data
  cfg.name, cfg.data_dir, cfg.source_dir = 'fashion_mnist_local', str(tmp_path / 'tfds'), str(d)
  with pytest.raises(ValueError) as e:
    sources.prepare(cfg)
  one_line(e, str(f), 'is not a readable gzipped IDX file')
  assert_nothing_prepared(tmp_path / 'tfds', 'fashion_mnist_local')
  sources.clear_cache()
  f.write_bytes(good)
  assert sources.prepare(cfg).num_test == 2000


# ----------------------------------------------------------------------------- the data dir


def test_stale_incomplete_preparation_is_removed(tmp_path):
  # a process killed while preparing leaves TFDS's incomplete.* dir behind
  stale = tmp_path / 'tfds' / 'fashion_mnist_embedded' / 'incomplete.ABC123_1.0.0'
  stale.mkdir(parents=True)
  (stale / 'fashion_mnist_embedded-train.array_record-00000-of-00001').write_bytes(b'half')
  cfg = common.base_config().data
  cfg.name, cfg.data_dir = 'fashion_mnist_embedded', str(tmp_path / 'tfds')
  assert sources.prepare(cfg).num_train == 10_000
  assert not stale.exists()


def test_data_dir_that_cannot_be_written_is_one_line(tmp_path):
  f = tmp_path / 'file'
  f.write_text('x')
  cfg = common.base_config().data
  cfg.name, cfg.data_dir = 'fashion_mnist_embedded', str(f / 'tfds')
  with pytest.raises(ValueError) as e:
    sources.prepare(cfg)
  one_line(e, f'data.data_dir={f}/tfds: cannot prepare fashion_mnist_embedded there', 'Not a')
  assert f.read_text() == 'x'


def test_failed_atomic_write_leaves_no_temporary_file(tmp_path):
  target = tmp_path / 'out.json'
  target.write_text('old')
  with pytest.raises(TypeError):
    fileio.atomic_write(target, 12345)  # not bytes: the write fails
  assert sorted(os.listdir(tmp_path)) == ['out.json']
  assert target.read_text() == 'old'
