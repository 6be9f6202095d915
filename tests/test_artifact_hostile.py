"""Hostile .pemn files: each is refused with a one-line ArtifactError, quickly and in little memory.

The files derive from a real artifact (a two-step smoke run, exported): its bytes flipped and cut,
and its header re-packed with a correct sha256 after a change (``pack``), so that the checksum
passes and everything after it is exercised: schema, limits, the model the config describes, the
masks and the key. Memory is measured with ``tracemalloc`` (numpy's buffers included): what the
reader allocates must be justified by the file's size, not by what the file claims.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import time
import tracemalloc
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pemn_jax import artifact, build, codec, layers, train
from pemn_jax.configs import common, smoke

# What any refusal may allocate besides the file itself: the reader's fixed working set (a
# 4 MiB header at most, tracing the smoke model abstractly), far below what a file can claim.
MEMORY_BASE = 16 * 2**20
MEMORY_PER_FILE_BYTE = 4  # the file, its payload copy, the header inflated from it
SECONDS = 10.0  # a refusal is one stat, one read and a header's checks; generous for slow CI
_PREFIX = struct.Struct('<8sIQ')


# ----------------------------------------------------------------------------------------------
# The real artifact and the helpers that take it apart and put it back together.


def smoke_artifact(tmp_path_factory, data_dir) -> str:
  """A real artifact of a two-step smoke run, trained and exported once per session."""
  base = tmp_path_factory.getbasetemp() / 'hostile-smoke-artifact'
  out = base / 'model.pemn'
  if not out.exists():
    config = smoke.get_config()
    over = {'data.data_dir': data_dir, 'train.num_steps': 2, 'train.checkpoint_every_steps': 2}
    workdir = str(base / 'workdir')
    train.train_and_evaluate(common.with_overrides(config, over), workdir)
    train.export_workdir(workdir, str(base / 'tmp.pemn'))
    os.replace(base / 'tmp.pemn', out)  # whole, or absent for the next caller
  return str(out)


def split(blob: bytes) -> tuple[dict, bytes]:
  """(header, payload) of a well-formed artifact's bytes, with no checks."""
  _, _, hlen = _PREFIX.unpack_from(blob)
  return json.loads(zlib.decompress(blob[_PREFIX.size : _PREFIX.size + hlen])), blob[
    _PREFIX.size + hlen : -32
  ]


def pack(
  header=None,
  payload: bytes = b'',
  *,
  raw: bytes | None = None,
  compressed: bytes | None = None,
  version: int | None = None,
  hlen: int | None = None,
) -> bytes:
  """An artifact's bytes with a CORRECT sha256: ``header`` as the writer serialises it, or
  ``raw`` JSON bytes, or ``compressed`` header bytes as they are; ``hlen`` overrides the
  prefix's header length; ``version`` the prefix's format version (default: the header's
  ``format_version`` where it is an integer, else ``FORMAT_VERSION``)."""
  if version is None:
    recorded = header.get('format_version') if isinstance(header, dict) else None
    version = (
      recorded if isinstance(recorded, int) and 0 <= recorded < 2**32 else artifact.FORMAT_VERSION
    )
  if compressed is None:
    if raw is None:
      raw = json.dumps(header, sort_keys=True, separators=(',', ':')).encode()
    compressed = zlib.compress(raw, 9)
  n = len(compressed) if hlen is None else hlen
  body = _PREFIX.pack(artifact.MAGIC, version, n) + compressed + payload
  return body + hashlib.sha256(body).digest()


def refused(path, fn=artifact.read, match: str | None = None, size: int | None = None) -> str:
  """``fn(path)`` raises ArtifactError (matching ``match``): one line, within SECONDS, in
  tracemalloc peak at most MEMORY_BASE + MEMORY_PER_FILE_BYTE x the file's size."""
  path = str(path)
  if size is None:
    size = os.path.getsize(path) if os.path.isfile(path) else 0
  tracemalloc.start()
  started = time.perf_counter()
  try:
    with pytest.raises(artifact.ArtifactError, match=match) as err:
      fn(path)
  finally:
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  message = str(err.value)
  assert message and len(message.splitlines()) == 1, message
  assert elapsed < SECONDS, f'{elapsed:.1f} s: {message}'
  limit = MEMORY_BASE + MEMORY_PER_FILE_BYTE * size
  assert peak <= limit, f'peak {peak:,} bytes > {limit:,} for a {size:,}-byte file: {message}'
  return message


