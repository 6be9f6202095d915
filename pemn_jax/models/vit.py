"""A small Vision Transformer in which every projection is a (masked) dense layer.

The paper trains ViTs of 6 or 8 blocks and width 256 or 512 on CIFAR-10 but publishes no
configuration. Ours, documented here and in the README:

* patch embedding: a conv with kernel = stride = ``patch_size`` (masked like every projection);
* fixed 2-D sine-cosine position embedding (no parameters: nothing to store or mask) and no
  class token: the classifier reads the mean of the final tokens (global average pooling);
* pre-LayerNorm blocks: LN -> multi-head self-attention (separate q, k, v and output
  projections, no biases) -> residual; LN -> MLP (``dim -> mlp_ratio * dim -> dim``, exact GELU)
  -> residual; a final LN; dense classifier;
* ``num_heads`` defaults to ``dim // 64``; LayerNorm scale and bias are trained, as BN is in the
  convolutional models.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pemn_jax import layers
from pemn_jax.models import remat
from pemn_jax.models.registry import ModelSpec, check_patch

ModuleDef = Any


def sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position embedding, shape (h * w, dim); dim divisible by 4."""
  if dim % 4:
    raise ValueError(f'model.dim must be divisible by 4 for the ViT position embedding, got {dim}')
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / (10000 ** (np.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1)))
  y = y.reshape(-1, 1) * omega[None]
  x = x.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1).astype(np.float32)


class Attention(nn.Module):
  """Multi-head self-attention with (masked) q, k, v and output projections."""

  dim: int
  num_heads: int
  dense: ModuleDef
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    b, n, _ = x.shape
    hd = self.dim // self.num_heads
    split = lambda t: t.reshape(b, n, self.num_heads, hd)
    q = split(self.dense(self.dim, dtype=self.dtype, name='query')(x))
    k = split(self.dense(self.dim, dtype=self.dtype, name='key')(x))
    v = split(self.dense(self.dim, dtype=self.dtype, name='value')(x))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(hd).astype(q.dtype)
    weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, n, self.dim)
    return self.dense(self.dim, dtype=self.dtype, name='out')(out)


class Block(nn.Module):
  """Pre-LN transformer block."""

  LAYERS = ('attn', 'ln1', 'ln2', 'mlp_in', 'mlp_out')  # its submodules (``remat.scan_blocks``)

  dim: int
  num_heads: int
  mlp_ratio: float
  dense: ModuleDef
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.dim, self.num_heads, self.dense, self.dtype, name='attn')(
      nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='ln1')(x)
    )
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='ln2')(x)
    y = self.dense(int(self.dim * self.mlp_ratio), dtype=self.dtype, name='mlp_in')(y)
    y = self.dense(self.dim, dtype=self.dtype, name='mlp_out')(nn.gelu(y, approximate=False))
    return x + y


class ViT(nn.Module):
  """ViT-``dim``/``depth`` for small images (see the module docstring for the choices)."""

  dim: int = 256
  depth: int = 6
  patch_size: int = 4
  num_heads: int | None = None
  mlp_ratio: float = 2.0
  num_classes: int = 10
  conv: ModuleDef = layers.Conv
  dense: ModuleDef = layers.Dense
  dtype: Any = None
  remat_blocks: str = 'none'  # see ConvMixer and ``pemn_jax.models.remat``

  @nn.compact
  def __call__(self, x, train: bool = False):
    remat.check(self.remat_blocks)  # train only picks the remat path: no BatchNorm, no dropout
    heads = self.num_heads or max(1, self.dim // 64)
    if self.dim % heads:
      raise ValueError(f'model.num_heads ({heads}) must divide model.dim ({self.dim})')
    p = self.patch_size
    x = self.conv(
      self.dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, name='patch_embed'
    )(x)
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, self.dim) + jnp.asarray(sincos_2d(h, w, self.dim), x.dtype)
    if self.remat_blocks != 'none' and train and not self.is_initializing():
      block = Block(self.dim, heads, self.mlp_ratio, self.dense, self.dtype)
      x = remat.scan_blocks(
        self,
        block,
        x,
        self.depth,
        lambda i: {n: (f'block{i}', n) for n in Block.LAYERS},
        self.remat_blocks,
        train,
      )
    else:
      for i in range(self.depth):
        x = Block(self.dim, heads, self.mlp_ratio, self.dense, self.dtype, name=f'block{i}')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='ln_final')(x).mean(axis=1)
    return self.dense(self.num_classes, dtype=self.dtype, name='head')(x).astype(jnp.float32)


def _build(m, layers_):
  return ViT(
    dim=m.dim,
    depth=m.depth,
    patch_size=m.patch_size,
    num_heads=m.num_heads,
    mlp_ratio=m.mlp_ratio,
    remat_blocks=m.remat_blocks,
    **layers_,
  )


def _validate(m):
  for field in ('dim', 'depth', 'patch_size'):
    if m[field] is None:
      raise ValueError(f'model.{field} must be set for vit (a positive integer)')
  heads = m.num_heads or max(1, m.dim // 64)
  if m.dim % heads or m.dim % 4:
    raise ValueError(
      f'model.dim ({m.dim}) must be divisible by 4 and by model.num_heads ({heads}) for vit'
    )
  if not m.mlp_ratio > 0:
    raise ValueError(f'model.mlp_ratio must be > 0, got {m.mlp_ratio!r}')
  if int(m.dim * m.mlp_ratio) < 1:
    raise ValueError(
      f'model.mlp_ratio ({m.mlp_ratio}) x model.dim ({m.dim}) must be at least 1 (the MLP width)'
    )


def _check_input(m, shape):
  check_patch(m, shape, divide=True)


SPEC = ModelSpec(
  build=_build,
  validate=_validate,
  check_input=_check_input,
  fields=('dim', 'depth', 'patch_size', 'num_heads', 'mlp_ratio'),
  identical_blocks=True,
)
