"""Straight-through top-k (pemn_jax.masking), checked against masks and gradients by hand.

The method (docs/method.md, section 1): keep the ceil(k * n) entries with the largest |score| (ties:
lower index first); backward is the identity to |score|, then through abs: dL/ds = sign(s) *
dL/dmask. With score_abs=False the top-k is over the raw scores and the gradient is dL/dmask
unchanged.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import masking

# ---------------------------------------------------------------------------------------------
# Exact kept counts.


@pytest.mark.parametrize(
  'n, k, expected',
  [
    (10, 0.3, 3),  # 0.3 * 10 == 3.0000000000000004 in floating point: still 3
    (10, 0.7, 7),  # 0.7 * 10 == 7.000000000000001
    (100, 0.07, 7),  # 0.07 * 100 == 7.000000000000001
    (10, 0.5, 5),
    (7, 0.5, 4),  # ceil(3.5)
    (3, 1 / 3, 1),
    (1000, 0.001, 1),
    (9, 0.1, 1),  # ceil(0.9)
    (11, 0.1, 2),  # ceil(1.1)
    (65536, 0.5, 32768),
    (5, 1.0, 5),
    (1, 0.5, 1),
  ],
)
def test_num_kept_is_exact_ceil(n, k, expected):
  assert masking.num_kept(n, k) == expected


@pytest.mark.parametrize(
  'shape, k',
  [((10,), 0.3), ((3, 7), 0.1), ((3, 7), 0.5), ((2, 3, 4, 5), 0.25), ((2, 3, 4, 5), 0.7)],
)
def test_topk_mask_keeps_exactly_ceil_kn(shape, k):
  n = math.prod(shape)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  m = np.asarray(masking.topk_mask(x, k))
  assert m.shape == shape
  assert set(np.unique(m)) <= {0.0, 1.0}
  assert m.sum() == masking.num_kept(n, k)


# ---------------------------------------------------------------------------------------------
# Hand-computed masks.


def test_mask_by_hand_on_abs_scores():
  s = jnp.array([0.1, -0.9, 0.4, -0.2, 0.8, 0.05, -0.6, 0.3, 0.0, 0.7])
  # |s| ranked: 0.9 (1), 0.8 (4), 0.7 (9) -> k = 0.3 keeps 3.
  np.testing.assert_array_equal(masking.score_mask(s, 0.3), [0, 1, 0, 0, 1, 0, 0, 0, 0, 1])
  # k = 0.5 keeps 5: add 0.6 (6), 0.4 (2).
  np.testing.assert_array_equal(masking.score_mask(s, 0.5), [0, 1, 1, 0, 1, 0, 1, 0, 0, 1])


def test_mask_by_hand_on_raw_scores():
  s = jnp.array([0.1, -0.9, 0.4, -0.2, 0.8, 0.05, -0.6, 0.3, 0.0, 0.7])
  # Raw scores ranked: 0.8 (4), 0.7 (9), 0.4 (2): large negative scores are dropped.
  np.testing.assert_array_equal(
    masking.score_mask(s, 0.3, score_abs=False), [0, 0, 1, 0, 1, 0, 0, 0, 0, 1]
  )


def test_mask_2d_ranks_over_the_whole_layer():
  s = jnp.array([[0.5, -0.1, 0.2], [-0.7, 0.3, 0.05]])
  # n = 6, k = 0.5 -> 3 kept: |s| = 0.7, 0.5, 0.3 (not per row).
  np.testing.assert_array_equal(masking.score_mask(s, 0.5), [[1, 0, 0], [1, 1, 0]])


def test_ties_broken_by_lower_index():
  x = jnp.array([1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 3.0])
  # ceil(0.5 * 7) = 4: the 3.0 and the first three 2.0s.
  np.testing.assert_array_equal(masking.topk_mask(x, 0.5), [0, 1, 1, 1, 0, 0, 1])
  # All equal: the first ceil(k n) are kept.
  np.testing.assert_array_equal(
    masking.topk_mask(jnp.zeros(10), 0.3), [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
  )
  # |s| ties between a positive and a negative score: lower index again.
  s = jnp.array([0.1, -0.4, 0.4, 0.2, -0.4])
  np.testing.assert_array_equal(masking.score_mask(s, 0.4), [0, 1, 1, 0, 0])


def test_keep_one_keeps_all():
  s = jnp.asarray(np.random.default_rng(1).standard_normal((4, 5)), jnp.float32)
  np.testing.assert_array_equal(masking.score_mask(s, 1.0), np.ones((4, 5)))
  np.testing.assert_array_equal(masking.score_mask(s, 1), np.ones((4, 5)))
  g = jax.grad(lambda s: jnp.sum(masking.score_mask(s, 1.0) * 2.0))(s)
  np.testing.assert_array_equal(g, 2.0 * np.sign(np.asarray(s)))


def test_mask_is_recomputed_from_scores_under_jit():
  f = jax.jit(masking.score_mask, static_argnums=(1, 2))
  s1 = jnp.array([0.9, 0.1, 0.2, 0.3])
  s2 = jnp.array([0.1, 0.9, 0.2, 0.3])
  np.testing.assert_array_equal(f(s1, 0.25, True), [1, 0, 0, 0])
  np.testing.assert_array_equal(f(s2, 0.25, True), [0, 1, 0, 0])


def test_mask_dtype_follows_scores():
  s = jnp.array([0.5, -0.25, 0.75, 0.1], jnp.bfloat16)
  m = masking.score_mask(s, 0.5)
  assert m.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(m, np.float32), [1, 0, 1, 0])


# ---------------------------------------------------------------------------------------------
# Straight-through gradients by hand.


def test_gradient_with_abs_is_sign_times_upstream():
  s = jnp.array([-0.3, 0.1, -0.5, 0.2, 0.7])
  g_mask = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])  # dL/dmask
  grad = jax.grad(lambda s: jnp.sum(masking.score_mask(s, 0.4) * g_mask))(s)
  # Every score gets sign(s) * g, kept (indices 2, 4) or not.
  np.testing.assert_array_equal(grad, [-1.0, 2.0, -3.0, 4.0, 5.0])


def test_gradient_with_abs_is_zero_at_a_zero_score():
  # sign(0) = 0 (the method: dL/ds = sign(s) * ...; PyTorch's abs backward gives 0 there too).
  s = jnp.array([0.0, -0.5, 0.5, -0.0])
  grad = jax.grad(lambda s: jnp.sum(masking.score_mask(s, 0.5) * jnp.array([1.0, 2.0, 3.0, 4.0])))(
    s
  )
  np.testing.assert_array_equal(grad, [0.0, -2.0, 3.0, 0.0])


def test_gradient_without_abs_is_upstream_unchanged():
  s = jnp.array([-0.3, 0.1, -0.5, 0.2, 0.7])
  g_mask = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
  grad = jax.grad(lambda s: jnp.sum(masking.score_mask(s, 0.4, score_abs=False) * g_mask))(s)
  np.testing.assert_array_equal(grad, g_mask)


def test_gradient_through_an_effective_weight_by_hand():
  # L = sum(x @ (w * mask(s))); dL/dw_eff[i, j] = sum_b x[b, i]; dL/dmask = w * that.
  w = jnp.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]])
  s = jnp.array([[0.2, -0.6], [0.05, -0.1], [0.9, 0.3]])
  x = jnp.array([[1.0, 2.0, 3.0], [0.5, -0.5, 1.0]])

  def loss(s):
    return jnp.sum(x @ (w * masking.score_mask(s, 0.5)))

  x_sum = np.asarray(x).sum(0)[:, None]  # dL/dw_eff, broadcast over columns
  expected = np.sign(np.asarray(s)) * np.asarray(w) * x_sum
  grad = jax.grad(loss)(s)
  np.testing.assert_allclose(grad, expected, rtol=1e-6)
  assert np.all(np.asarray(grad) != 0)  # the 3 dropped scores get a gradient too
  np.testing.assert_array_equal(masking.score_mask(s, 0.5), [[0, 1], [0, 0], [1, 1]])
  # Forward value by hand: effective weight keeps w at the kept entries.
  np.testing.assert_allclose(
    loss(s), np.sum(np.asarray(x) @ (np.asarray(w) * [[0, 1], [0, 0], [1, 1]]))
  )


def test_gradient_under_jit_and_vmap_matches():
  rng = np.random.default_rng(2)
  s = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
  f = lambda s, g: jnp.sum(masking.score_mask(s, 0.25) * g)
  grads = jax.jit(jax.vmap(jax.grad(f)))(s, g)
  chex.assert_trees_all_close(grads, np.sign(np.asarray(s)) * np.asarray(g))


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize(
  'bad', [0, 0.0, -0.1, -1, 1.0000001, 1.5, 2, float('nan'), float('inf'), True, False, '0.5', None]
)
def test_bad_keep_fraction_names_the_field(bad):
  with pytest.raises(ValueError, match=r'strategy\.keep_fraction') as e:
    masking.validate_keep_fraction(bad)
  assert '(0, 1]' in str(e.value)
  with pytest.raises(ValueError, match=r'strategy\.keep_fraction'):
    masking.num_kept(10, bad)
  with pytest.raises(ValueError, match=r'strategy\.keep_fraction'):
    masking.score_mask(jnp.ones(4), bad)


@pytest.mark.parametrize('good', [1e-6, 0.1, 0.5, 1.0, 1])
def test_good_keep_fraction(good):
  assert masking.validate_keep_fraction(good) == float(good)