@pytest.fixture(scope='module')
def original(tmp_path_factory, data_dir) -> str:
  path = smoke_artifact(tmp_path_factory, data_dir)
  artifact.read(path)  # warm the caches a first read fills, outside any measured call
  return path


@pytest.fixture(scope='module')
def parts(original) -> tuple[bytes, dict, bytes]:
  blob = open(original, 'rb').read()
  return (blob, *split(blob))


def _write(tmp_path, blob: bytes, name: str = 'hostile.pemn') -> str:
  path = tmp_path / name
  path.write_bytes(blob)
  return str(path)


def test_pack_of_the_unchanged_header_is_the_original(parts):
  blob, header, payload = parts
  assert pack(header, payload) == blob  # the helper writes exactly what export writes


# ----------------------------------------------------------------------------------------------
# Files that are not artifacts, and damaged artifacts.


def test_dev_zero_empty_directory_missing_fifo(tmp_path):
  assert 'not a regular file' in refused('/dev/zero')
  assert 'is empty' in refused(_write(tmp_path, b'', 'empty.pemn'))
  assert 'directory' in refused(tmp_path)
  assert 'does not exist' in refused(tmp_path / 'missing.pemn')
  fifo = tmp_path / 'fifo.pemn'
  os.mkfifo(fifo)
  assert 'not a regular file' in refused(fifo)  # never opened: that would block
  assert 'not a pemn artifact' in refused(_write(tmp_path, b'PK\x03\x04' * 100, 'zip.pemn'))
  assert 'truncated' in refused(_write(tmp_path, artifact.MAGIC, 'magic.pemn'))
  assert 'truncated' in refused(_write(tmp_path, artifact.MAGIC[:5], 'part.pemn'))


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
  path = tmp_path / 'huge.pemn'
  with open(path, 'wb') as f:
    f.write(artifact.MAGIC + b'\0' * 12)
    f.truncate(artifact.MAX_FILE_BYTES + 1)  # sparse: claims 4 GiB, occupies nothing
  assert 'more than the' in refused(path, size=0)  # nothing of its size may be allocated


def test_bit_flips_and_truncations(parts, tmp_path):
  blob = parts[0]
  rng = np.random.default_rng(0)
  positions = sorted({*range(0, 40), *rng.integers(0, len(blob), 200).tolist(), len(blob) - 1})
  path = tmp_path / 'flipped.pemn'
  for pos in positions:
    damaged = bytearray(blob)
    damaged[pos] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(damaged))
    message = refused(path)
    if pos >= 8:  # past the magic every damage is caught by the checksum, prefix included
      assert 'checksum' in message and 'upgrade' not in message, (pos, message)
  for n in sorted({*range(0, 64), *rng.integers(64, len(blob), 60).tolist(), len(blob) - 1}):
    path.write_bytes(blob[:n])
    refused(path)


def test_damaged_version_says_corrupted_not_newer(parts, tmp_path):
  blob = bytearray(parts[0])
  blob[8:12] = (7).to_bytes(4, 'little')
  message = refused(_write(tmp_path, bytes(blob)))
  assert message.endswith('a damaged file, or one from a newer pemn-jax')
  assert 'corrupted' in message and 'format version 7' in message


@pytest.mark.parametrize(
  'version, match',
  [
    (0, 'format version 0, which no pemn-jax writes'),
    (artifact.FORMAT_VERSION + 1, 'upgrade pemn-jax'),
  ],
)
def test_prefix_version_out_of_range_with_a_valid_checksum(parts, tmp_path, version, match):
  _, header, payload = parts
  refused(_write(tmp_path, pack(header, payload, version=version)), match=match)


