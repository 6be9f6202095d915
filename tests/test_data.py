"""Tests of the data layer: TF-free TFDS builders, dataset sources, batches, augmentation.

The embedded Fashion-MNIST subset is prepared once per test session into a temporary data dir;
TFDS catalogue datasets are driven by ``tfds.testing.mock_data`` (whose data sources work for
``as_data_source``, with unknown split sizes, so the pipeline counts examples with ``len(source)``).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageOps

from pemn_jax.configs import common
from pemn_jax.data import augment as A
from pemn_jax.data import builders, pipeline, sources
from pemn_jax.data import image_ops as ops

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(**fields):
  cfg = common.base_config().data
  cfg.name = 'fashion_mnist_embedded'
  cfg.prefetch = 1
  for k, v in fields.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(autouse=True)
def _fresh_cache():
  sources.clear_cache()
  yield
  sources.clear_cache()


@pytest.fixture(scope='session')
def embedded_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  sources.prepare(_cfg(data_dir=data_dir))
  return data_dir


def _all(it):
  return [dict(b) for b in it]


# ----------------------------------------------------------------------------- builders


def test_idx_round_trip(tmp_path):
  x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  for name in ('a.gz', 'b'):
    builders.write_idx(tmp_path / name, x)
    np.testing.assert_array_equal(builders.read_idx(tmp_path / name), x)
  # deterministic bytes (mtime 0 in the gzip header)
  builders.write_idx(tmp_path / 'c.gz', x)
  assert (tmp_path / 'a.gz').read_bytes() == (tmp_path / 'c.gz').read_bytes()


def test_embedded_builder_prepares_and_reads(embedded_dir):
  assert 'tensorflow' not in sys.modules
  builder = builders.FashionMnistEmbedded(data_dir=embedded_dir)
  assert builders.is_prepared(builder)
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  splits = builder.as_data_source()
  assert len(splits['train']) == 10_000 and len(splits['test']) == 2_000
  example = splits['test'][7]
  assert example['image'].shape == (28, 28, 1) and example['image'].dtype == np.uint8
  labels = np.array([splits['test'][i]['label'] for i in range(len(splits['test']))])
  assert labels.min() == 0 and labels.max() == 9
  assert np.all(np.bincount(labels) == 200)  # class-balanced subset
  # records are the shipped IDX files, in file order
  images, idx_labels = builders.read_idx_split(builders.embedded_source_dir(), 'test')
  np.testing.assert_array_equal(idx_labels, labels)
  np.testing.assert_array_equal(example['image'], images[7])
  # nothing half-written left behind
  assert not list(pathlib.Path(embedded_dir).glob('**/incomplete*'))
  info = sources.get_dataset_info(_cfg(data_dir=embedded_dir))
  assert (info.num_train, info.num_test, info.num_classes) == (10_000, 2_000, 10)
  assert info.image_shape == (28, 28, 1) and info.augment is False


def test_embedded_set_needs_no_setup(tmp_path, monkeypatch):
  cfg = common.base_config().data
  assert cfg.name == 'cifar10_jpeg'  # the one default of data.name
  assert cfg.data_dir is None and cfg.source_dir is None and cfg.source_path is None
  assert cfg.augment is None
  cfg.name = 'fashion_mnist_embedded'  # every other field at its default
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  info = sources.prepare(cfg)  # prepared on first use into the user cache
  assert info.data_dir == str(tmp_path / 'pemn_jax' / 'tensorflow_datasets')
  assert (tmp_path / 'pemn_jax' / 'tensorflow_datasets' / 'fashion_mnist_embedded').is_dir()


def test_data_config_defaults_live_in_common():
  defaults = common.base_config().data
  # the recipe's switches in the config are AugmentOptions' defaults, field for field
  assert defaults.augment_options.to_dict() == dataclasses.asdict(A.AugmentOptions())
  assert defaults.prefetch == 2
  # a partial config (a test's, an older artifact's) is completed from there
  full = sources.complete({'name': 'mnist', 'augment_options': {'erase_prob': 0.5}})
  assert full.name == 'mnist' and full.prefetch == 2 and full.augment is None
  assert full.augment_options.erase_prob == 0.5 and full.augment_options.flip is True
  assert sources.complete(None).to_dict() == defaults.to_dict()
  assert sources.complete({'name': None}).name == 'cifar10_jpeg'  # None is the default
  # the command line reaches the nested switches
  cfg = common.with_overrides(
    common.base_config(), ['--config.data.augment_options.randaugment_magnitude=9']
  )
  options = pipeline._augment_options(sources.complete(cfg.data).augment_options)
  assert options == A.AugmentOptions(randaugment_magnitude=9)


def test_partial_config_batches_equal_full_config_batches(embedded_dir):
  partial = {'name': 'fashion_mnist_embedded', 'data_dir': embedded_dir, 'augment': True}
  full = _cfg(data_dir=embedded_dir, augment=True)
  args = dict(global_batch_size=16, seed=1, epoch=0, process_index=0, process_count=1)
  a = pipeline.train_batches(partial, **args)
  b = pipeline.train_batches(full, **args)
  for _ in range(2):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  a.close()
  b.close()


def test_image_shape_of_known_datasets_imports_no_tfds():
  code = (
    'import sys; from pemn_jax.data import sources; '
    "assert 'tensorflow_datasets' not in sys.modules; "
    "print(sources.image_shape({'name': 'cifar10'}), sources.image_shape({'name': 'mnist'}), "
    'sources.image_shape(None)); '
    "assert 'tensorflow_datasets' not in sys.modules"
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split('\n')[0] == '(32, 32, 3) (28, 28, 1) (32, 32, 3)'


def test_image_shape_of_other_datasets_opens_them():
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    # a catalogue dataset outside the table: its shape comes from its features
    assert sources.image_shape({'name': 'emnist'}) == (28, 28, 1)


def test_concurrent_preparation_from_two_processes(tmp_path):
  code = (
    'import sys; from pemn_jax.data import sources as p; '
    "i = p.prepare({'name': 'fashion_mnist_embedded', 'data_dir': sys.argv[1]}); "
    'print(i.num_train, i.num_test)'
  )
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', code, str(tmp_path)],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
    assert out.split()[-2:] == ['10000', '2000']
  # the lock let exactly one of them generate the dataset; the other only read it
  assert sum('Downloading and preparing' in out for out, _ in outs) == 1
  assert not list(tmp_path.glob('**/incomplete*'))
  assert len(list(tmp_path.glob('fashion_mnist_embedded/*/dataset_info.json'))) == 1


def _write_tiny_cifar_npz(path: pathlib.Path, n_train=12, n_test=5):
  rng = np.random.default_rng(0)
  out = {}
  decoded = {}
  for split, n in (('train', n_train), ('test', n_test)):
    blobs, images = [], []
    for _ in range(n):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        buf, format='JPEG', quality=75
      )
      blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
      images.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert('RGB')))
    out[f'{split}_bytes'] = np.concatenate(blobs)
    out[f'{split}_offsets'] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])])
    out[f'y_{split}'] = (np.arange(n) % 10).astype(np.uint8)
    out[f'names_{split}'] = np.array([f'{split}/{i}.jpg' for i in range(n)])
    decoded[split] = np.stack(images)
  out['classes'] = np.array(builders.CIFAR10_CLASSES)
  np.savez(path, **out)
  return decoded, out


def test_cifar10_jpeg_from_tiny_npz(tmp_path, monkeypatch):
  monkeypatch.delenv(builders.CIFAR10_NPZ_ENV, raising=False)
  decoded, raw = _write_tiny_cifar_npz(tmp_path / 'tiny.npz')
  cfg = _cfg(name="cifar10_jpeg", data_dir=str(tmp_path / "tfds"),
               source_path=str(tmp_path / "tiny.npz"))  # fmt: skip
  info = sources.prepare(cfg)
  assert (info.num_train, info.num_test, info.image_shape) == (12, 5, (32, 32, 3))
  assert info.augment is True and info.mean == (0.4914, 0.4822, 0.4465)
  # the test split read back in order equals Pillow's decoding of the JPEGs
  cfg.augment = False
  batches = _all(pipeline.eval_batches(cfg, global_batch_size=4, process_index=0,
                                         process_count=1))  # fmt: skip
  images = np.concatenate([b['image'] for b in batches])[:5]
  labels = np.concatenate([b['label'] for b in batches])[:5]
  expected = A.normalize(decoded['test'], info.mean, info.std)
  np.testing.assert_allclose(images, expected, atol=1e-5)
  np.testing.assert_array_equal(labels, raw['y_test'])
  # once prepared, the npz is no longer needed
  sources.clear_cache()
  (tmp_path / 'tiny.npz').unlink()
  assert sources.prepare(cfg).num_train == 12


# ----------------------------------------------------------------------------- pipeline


def _train(cfg, **kw):
  args = dict(global_batch_size=8, seed=3, epoch=0, process_index=0, process_count=1)
  args.update(kw)
  return _all(pipeline.train_batches(cfg, **args))


def test_mock_catalogue_dataset_train_and_eval():
  with tfds.testing.mock_data(num_examples=37, policy=tfds.testing.MockPolicy.USE_CODE):
    cfg = _cfg(name='mnist')
    info = sources.get_dataset_info(cfg)
    assert (info.num_train, info.num_test, info.image_shape) == (37, 37, (28, 28, 1))
    assert info.augment is False and info.std == (0.3081,)
    batches = _train(cfg, global_batch_size=8)
    assert len(batches) == pipeline.steps_per_epoch(info, 8) == 4  # 37 // 8, partial dropped
    for b in batches:
      assert b['image'].shape == (8, 28, 28, 1) and b['image'].dtype == np.float32
      assert b['label'].dtype == np.int32 and set(b) == {'image', 'label'}
    ev = _all(pipeline.eval_batches(cfg, global_batch_size=8, process_index=0,
                                        process_count=1))  # fmt: skip
    assert len(ev) == pipeline.eval_steps(info, 8) == 5
    assert sum(b['mask'].sum() for b in ev) == 37
    np.testing.assert_array_equal(ev[-1]['mask'], [1, 1, 1, 1, 1, 0, 0, 0])


def test_train_order_is_a_function_of_seed_and_epoch_and_splits_over_processes():
  with tfds.testing.mock_data(num_examples=50, policy=tfds.testing.MockPolicy.USE_CODE):
    cfg = _cfg(name='cifar10')  # colour: augmentation on by default
    assert sources.get_dataset_info(cfg).augment is True
    one = _train(cfg, global_batch_size=8, epoch=1)
    again = _train(cfg, global_batch_size=8, epoch=1)
    other_epoch = _train(cfg, global_batch_size=8, epoch=2)
    other_seed = _train(cfg, global_batch_size=8, epoch=1, seed=4)
    assert len(one) == 6
    for a, b in zip(one, again):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
    assert not np.array_equal(one[0]['image'], other_epoch[0]['image'])
    assert not np.array_equal(one[0]['image'], other_seed[0]['image'])
    halves = [_train(cfg, global_batch_size=8, epoch=1, process_index=p, process_count=2)
                  for p in (0, 1)]  # fmt: skip
    for step, full in enumerate(one):
      assert halves[0][step]['image'].shape[0] == 4
      for key in ('image', 'label'):
        joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
        np.testing.assert_array_equal(joined, full[key])
    resumed = _train(cfg, global_batch_size=8, epoch=1, start_step_in_epoch=4)
    assert len(resumed) == 2
    for a, b in zip(resumed, one[4:]):
      np.testing.assert_array_equal(a['image'], b['image'])


def test_epoch_permutation_covers_each_index_once():
  perm = pipeline.epoch_permutation(1000, seed=0, epoch=5)
  np.testing.assert_array_equal(np.sort(perm), np.arange(1000))
  np.testing.assert_array_equal(perm, pipeline.epoch_permutation(1000, seed=0, epoch=5))
  assert not np.array_equal(perm, pipeline.epoch_permutation(1000, seed=0, epoch=6))


def test_start_step_skips_without_reading(embedded_dir, monkeypatch):
  cfg = _cfg(data_dir=embedded_dir)
  info = sources.prepare(cfg)
  steps = pipeline.steps_per_epoch(info, 1000)
  assert steps == 10
  reads = []
  real_read = pipeline._read

  def counting_read(source, indices, shape):
    reads.append(len(indices))
    return real_read(source, indices, shape)

  monkeypatch.setattr(pipeline, '_read', counting_read)
  tail = _train(cfg, global_batch_size=1000, start_step_in_epoch=8)
  assert len(tail) == 2 and reads == [1000, 1000]
  full = _train(cfg, global_batch_size=1000)
  np.testing.assert_array_equal(tail[0]['image'], full[8]['image'])
  # a whole epoch sees each training example exactly once
  seen = np.concatenate([b['label'] for b in full])
  assert np.all(np.bincount(seen) == 1000)
  assert _train(cfg, global_batch_size=1000, start_step_in_epoch=10) == []


def test_eval_covers_every_example_once_with_padding(embedded_dir):
  cfg = _cfg(data_dir=embedded_dir)
  info = sources.prepare(cfg)
  builder = builders.FashionMnistEmbedded(data_dir=embedded_dir)
  test = builder.as_data_source(split='test')
  expected = A.normalize(np.stack([test[i]["image"] for i in range(len(test))]),
                           info.mean, info.std)  # fmt: skip
  per_process = [
    _all(pipeline.eval_batches(cfg, global_batch_size=768, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  assert len(per_process[0]) == len(per_process[1]) == pipeline.eval_steps(info, 768) == 3
  images, masks = [], []
  for b0, b1 in zip(*per_process):
    for b in (b0, b1):
      assert set(b) == {'image', 'label', 'mask'} and b['mask'].dtype == np.float32
    images.append(np.concatenate([b0['image'], b1['image']]))
    masks.append(np.concatenate([b0['mask'], b1['mask']]))
  images, masks = np.concatenate(images), np.concatenate(masks)
  np.testing.assert_array_equal(masks, (np.arange(3 * 768) < 2000).astype(np.float32))
  np.testing.assert_allclose(images[:2000], expected, atol=1e-6)
  assert np.all(images[2000:] == 0)


def test_fashion_mnist_full_from_source_dir(tmp_path):
  # a tiny stand-in for the official files, in the official names and format
  src = tmp_path / 'fm'
  src.mkdir()
  rng = np.random.default_rng(1)
  for split, n in (('train', 20), ('test', 6)):
    image_name, label_name = builders.IDX_FILES[split]
    builders.write_idx(src / image_name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    builders.write_idx(src / label_name, (np.arange(n) % 10).astype(np.uint8))
  cfg = _cfg(name='fashion_mnist', data_dir=str(tmp_path / 'tfds'), source_dir=str(src))
  info = sources.prepare(cfg)
  assert (info.tfds_name, info.num_train, info.num_test) == ('fashion_mnist_local', 20, 6)
  assert info.mean == (0.2860,) and info.augment is False


# ----------------------------------------------------------------------------- bad input


def test_bad_config_errors_name_the_field(tmp_path, monkeypatch):
  monkeypatch.delenv(builders.CIFAR10_NPZ_ENV, raising=False)
  empty = str(tmp_path / 'empty')
  with pytest.raises(ValueError, match='data.name'):
    sources.prepare(_cfg(name='no_such_dataset_xyz', data_dir=empty))
  with pytest.raises(FileNotFoundError, match=r'data.data_dir.*no network'):
    sources.prepare(_cfg(name='mnist', data_dir=empty))
  with pytest.raises(FileNotFoundError, match='data.source_dir'):
    sources.prepare(_cfg(name="fashion_mnist_local", data_dir=empty,
                              source_dir=str(tmp_path / "nope")))  # fmt: skip
  with pytest.raises(ValueError, match=r'data.source_path.*PEMN_CIFAR10_NPZ'):
    sources.prepare(_cfg(name='cifar10_jpeg', data_dir=empty))
  with pytest.raises(FileNotFoundError, match='data.source_path'):
    sources.prepare(_cfg(name="cifar10_jpeg", data_dir=empty,
                              source_path=str(tmp_path / "x.npz")))  # fmt: skip
  with pytest.raises(ValueError, match='data.augment_options'):
    list(pipeline.train_batches(
            {"name": "fashion_mnist_embedded", "data_dir": empty, "augment": True,
             "augment_options": {"bogus": 1}},
            global_batch_size=8, seed=0, epoch=0, process_index=0, process_count=1,
        ))  # fmt: skip
  assert not list(pathlib.Path(empty).glob('**/incomplete*'))


def test_batch_size_errors_name_train_batch_size(embedded_dir):
  cfg = _cfg(data_dir=embedded_dir)
  with pytest.raises(ValueError, match='data.augment'):
    sources.prepare({"name": "fashion_mnist_embedded", "data_dir": embedded_dir,
                          "augment": "yes"})  # fmt: skip
  with pytest.raises(ValueError, match='train.batch_size'):
    pipeline.train_batches(cfg, global_batch_size=10, seed=0, epoch=0,
                               process_index=0, process_count=4)  # fmt: skip
  with pytest.raises(ValueError, match=r'train\.eval_batch_size'):  # the eval batch's own field
    pipeline.eval_batches(cfg, global_batch_size=10, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='train.batch_size'):
    pipeline.train_batches(cfg, global_batch_size=20_000, seed=0, epoch=0,
                               process_index=0, process_count=1)  # fmt: skip


def test_prefetch_propagates_errors_and_stops():
  def items():
    yield 1
    raise RuntimeError('boom')

  it = pipeline._prefetch(items(), 2)
  assert next(it) == 1
  with pytest.raises(RuntimeError, match='boom'):
    next(it)
  it = pipeline._prefetch(iter(range(100)), 2)
  assert next(it) == 0
  it.close()  # consumer stops early: the worker thread ends


# ----------------------------------------------------------------------------- augmentation


@pytest.fixture(scope='module')
def cifar_like():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


def test_augment_keeps_shape_dtype_range_and_is_deterministic(cifar_like):
  u = A.example_uniforms(7, 2, np.arange(16))
  assert u.shape == (16, A.NUM_UNIFORMS) and u.min() >= 0 and u.max() < 1
  np.testing.assert_array_equal(u, A.example_uniforms(7, 2, np.arange(16)))
  np.testing.assert_array_equal(u[5:7], A.example_uniforms(7, 2, [5, 6]))  # per example
  mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  x = A.augment_batch(cifar_like, u, mean, std)
  assert x.shape == cifar_like.shape and x.dtype == np.float32
  assert x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (0..1 - 0.5) / 0.25
  np.testing.assert_array_equal(x, A.augment_batch(cifar_like, u, mean, std))
  u2 = A.example_uniforms(7, 3, np.arange(16))
  assert not np.array_equal(x, A.augment_batch(cifar_like, u2, mean, std))
  # off switches give plain normalisation
  off = A.AugmentOptions(flip=False, randaugment_num_ops=0, color_jitter=0, erase_prob=0)
  np.testing.assert_allclose(A.augment_batch(cifar_like, u, mean, std, off),
                               A.normalize(cifar_like, mean, std))  # fmt: skip


@pytest.mark.parametrize('op', ops.OPS)
def test_each_randaugment_op_keeps_shape_and_range(cifar_like, op):
  x = cifar_like.astype(np.float32)
  mag = np.full(len(x), ops.randaugment_magnitudes(12, 32, 32)[op])
  for signed in (mag, -mag if op in ops.SIGNED_OPS else mag):
    y = ops.apply_op(x, op, signed)
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0 and y.max() <= 255
  gray = cifar_like[..., :1].astype(np.float32)  # one-channel images work too
  assert ops.apply_op(gray, op, mag).shape == gray.shape


def test_ops_match_pillow(cifar_like):
  x = cifar_like[:6]
  xf = x.astype(np.float32)
  pil = [Image.fromarray(a) for a in x]

  def stack(fn):
    return np.stack([np.asarray(fn(im)) for im in pil]).astype(np.float32)

  np.testing.assert_array_equal(ops.equalize(xf), stack(ImageOps.equalize))
  np.testing.assert_array_equal(ops.posterize(xf, 6), stack(lambda im: ImageOps.posterize(im, 6)))
  np.testing.assert_array_equal(ops.solarize(xf, 153), stack(lambda im: ImageOps.solarize(im, 153)))
  # enhance ops: within PIL's uint8 rounding
  f = np.full(6, 1.36)
  for ours, theirs in (
    (ops.sharpness, ImageEnhance.Sharpness),
    (ops.saturation, ImageEnhance.Color),
    (ops.contrast, ImageEnhance.Contrast),
    (ops.brightness, ImageEnhance.Brightness),
  ):
    assert np.abs(ours(xf, f) - stack(lambda im, t=theirs: t(im).enhance(1.36))).max() <= 1.5
  assert np.abs(ops.autocontrast(xf) - stack(ImageOps.autocontrast)).max() <= 1.0
  rotated = stack(lambda im: im.rotate(12, resample=Image.Resampling.NEAREST))
  assert (ops.apply_op(xf, 'Rotate', np.full(6, 12.0)) != rotated).mean() < 0.01
  shifted = ops.apply_op(xf, 'TranslateX', np.full(6, 5.8))  # truncated to 5 pixels
  np.testing.assert_array_equal(shifted[:, :, 5:], xf[:, :, :-5])
  assert np.all(shifted[:, :, :5] == 0)


def test_random_erase_rectangle_and_probability():
  x = np.ones((400, 32, 32, 3), np.float32)
  u = A.example_uniforms(0, 0, np.arange(400))
  y = A.random_erase(x, u, prob=0.2)
  erased = (y == 0).any(axis=(1, 2, 3))
  assert 0.12 < erased.mean() < 0.28
  for img in y[erased][:20]:
    rows = np.flatnonzero((img == 0).any(axis=(1, 2)))
    cols = np.flatnonzero((img == 0).any(axis=(0, 2)))
    zero = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert np.all(zero == 0)  # one solid rectangle
    area = len(rows) * len(cols) / (32 * 32)
    assert 0.01 <= area <= 0.4
  assert np.array_equal(A.random_erase(x, u, prob=0.0), x)


def test_make_embedded_dataset_is_reproducible(tmp_path):
  src = pathlib.Path(builders.DEFAULT_FASHION_MNIST_DIR)
  if builders.missing_idx_files(src):
    pytest.skip('Debian dataset-fashion-mnist not installed')
  # the shipped subset's content equals a rebuild (checked on the small test split only)
  images, labels = builders.read_idx_split(src, 'test')
  keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:200] for c in range(10)]))
  shipped_images, shipped_labels = builders.read_idx_split(builders.embedded_source_dir(), 'test')
  np.testing.assert_array_equal(shipped_images, images[keep])
  np.testing.assert_array_equal(shipped_labels, labels[keep])
  assert os.path.getsize(builders.embedded_source_dir() / 'train-images-idx3-ubyte.gz') < 5e6


def test_jax_augmentation_matches_numpy(cifar_like, monkeypatch):
  monkeypatch.syspath_prepend(str(REPO))  # the benchmark's JAX twin lives in experiments/
  from experiments import augment_jax

  u = A.example_uniforms(1, 0, np.arange(len(cifar_like)))
  mean, std = sources.KNOWN_STATS['cifar10']
  ours = A.augment_batch(cifar_like, u, mean, std)
  on_device = np.asarray(augment_jax.augment_batch_jax(cifar_like, u, mean, std))
  assert on_device.shape == ours.shape and on_device.dtype == np.float32
  # same uniforms, same recipe: equal up to float32 rounding
  assert np.mean(np.abs(on_device - ours) > 1e-3) < 0.01
