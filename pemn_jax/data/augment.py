"""The reference CIFAR training augmentation (METHOD.md section 3), vectorised in NumPy.

Recipe, in torchvision's order and with torchvision's definitions (the reference code uses
`transforms.RandomHorizontalFlip`, `RandAugment(num_ops=2, magnitude=12)`,
`ColorJitter(0.2, 0.2, 0.2)`, `Normalize`, `RandomErasing(p=0.2)`):

1. horizontal flip with probability 0.5;
2. RandAugment: `num_ops` ops drawn uniformly (with replacement) from the 14 of torchvision
   (Identity, ShearX, ShearY, TranslateX, TranslateY, Rotate, Brightness, Color, Contrast,
   Sharpness, Posterize, Solarize, AutoContrast, Equalize), at magnitude bin `magnitude` of 31;
   signed ops flip their sign with probability 0.5. Geometric ops use nearest sampling and fill 0,
   shears pivot on the top-left corner, rotation on the centre (as torchvision);
3. colour jitter: brightness, contrast and saturation factors uniform in [1-j, 1+j], applied in a
   random order;
4. scale to [0, 1] and normalise with the dataset's mean and std;
5. random erasing with probability p: torchvision's rule (area 2%..33%, aspect 0.3..3.3 log-uniform,
   up to 10 tries), erased to 0 in normalised space.

Pixels stay float32 on the 0..255 scale between ops and are clipped after each (PIL rounds to
uint8 between ops; ops that need integers, Posterize, Solarize, Equalize, round first).

Randomness is explicit: every random choice of example b is read from `uniforms[b]`, a row of
`NUM_UNIFORMS` numbers in [0, 1) (see `example_uniforms`), so the result is a pure function of
(images, uniforms, options). The pipeline derives each row from (seed, epoch, position of the
example in the epoch), which makes augmentation independent of batch size, process count and
resumption.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
_GEOMETRIC = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
_SIGNED = _GEOMETRIC + ('Brightness', 'Color', 'Contrast', 'Sharpness')
NUM_MAGNITUDE_BINS = 31
MAX_RANDAUGMENT_OPS = 4
ERASE_ATTEMPTS = 10

# Column layout of the per-example uniforms.
_COL_FLIP = 0
_COL_RA = 1  # (op, sign) pairs for up to MAX_RANDAUGMENT_OPS ops
_COL_JITTER = _COL_RA + 2 * MAX_RANDAUGMENT_OPS  # brightness, contrast, saturation factors
_COL_JITTER_ORDER = _COL_JITTER + 3
_COL_ERASE = _COL_JITTER_ORDER + 1  # apply?
_COL_ERASE_TRIES = _COL_ERASE + 1  # 4 columns per try: area, log-aspect, top, left
NUM_UNIFORMS = _COL_ERASE_TRIES + 4 * ERASE_ATTEMPTS

_AUGMENT_STREAM = 0x41554721  # separates augmentation seeds from other uses of (seed, epoch)
_JITTER_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


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
    if not 0 <= self.randaugment_num_ops <= MAX_RANDAUGMENT_OPS:
      raise ValueError(f'randaugment_num_ops must be in 0..{MAX_RANDAUGMENT_OPS}')
    if not 0 <= self.randaugment_magnitude < NUM_MAGNITUDE_BINS:
      raise ValueError(f'randaugment_magnitude must be in 0..{NUM_MAGNITUDE_BINS - 1}')
    if not 0 <= self.color_jitter < 1:
      raise ValueError('color_jitter must be in [0, 1)')
    if not 0 <= self.erase_prob <= 1:
      raise ValueError('erase_prob must be in [0, 1]')


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


# ----------------------------------------------------------------------------- pixel ops
# All take x float32 (n, H, W, C) on the 0..255 scale and per-image parameters of shape (n,).


def _grayscale(x: np.ndarray) -> np.ndarray:
  """(n, H, W, 1) luma with torchvision's weights (identity for one channel)."""
  if x.shape[-1] == 1:
    return x
  return (0.2989 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]).astype(np.float32)