def test_header_length_beyond_the_file_with_a_valid_checksum(parts, tmp_path):
  _, header, payload = parts
  refused(_write(tmp_path, pack(header, payload, hlen=2**60)), match='written wrongly')


# ----------------------------------------------------------------------------------------------
# Crafted headers with a valid checksum: each case changes the header (or its bytes) and names
# what the error must say.

_DELETE = object()


def _at(header, path, value):
  """A copy of ``header`` with the item at ``path`` (keys and indices) set, or deleted."""
  h = copy.deepcopy(header)
  node = h
  for k in path[:-1]:
    node = node[k]
  if value is _DELETE:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return h


def _nested(depth):
  node = {}
  for _ in range(depth):
    node = {'a': node}
  return node


# (id, header -> new header, what the message says)
CASES = [
  ('header-list', lambda h: [], 'the header must be an object'),
  ('header-string', lambda h: 'pemn', 'the header must be an object'),
  ('header-null', lambda h: None, 'the header must be an object'),
  *[
    (f'missing-{f}', lambda h, f=f: _at(h, (f,), _DELETE), f"'{f}' is missing")
    for f in ('format_version', 'created', 'versions', 'config', 'step', 'key', 'entries')
  ],
  ('unknown-field', lambda h: _at(h, ('weights',), [1.0]), "unknown field 'weights'"),
  ('format-version-field', lambda h: _at(h, ('format_version',), 1.0), 'format_version'),
  ('created-number', lambda h: _at(h, ('created',), 5), 'created must be a string'),
  ('versions-without-jax', lambda h: _at(h, ('versions',), {}), 'versions must name'),
  ('step-negative', lambda h: _at(h, ('step',), -1), 'step must be an integer'),
  ('step-string', lambda h: _at(h, ('step',), '4'), 'step must be an integer'),
  ('key-null-on-a-masked-model', lambda h: _at(h, ('key',), None), 'key is null'),
  ('key-list', lambda h: _at(h, ('key',), [0, 1]), 'key must be an object'),
  ('key-impl', lambda h: _at(h, ('key', 'impl'), 'philox'), 'key.impl must be one of'),
  ('key-impl-list', lambda h: _at(h, ('key', 'impl'), []), 'key.impl must be one of'),
  ('key-extra-field', lambda h: _at(h, ('key', 'seed'), 0), 'key must have exactly'),
  ('key-short', lambda h: _at(h, ('key', 'data'), [1]), 'key.data must be a list of 2'),
  ('key-long', lambda h: _at(h, ('key', 'data'), [1, 2, 3]), 'key.data must be a list of 2'),
  ('key-word-range', lambda h: _at(h, ('key', 'data'), [2**32, 0]), r'key.data\[0\]'),
  ('key-word-negative', lambda h: _at(h, ('key', 'data'), [0, -1]), r'key.data\[1\]'),
  ('key-word-string', lambda h: _at(h, ('key', 'data'), ['0', 1]), r'key.data\[0\]'),
  ('key-word-float', lambda h: _at(h, ('key', 'data'), [0.5, 1]), r'key.data\[0\]'),
  (
    'fingerprint-missing',
    lambda h: _at(h, ('frozen_fingerprint',), _DELETE),
    'frozen_fingerprint is missing',
  ),
  (
    'fingerprint-dense-on-a-masked-model',
    lambda h: _at(h, ('frozen_fingerprint',), 'dense'),
    'frozen_fingerprint is missing',
  ),
  ('fingerprint-garbage', lambda h: _at(h, ('frozen_fingerprint',), 'abc'), 'sha256 hex'),
  ('input-shape-2d', lambda h: _at(h, ('input_shape',), [28, 28]), 'input_shape must be'),
  ('input-shape-zero', lambda h: _at(h, ('input_shape',), [0, 28, 1]), r'input_shape\[0\]'),
  ('input-shape-huge', lambda h: _at(h, ('input_shape',), [8192, 8192, 64]), 'values'),
  ('input-shape-string', lambda h: _at(h, ('input_shape',), 'x'), 'input_shape must be'),
  ('input-shape-channels', lambda h: _at(h, ('input_shape',), [28, 28, 3]), 'has shape'),
  ('config-list', lambda h: _at(h, ('config',), []), 'config must be an object'),
  ('config-model-string', lambda h: _at(h, ('config', 'model'), 'x'), 'config.model must be'),
  ('config-unknown-model-field', lambda h: _at(h, ('config', 'model', 'gate'), 1), 'model.gate'),
  ('config-dotted-key', lambda h: _at(h, ('config', 'train', 'a.b'), 1), 'field named'),
  ('config-dunder-key', lambda h: _at(h, ('config', 'train', '__class__'), 1), 'field named'),
  ('config-deep', lambda h: _at(h, ('config', 'train', 'x'), _nested(50)), 'nests more'),
  ('config-nested-list', lambda h: _at(h, ('config', 'train', 'x'), [[1]]), r'x\[0\] must'),
  ('depth-million', lambda h: _at(h, ('config', 'model', 'depth'), 10**6), 'model.depth'),
  ('depth-hundred', lambda h: _at(h, ('config', 'model', 'depth'), 100), 'do not store'),
  ('depth-string', lambda h: _at(h, ('config', 'model', 'depth'), '2'), 'model.depth'),
  ('dim-huge', lambda h: _at(h, ('config', 'model', 'dim'), 10**30), 'model.dim'),
  ('dim-float', lambda h: _at(h, ('config', 'model', 'dim'), 16.0), 'model.dim'),
  ('dim-other', lambda h: _at(h, ('config', 'model', 'dim'), 32), 'has shape'),
  ('kernel-size-other', lambda h: _at(h, ('config', 'model', 'kernel_size'), 5), 'has shape'),
  ('patch-size-other', lambda h: _at(h, ('config', 'model', 'patch_size'), 1), 'has shape'),
  (
    'activation-huge',
    lambda h: _at(_at(h, ('config', 'model', 'patch_size'), 1), ('input_shape',), [4096] * 2 + [1]),
    'an activation of 268,435,456 values',
  ),
  ('name-list', lambda h: _at(h, ('config', 'model', 'name'), []), 'model.name'),
  ('name-unknown', lambda h: _at(h, ('config', 'model', 'name'), 'lenet'), 'model.name'),
  ('name-other-family', lambda h: _at(h, ('config', 'model', 'name'), 'vit'), 'do not store|no'),
  ('masked-string', lambda h: _at(h, ('config', 'model', 'masked'), 'yes'), 'model.masked'),
  ('masked-false', lambda h: _at(h, ('config', 'model', 'masked'), False), 'stored as|no var'),
  ('hidden-dims-string', lambda h: _at(h, ('config', 'model', 'hidden_dims'), 'x'), 'hidden'),
  ('mlp-ratio-huge', lambda h: _at(h, ('config', 'model', 'mlp_ratio'), 1e300), 'mlp_ratio'),
  (
    'keep-fraction-disagrees-with-the-masks',
    lambda h: _at(h, ('config', 'strategy', 'keep_fraction'), 0.25),
    'keep_fraction=0.25 keeps',
  ),
  (
    'keep-fraction-string',
    lambda h: _at(h, ('config', 'strategy', 'keep_fraction'), '0.5'),
    'keep_fraction',
  ),
  (
    'keep-fraction-nan',
    lambda h: _at(h, ('config', 'strategy', 'keep_fraction'), float('nan')),
    'keep_fraction must be a finite number',
  ),
  ('keep-fraction-zero', lambda h: _at(h, ('config', 'strategy', 'keep_fraction'), 0), 'keep'),
  ('strategy-unknown', lambda h: _at(h, ('config', 'strategy', 'name'), 'x'), 'strategy.name'),
  ('strategy-other', lambda h: _at(h, ('config', 'strategy', 'name'), 'mask'), 'fingerprint'),
  ('score-abs-string', lambda h: _at(h, ('config', 'strategy', 'score_abs'), 1), 'score_abs'),
  ('seed-string', lambda h: _at(h, ('config', 'seed'), 'zero'), 'config.seed'),
  ('seed-huge', lambda h: _at(h, ('config', 'seed'), 2**70), 'config.seed'),
  ('data-name-path', lambda h: _at(h, ('config', 'data', 'name'), '../../x'), 'data.name'),
  ('data-name-number', lambda h: _at(h, ('config', 'data', 'name'), 5), 'data.name'),
  (
    'eval-batch-huge',
    lambda h: _at(h, ('config', 'train', 'eval_batch_size'), 10**9),
    'eval_batch_size',
  ),
  ('entries-object', lambda h: _at(h, ('entries',), {}), 'entries must be a list'),
  ('entries-too-many', lambda h: _at(h, ('entries',), h['entries'] * 400), 'at most 8192'),
  ('entry-number', lambda h: _at(h, ('entries', 0), 5), r'entries\[0\] must be an object'),
  ('entry-kind', lambda h: _at(h, ('entries', 0, 'kind'), 'weights'), 'kind must be one of'),
  ('entry-no-ones', lambda h: _at(h, ('entries', 0, 'ones'), _DELETE), 'must have the fields'),
  ('entry-path-string', lambda h: _at(h, ('entries', 0, 'path'), 'stem/scores'), 'path must'),
  ('entry-path-numbers', lambda h: _at(h, ('entries', 0, 'path'), [1, 2]), 'path must'),
  ('entry-path-empty', lambda h: _at(h, ('entries', 0, 'path'), []), 'path must'),
  ('entry-path-newline', lambda h: _at(h, ('entries', 0, 'path'), ['a\nb', 's']), 'no variable'),
  ('entry-path-traversal', lambda h: _at(h, ('entries', 0, 'path'), ['..', 'x']), 'no variable'),
  ('entry-path-twice', lambda h: _at(h, ('entries', 1, 'path'), h['entries'][0]['path']), 'twice'),
  ('entry-shape-negative', lambda h: _at(h, ('entries', 0, 'shape'), [-1]), r'shape\[0\]'),
  ('entry-shape-float', lambda h: _at(h, ('entries', 0, 'shape'), [144.0]), r'shape\[0\]'),
  ('entry-shape-2e9', lambda h: _at(h, ('entries', 0, 'shape'), [2 * 10**9]), r'shape\[0\]'),
  (
    'entry-shape-2e9-product',
    lambda h: _at(h, ('entries', 0, 'shape'), [44722, 44722]),
    'has more than',
  ),
  ('entry-shape-other', lambda h: _at(h, ('entries', 0, 'shape'), [3, 3, 1, 17]), 'has shape'),
  ('entry-offset-gap', lambda h: _at(h, ('entries', 1, 'offset'), 22), 'end at'),
  ('entry-offset-string', lambda h: _at(h, ('entries', 0, 'offset'), '0'), 'offset'),
  ('entry-length-beyond', lambda h: _at(h, ('entries', 0, 'length'), 10**9), 'length'),
  ('entry-ones-over', lambda h: _at(h, ('entries', 0, 'ones'), 145), 'ones'),
  ('entry-ones-other', lambda h: _at(h, ('entries', 0, 'ones'), 71), 'keeps 71'),
  ('entry-codec-unknown', lambda h: _at(h, ('entries', 0, 'codec'), 'zip'), 'codec must'),
  ('entry-codec-lie', lambda h: _at(h, ('entries', 0, 'codec'), 'rans'), 'coded otherwise'),
  ('array-dtype-object', lambda h: _at(h, ('entries', 6, 'dtype'), 'object'), 'dtype object'),
  ('array-dtype-void', lambda h: _at(h, ('entries', 6, 'dtype'), 'V99999999'), 'dtype'),
  ('array-dtype-float64', lambda h: _at(h, ('entries', 6, 'dtype'), 'float64'), 'dtype'),
  ('array-as-mask', lambda h: _at(h, ('entries', 6, 'kind'), 'mask'), 'must have the fields'),
  (
    'array-as-base-with-bytes',  # a leaf left as a base's value has no bytes
    lambda h: _at(_at(h, ('format_version',), 2), ('entries', 6, 'kind'), 'base'),
    r'\(base\) is \d+ bytes',
  ),
  ('entry-dropped', lambda h: _at(h, ('entries',), h['entries'][:-1]), 'end at byte'),
]


