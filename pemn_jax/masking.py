"""Straight-through top-k masks: the learned part of a PEMN layer.

A masked layer owns one real-valued score per frozen weight. In the forward pass the
``ceil(k * n)`` entries with the largest score (by default the largest ``|score|``) are kept,
``k`` being the *keep fraction* (the reference calls it ``sparsity``, but it is the fraction
kept). In the backward pass the mask is treated as the identity (straight-through estimator):
the gradient reaching the mask flows unchanged to its input. With ``score_abs=True`` (the
reference code) that input is ``|score|``, so autodiff through ``abs`` multiplies by
``sign(score)``; with ``score_abs=False`` (the paper's equation, edge-popup's) the top-k is taken
over the raw scores and the gradient reaches them unchanged.

Ties at the boundary are broken by flat index (lower index kept first), so the kept count is
exact and the mask a deterministic function of the scores.
"""

from __future__ import annotations

import fractions
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from pemn_jax import native


def _as_fraction(value: float) -> fractions.Fraction:
  """The rational a user meant by a decimal float (0.3 -> 3/10), for exact counts."""
  return fractions.Fraction(float(value)).limit_denominator(10**12)


def validate_keep_fraction(keep_fraction: float, field: str = 'strategy.keep_fraction') -> float:
  """Checks ``keep_fraction`` is a number in (0, 1] and returns it as a float.

  Raises:
    ValueError: naming ``field`` and the allowed range.
  """
  if isinstance(keep_fraction, bool) or not isinstance(keep_fraction, numbers.Real):
    raise ValueError(f'{field} must be a number in (0, 1], got {keep_fraction!r}')
  if not 0.0 < float(keep_fraction) <= 1.0 or math.isnan(keep_fraction):
    raise ValueError(
      f'{field} must be in (0, 1] (the fraction of weights KEPT), got {keep_fraction!r}'
    )
  return float(keep_fraction)


def num_kept(n: int, keep_fraction: float) -> int:
  """Number of entries a layer of ``n`` weights keeps: ``ceil(k * n)``, computed exactly.

  ``0.3 * 10`` is ``3.0000000000000004`` in floating point; the count is computed on the
  rational ``k`` so that it is 3, as a reader would expect.

  Args:
    n: number of entries in the layer.
    keep_fraction: fraction kept, in (0, 1].

  Returns:
    The kept count, between 1 and ``n`` (for ``n >= 1``).
  """
  validate_keep_fraction(keep_fraction)
  return min(n, max(1, math.ceil(_as_fraction(keep_fraction) * n)))


def topk_mask(x: jax.Array, keep_fraction: float) -> jax.Array:
  """Binary mask (same shape and dtype as ``x``) keeping the ``ceil(k*n)`` largest entries.

  No straight-through gradient: this is the plain forward computation. Ties are broken by flat
  index, lower first (``lax.top_k`` returns equal values in index order). On the CPU, float32
  masks come from ``pemn_jax.native.topk_mask`` (the same set, found in linear time).
  """
  n = x.size
  kept = num_kept(n, keep_fraction)
  if kept == n:
    return jnp.ones_like(x)
  if native.topk_usable(x):  # the same set, by linear-time selection on the CPU
    return native.topk_mask(x, kept)
  flat = x.reshape(-1)
  _, idx = jax.lax.top_k(flat, kept)
  mask = jnp.zeros((n,), x.dtype).at[idx].set(1, unique_indices=True)
  return mask.reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def straight_through_topk(x: jax.Array, keep_fraction: float) -> jax.Array:
  """Top-k mask of ``x`` whose gradient is the identity (straight-through estimator).

  Args:
    x: scores (or ``|scores|``); any shape.
    keep_fraction: static fraction kept, in (0, 1].

  Returns:
    A 0/1 array shaped like ``x``. Its vector-Jacobian product passes the cotangent through
    unchanged, so no residual is saved for the backward pass.
  """
  return topk_mask(x, keep_fraction)


def _st_fwd(x, keep_fraction):
  return topk_mask(x, keep_fraction), None


def _st_bwd(keep_fraction, _, g):
  del keep_fraction
  return (g,)


straight_through_topk.defvjp(_st_fwd, _st_bwd)


def score_mask(scores: jax.Array, keep_fraction: float, score_abs: bool = True) -> jax.Array:
  """The mask of a PEMN layer from its scores, with the straight-through gradient.

  Args:
    scores: the layer's learned scores.
    keep_fraction: static fraction of entries kept, in (0, 1].
    score_abs: rank by ``|score|`` (reference code; gradient ``sign(s) * g``) or by the raw
      score (paper's equation; gradient ``g``).
  """
  if score_abs:
    # |s| written as s * sign(s) so that the gradient is exactly sign(s): 0 at s = 0, as in the
    # method's dL/ds = sign(s) * dL/d|s| and PyTorch's abs backward (JAX's abs gives 1 at 0).
    ranked = scores * jax.lax.stop_gradient(jnp.sign(scores))
  else:
    ranked = scores
  return straight_through_topk(ranked, keep_fraction)
