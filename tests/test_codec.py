"""Tests for pemn_jax.codec: lossless mask storage (packbits or static rANS)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pemn_jax.codec import (
  METHOD_PACKBITS,
  METHOD_RANS,
  decode_mask,
  encode_mask,
  entropy_bits,
  packed_bits,
)

HEADER_SLACK_BITS = 8 * 16  # method byte, varints n and m, state length, byte rounding


def _random_mask(rng, shape, k):
  return rng.random(shape) < k


def _topk_mask(rng, n, k):
  m = math.ceil(k * n)
  mask = np.zeros(n, dtype=bool)
  mask[np.argsort(rng.random(n), kind='stable')[:m]] = True
  return mask


def _packbits_len(n):
  return 1 + len(_varint(n)) + (n + 7) // 8


def _varint(v):
  out = bytearray()
  while True:
    b, v = v & 0x7F, v >> 7
    out.append(b | (0x80 if v else 0))
    if not v:
      return bytes(out)


@pytest.mark.parametrize('n', [1, 7, 8, 100, 10_000, 300_000])
@pytest.mark.parametrize('k', [0.5, 0.3, 0.1, 0.05, 0.01])
def test_round_trip_random(n, k):
  rng = np.random.default_rng(n * 1000 + int(k * 100))
  mask = _random_mask(rng, n, k)
  for method in (None, METHOD_PACKBITS, METHOD_RANS):
    data = encode_mask(mask, method=method)
    out = decode_mask(data, (n,))
    assert out.dtype == np.bool_ and out.shape == (n,)
    np.testing.assert_array_equal(out, mask)
    if method is not None:
      assert data[0] & 0x0F == method


@pytest.mark.parametrize('n', [0, 1, 7, 8, 17, 100, 10_000])
@pytest.mark.parametrize('value', [False, True])
def test_constant_masks(n, value):
  mask = np.full(n, value, dtype=bool)
  for method in (None, METHOD_PACKBITS, METHOD_RANS):
    data = encode_mask(mask, method=method)
    np.testing.assert_array_equal(decode_mask(data, n), mask)
  if n >= 100:  # constant masks cost only the header
    assert encode_mask(mask)[0] == METHOD_RANS  # no state follows
    assert len(encode_mask(mask)) <= 8


@pytest.mark.parametrize('shape', [(3, 5), (2, 3, 4, 5), (16, 16, 3, 3), (1,), (0, 4)])
def test_multidim_shapes(shape):
  rng = np.random.default_rng(1)
  mask = _random_mask(rng, shape, 0.1)
  for method in (None, METHOD_PACKBITS, METHOD_RANS):
    out = decode_mask(encode_mask(mask, method=method), shape)
    assert out.shape == shape
    np.testing.assert_array_equal(out, mask)


def test_non_contiguous_input():
  rng = np.random.default_rng(2)
  base = _random_mask(rng, (64, 48, 3), 0.2)
  for view in (base.T, base[::2, 1::3], np.asfortranarray(base), base[:, :, 1]):
    for method in (None, METHOD_PACKBITS, METHOD_RANS):
      out = decode_mask(encode_mask(view, method=method), view.shape)
      np.testing.assert_array_equal(out, view)


@pytest.mark.parametrize('n', [100, 10_000, 65_536, 300_000])
@pytest.mark.parametrize('k', [0.5, 0.3, 0.1, 0.05, 0.01])
def test_topk_exact(n, k):
  rng = np.random.default_rng(n + int(k * 1000))
  mask = _topk_mask(rng, n, k).reshape(-1, 4) if n % 4 == 0 else _topk_mask(rng, n, k)
  assert int(mask.sum()) == math.ceil(k * n)
  data = encode_mask(mask)
  np.testing.assert_array_equal(decode_mask(data, mask.shape), mask)


@pytest.mark.parametrize('n', [10_000, 65_536, 300_000])
@pytest.mark.parametrize('k', [0.05, 0.1, 0.3, 0.5])
def test_size_near_entropy(n, k):
  rng = np.random.default_rng(7 * n + int(k * 100))
  mask = _topk_mask(rng, n, k)
  ones = int(mask.sum())
  bits = 8 * len(encode_mask(mask))
  assert bits <= 1.02 * entropy_bits(n, ones) + HEADER_SLACK_BITS
  # The rANS payload alone is much tighter than 2% on the i.i.d. model.
  rans_bits = 8 * len(encode_mask(mask, method=METHOD_RANS))
  assert rans_bits <= 1.005 * entropy_bits(n, ones) + HEADER_SLACK_BITS
  if n >= 65_536:  # header included, the 2% goal holds outright
    assert bits <= 1.02 * entropy_bits(n, ones)


@pytest.mark.parametrize('n', [1, 7, 8, 9, 100, 1000, 10_000, 300_000])
@pytest.mark.parametrize('k', [0.5, 0.45, 0.3, 0.05])
def test_choice_never_larger_than_packbits(n, k):
  rng = np.random.default_rng(n + 3)
  mask = _random_mask(rng, n, k)
  data = encode_mask(mask)
  assert len(data) == min(
    len(encode_mask(mask, method=METHOD_PACKBITS)), len(encode_mask(mask, method=METHOD_RANS))
  )
  assert len(data) <= _packbits_len(n)
  assert 8 * (len(data) - 1 - len(_varint(n))) <= packed_bits(n)


def test_entropy_and_packed_bits():
  assert entropy_bits(10, 0) == 0.0 and entropy_bits(10, 10) == 0.0
  assert entropy_bits(1000, 500) == pytest.approx(1000.0)
  assert entropy_bits(1000, 100) / 1000 == pytest.approx(0.4690, abs=1e-4)
  assert packed_bits(0) == 0 and packed_bits(1) == 8 and packed_bits(16) == 16
  assert packed_bits(17) == 24
  with pytest.raises(ValueError):
    entropy_bits(5, 6)


def test_rejects_non_bool():
  with pytest.raises(TypeError):
    encode_mask(np.array([0, 1, 1]))
  with pytest.raises(ValueError):
    encode_mask(np.array([True]), method=7)


@pytest.fixture(scope='module')
def encoded_examples():
  rng = np.random.default_rng(11)
  mask = _topk_mask(rng, 20_000, 0.1)
  return {
    'rans': (encode_mask(mask), mask),
    'packbits': (encode_mask(_topk_mask(rng, 20_000, 0.5)), None),
  }


def test_truncated_raises(encoded_examples):
  for data, _ in encoded_examples.values():
    for cut in (0, 1, 2, 3, 5, 8, 9, len(data) // 2, len(data) - 4, len(data) - 1):
      with pytest.raises(ValueError):
        decode_mask(data[:cut], (20_000,))
    with pytest.raises(ValueError):  # trailing garbage
      decode_mask(data + b'\x00\x00\x00\x00', (20_000,))


def test_corrupted_raises(encoded_examples):
  data, mask = encoded_examples['rans']
  assert data[0] & 0x0F == METHOD_RANS
  np.testing.assert_array_equal(decode_mask(data, (20_000,)), mask)
  rng = np.random.default_rng(5)
  positions = sorted(set(rng.integers(0, len(data), size=40).tolist()) | {0, 1, 4, 5, 6, 7})
  for pos in positions:
    for flip in (0x01, 0x80, 0xFF):
      bad = bytearray(data)
      bad[pos] ^= flip
      with pytest.raises(ValueError):
        decode_mask(bytes(bad), (20_000,))


def test_header_mismatches_raise():
  mask = np.zeros(100, dtype=bool)
  mask[::7] = True
  for method in (METHOD_PACKBITS, METHOD_RANS):
    data = encode_mask(mask, method=method)
    with pytest.raises(ValueError, match='entries'):
      decode_mask(data, (101,))
  with pytest.raises(ValueError, match='empty'):
    decode_mask(b'', (100,))
  with pytest.raises(ValueError, match='method'):
    decode_mask(bytes([9]) + encode_mask(mask)[1:], (100,))
  with pytest.raises(ValueError, match='method byte'):  # packbits with a state length
    decode_mask(bytes([0x10]) + encode_mask(mask, method=METHOD_PACKBITS)[1:], (100,))
  with pytest.raises(ValueError, match='state length'):  # rANS state length 9
    decode_mask(bytes([0x91]) + encode_mask(mask, method=METHOD_RANS)[1:], (100,))
  # count of ones larger than n
  with pytest.raises(ValueError):
    decode_mask(bytes([METHOD_RANS, 100, 101]), (100,))
  # constant-mask header followed by junk, or claiming a state
  with pytest.raises(ValueError):
    decode_mask(bytes([METHOD_RANS, 100, 0, 1]), (100,))
  with pytest.raises(ValueError):
    decode_mask(bytes([METHOD_RANS | 0x10, 100, 0]), (100,))
  # nonzero packbits padding
  with pytest.raises(ValueError, match='padding'):
    decode_mask(bytes([METHOD_PACKBITS, 3, 0b1110_0001]), (3,))