@pytest.mark.parametrize('name, mutate, match', CASES, ids=[c[0] for c in CASES])
def test_crafted_header_is_refused(parts, tmp_path, name, mutate, match):
  _, header, payload = parts
  fn = artifact.load if 'fingerprint' in match else artifact.read
  message = refused(_write(tmp_path, pack(mutate(header), payload)), fn=fn, match=match)
  assert message.startswith(str(tmp_path)), message  # names the file


def test_the_cases_index_the_entries_they_mean(parts):
  """The CASES above address entries 0, 1 (masks, packbits) and 6 (an array) by index."""
  entries = parts[1]['entries']
  assert [e['kind'] for e in (entries[0], entries[1], entries[6])] == ['mask', 'mask', 'array']
  assert entries[0]['codec'] == 'packbits' and entries[0]['shape'] == [3, 3, 1, 16]
  assert entries[0]['ones'] == 72 and entries[1]['offset'] == entries[0]['length'] == 21


def test_a_dropped_entry_with_its_bytes_is_a_missing_variable(parts, tmp_path):
  _, header, payload = parts
  last = header['entries'][-1]
  h = _at(header, ('entries',), header['entries'][:-1])
  message = refused(_write(tmp_path, pack(h, payload[: last['offset']])))
  assert 'is not stored in the file' in message


