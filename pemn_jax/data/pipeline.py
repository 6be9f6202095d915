"""Input pipeline: the order of the examples, process-local batches, prefetch. No TensorFlow.

Public API
----------
- ``steps_per_epoch(info, global_batch_size) -> int``: full training batches per epoch.
- ``eval_steps(info, global_batch_size) -> int``: evaluation batches (last one padded).
- ``fit_eval_batch_size(info, global_batch_size, multiple) -> int``: the eval batch capped at
  the test split (rounded up to ``multiple``, the device count): a larger one is only padding.
- ``epoch_permutation(num_examples, seed, epoch)``: the training order of one epoch.
- `train_batches(data_config, *, global_batch_size, seed, epoch, process_index, process_count,
  start_step_in_epoch=0) -> Iterator[dict]`: one epoch of process-local training batches
  ``{'image': float32 (L, H, W, C) normalised, 'label': int32 (L,)}``, L = global / process_count.
- `eval_batches(data_config, *, global_batch_size, process_index, process_count,
  batch_size_field='train.eval_batch_size') -> Iterator[dict]``: the test split once,
  ``{'image', 'label', 'mask'}`; ``mask`` float32 is 1 for real examples and 0 for padding (only
  the last batch has padding); errors name ``batch_size_field``.

Which dataset is read and what it is (``prepare``, ``get_dataset_info``, ``DatasetInfo``) is
``pemn_jax.data.sources``; the augmentation is ``pemn_jax.data.augment``.

Order and randomness: epoch e uses a permutation of all training indices that is a pure function
of (seed, e); global batch s is positions [s*G, (s+1)*G) of it (the last partial batch is
dropped), and process p takes the contiguous slice [p*L, (p+1)*L) of each global batch. The
augmentation of the example at position i is a pure function of (seed, e, i). Hence the global
batch, augmented pixels included, does not depend on the process count, and a resumed run with
``start_step_in_epoch=s`` yields exactly the batches s, s+1, ... of an uninterrupted run, without
reading the skipped ones. Evaluation reads the test split in order; batch s holds test positions
[s*G, (s+1)*G), process p again its slice, padded past the end. Every process gets the same
number of batches. Batches are built in a background thread, ``data.prefetch`` ahead, with the
recipe switches ``data.augment_options`` (fields of ``augment.AugmentOptions``).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from pemn_jax.configs import common
from pemn_jax.data import augment as augment_lib
from pemn_jax.data import sources

_PERMUTATION_STREAM = 0x5045524D  # separates the order's seed from other uses of (seed, epoch)


def _augment_options(raw: Any) -> augment_lib.AugmentOptions:
  """``data.augment_options`` (a completed ConfigDict or mapping) as ``AugmentOptions``."""
  raw = dict(raw.to_dict() if hasattr(raw, 'to_dict') else raw)
  allowed = {f.name for f in dataclasses.fields(augment_lib.AugmentOptions)}
  unknown = set(raw) - allowed
  if unknown:
    raise ValueError(
      f'data.augment_options has unknown fields {sorted(unknown)}; allowed: {sorted(allowed)}'
    )
  return augment_lib.AugmentOptions(**raw)  # its errors name the data.augment_options field


def steps_per_epoch(info: sources.DatasetInfo, global_batch_size: int) -> int:
  """Full global training batches per epoch (the last partial batch is dropped).

  Args:
    info: the dataset.
    global_batch_size: examples per step over all processes.

  Returns:
    floor(num_train / global_batch_size).
  """
  return info.num_train // int(global_batch_size)


def eval_steps(info: sources.DatasetInfo, global_batch_size: int) -> int:
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


def _local_batch_size(
  global_batch_size: int, process_index: int, process_count: int, field: str
) -> int:
  """This process's share of a global batch; errors name ``field`` (the config field the
  global batch size came from)."""
  common.check_positive_int(global_batch_size, field)
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count})')
  if global_batch_size % process_count:
    raise ValueError(
      f'{field}={global_batch_size} must be divisible by the number of processes '
      f'({process_count}); choose a multiple of {process_count}'
    )
  return global_batch_size // process_count


def fit_eval_batch_size(info: sources.DatasetInfo, global_batch_size: int, multiple: int) -> int:
  """The evaluation batch actually needed: ``global_batch_size``, or the test split rounded up
  to a multiple of ``multiple`` (the device count) when that is smaller.

  The test set is padded to whole batches, so a batch larger than the split only adds padding
  (memory, and time to evaluate zeros); the results are the same at any batch size.
  """
  needed = max(1, math.ceil(info.num_test / multiple)) * multiple
  return min(int(global_batch_size), needed)


def _read(source, indices: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
  records = [source[int(i)] for i in indices]
  images = np.zeros((len(records), *shape), np.uint8)
  labels = np.zeros((len(records),), np.int32)
  for j, record in enumerate(records):
    images[j] = np.asarray(record['image']).reshape(shape)
    labels[j] = int(record['label'])
  return images, labels


def _prefetch(items: Iterator[dict], size: int) -> Iterator[dict]:
  """Runs ``items`` in a daemon thread, ``size`` ahead; errors re-raise in the consumer."""
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
    data_config: the ``config.data`` ConfigDict.
    global_batch_size: examples per step over all processes (``train.batch_size``).
    seed: run seed; the order and augmentation are pure functions of (seed, epoch).
    epoch: epoch number (0-based).
    process_index: this process (``jax.process_index()``).
    process_count: number of processes (``jax.process_count()``).
    start_step_in_epoch: first step to yield (a resumed run skips the steps done).

  Returns:
    Iterator over ``steps_per_epoch - start_step_in_epoch`` dicts with 'image' float32
    (L, H, W, C) normalised and 'label' int32 (L,), L = global_batch_size / process_count.

  Raises:
    ValueError: batch size not divisible by the process count or larger than the training
        split, start step out of range, bad config (see ``prepare``).
  """
  local = _local_batch_size(global_batch_size, process_index, process_count, 'train.batch_size')
  cfg = sources.complete(data_config)
  opened = sources.open_dataset(cfg)
  info = opened.info
  steps = steps_per_epoch(info, global_batch_size)
  if steps == 0:
    raise ValueError(
      f'train.batch_size={global_batch_size} exceeds the {info.num_train} training examples '
      f'of data.name={info.name!r}'
    )
  if not 0 <= start_step_in_epoch <= steps:
    raise ValueError(f'start_step_in_epoch={start_step_in_epoch} not in [0, {steps}]')
  options = _augment_options(cfg.augment_options) if info.augment else None
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

  size = int(cfg.prefetch)
  return _prefetch(map(make, range(start_step_in_epoch, steps)), size)


def eval_batches(
  data_config: Any,
  *,
  global_batch_size: int,
  process_index: int,
  process_count: int,
  batch_size_field: str = 'train.eval_batch_size',
) -> Iterator[dict[str, np.ndarray]]:
  """The test split once, in order, as this process's padded batches.

  Args:
    data_config: the ``config.data`` ConfigDict.
    global_batch_size: examples per evaluation step over all processes.
    process_index: this process.
    process_count: number of processes.
    batch_size_field: the config field ``global_batch_size`` came from (errors name it).

  Returns:
    Iterator over ``eval_steps(info, global_batch_size)`` dicts with 'image' float32
    (L, H, W, C) normalised (zeros where padded), 'label' int32 (0 where padded) and 'mask'
    float32 (1 real, 0 padding).

  Raises:
    ValueError: batch size not divisible by the process count; bad config (see ``prepare``).
  """
  local = _local_batch_size(global_batch_size, process_index, process_count, batch_size_field)
  cfg = sources.complete(data_config)
  opened = sources.open_dataset(cfg)
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

  size = int(cfg.prefetch)
  return _prefetch(map(make, range(eval_steps(info, global_batch_size))), size)
