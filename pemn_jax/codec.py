"""Lossless compact storage of binary PEMN masks.

Each layer's boolean mask is stored either bit-packed or entropy-coded, whichever is smaller.
The result is a self-describing byte string; ``decode_mask(data, shape)`` inverts it exactly.

Format (all integers are unsigned LEB128 varints unless noted)::

    byte 0      low nibble: method id, 0 = packbits, 1 = static rANS;
                high nibble: length s of the final rANS state in bytes (0 for packbits
                and for constant masks, 1..8 otherwise)
    varint n    number of mask entries (checked against ``prod(shape)`` on decode)

    method 0:   ceil(n/8) bytes of ``np.packbits(mask.ravel())`` (big-endian bit order,
                padding bits zero)
    method 1:   varint m          number of ones
                if 0 < m < n:
                  s bytes         final rANS state, little endian, most significant byte != 0
                  4*w bytes       rANS output words (little-endian uint32), in decoding order
                (if m == 0 or m == n nothing follows: the mask is constant)

Entropy coder (method 1)
------------------------
The flattened mask (C order) is zero-padded to a multiple of 16 bits and cut into 16-bit
symbols (big-endian bit order, as packbits). Masks are top-k of random scores, so entries
are modelled as i.i.d. Bernoulli(p) with the *empirical* p = m/n, which the header carries
exactly as the integer m. A symbol with j ones has probability p^j (1-p)^(16-j); its rANS
frequency out of M = 2^32 is computed in exact integer arithmetic (no floats, so tables are
bit-identical on every platform)::

    f_j = floor((M - 65536) * m^j (n-m)^(16-j) / n^16) + 1

Every symbol therefore has frequency >= 1 and the total is <= M; the (< 65536) remainder
goes to the most frequent symbol. The quantisation loss is below 2^-16 of a bit per symbol.
The coder is a standard rANS with 64-bit state in [2^32, 2^64) and 32-bit renormalisation
words (at most one word per symbol each way). The encoder starts from state 1 instead of the
usual lower bound, so no initial-state bits are wasted; the decoder only pulls a word while
words remain, and must finish with state 1 and every word consumed. The final state is stored
with a variable number of bytes (its length lives in the method byte). Total overhead beyond
n*H(p) is therefore the header (1 + varint n + varint m: 5 bytes for n = 10^4, 7 for n = 6e5),
<= 1 byte of state rounding, and the zero padding (< 16 * -log2(1-p) bits).

The sequential part is one Python loop over n/16 symbols (37k iterations for 600k entries);
the symbol split, frequency/cumulative lookups and (un)packing are vectorised in numpy, and
decoding uses ``bisect`` on the cumulative table.

Decoding validates everything it can: method id, varints, n against the shape, m <= n, the
payload lengths, that the rANS decoder ends in its initial state having consumed every word,
that the padding bits are zero and that the number of decoded ones equals m. Any violation
raises ``ValueError``; a wrong-length mask is never returned. ``peek`` reads the header alone
(method, n, m: at most 21 bytes), so a caller can check the counts against what it expects
before ``decode_mask`` allocates n entries; an rANS body with more words than symbols is
refused before its words are read. These checks are not a checksum:
packbits payloads have no redundancy at all, and in a fuzz run 8 of 20,000 random single-byte
corruptions of rANS streams (n = 200..20,000) still decoded, to a different mask of the right
length and count. Integrity is the outer file format's checksum's job.

Why this design (measured on this machine, 2-core AMD EPYC, Python 3.11, numpy 2.4; see
``experiments/bench_codec.py`` and ``experiments/results/codec.md``):

* one 600,000-entry mask, header included: 1.0003 / 1.0007 / 1.0009 x n*H(p) at
  k = 0.3 / 0.1 / 0.05; encode ~0.01 s, decode ~0.02 s.
* 65,536 entries: 1.0016 / 1.0031 / 1.0041; 10,000 entries: 1.0067 / 1.0149 / 1.0196
  (there the 5-byte header is most of the excess).
* ConvMixer-256/8 (581,120 entries in 18 layers, 3 of them small): 1.0026 / 1.0051 / 1.0082
  x sum_l n_l*H(p_l) at k = 0.3 / 0.1 / 0.05; at k = 0.5 every layer picks packbits
  (1.0009, the header). Whole model: encode <= 0.02 s, decode <= 0.035 s.

Alternatives considered: a per-bit arithmetic coder in Python needs 16x more loop iterations.
Golomb coding of zero runs (optimal parameter) is vectorisable, but its redundancy over
p in 0.05..0.5 reaches 4.1% (p ~ 0.38; computed exactly for geometric runs), missing the 2%
goal. rANS over 8-bit symbols is just as tight but needs twice the loop iterations. The
compiled ``constriction`` package would add a binary dependency without any size gain, and
the pure-Python loop is already ~100x under the time budget.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np

__all__ = [
  'METHOD_PACKBITS',
  'METHOD_RANS',
  'MaskHeader',
  'decode_mask',
  'encode_mask',
  'entropy_bits',
  'packed_bits',
  'peek',
]

METHOD_PACKBITS = 0
METHOD_RANS = 1

_SYM_BITS = 16
_NSYM = 1 << _SYM_BITS
_PREC_BITS = 32  # log2 of the rANS frequency total M
_M = 1 << _PREC_BITS
_SLOT_MASK = _M - 1
_WORD_BITS = 32
_WORD_MASK = (1 << _WORD_BITS) - 1
_L = 1 << 32  # lower bound of the normalised state interval [L, L * 2^32)
_X_INIT = 1  # encoder start state (= required decoder end state)


# ----------------------------------------------------------------------------- sizes


def entropy_bits(n: int, ones: int) -> float:
  """Entropy bound ``n * H(ones / n)`` in bits for a mask with ``ones`` ones out of ``n``."""
  n, ones = int(n), int(ones)
  if n < 0 or ones < 0 or ones > n:
    raise ValueError(f'need 0 <= ones <= n, got n={n}, ones={ones}')
  if ones == 0 or ones == n:
    return 0.0
  zeros = n - ones
  return -(ones * math.log2(ones / n) + zeros * math.log2(zeros / n))


def packed_bits(n: int) -> int:
  """Size in bits of the bit-packed payload (``np.packbits``) of ``n`` entries."""
  n = int(n)
  if n < 0:
    raise ValueError(f'n must be >= 0, got {n}')
  return 8 * ((n + 7) // 8)


# ----------------------------------------------------------------------------- varints


def _put_varint(out: bytearray, v: int) -> None:
  if v < 0:
    raise ValueError('varint must be non-negative')
  while True:
    b = v & 0x7F
    v >>= 7
    if v:
      out.append(b | 0x80)
    else:
      out.append(b)
      return


def _get_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
  v = 0
  shift = 0
  while True:
    if pos >= len(data):
      raise ValueError(f'mask codec: truncated data while reading {what}')
    b = data[pos]
    pos += 1
    v |= (b & 0x7F) << shift
    if not b & 0x80:
      if b == 0 and shift:
        raise ValueError(f'mask codec: non-canonical varint for {what}')
      return v, pos
    shift += 7
    if shift > 63:
      raise ValueError(f'mask codec: varint for {what} is too long (corrupted data?)')


# ----------------------------------------------------------------------------- rANS model


@lru_cache(maxsize=1)
def _popcount16() -> np.ndarray:
  sym = np.arange(_NSYM, dtype='>u2').view(np.uint8)
  return np.unpackbits(sym).reshape(_NSYM, _SYM_BITS).sum(axis=1).astype(np.intp)


@lru_cache(maxsize=4)
def _table(n: int, ones: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
  """Static rANS table for the i.i.d. Bernoulli(ones/n) model of 16-bit symbols.

  Exact integer arithmetic, so encoder and decoder agree on every platform.
  Returns (freq, cum) as int64 arrays and as Python lists (cum has NSYM + 1 entries).
  """
  zeros = n - ones
  scale = _M - _NSYM
  den = n**_SYM_BITS
  fj = [scale * ones**j * zeros ** (_SYM_BITS - j) // den + 1 for j in range(_SYM_BITS + 1)]
  freq = np.asarray(fj, dtype=np.int64)[_popcount16()]
  resid = _M - int(freq.sum())
  assert 0 <= resid <= _NSYM
  freq[int(np.argmax(freq))] += resid
  cum = np.zeros(_NSYM + 1, dtype=np.int64)
  np.cumsum(freq, out=cum[1:])
  assert int(cum[-1]) == _M
  return freq, cum, freq.tolist(), cum.tolist()


def _symbols(bits: np.ndarray) -> np.ndarray:
  packed = np.packbits(bits)
  if packed.size % 2:
    packed = np.append(packed, np.uint8(0))
  return packed.view('>u2')


def _rans_encode(bits: np.ndarray, ones: int) -> tuple[int, bytes]:
  """Return (length of the final state in bytes, state bytes + words)."""
  n = bits.size
  freq, cum, _, _ = _table(n, ones)
  syms = _symbols(bits).astype(np.intp)
  f_sel = freq[syms]
  f_list = f_sel.tolist()
  c_list = cum[syms].tolist()
  xmax_list = (f_sel.astype(np.uint64) << np.uint64(_WORD_BITS)).tolist()

  x = _X_INIT
  words: list[int] = []
  emit = words.append
  for i in range(len(f_list) - 1, -1, -1):
    f = f_list[i]
    if x >= xmax_list[i]:
      emit(x & _WORD_MASK)
      x >>= _WORD_BITS
    q, r = divmod(x, f)
    x = (q << _PREC_BITS) + r + c_list[i]

  state = x.to_bytes((x.bit_length() + 7) // 8, 'little')
  words.reverse()  # decoder reads words in the reverse order of emission
  return len(state), state + np.asarray(words, dtype='<u4').tobytes()


def _rans_decode(payload: bytes, slen: int, n: int, ones: int) -> np.ndarray:
  if not 1 <= slen <= 8:
    raise ValueError(f'mask codec: invalid rANS state length {slen} (corrupted data?)')
  if len(payload) < slen:
    raise ValueError('mask codec: truncated data inside the rANS state')
  state = payload[:slen]
  if state[-1] == 0:
    raise ValueError('mask codec: non-canonical rANS state (corrupted data?)')
  body = payload[slen:]
  if len(body) % 4:
    raise ValueError(
      f'mask codec: rANS body of {len(body)} bytes is not a whole number of 32-bit words '
      '(truncated or corrupted data)'
    )
  nsym = (n + _SYM_BITS - 1) // _SYM_BITS
  if len(body) // 4 > nsym:
    # The decoder pulls at most one word per symbol: more words than symbols is never a valid
    # stream, and refusing it here bounds the word list by the symbol count.
    raise ValueError(
      f'mask codec: rANS body holds {len(body) // 4} words for {nsym} symbols (corrupted data)'
    )
  words = np.frombuffer(body, dtype='<u4').tolist()
  nwords = len(words)

  _, _, freq, cum = _table(n, ones)
  out = [0] * nsym
  x = int.from_bytes(state, 'little')
  pos = 0
  for i in range(nsym):
    slot = x & _SLOT_MASK
    s = bisect_right(cum, slot) - 1
    x = freq[s] * (x >> _PREC_BITS) + slot - cum[s]
    if x < _L and pos < nwords:
      x = (x << _WORD_BITS) | words[pos]
      pos += 1
    out[i] = s
  if pos != nwords or x != _X_INIT:
    raise ValueError(
      'mask codec: rANS stream is inconsistent (decoder ended in state '
      f'{x} after {pos}/{nwords} words; truncated or corrupted data)'
    )
  raw = np.asarray(out, dtype='>u2').view(np.uint8)
  bits = np.unpackbits(raw)
  if bits[n:].any():
    raise ValueError('mask codec: nonzero padding bits in rANS payload (corrupted data)')
  return bits[:n].astype(bool)


# ----------------------------------------------------------------------------- public API


def _as_flat_bool(mask: np.ndarray) -> np.ndarray:
  arr = np.asarray(mask)
  if arr.dtype != np.bool_:
    raise TypeError(f'encode_mask expects a boolean array, got dtype {arr.dtype}')
  return arr.ravel()  # C order; copies non-contiguous input


def encode_mask(mask: np.ndarray, method: int | None = None) -> bytes:
  """Encode a boolean mask (any shape, C order) into self-describing bytes.

  ``method=None`` (default) stores whichever of packbits (0) and rANS (1) is smaller
  (packbits on ties); pass ``METHOD_PACKBITS`` or ``METHOD_RANS`` to force one.
  The shape is not stored; only the entry count n is, and it is checked on decode.
  """
  bits = _as_flat_bool(mask)
  n = bits.size
  if method not in (None, METHOD_PACKBITS, METHOD_RANS):
    raise ValueError(f'unknown mask codec method {method!r}')

  candidates = []
  if method in (None, METHOD_PACKBITS):
    out = bytearray([METHOD_PACKBITS])
    _put_varint(out, n)
    out += np.packbits(bits).tobytes()
    candidates.append(bytes(out))
  if method in (None, METHOD_RANS):
    ones = int(np.count_nonzero(bits))
    slen, body = _rans_encode(bits, ones) if 0 < ones < n else (0, b'')
    out = bytearray([METHOD_RANS | (slen << 4)])
    _put_varint(out, n)
    _put_varint(out, ones)
    out += body
    candidates.append(bytes(out))
  return min(candidates, key=len)  # min() keeps the first (packbits) on ties


class MaskHeader(NamedTuple):
  """What an encoded mask says about itself, read without decoding it (``peek``).

  Attributes:
    method: ``METHOD_PACKBITS`` or ``METHOD_RANS``.
    n: number of entries.
    ones: number of ones (rANS only; None for packbits, which does not record it).
    payload_length: bytes after the header (packbits: exactly ``ceil(n / 8)`` when valid).
  """

  method: int
  n: int
  ones: int | None
  payload_length: int


def peek(data: bytes) -> MaskHeader:
  """The header of an encoded mask (method, entry count, count of ones), nothing decoded.

  Reads at most the first 21 bytes whatever the mask's size, so a reader can check the counts
  against what it expects (a model's layer shape and kept count) before ``decode_mask``
  allocates ``n`` entries. Raises ``ValueError`` for an unknown method or a malformed header.
  """
  if not data:
    raise ValueError('mask codec: empty data')
  method, slen = data[0] & 0x0F, data[0] >> 4
  n, pos = _get_varint(data, 1, 'entry count')
  ones = None
  if method == METHOD_PACKBITS:
    if slen:
      raise ValueError(f'mask codec: invalid packbits method byte {data[0]:#04x}')
  elif method == METHOD_RANS:
    ones, pos = _get_varint(data, pos, 'count of ones')
    if ones > n:
      raise ValueError(f'mask codec: count of ones {ones} exceeds entry count {n}')
  else:
    raise ValueError(f'mask codec: unknown method id {method} (corrupted data?)')
  return MaskHeader(method, n, ones, len(data) - pos)


def decode_mask(data: bytes, shape: int | Sequence[int]) -> np.ndarray:
  """Decode bytes from :func:``encode_mask`` into a boolean array of ``shape``.

  Raises ``ValueError`` if the data is truncated, corrupted, or does not match ``shape``.
  """
  data = bytes(data)
  shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
  if any(s < 0 for s in shape):
    raise ValueError(f'invalid shape {shape}')
  n_expected = math.prod(shape)
  head = peek(data)
  n, ones = head.n, head.ones
  if n != n_expected:
    raise ValueError(f'mask codec: data holds {n} entries but shape {shape} needs {n_expected}')
  payload = data[len(data) - head.payload_length :]

  if head.method == METHOD_PACKBITS:
    need = (n + 7) // 8
    if len(payload) != need:
      raise ValueError(
        f'mask codec: packbits payload is {len(payload)} bytes, expected {need} '
        '(truncated or corrupted data)'
      )
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))
    if bits[n:].any():
      raise ValueError('mask codec: nonzero padding bits in packbits payload')
    flat = bits[:n].astype(bool)
  else:  # METHOD_RANS (peek refused every other method)
    slen = data[0] >> 4
    if ones == 0 or ones == n:
      if payload or slen:
        raise ValueError('mask codec: unexpected payload after a constant-mask header')
      flat = np.full(n, ones == n, dtype=bool)
    else:
      flat = _rans_decode(payload, slen, n, ones)
      got = int(np.count_nonzero(flat))
      if got != ones:
        raise ValueError(f'mask codec: decoded {got} ones but header says {ones} (corrupted data)')

  if flat.size != n_expected:  # defensive: never hand back a wrong-length mask
    raise ValueError(f'mask codec: decoded {flat.size} entries, expected {n_expected}')
  return flat.reshape(shape)