def test_a_mask_claiming_two_billion_entries(parts, tmp_path):
  """The fault sweep's 2.5 KB file: a constant rANS mask of 2e9 entries (3 bytes of codec) and
  a header agreeing with it. The old reader allocated 10 GB; this one refuses before decoding."""
  _, header, payload = parts
  n = 2 * 10**9
  coded = bytearray([codec.METHOD_RANS])
  for v in (n, n):  # varints: the entry count, and as many ones (a constant mask)
    while True:
      b, v = v & 0x7F, v >> 7
      coded.append(b | (0x80 if v else 0))
      if not v:
        break
  first = header['entries'][0]
  h = copy.deepcopy(header)
  h['entries'][0].update(shape=[n], ones=n, codec='rans', length=len(coded))
  shift = len(coded) - first['length']
  for e in h['entries'][1:]:
    e['offset'] += shift
  blob = pack(h, bytes(coded) + payload[first['length'] :])
  assert len(blob) < 3000
  refused(_write(tmp_path, blob), fn=artifact.load, match=r'shape\[0\] must be an integer in')
  h['entries'][0]['shape'] = [50000, 40000]  # each side below the limit, the product above
  blob = pack(h, bytes(coded) + payload[first['length'] :])
  refused(_write(tmp_path, blob), fn=artifact.load, match='has more than 1,073,741,824 entries')
  h['entries'][0].update(shape=[20000, 10000], ones=2 * 10**8)  # within the limit, not the model
  blob = pack(h, bytes(coded) + payload[first['length'] :])
  refused(_write(tmp_path, blob), fn=artifact.load, match=r"the model's is \(3, 3, 1, 16\)")


