"""The reference code's CIFAR training augmentation of a batch, vectorised in NumPy.

Recipe, in torchvision's order and with torchvision's definitions (the reference code uses
``transforms.RandomHorizontalFlip``, ``RandAugment(num_ops=2, magnitude=12)``,
``ColorJitter(0.2, 0.2, 0.2)``, ``Normalize``, ``RandomErasing(p=0.2)``):

1. horizontal flip with probability 0.5;
2. RandAugment: ``num_ops`` ops drawn uniformly (with replacement) from the 14 of torchvision
   (Identity, ShearX, ShearY, TranslateX, TranslateY, Rotate, Brightness, Color, Contrast,
   Sharpness, Posterize, Solarize, AutoContrast, Equalize), at magnitude bin ``magnitude`` of 31;
   signed ops flip their sign with probability 0.5 (the ops themselves, torchvision-faithful,
   are ``pemn_jax.data.image_ops``);
3. colour jitter: brightness, contrast and saturation factors uniform in [1-j, 1+j], applied in a
   random order;
4. scale to [0, 1] and normalise with the dataset's mean and std;
5. random erasing with probability p: torchvision's rule (area 2%..33%, aspect 0.3..3.3 log-uniform,
   up to 10 tries), erased to 0 in normalised space.

Pixels stay float32 on the 0..255 scale between ops and are clipped after each (PIL rounds to
uint8 between ops; ops that need integers, Posterize, Solarize, Equalize, round first).

Randomness is explicit: every random choice of example b is read from ``uniforms[b]``, a row of
``NUM_UNIFORMS`` numbers in [0, 1) (see ``example_uniforms``), so the result is a pure function of
(images, uniforms, options). The pipeline derives each row from (seed, epoch, position of the
example in the epoch), which makes augmentation independent of batch size, process count and
resumption.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pemn_jax.configs import common
from pemn_jax.data.image_ops import (
  NUM_MAGNITUDE_BINS,
  OPS,
  SIGNED_OPS,
  apply_op,
  brightness,
  contrast,
  randaugment_magnitudes,
  saturation,
)

MAX_RANDAUGMENT_OPS = 4
ERASE_ATTEMPTS = 10

# Column layout of the per-example uniforms (public: ``experiments/augment_jax.py`` reads the same
# columns, so that both versions draw identical choices).
COL_FLIP = 0
COL_RA = 1  # (op, sign) pairs for up to MAX_RANDAUGMENT_OPS ops
COL_JITTER = COL_RA + 2 * MAX_RANDAUGMENT_OPS  # brightness, contrast, saturation factors
COL_JITTER_ORDER = COL_JITTER + 3
COL_ERASE = COL_JITTER_ORDER + 1  # apply?
COL_ERASE_TRIES = COL_ERASE + 1  # 4 columns per try: area, log-aspect, top, left
NUM_UNIFORMS = COL_ERASE_TRIES + 4 * ERASE_ATTEMPTS

_AUGMENT_STREAM = 0x41554721  # separates augmentation seeds from other uses of (seed, epoch)
# the 6 orders of (brightness, contrast, saturation) colour jitter draws from
JITTER_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """Switches of the training augmentation; defaults are the reference recipe.

  Attributes:
    flip: random horizontal flip (p = 0.5).
    randaugment_num_ops: RandAugment ops per image (0 disables RandAugment; at most 4).
    randaugment_magnitude: magnitude bin, 0..30.
    color_jitter: brightness/contrast/saturation jitter strength (0 disables).
    erase_prob: random-erasing probability (0 disables).
  """

  flip: bool = True
  randaugment_num_ops: int = 2
  randaugment_magnitude: int = 12
  color_jitter: float = 0.2
  erase_prob: float = 0.2

  def __post_init__(self):
    f = 'data.augment_options.'  # the config fields these are
    common.check_bool(self.flip, f + 'flip')
    common.check_int(self.randaugment_num_ops, f + 'randaugment_num_ops', 0, MAX_RANDAUGMENT_OPS)
    common.check_int(
      self.randaugment_magnitude, f + 'randaugment_magnitude', 0, NUM_MAGNITUDE_BINS - 1
    )
    common.check_real(self.color_jitter, f + 'color_jitter', 0.0, 1.0, high_open=True)
    common.check_real(self.erase_prob, f + 'erase_prob', 0.0, 1.0)


def example_uniforms(seed: int, epoch: int, positions: np.ndarray) -> np.ndarray:
  """The random numbers of each example: a pure function of (seed, epoch, position).

  Args:
    seed: run seed (any integer).
    epoch: epoch number.
    positions: (B,) positions of the examples in the epoch's global order.

  Returns:
    (B, NUM_UNIFORMS) float64 in [0, 1).
  """
  seed, epoch = int(seed) % 2**64, int(epoch) % 2**64
  return np.stack(
    [
      np.random.default_rng([seed, epoch, int(p), _AUGMENT_STREAM]).random(NUM_UNIFORMS)
      for p in np.asarray(positions).reshape(-1)
    ]
  ).reshape(-1, NUM_UNIFORMS)


# ----------------------------------------------------------------------------- the recipe


def _apply_grouped(x: np.ndarray, choice: np.ndarray, fns) -> None:
  """x[b] = fns[choice[b]](x[b]) in place, one vectorised call per distinct choice."""
  for k, fn in enumerate(fns):
    idx = np.flatnonzero(choice == k)
    if len(idx):
      x[idx] = fn(x[idx], idx)


def augment_uint8(images: np.ndarray, uniforms: np.ndarray, options: AugmentOptions) -> np.ndarray:
  """Flip, RandAugment and colour jitter of a batch (steps 1-3 of the recipe).

  Args:
    images: (B, H, W, C) uint8.
    uniforms: (B, NUM_UNIFORMS) in [0, 1), the randomness of each example.
    options: which steps to apply and how strongly.

  Returns:
    (B, H, W, C) float32 on the 0..255 scale.
  """
  x = images.astype(np.float32)
  b, h, w, _ = x.shape
  u = np.asarray(uniforms, dtype=np.float64)
  if u.shape != (b, NUM_UNIFORMS):
    raise ValueError(f'uniforms must have shape {(b, NUM_UNIFORMS)}, got {u.shape}')
  if options.flip:
    flip = u[:, COL_FLIP] < 0.5
    x[flip] = x[flip, :, ::-1]
  mags = randaugment_magnitudes(options.randaugment_magnitude, h, w)
  for k in range(options.randaugment_num_ops):
    op_idx = np.minimum((u[:, COL_RA + 2 * k] * len(OPS)).astype(np.int64), len(OPS) - 1)
    sign = np.where(u[:, COL_RA + 2 * k + 1] < 0.5, -1.0, 1.0)

    def make(op, k_sign=sign):
      signed = op in SIGNED_OPS

      def fn(xs, idx):
        mag = np.full(len(idx), mags[op])
        return apply_op(xs, op, mag * k_sign[idx] if signed else mag)

      return fn

    _apply_grouped(x, op_idx, [make(op) for op in OPS])
  if options.color_jitter > 0:
    j = options.color_jitter
    factors = 1.0 - j + 2.0 * j * u[:, COL_JITTER : COL_JITTER + 3]
    order = np.minimum((u[:, COL_JITTER_ORDER] * 6).astype(np.int64), 5)
    adjust = (brightness, contrast, saturation)
    for slot in range(3):
      which = np.array([JITTER_ORDERS[o][slot] for o in order])
      _apply_grouped(
        x,
        which,
        [
          lambda xs, idx, a=a, i=i: a(xs, factors[idx, i]) for i, a in enumerate(adjust)
        ],  # fmt: skip
      )
  return x


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
  """Scales 0..255 pixels to [0, 1] and standardises per channel.

  Args:
    x: (..., C) pixels on the 0..255 scale (uint8 or float).
    mean: C per-channel means on the [0, 1] scale.
    std: C per-channel standard deviations on the [0, 1] scale.

  Returns:
    float32 array of the same shape.
  """
  mean = np.asarray(mean, np.float32) * 255.0
  inv = 1.0 / (np.asarray(std, np.float32) * 255.0)
  return ((np.asarray(x, np.float32) - mean) * inv).astype(np.float32)


def random_erase(x: np.ndarray, uniforms: np.ndarray, prob: float) -> np.ndarray:
  """torchvision RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0), batched.

  Args:
    x: (B, H, W, C) float32 (normalised images).
    uniforms: (B, NUM_UNIFORMS) in [0, 1).
    prob: probability of erasing a rectangle in an image.

  Returns:
    The images with the chosen rectangles set to 0 (a new array).
  """
  b, h, w, _ = x.shape
  u = np.asarray(uniforms, dtype=np.float64)
  tries = u[:, COL_ERASE_TRIES:].reshape(b, ERASE_ATTEMPTS, 4)
  area = h * w * (0.02 + (0.33 - 0.02) * tries[..., 0])
  aspect = np.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * tries[..., 1])
  eh = np.round(np.sqrt(area * aspect)).astype(np.int64)
  ew = np.round(np.sqrt(area / aspect)).astype(np.int64)
  ok = (eh < h) & (ew < w)
  first = np.argmax(ok, axis=1)  # first acceptable try (torchvision gives up after 10)
  rows = np.arange(b)
  eh, ew = eh[rows, first], ew[rows, first]
  top = np.floor(tries[rows, first, 2] * (h - eh + 1)).astype(np.int64)
  left = np.floor(tries[rows, first, 3] * (w - ew + 1)).astype(np.int64)
  erase = (u[:, COL_ERASE] < prob) & ok.any(axis=1)
  yy = np.arange(h)[None, :, None]
  xx = np.arange(w)[None, None, :]
  inside = (
    (yy >= top[:, None, None])
    & (yy < (top + eh)[:, None, None])
    & (xx >= left[:, None, None])
    & (xx < (left + ew)[:, None, None])
    & erase[:, None, None]
  )
  return np.where(inside[..., None], np.float32(0.0), x)


def augment_batch(
  images: np.ndarray, uniforms: np.ndarray, mean, std, options: AugmentOptions | None = None
) -> np.ndarray:
  """The whole training recipe: flip, RandAugment, colour jitter, normalise, random erasing.

  Args:
    images: (B, H, W, C) uint8.
    uniforms: (B, NUM_UNIFORMS) in [0, 1) (see ``example_uniforms``).
    mean: C per-channel means on [0, 1].
    std: C per-channel stds on [0, 1].
    options: recipe switches (default: the reference recipe).

  Returns:
    (B, H, W, C) float32, normalised.
  """
  options = options or AugmentOptions()
  x = normalize(augment_uint8(images, uniforms, options), mean, std)
  if options.erase_prob > 0:
    x = random_erase(x, uniforms, options.erase_prob)
  return x