def _blend(x: np.ndarray, other: np.ndarray, factor: np.ndarray) -> np.ndarray:
  f = factor.astype(np.float32).reshape(-1, 1, 1, 1)
  return np.clip(f * x + (1.0 - f) * other, 0.0, 255.0)


def brightness(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """Scales pixel values by `factor` (PIL ImageEnhance.Brightness).

  Args:
      x: (n, H, W, C) float32 on 0..255.
      factor: (n,) factors (1 = unchanged).

  Returns:
      The adjusted images, clipped to 0..255.
  """
  return _blend(x, np.zeros((), np.float32), factor)


def saturation(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """Blends with the grayscale image (PIL ImageEnhance.Color; identity for one channel).

  Args:
      x: (n, H, W, C) float32 on 0..255.
      factor: (n,) factors (1 = unchanged, 0 = grayscale).

  Returns:
      The adjusted images.
  """
  return _blend(x, _grayscale(x), factor)


def contrast(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """Blends with the mean grey level of each image (torchvision adjust_contrast).

  Args:
      x: (n, H, W, C) float32 on 0..255.
      factor: (n,) factors (1 = unchanged).

  Returns:
      The adjusted images.
  """
  mean = _grayscale(x).mean(axis=(1, 2, 3), keepdims=True)
  return _blend(x, mean, factor)


def sharpness(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """Blends with a smoothed image (3x3 kernel, centre 5, sum 13; border kept), as PIL.

  Args:
      x: (n, H, W, C) float32 on 0..255.
      factor: (n,) factors (1 = unchanged, 0 = smoothed, >1 sharpened).

  Returns:
      The adjusted images.
  """
  smooth = x.copy()
  acc = 4.0 * x[:, 1:-1, 1:-1]
  for di in (0, 1, 2):
    for dj in (0, 1, 2):
      acc = acc + x[:, di : di + x.shape[1] - 2, dj : dj + x.shape[2] - 2]
  smooth[:, 1:-1, 1:-1] = np.round(acc / 13.0)
  return _blend(x, smooth, factor)


def posterize(x: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the `bits` most significant bits of each pixel.

  Args:
      x: (n, H, W, C) float32 on 0..255.
      bits: 1..8.

  Returns:
      The posterized images (float32).
  """
  mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
  return (np.round(x).astype(np.uint8) & mask).astype(np.float32)


def solarize(x: np.ndarray, threshold: float) -> np.ndarray:
  """Inverts pixels at or above `threshold`.

  Args:
      x: (n, H, W, C) float32 on 0..255.
      threshold: 0..255.

  Returns:
      The solarized images.
  """
  x = np.round(x)
  return np.where(x >= threshold, 255.0 - x, x).astype(np.float32)


def autocontrast(x: np.ndarray) -> np.ndarray:
  """Stretches each channel of each image to the full 0..255 range (constant channels kept).

  Args:
      x: (n, H, W, C) float32 on 0..255.

  Returns:
      The stretched images.
  """
  lo = x.min(axis=(1, 2), keepdims=True)
  hi = x.max(axis=(1, 2), keepdims=True)
  flat = hi <= lo
  scale = np.where(flat, 1.0, 255.0 / np.where(flat, 1.0, hi - lo))
  lo = np.where(flat, 0.0, lo)
  return np.clip((x - lo) * scale, 0.0, 255.0).astype(np.float32)


def equalize(x: np.ndarray) -> np.ndarray:
  """Histogram-equalises each channel of each image (PIL ImageOps.equalize's rule).

  Args:
      x: (n, H, W, C) float32 on 0..255.

  Returns:
      The equalised images.
  """
  n, h, w, c = x.shape
  xi = np.round(x).astype(np.int64).transpose(0, 3, 1, 2).reshape(n * c, h * w)
  rows = np.arange(n * c)[:, None]
  hist = np.bincount((xi + 256 * rows).ravel(), minlength=256 * n * c).reshape(n * c, 256)
  last = hist[rows[:, 0], xi.max(axis=1)]  # count of the highest value present
  step = (h * w - last) // 255
  safe = np.maximum(step, 1)[:, None]
  before = np.cumsum(hist, axis=1) - hist  # pixels strictly below each value
  lut = np.minimum((before + safe // 2) // safe, 255)
  lut = np.where(step[:, None] > 0, lut, np.arange(256)[None, :])
  out = np.take_along_axis(lut, xi, axis=1)
  return out.reshape(n, c, h, w).transpose(0, 2, 3, 1).astype(np.float32)


def affine_nearest(x: np.ndarray, inverse: np.ndarray) -> np.ndarray:
  """Warps images by per-image inverse affine maps, nearest sampling, fill 0.

  Args:
      x: (n, H, W, C) images.
      inverse: (n, 2, 3) maps from output pixel-centre coordinates (x, y) to input coordinates.

  Returns:
      The warped images, same dtype.
  """
  n, h, w, _ = x.shape
  ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing='ij')
  a = inverse[:, :, :, None, None]
  src_x = a[:, 0, 0] * xs + a[:, 0, 1] * ys + a[:, 0, 2]
  src_y = a[:, 1, 0] * xs + a[:, 1, 1] * ys + a[:, 1, 2]
  ix = np.floor(src_x).astype(np.int64)
  iy = np.floor(src_y).astype(np.int64)
  valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  out = x[np.arange(n)[:, None, None], np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)]
  return np.where(valid[..., None], out, np.zeros((), x.dtype))


def _geometric_inverse(op: str, magnitude: np.ndarray, h: int, w: int) -> np.ndarray:
  """Inverse affine maps (n, 2, 3) of torchvision's RandAugment geometric ops."""
  n = len(magnitude)
  m = np.zeros((n, 2, 3))
  m[:, 0, 0] = m[:, 1, 1] = 1.0
  if op == 'ShearX':  # pivot at the top-left corner (torchvision center=[0, 0])
    m[:, 0, 1] = magnitude
  elif op == 'ShearY':
    m[:, 1, 0] = magnitude
  elif op == 'TranslateX':  # torchvision truncates the shift to whole pixels
    m[:, 0, 2] = -np.trunc(magnitude)
  elif op == 'TranslateY':
    m[:, 1, 2] = -np.trunc(magnitude)
  elif op == 'Rotate':  # about the image centre; magnitude in degrees
    t = np.deg2rad(magnitude)
    cos, sin = np.cos(t), np.sin(t)
    cx, cy = w / 2.0, h / 2.0
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1] = cos, -sin, sin, cos
    m[:, 0, 2] = cx - cos * cx + sin * cy
    m[:, 1, 2] = cy - sin * cx - cos * cy
  else:
    raise ValueError(op)
  return m


def randaugment_magnitudes(magnitude_bin: int, h: int, w: int) -> dict[str, float]:
  """Unsigned magnitudes of the torchvision RandAugment ops at one bin (of 31).

  Args:
      magnitude_bin: 0..30.
      h: image height.
      w: image width.

  Returns:
      Op name -> magnitude (shear as tan, translate in pixels, rotate in degrees, enhance
      as the deviation of the factor from 1, posterize bits, solarize threshold).
  """
  frac = magnitude_bin / (NUM_MAGNITUDE_BINS - 1)
  return {
    'Identity': 0.0,
    'ShearX': 0.3 * frac,
    'ShearY': 0.3 * frac,
    'TranslateX': 150.0 / 331.0 * w * frac,
    'TranslateY': 150.0 / 331.0 * h * frac,
    'Rotate': 30.0 * frac,
    'Brightness': 0.9 * frac,
    'Color': 0.9 * frac,
    'Contrast': 0.9 * frac,
    'Sharpness': 0.9 * frac,
    'Posterize': float(8 - int(round(magnitude_bin / ((NUM_MAGNITUDE_BINS - 1) / 4)))),
    'Solarize': 255.0 * (1.0 - frac),
    'AutoContrast': 0.0,
    'Equalize': 0.0,
  }


def apply_op(x: np.ndarray, op: str, magnitude: np.ndarray) -> np.ndarray:
  """Applies one RandAugment op to every image of `x`.

  Args:
      x: (n, H, W, C) float32 on 0..255.
      op: a name from `OPS`.
      magnitude: (n,) signed magnitudes in the units of `randaugment_magnitudes`.

  Returns:
      The transformed images, float32 on 0..255.
  """
  if op == 'Identity':
    return x
  if op in _GEOMETRIC:
    return affine_nearest(x, _geometric_inverse(op, magnitude, x.shape[1], x.shape[2]))
  if op == 'Brightness':
    return brightness(x, 1.0 + magnitude)
  if op == 'Color':
    return saturation(x, 1.0 + magnitude)
  if op == 'Contrast':
    return contrast(x, 1.0 + magnitude)
  if op == 'Sharpness':
    return sharpness(x, 1.0 + magnitude)
  if op == 'Posterize':
    return posterize(x, int(magnitude[0]))
  if op == 'Solarize':
    return solarize(x, float(magnitude[0]))
  if op == 'AutoContrast':
    return autocontrast(x)
  if op == 'Equalize':
    return equalize(x)
  raise ValueError(f'unknown op {op!r}; known: {OPS}')


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
    flip = u[:, _COL_FLIP] < 0.5
    x[flip] = x[flip, :, ::-1]
  mags = randaugment_magnitudes(options.randaugment_magnitude, h, w)
  for k in range(options.randaugment_num_ops):
    op_idx = np.minimum((u[:, _COL_RA + 2 * k] * len(OPS)).astype(np.int64), len(OPS) - 1)
    sign = np.where(u[:, _COL_RA + 2 * k + 1] < 0.5, -1.0, 1.0)

    def make(op, k_sign=sign):
      signed = op in _SIGNED

      def fn(xs, idx):
        mag = np.full(len(idx), mags[op])
        return apply_op(xs, op, mag * k_sign[idx] if signed else mag)

      return fn

    _apply_grouped(x, op_idx, [make(op) for op in OPS])
  if options.color_jitter > 0:
    j = options.color_jitter
    factors = 1.0 - j + 2.0 * j * u[:, _COL_JITTER : _COL_JITTER + 3]
    order = np.minimum((u[:, _COL_JITTER_ORDER] * 6).astype(np.int64), 5)
    adjust = (brightness, contrast, saturation)
    for slot in range(3):
      which = np.array([_JITTER_ORDERS[o][slot] for o in order])
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
  tries = u[:, _COL_ERASE_TRIES:].reshape(b, ERASE_ATTEMPTS, 4)
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
  erase = (u[:, _COL_ERASE] < prob) & ok.any(axis=1)
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
      uniforms: (B, NUM_UNIFORMS) in [0, 1) (see `example_uniforms`).
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


# ----------------------------------------------------------------------------- on-device variant
# The same recipe in jax.numpy, jitted, driven by the same uniforms (equal to the NumPy result up
# to float32 rounding of a few pixels). Under jit every op of a RandAugment slot is computed for
# the whole batch and the chosen one selected per image, so it does ~14x the arithmetic of the
# NumPy version; `experiments/bench_input.py` measures both.


def _jax_affine_nearest(x, inverse):
  import jax.numpy as jnp

  n, h, w, c = x.shape
  ys, xs = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing='ij')
  a = inverse[:, :, :, None, None]
  ix = jnp.floor(a[:, 0, 0] * xs + a[:, 0, 1] * ys + a[:, 0, 2]).astype(jnp.int32)
  iy = jnp.floor(a[:, 1, 0] * xs + a[:, 1, 1] * ys + a[:, 1, 2]).astype(jnp.int32)
  valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  lin = (jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1)).reshape(n, h * w, 1)
  out = jnp.take_along_axis(x.reshape(n, h * w, c), lin, axis=1).reshape(n, h, w, c)
  return jnp.where(valid[..., None], out, 0.0)


def _jax_color_ops(x, factor, op: str, posterize_bits: int, solarize_threshold: float):
  import jax.numpy as jnp

  def gray(v):
    if v.shape[-1] == 1:
      return v
    return 0.2989 * v[..., 0:1] + 0.587 * v[..., 1:2] + 0.114 * v[..., 2:3]

  def blend(a, b, f):
    f = f.reshape(-1, 1, 1, 1)
    return jnp.clip(f * a + (1.0 - f) * b, 0.0, 255.0)

  if op == 'Brightness':
    return blend(x, 0.0, factor)
  if op == 'Color':
    return blend(x, gray(x), factor)
  if op == 'Contrast':
    return blend(x, gray(x).mean(axis=(1, 2, 3), keepdims=True), factor)
  if op == 'Sharpness':
    h, w = x.shape[1], x.shape[2]
    acc = 4.0 * x[:, 1:-1, 1:-1]
    for di in (0, 1, 2):
      for dj in (0, 1, 2):
        acc = acc + x[:, di : di + h - 2, dj : dj + w - 2]
    smooth = x.at[:, 1:-1, 1:-1].set(jnp.round(acc / 13.0))
    return blend(x, smooth, factor)
  if op == 'Posterize':
    mask = (0xFF << (8 - posterize_bits)) & 0xFF
    return (jnp.round(x).astype(jnp.int32) & mask).astype(jnp.float32)
  if op == 'Solarize':
    r = jnp.round(x)
    return jnp.where(r >= solarize_threshold, 255.0 - r, r)
  if op == 'AutoContrast':
    lo = x.min(axis=(1, 2), keepdims=True)
    hi = x.max(axis=(1, 2), keepdims=True)
    flat = hi <= lo
    scale = jnp.where(flat, 1.0, 255.0 / jnp.where(flat, 1.0, hi - lo))
    return jnp.clip((x - jnp.where(flat, 0.0, lo)) * scale, 0.0, 255.0)
  if op == 'Equalize':
    n, h, w, c = x.shape
    xi = jnp.round(x).astype(jnp.int32).transpose(0, 3, 1, 2).reshape(n * c, h * w)
    rows = jnp.arange(n * c)
    hist = jnp.zeros((n * c, 256), jnp.int32).at[rows[:, None], xi].add(1)
    last = hist[rows, xi.max(axis=1)]
    step = (h * w - last) // 255
    safe = jnp.maximum(step, 1)[:, None]
    before = jnp.cumsum(hist, axis=1) - hist
    lut = jnp.minimum((before + safe // 2) // safe, 255)
    lut = jnp.where(step[:, None] > 0, lut, jnp.arange(256)[None, :])
    out = jnp.take_along_axis(lut, xi, axis=1)
    return out.reshape(n, c, h, w).transpose(0, 2, 3, 1).astype(jnp.float32)
  raise ValueError(op)


def _jax_augment(images, uniforms, mean, std, options: AugmentOptions):
  import jax.numpy as jnp

  x = images.astype(jnp.float32)
  u = uniforms.astype(jnp.float32)
  b, h, w, _ = x.shape
  if options.flip:
    x = jnp.where((u[:, _COL_FLIP] < 0.5)[:, None, None, None], x[:, :, ::-1], x)
  mags = randaugment_magnitudes(options.randaugment_magnitude, h, w)
  for k in range(options.randaugment_num_ops):
    op_idx = jnp.minimum((u[:, _COL_RA + 2 * k] * len(OPS)).astype(jnp.int32), len(OPS) - 1)
    sign = jnp.where(u[:, _COL_RA + 2 * k + 1] < 0.5, -1.0, 1.0)
    # geometric ops: one warp with the chosen op's inverse map (identity for the others)
    identity = jnp.broadcast_to(jnp.array([[1.0, 0, 0], [0, 1.0, 0]]), (b, 2, 3))
    inverse = identity
    for op in _GEOMETRIC:
      mag = mags[op] * sign
      if op == 'ShearX':
        m_b = identity.at[:, 0, 1].set(mag)
      elif op == 'ShearY':
        m_b = identity.at[:, 1, 0].set(mag)
      elif op == 'TranslateX':
        m_b = identity.at[:, 0, 2].set(-jnp.trunc(mag))
      elif op == 'TranslateY':
        m_b = identity.at[:, 1, 2].set(-jnp.trunc(mag))
      else:  # Rotate, as `_geometric_inverse`
        t = jnp.deg2rad(mag)
        cos, sin, cx, cy = jnp.cos(t), jnp.sin(t), w / 2.0, h / 2.0
        row0 = jnp.stack([cos, -sin, cx - cos * cx + sin * cy], -1)
        row1 = jnp.stack([sin, cos, cy - sin * cx - cos * cy], -1)
        m_b = jnp.stack([row0, row1], 1)
      inverse = jnp.where((op_idx == OPS.index(op))[:, None, None], m_b, inverse)
    out = _jax_affine_nearest(x, inverse)
    is_geometric = jnp.isin(op_idx, jnp.array([OPS.index(o) for o in _GEOMETRIC]))
    out = jnp.where(is_geometric[:, None, None, None], out, x)
    for op in OPS[6:]:
      factor = 1.0 + mags[op] * sign
      y = _jax_color_ops(x, factor, op, int(mags['Posterize']), mags['Solarize'])
      out = jnp.where((op_idx == OPS.index(op))[:, None, None, None], y, out)
    x = out
  if options.color_jitter > 0:
    j = options.color_jitter
    factors = 1.0 - j + 2.0 * j * u[:, _COL_JITTER : _COL_JITTER + 3]
    order = jnp.minimum((u[:, _COL_JITTER_ORDER] * 6).astype(jnp.int32), 5)
    table = jnp.array(_JITTER_ORDERS)
    for slot in range(3):
      which = table[order, slot]
      out = x
      for i, op in enumerate(('Brightness', 'Contrast', 'Color')):
        y = _jax_color_ops(x, factors[:, i], op, 8, 256.0)
        out = jnp.where((which == i)[:, None, None, None], y, out)
      x = out
  mean = jnp.asarray(mean, jnp.float32) * 255.0
  x = (x - mean) / (jnp.asarray(std, jnp.float32) * 255.0)
  if options.erase_prob > 0:
    tries = u[:, _COL_ERASE_TRIES:].reshape(b, ERASE_ATTEMPTS, 4)
    area = h * w * (0.02 + (0.33 - 0.02) * tries[..., 0])
    aspect = jnp.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * tries[..., 1])
    eh = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    ew = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    ok = (eh < h) & (ew < w)
    first = jnp.argmax(ok, axis=1)
    rows = jnp.arange(b)
    eh, ew = eh[rows, first], ew[rows, first]
    top = jnp.floor(tries[rows, first, 2] * (h - eh + 1)).astype(jnp.int32)
    left = jnp.floor(tries[rows, first, 3] * (w - ew + 1)).astype(jnp.int32)
    erase = (u[:, _COL_ERASE] < options.erase_prob) & ok.any(axis=1)
    yy = jnp.arange(h)[None, :, None]
    xx = jnp.arange(w)[None, None, :]
    inside = (
      (yy >= top[:, None, None])
      & (yy < (top + eh)[:, None, None])
      & (xx >= left[:, None, None])
      & (xx < (left + ew)[:, None, None])
      & erase[:, None, None]
    )
    x = jnp.where(inside[..., None], 0.0, x)
  return x


def augment_batch_jax(images, uniforms, mean, std, options: AugmentOptions | None = None):
  """On-device (jitted JAX) version of `augment_batch`, for comparison and device pipelines.

  Args:
      images: (B, H, W, C) uint8 (NumPy or JAX array).
      uniforms: (B, NUM_UNIFORMS) in [0, 1).
      mean: C per-channel means on [0, 1].
      std: C per-channel stds on [0, 1].
      options: recipe switches (default: the reference recipe).

  Returns:
      (B, H, W, C) float32 JAX array, normalised; matches `augment_batch` up to float32
      rounding (a few pixels may differ by one grey level before normalisation).
  """
  return _jitted_augment(
    options or AugmentOptions(),
    tuple(float(m) for m in mean),
    tuple(float(s) for s in std),
  )(images, uniforms)


@functools.lru_cache(maxsize=8)
def _jitted_augment(options: AugmentOptions, mean: tuple, std: tuple):
  import jax

  return jax.jit(lambda images, u: _jax_augment(images, u, mean, std, options))