def test_mask_bits_that_disagree_with_the_entry(parts, tmp_path):
  """A packbits mask with one more kept bit than its entry (and the keep fraction) says."""
  _, header, payload = parts
  first = header['entries'][0]
  mask = codec.decode_mask(payload[: first['length']], first['shape']).ravel()
  mask[np.flatnonzero(~mask)[0]] = True
  coded = codec.encode_mask(mask.reshape(first['shape']), method=codec.METHOD_PACKBITS)
  assert len(coded) == first['length']
  path = _write(tmp_path, pack(header, coded + payload[first['length'] :]))
  refused(path, fn=artifact.load, match='decodes to 73 kept entries, the header says 72')


def test_a_changed_key_fails_the_fingerprint_and_says_what_was_checked(parts, tmp_path):
  _, header, payload = parts
  h = _at(header, ('key', 'data'), [header['key']['data'][0] ^ 1, header['key']['data'][1]])
  message = refused(_write(tmp_path, pack(h, payload)), fn=artifact.load, match='fingerprint')
  assert 'regenerated from the recorded key' in message
  assert 'masks and arrays were checked against the header and agree' in message
  h = _at(h, ('frozen_fingerprint',), _DELETE)  # and without a fingerprint: never silently
  refused(_write(tmp_path, pack(h, payload)), match='frozen_fingerprint is missing')


