"""The learned 1-bit-weight baseline: dense networks whose every weight is one bit.

A PEMN mask at keep fraction 0.5 costs one bit per weight. The strongest known family at that
budget trains the weights themselves down to one bit: BinaryConnect (Courbariaux, Bengio and
David 2015; Courbariaux et al. 2016, "Binarized Neural Networks") keeps a real-valued *latent*
weight per connection, uses only its sign in the forward pass and updates the latent weight
with the gradient of the sign taken through a straight-through estimator. XNOR-Net (Rastegari
et al. 2016) multiplies each output channel's signs by a real scale (there ``mean |W|``), and
McDonnell (2018, "Training wide residual networks for deployment using a single bit for each
weight") shows such networks come within a few points of full precision on CIFAR.

``BinaryDense`` and ``BinaryConv`` keep, in ``params``,

* ``kernel``: the latent weights, initialised as the other trainable layers (``U(-1/sqrt(fan_in),
  +1/sqrt(fan_in))``, ``layers.uniform_fan_in``);
* ``scale``: one trainable value per output channel (the last kernel axis), initialised to the
  mean ``|kernel|`` over the other axes of the freshly drawn kernel (XNOR-Net's ``alpha``;
  about ``0.5 / sqrt(fan_in)``), then learned.

The effective kernel is ``sign_ste(kernel) * scale``: each output channel's weights take exactly
two values, ``+scale`` and ``-scale`` (sign maps 0 to +1, so every weight is one bit). The
gradient reaches the latent kernel through the clipped straight-through estimator
``d sign(w) / dw = 1{|w| <= 1}`` (the hardtanh STE of BinaryConnect / BNN), and the scale
through the ordinary product rule. Everything the optimizer sees is float32; the effective kernel
is cast to the compute dtype by the layer base classes, as every other layer's is.

Storage (``storage.binary_bits``): one bit per weight plus a 32-bit scale per output channel.
These layers take the place of ``layers.Conv`` / ``layers.Dense`` in any model definition
(``model.binary_weights=True`` with ``model.masked=False``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pemn_jax import layers

STE_CLIP = 1.0  # the straight-through gradient passes where |latent| <= this


@jax.custom_vjp
def sign_ste(x: jax.Array) -> jax.Array:
  """``+1`` where ``x >= 0`` (0 included), ``-1`` elsewhere, in ``x``'s dtype; its gradient is
  the clipped straight-through estimator ``g * 1{|x| <= 1}``."""
  return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


def _sign_fwd(x):
  return sign_ste(x), x


def _sign_bwd(x, g):
  return (jnp.where(jnp.abs(x) <= STE_CLIP, g, jnp.zeros_like(g)),)


sign_ste.defvjp(_sign_fwd, _sign_bwd)


def _binary_kernel(module: nn.Module, shape) -> jax.Array:
  """``sign_ste(kernel) * scale``, the scale per output channel (the last axis)."""
  kernel = module.param('kernel', layers.uniform_fan_in, shape)
  reduce_axes = tuple(range(len(shape) - 1))
  # Called only at init, with the kernel just drawn: XNOR-Net's alpha = mean |W| per channel.
  scale = module.param(
    'scale', lambda _key: jnp.mean(jnp.abs(jax.lax.stop_gradient(kernel)), axis=reduce_axes)
  )
  return sign_ste(kernel) * scale.astype(kernel.dtype)


class BinaryDense(layers.DenseBase):
  """Dense layer with learned 1-bit weights: ``sign(latent) * scale`` per output feature."""

  def effective_kernel(self, shape):
    return _binary_kernel(self, shape)


class BinaryConv(layers.ConvBase):
  """2-D conv with learned 1-bit weights: ``sign(latent) * scale`` per output channel."""

  def effective_kernel(self, shape):
    return _binary_kernel(self, shape)
