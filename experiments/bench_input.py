"""Measures input throughput: the augmentation on the host (NumPy) vs on the device (jitted JAX).

Prints images/s side by side for CIFAR-sized batches (default 128 x 32x32x3), plus the whole
training input pipeline (read from array_record + augment + normalise) on the embedded set.
Images are real CIFAR-10 (JPEG mirror) when the npz is given, else uniform noise (the per-op cost
does not depend on content).

Run (from the repo root):

    .venv/bin/python -m experiments.bench_input [--batch 128] [--reps 20] [--cifar_npz PATH]

`--cifar_npz` defaults to $PEMN_CIFAR10_NPZ. The JAX timing includes the host-to-device copy and
excludes compilation (done once before timing). The JAX version is `experiments/augment_jax.py`.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np

from experiments import augment_jax
from pemn_jax.configs import common
from pemn_jax.data import augment as A
from pemn_jax.data import builders, pipeline, sources

CIFAR_MEAN, CIFAR_STD = sources.KNOWN_STATS['cifar10']


def load_images(npz_path: str | None, n: int) -> tuple[np.ndarray, str]:
  """First n CIFAR-10 training images from the npz, or noise.

  Args:
      npz_path: path of cifar10_jpeg_q75.npz or None.
      n: number of images.

  Returns:
      (uint8 (n, 32, 32, 3), description of the source).
  """
  if npz_path and os.path.isfile(npz_path):
    from PIL import Image

    with np.load(npz_path) as npz:
      blob, offsets = npz['train_bytes'], npz['train_offsets']
      # rows are sorted by class: take a spread of them
      rows = np.linspace(0, len(offsets) - 2, n).astype(np.int64)
      images = [
        np.asarray(Image.open(io.BytesIO(blob[offsets[i] : offsets[i + 1]].tobytes())))
        for i in rows
      ]
    return np.stack(images).astype(np.uint8), 'CIFAR-10 (JPEG-q75 mirror)'
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), 'uniform noise'


def rate(fn, reps: int, batch: int) -> float:
  """Images per second of `fn()` producing one batch, best of 3 runs of `reps` calls.

  Args:
      fn: callable producing one batch.
      reps: calls per run.
      batch: images per call.

  Returns:
      Images per second.
  """
  best = float('inf')
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(reps):
      fn()
    best = min(best, time.perf_counter() - start)
  return reps * batch / best


def main() -> None:
  """Runs the benchmark and prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--reps', type=int, default=20)
  parser.add_argument('--cifar_npz', default=os.environ.get(builders.CIFAR10_NPZ_ENV))
  args = parser.parse_args()

  import jax

  images, source = load_images(args.cifar_npz, args.batch)
  positions = np.arange(args.batch)
  uniforms = A.example_uniforms(0, 0, positions)
  opts = A.AugmentOptions()

  rows = []
  rows.append(
    (
      'per-example uniforms (NumPy)',
      rate(lambda: A.example_uniforms(0, 0, positions), args.reps, args.batch),
    )  # fmt: skip
  )
  rows.append(
    (
      'augment, host NumPy',
      rate(
        lambda: A.augment_batch(images, uniforms, CIFAR_MEAN, CIFAR_STD, opts),
        args.reps,
        args.batch,
      ),
    )  # fmt: skip
  )
  jax_fn = lambda: augment_jax.augment_batch_jax(images, uniforms, CIFAR_MEAN, CIFAR_STD, opts)
  jax_fn().block_until_ready()  # compile
  rows.append(
    (
      f'augment, on-device JAX ({jax.default_backend()})',
      rate(lambda: jax_fn().block_until_ready(), args.reps, args.batch),
    )  # fmt: skip
  )
  diff = np.abs(
    np.asarray(jax_fn()) - A.augment_batch(images, uniforms, CIFAR_MEAN, CIFAR_STD, opts)
  )
  rows.append(("normalise only (no augmentation), NumPy",
                 rate(lambda: A.normalize(images, CIFAR_MEAN, CIFAR_STD), args.reps,
                      args.batch)))  # fmt: skip

  with tempfile.TemporaryDirectory() as data_dir:
    for augment in (False, True):
      cfg = common.base_config().data
      cfg.name = 'fashion_mnist_embedded'
      cfg.data_dir = data_dir
      cfg.augment = augment
      cfg.prefetch = 0  # measure the work itself, not the overlap
      sources.prepare(cfg)
      steps = min(args.reps, 10_000 // args.batch)
      start = time.perf_counter()
      for _ in pipeline.train_batches(
                cfg, global_batch_size=args.batch, seed=0, epoch=0, process_index=0,
                process_count=1,
            ):  # fmt: skip
        steps -= 1
        if steps == 0:
          break
      elapsed = time.perf_counter() - start
      n = min(args.reps, 10_000 // args.batch) * args.batch
      label = 'augmented' if augment else 'not augmented'
      rows.append((f'train_batches, embedded 28x28x1, {label}', n / elapsed))

  print(f"batch {args.batch}, images: {source}, devices: {jax.devices()}, "
          f"CPU cores: {os.cpu_count()}")  # fmt: skip
  width = max(len(r[0]) for r in rows)
  for name, images_per_s in rows:
    print(f"{name:<{width}}  {images_per_s:>10,.0f} images/s  "
              f"({1e3 * args.batch / images_per_s:7.1f} ms/batch)")  # fmt: skip
  print(f'JAX vs NumPy max |difference| (normalised units): {diff.max():.2e}')


if __name__ == '__main__':
  main()