def test_header_bytes_that_are_not_a_header(parts, tmp_path):
  _, header, payload = parts
  good = json.dumps(header).encode()
  cases = [
    (dict(compressed=b'not zlib at all'), 'unreadable header \\(zlib'),
    (dict(compressed=zlib.compress(good) + b'xx'), 'bytes after it'),
    (dict(compressed=zlib.compress(good)[:-6]), 'incomplete zlib stream'),
    (dict(raw=b'{not json'), 'not UTF-8 JSON'),
    (dict(raw=b'\xff\xfe{}'), 'not UTF-8 JSON'),
    (dict(raw=b'[' * 100_000 + b']' * 100_000), 'nested too deeply'),
    (dict(raw=b'{"step": 1, "step": 2}'), 'duplicate key'),
    (dict(raw=b'{"step": ' + b'9' * 5000 + b'}'), 'not UTF-8 JSON'),
  ]
  for kwargs, match in cases:
    refused(_write(tmp_path, pack(payload=payload, **kwargs)), match=match)


def test_a_header_inflating_to_hundreds_of_megabytes(parts, tmp_path):
  """A quarter MB of zlib that would inflate to 256 MiB: refused at the 4 MiB cap."""
  _, _, payload = parts
  z = zlib.compressobj(9)
  chunks = [z.compress(b'{"created": "')]
  block = b'a' * 2**20
  chunks += [z.compress(block) for _ in range(256)]
  chunks.append(z.compress(b'"}') + z.flush())
  blob = pack(payload=payload, compressed=b''.join(chunks))
  assert len(blob) < 2**19
  refused(_write(tmp_path, blob), match='inflates to more than 4,194,304 bytes')


# ----------------------------------------------------------------------------------------------
# A random sparse baseline: its stored positions must lie in the mask its key regenerates.


def test_sparse_positions_outside_the_random_mask(tmp_path):
  config = common.with_overrides(
    smoke.get_config(),
    {'model.masked': False, 'model.sparsity_method': 'random', 'model.sparsity': 0.9},
  )
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  good = str(tmp_path / 'sparse.pemn')
  artifact.export(config, variables, good)  # the fingerprint is computed when not given
  header, payload = split(open(good, 'rb').read())
  assert header['frozen_fingerprint'] and header['key'] is not None
  artifact.load(good)
  i, e = next((i, e) for i, e in enumerate(header['entries']) if e['kind'] == 'sparse')
  data = payload[e['offset'] : e['offset'] + e['length']]
  nz = codec.decode_mask(data[: e['positions_length']], e['shape'])
  moved = np.roll(nz.ravel(), 1).reshape(nz.shape)  # as many positions, other places
  pos = codec.encode_mask(moved)
  new = pos + data[e['positions_length'] :]
  h = copy.deepcopy(header)
  h['entries'][i].update(length=len(new), positions_length=len(pos))
  shift = len(new) - e['length']
  for later in h['entries'][i + 1 :]:
    later['offset'] += shift
  end = e['offset'] + e['length']
  bad = _write(tmp_path, pack(h, payload[: e['offset']] + new + payload[end:]), 'moved.pemn')
  refused(bad, fn=artifact.load, match='outside the random mask')


# ----------------------------------------------------------------------------------------------
# Paths a file records are never used; writing errors are one line and leave nothing behind.


