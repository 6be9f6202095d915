"""Storage accounting (pemn_jax.storage), checked by hand (docs/method.md, section 7)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from pemn_jax import build, layers, storage, strategies, summary
from pemn_jax.configs import common

HEADER = storage.KEY_BITS + storage.STRATEGY_BITS


def _convmixer_config(dim=256, depth=6, strategy='random_vector_padding', rp_ratio=1e-3, keep=0.5):
  c = common.base_config()
  c.model.name, c.model.dim, c.model.depth = 'convmixer', dim, depth
  c.model.kernel_size, c.model.patch_size = 5, 2
  c.strategy.name, c.strategy.rp_ratio, c.strategy.keep_fraction = strategy, rp_ratio, keep
  return c


def _shapes_and_norm_values(config):
  """Masked kernel shapes by depth and BN values, from an abstract init."""
  model = build.build_model(config)
  shape = build.input_shape(config)
  v = jax.eval_shape(
    model.init,
    {'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)},
    jax.ShapeDtypeStruct((1, *shape), jnp.float32),
  )
  order = build.kernel_order(model, shape)
  shapes = []
  for path in order:
    node = v[layers.FROZEN]
    for k in path:
      node = node[k]
    shapes.append(tuple(node.shape))
  return shapes, summary.norm_values(v['params'])


@pytest.fixture(scope='module')
def convmixer_256_6():
  return _shapes_and_norm_values(_convmixer_config())


def test_paper_example_convmixer_256_6_rp_1e3_is_31_85x(convmixer_256_6):
  shapes, nv = convmixer_256_6
  r = storage.report(shapes, nv, 'random_vector_padding', 0.5, 1e-3)
  p = 437_248
  assert r.masked_weights == p
  assert r.stored_values == 66
  assert r.dense_fp32_bits == 32 * p == 13_991_936
  assert r.paper_bits == 32 * 66 + p == 439_360  # 66 values at 32 bits + 1 bit/weight
  ratio = r.dense_fp32_bits / r.paper_bits
  assert round(ratio, 2) == 31.85
  assert r.as_dict()['ratio_paper'] == ratio


def test_bn_included_and_excluded(convmixer_256_6):
  shapes, nv = convmixer_256_6
  # 13 BatchNorms (stem + 2 per block) x 256 channels x (scale, shift).
  assert nv == 13 * 256 * 2 == 6656
  r = storage.report(shapes, nv, 'random_vector_padding', 0.5, 1e-3)
  d = r.as_dict()
  assert r.paper_bits_with_bn == 439_360 + 32 * 6656
  assert r.dense_fp32_bits_with_bn == 13_991_936 + 32 * 6656
  assert d['paper_bits_with_bn'] == r.paper_bits_with_bn
  assert d['ratio_paper_with_bn'] == pytest.approx(14_204_928 / 652_352)
  assert d['ratio_paper_with_bn'] < d['ratio_paper']


def test_mask_strategy_costs_more_than_dense_under_the_paper_convention(convmixer_256_6):
  shapes, nv = convmixer_256_6
  r = storage.report(shapes, nv, 'mask', 0.5)
  assert r.stored_values == r.masked_weights
  assert r.paper_bits == 33 * r.masked_weights > r.dense_fp32_bits
  assert r.as_dict()['ratio_paper'] < 1
  # Ours: the key replaces every value, so even Mask is about 32x.
  assert r.key_only_bits == HEADER + r.masked_weights
  assert r.dense_fp32_bits / r.key_only_bits == pytest.approx(32, rel=1e-3)


@pytest.mark.parametrize(
  'strategy, rp',
  [
    ('mask', None),
    ('one_layer', None),
    ('max_layer_padding', None),
    ('random_vector_padding', 1e-5),
  ],
)
def test_paper_ceiling_is_32x_and_key_only_is_the_same_for_every_strategy(
  convmixer_256_6, strategy, rp
):
  shapes, nv = convmixer_256_6
  r = storage.report(shapes, nv, strategy, 0.5, rp)
  assert r.dense_fp32_bits / r.paper_bits < 32
  assert r.key_only_bits == HEADER + 437_248
  assert r.rp_ratio == rp


def test_stored_values_per_strategy_convmixer_256_6(convmixer_256_6):
  shapes, nv = convmixer_256_6
  count = lambda name, rp=None: storage.report(shapes, nv, name, 0.5, rp).stored_values
  assert count('mask') == 437_248
  # OL: stem, one depthwise, one pointwise prototype, and the classifier.
  assert count('one_layer') == 3072 + 6400 + 65_536 + 2560
  assert count('max_layer_padding') == 65_536
  assert [count('random_vector_padding', r) for r in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)] == [
    6554,
    656,
    66,
    7,
    1,
  ]


def test_binary_entropy():
  assert storage.binary_entropy(0.5) == 1.0
  assert round(storage.binary_entropy(0.1), 3) == 0.469
  assert storage.binary_entropy(0.1) == pytest.approx(
    -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
  )
  assert storage.binary_entropy(0.0) == storage.binary_entropy(1.0) == 0.0
  assert storage.binary_entropy(0.3) == pytest.approx(storage.binary_entropy(0.7))


def test_entropy_bits_at_k_0_1(convmixer_256_6):
  shapes, nv = convmixer_256_6
  p = 437_248
  # A layer of 1000 keeps exactly 100: 1000 * H(0.1).
  assert storage.mask_entropy_bits([(10, 100)], 0.1) == pytest.approx(
    1000 * storage.binary_entropy(0.1)
  )
  r = storage.report(shapes, nv, 'random_vector_padding', 0.1, 1e-3)
  # ceil(0.1 n) per layer is within one entry of 0.1 n: n * H(0.1) up to a hair.
  assert r.entropy_bits - HEADER == pytest.approx(p * 0.469, rel=1e-3)
  assert r.dense_fp32_bits / r.entropy_bits > 32 / 0.47  # past the 32x ceiling: ~68x
  # At k = 0.5 (every layer has an even size) the bound is exactly one bit per entry.
  r5 = storage.report(shapes, nv, 'random_vector_padding', 0.5, 1e-3)
  assert r5.entropy_bits == r5.key_only_bits == HEADER + p


def test_entropy_uses_the_exact_kept_count():
  # n = 3 at k = 0.5 keeps 2 (ceil 1.5): 3 * H(2/3), not 3 * H(0.5).
  assert storage.mask_entropy_bits([(3, 1)], 0.5) == pytest.approx(
    3 * storage.binary_entropy(2 / 3)
  )
  assert storage.mask_entropy_bits([(4, 2)], 1.0) == 0.0


def test_csr_bits_by_hand():
  # A conv (3, 3, 2, 4) in Flax layout: PyTorch (4, 2, 3, 3) -> a 4 x 18 matrix of 72 weights.
  # Sparsity 0.75 keeps 18: 18 values + 18 column indices + 5 row pointers, 32 bits each.
  assert storage.csr_bits([(3, 3, 2, 4)], 0.75) == 18 * 32 + 18 * 32 + 5 * 32 == 1312
  # A dense (4, 3) (in, out): a 3 x 4 matrix; sparsity 0.5 keeps 6.
  assert storage.csr_bits([(4, 3)], 0.5) == 6 * 64 + 4 * 32 == 512
  assert storage.csr_bits([(3, 3, 2, 4), (4, 3)], 0.75) == 1312 + (3 * 64 + 4 * 32)
  # Other widths: 16-bit values, 8-bit indices.
  assert storage.csr_bits([(4, 3)], 0.5, value_bits=16, index_bits=8) == 6 * 24 + 4 * 8
  # No sparsity: every value plus its index.
  assert storage.csr_bits([(4, 3)], 0.0) == 12 * 64 + 4 * 32


@pytest.mark.parametrize('bad', [1.0, 1.5, -0.1])
def test_csr_bad_sparsity(bad):
  with pytest.raises(ValueError, match='sparsity'):
    storage.csr_bits([(4, 3)], bad)


def test_sparse_baseline_vs_pemn_at_90_percent(convmixer_256_6):
  shapes, nv = convmixer_256_6
  csr = storage.csr_bits(shapes, 0.9)
  r = storage.report(shapes, nv, 'random_vector_padding', 0.5, 1e-3)
  # Kept per layer, round(0.1 d): stem 307, depthwise 640 (x6), pointwise 6554 (x6), head 256.
  nnz = 307 + 6 * (640 + 6554) + 256
  # Row pointers: out + 1 per layer; 256 outputs for every conv, 10 for the head.
  pointers = 13 * 257 + 11
  assert csr == 64 * nnz + 32 * pointers == 2_905_792
  # About 2 p (1 - r) numbers of 32 bits (6.4 bits a weight) plus the row pointers, against
  # about 1 bit a weight for PEMN.
  assert 6.4 < csr / 437_248 < 6.7
  assert r.paper_bits < csr / 6


def test_report_validates_its_inputs():
  with pytest.raises(ValueError, match=r'strategy\.keep_fraction'):
    storage.report([(4, 3)], 0, 'mask', 0.0)
  with pytest.raises(ValueError, match=r'strategy\.name'):
    storage.report([(4, 3)], 0, 'bogus', 0.5)
  with pytest.raises(ValueError, match=r'strategy\.rp_ratio'):
    storage.report([(4, 3)], 0, 'random_vector_padding', 0.5, None)


def test_format_table_mentions_every_row(convmixer_256_6):
  shapes, nv = convmixer_256_6
  table = storage.format_table(storage.report(shapes, nv, 'random_vector_padding', 0.5, 1e-3))
  for text in (
    'dense fp32',
    'paper convention',
    'key + 1-bit masks',
    'entropy',
    'r=0.001',
    '31.85x',
    'BN excluded',
    'BN included',
    '437,248',
  ):
    assert text in table, text


def test_summarize_agrees_with_report(convmixer_256_6):
  # The summary ``pemn inspect`` prints, from given variables (no init compile needed).
  config = _convmixer_config()
  model = build.build_model(config)
  abstract = jax.eval_shape(lambda: build.init_variables(model, config))
  variables = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
  report = summary.summarize(config, variables)
  shapes, nv = convmixer_256_6
  assert report['masked_weights'] == 437_248
  assert report['unique_values'] == 66
  assert report['norm_values'] == nv
  assert [tuple(layer['shape']) for layer in report['layers']] == shapes
  expected = storage.report(shapes, nv, 'random_vector_padding', 0.5, 1e-3).as_dict()
  assert report['storage'] == expected
  assert strategies.stored_value_count(shapes, 'random_vector_padding', 1e-3) == 66


def test_summarize_abstract_draws_nothing_and_agrees(convmixer_256_6):
  # abstract=True is what experiments/storage_table.py uses for the paper's large models.
  config = _convmixer_config()
  report = summary.summarize(config, abstract=True)
  shapes, nv = convmixer_256_6
  assert report['masked_weights'] == 437_248 and report['unique_values'] == 66
  assert 'distinct_values_present' not in report
  assert (
    report['storage'] == storage.report(shapes, nv, 'random_vector_padding', 0.5, 1e-3).as_dict()
  )
