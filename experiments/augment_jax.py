"""The training augmentation in jitted JAX, for comparison with the host NumPy version.

The same recipe as `pemn_jax.data.augment.augment_batch`, driven by the same per-example
uniforms, so the two agree up to float32 rounding of a few pixels. Training does not use it:
under jit every op of a RandAugment slot is computed for the whole batch and the chosen one is
selected per image, so it does ~14x the arithmetic of the NumPy version; `bench_input.py`
measures both.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pemn_jax.data import augment as A
from pemn_jax.data import image_ops as ops


def _jax_affine_nearest(x, inverse):
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


def _jax_augment(images, uniforms, mean, std, options: A.AugmentOptions):
  x = images.astype(jnp.float32)
  u = uniforms.astype(jnp.float32)
  b, h, w, _ = x.shape
  if options.flip:
    x = jnp.where((u[:, A.COL_FLIP] < 0.5)[:, None, None, None], x[:, :, ::-1], x)
  mags = ops.randaugment_magnitudes(options.randaugment_magnitude, h, w)
  for k in range(options.randaugment_num_ops):
    op_idx = jnp.minimum(
      (u[:, A.COL_RA + 2 * k] * len(ops.OPS)).astype(jnp.int32), len(ops.OPS) - 1
    )
    sign = jnp.where(u[:, A.COL_RA + 2 * k + 1] < 0.5, -1.0, 1.0)
    # geometric ops: one warp with the chosen op's inverse map (identity for the others)
    identity = jnp.broadcast_to(jnp.array([[1.0, 0, 0], [0, 1.0, 0]]), (b, 2, 3))
    inverse = identity
    for op in ops.GEOMETRIC_OPS:
      mag = mags[op] * sign
      if op == 'ShearX':
        m_b = identity.at[:, 0, 1].set(mag)
      elif op == 'ShearY':
        m_b = identity.at[:, 1, 0].set(mag)
      elif op == 'TranslateX':
        m_b = identity.at[:, 0, 2].set(-jnp.trunc(mag))
      elif op == 'TranslateY':
        m_b = identity.at[:, 1, 2].set(-jnp.trunc(mag))
      else:  # Rotate, as `image_ops._geometric_inverse`
        t = jnp.deg2rad(mag)
        cos, sin, cx, cy = jnp.cos(t), jnp.sin(t), w / 2.0, h / 2.0
        row0 = jnp.stack([cos, -sin, cx - cos * cx + sin * cy], -1)
        row1 = jnp.stack([sin, cos, cy - sin * cx - cos * cy], -1)
        m_b = jnp.stack([row0, row1], 1)
      inverse = jnp.where((op_idx == ops.OPS.index(op))[:, None, None], m_b, inverse)
    out = _jax_affine_nearest(x, inverse)
    is_geometric = jnp.isin(op_idx, jnp.array([ops.OPS.index(o) for o in ops.GEOMETRIC_OPS]))
    out = jnp.where(is_geometric[:, None, None, None], out, x)
    for op in ops.OPS[6:]:
      factor = 1.0 + mags[op] * sign
      y = _jax_color_ops(x, factor, op, int(mags['Posterize']), mags['Solarize'])
      out = jnp.where((op_idx == ops.OPS.index(op))[:, None, None, None], y, out)
    x = out
  if options.color_jitter > 0:
    j = options.color_jitter
    factors = 1.0 - j + 2.0 * j * u[:, A.COL_JITTER : A.COL_JITTER + 3]
    order = jnp.minimum((u[:, A.COL_JITTER_ORDER] * 6).astype(jnp.int32), 5)
    table = jnp.array(A.JITTER_ORDERS)
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
    tries = u[:, A.COL_ERASE_TRIES :].reshape(b, A.ERASE_ATTEMPTS, 4)
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
    erase = (u[:, A.COL_ERASE] < options.erase_prob) & ok.any(axis=1)
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


def augment_batch_jax(images, uniforms, mean, std, options: A.AugmentOptions | None = None):
  """On-device (jitted JAX) version of `augment.augment_batch`, for comparison.

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
    options or A.AugmentOptions(),
    tuple(float(m) for m in mean),
    tuple(float(s) for s in std),
  )(images, uniforms)


@functools.lru_cache(maxsize=8)
def _jitted_augment(options: A.AugmentOptions, mean: tuple, std: tuple):
  return jax.jit(lambda images, u: _jax_augment(images, u, mean, std, options))