def test_evaluate_takes_the_dataset_name_only(parts, tmp_path, data_dir):
  """Recorded data_dir / source paths (here with ../) are ignored: the caller's config says
  where data lives, and nothing is created where the file points."""
  _, header, payload = parts
  evil = tmp_path / 'evil'
  h = copy.deepcopy(header)
  h['config']['data'].update(
    data_dir=str(evil / '..' / 'escaped'),
    source_dir=str(evil / 'src'),
    source_path=str(evil / 'x.npz'),
  )
  path = _write(tmp_path, pack(h, payload), 'paths.pemn')
  caller = common.with_overrides(smoke.get_config(), {'data.data_dir': data_dir})
  result = artifact.evaluate(path, caller)
  assert result['num_examples'] == 2000 and result['step'] == 2
  assert sorted(os.listdir(tmp_path)) == ['paths.pemn']  # neither evil/ nor escaped/


def test_export_onto_a_directory_or_an_unwritable_place(parts, tmp_path, monkeypatch):
  config = smoke.get_config()
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  with pytest.raises(artifact.ArtifactError, match='is a directory'):
    artifact.export(config, variables, str(tmp_path))
  with pytest.raises(artifact.ArtifactError, match='cannot write the artifact'):
    artifact.export(config, variables, str(tmp_path / 'no' / 'such' / 'dir' / 'm.pemn'))
  (tmp_path / 'file').write_bytes(b'')
  with pytest.raises(artifact.ArtifactError, match='cannot write the artifact'):
    artifact.export(config, variables, str(tmp_path / 'file' / 'm.pemn'))

  def full_disk(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'replace', full_disk)  # the rename of atomic_write fails
  with pytest.raises(artifact.ArtifactError, match='No space left on device'):
    artifact.export(config, variables, str(tmp_path / 'm.pemn'))
  assert sorted(os.listdir(tmp_path)) == ['file']  # no temporary file left behind


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only directories')
def test_export_into_a_read_only_directory(tmp_path):
  config = smoke.get_config()
  variables = build.init_variables(build.build_model(config), config)
  ro = tmp_path / 'ro'
  ro.mkdir()
  ro.chmod(0o500)
  try:
    with pytest.raises(artifact.ArtifactError, match='cannot write the artifact'):
      artifact.export(config, variables, str(ro / 'm.pemn'))
    assert os.listdir(ro) == []
  finally:
    ro.chmod(0o700)


def test_a_clean_reload_still_gives_the_trained_logits(parts, tmp_path):
  """The re-packed original is read exactly as the original (the helper changes nothing)."""
  blob, header, payload = parts
  path = _write(tmp_path, pack(header, payload))
  _, model, variables, _ = artifact.load(path)
  _, model0, variables0, _ = artifact.load(_write(tmp_path, blob, 'orig.pemn'))
  x = jnp.ones((2, 28, 28, 1))
  np.testing.assert_array_equal(model.apply(variables, x), model0.apply(variables0, x))
  assert layers.FROZEN in variables


# ----------------------------------------------------------------------------------------------
# The command line: one line on stderr, no traceback.


def test_cli_refusals_are_one_line(parts, tmp_path, pemn_cli):
  _, header, payload = parts
  crafted = _write(tmp_path, pack(_at(header, ('config', 'model', 'depth'), 10**6), payload))
  mismatch = _write(
    tmp_path,
    pack(_at(header, ('config', 'strategy', 'keep_fraction'), 0.25), payload),
    'keep.pemn',
  )
  commands = [
    ('inspect', '--artifact=/dev/zero'),
    ('inspect', f'--artifact={tmp_path}'),
    ('inspect', f'--artifact={crafted}'),
    ('evaluate', f'--artifact={mismatch}', '--json'),
  ]
  started = [pemn_cli.start(*args) for args in commands]  # all at once
  for args, proc in zip(commands, map(pemn_cli.finish, started)):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and proc.stdout == '', (args, proc.stderr)
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, (args, proc.stderr)
    assert lines[0].startswith(f'pemn {args[0]}: error: '), lines
