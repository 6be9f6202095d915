"""torchvision-faithful image ops on batches: the RandAugment ops and the colour adjustments.

Each op takes x float32 (n, H, W, C) on the 0..255 scale and per-image parameters of shape (n,),
and follows torchvision's (or PIL's) definition of the op: Brightness, Color (saturation),
Contrast and Sharpness blend with a degenerate image; Posterize, Solarize, AutoContrast and
Equalize act on rounded integer pixels as PIL does on uint8; the geometric ops (ShearX, ShearY,
TranslateX, TranslateY, Rotate) warp by an inverse affine map with nearest sampling and fill 0,
shears pivoting on the top-left corner, rotation on the centre. ``randaugment_magnitudes`` gives
torchvision's magnitude of each op at one of 31 bins and ``apply_op`` applies an op by name.
The batch augmentation that draws ops and parameters per example is ``pemn_jax.data.augment``.
"""

from __future__ import annotations

import numpy as np

OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
    "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)  # fmt: skip
GEOMETRIC_OPS = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
# ops whose magnitude RandAugment negates with probability 0.5
SIGNED_OPS = GEOMETRIC_OPS + ('Brightness', 'Color', 'Contrast', 'Sharpness')
NUM_MAGNITUDE_BINS = 31


def _grayscale(x: np.ndarray) -> np.ndarray:
  """(n, H, W, 1) luma with torchvision's weights (identity for one channel)."""
  if x.shape[-1] == 1:
    return x
  return (0.2989 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3]).astype(np.float32)


def _blend(x: np.ndarray, other: np.ndarray, factor: np.ndarray) -> np.ndarray:
  f = factor.astype(np.float32).reshape(-1, 1, 1, 1)
  return np.clip(f * x + (1.0 - f) * other, 0.0, 255.0)


def brightness(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """Scales pixel values by ``factor`` (PIL ImageEnhance.Brightness).

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
  """Keeps the ``bits`` most significant bits of each pixel.

  Args:
    x: (n, H, W, C) float32 on 0..255.
    bits: 1..8.

  Returns:
    The posterized images (float32).
  """
  mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
  return (np.round(x).astype(np.uint8) & mask).astype(np.float32)


def solarize(x: np.ndarray, threshold: float) -> np.ndarray:
  """Inverts pixels at or above ``threshold``.

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
  """Applies one RandAugment op to every image of ``x``.

  Args:
    x: (n, H, W, C) float32 on 0..255.
    op: a name from ``OPS``.
    magnitude: (n,) signed magnitudes in the units of ``randaugment_magnitudes``.

  Returns:
    The transformed images, float32 on 0..255.
  """
  if op == 'Identity':
    return x
  if op in GEOMETRIC_OPS:
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
