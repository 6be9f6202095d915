"""Benchmark the mask codec (pemn_jax.codec) on ConvMixer-256/8-sized masks.

Layers (581,120 masked weights in total): patch stem 2x2x3x256 = 3,072; 8 blocks of depthwise
5x5x256 = 6,400 and pointwise 256x256 = 65,536; head 256x10 = 2,560. Each layer gets an exact
top-k mask (ceil(k*n) ones) of i.i.d. random scores, as PEMN produces.

Usage: .venv/bin/python -m experiments.bench_codec
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from experiments.common import machine, machine_line
from pemn_jax import codec
from pemn_jax.codec import METHOD_RANS, decode_mask, encode_mask, entropy_bits

LAYERS = [(2, 2, 3, 256)] + [(5, 5, 1, 256), (256, 256)] * 8 + [(256, 10)]
KS = (0.5, 0.3, 0.1, 0.05)
REPEATS = 3


def topk_mask(rng: np.random.Generator, shape: tuple[int, ...], k: float) -> np.ndarray:
  n = math.prod(shape)
  flat = np.zeros(n, dtype=bool)
  flat[np.argpartition(-rng.random(n), math.ceil(k * n) - 1)[: math.ceil(k * n)]] = True
  return flat.reshape(shape)


def h2(p: float) -> float:
  return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def timed(fn):
  best = math.inf
  for _ in range(REPEATS):
    codec._table.cache_clear()  # include building the rANS tables in the timing
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return out, best


def bench_model(k: float, rng: np.random.Generator) -> dict:
  masks = [topk_mask(rng, s, k) for s in LAYERS]
  n = sum(m.size for m in masks)
  bound = sum(entropy_bits(m.size, int(m.sum())) for m in masks)
  blobs, t_enc = timed(lambda: [encode_mask(m) for m in masks])
  decoded, t_dec = timed(lambda: [decode_mask(b, m.shape) for b, m in zip(blobs, masks)])
  assert all(np.array_equal(a, b) for a, b in zip(decoded, masks))
  rans_bits = sum(8 * len(encode_mask(m, method=METHOD_RANS)) for m in masks)
  bits = sum(8 * len(b) for b in blobs)
  methods = ''.join('R' if b[0] & 0x0F == METHOD_RANS else 'P' for b in blobs)
  return dict(
    k=k,
    n=n,
    bpe=bits / n,
    h=h2(k),
    ratio=bits / bound,
    rans_ratio=rans_bits / bound,
    n_rans=methods.count('R'),
    n_layers=len(masks),
    enc=t_enc,
    dec=t_dec,
  )


def bench_single(n: int, k: float, rng: np.random.Generator) -> dict:
  mask = topk_mask(rng, (n,), k)
  ones = int(mask.sum())
  blob, t_enc = timed(lambda: encode_mask(mask, method=METHOD_RANS))
  out, t_dec = timed(lambda: decode_mask(blob, (n,)))
  assert np.array_equal(out, mask)
  bound = entropy_bits(n, ones)
  return dict(
    n=n, k=k, bytes=len(blob), bound=bound / 8, ratio=8 * len(blob) / bound, enc=t_enc, dec=t_dec
  )


def main(argv: list[str] | None = None) -> None:
  argparse.ArgumentParser(
    prog='python -m experiments.bench_codec',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  ).parse_args(argv)
  rng = np.random.default_rng(0)
  print(machine_line(machine()))
  print(f'python {platform.python_version()}, numpy {np.__version__}; best of {REPEATS} runs')
  print(
    f'model: ConvMixer-256/8 masks, {len(LAYERS)} layers, '
    f'{sum(math.prod(s) for s in LAYERS):,} entries; exact per-layer top-k\n'
  )
  print(
    '| k | bits/entry | H(k) | ratio to sum n_l*H(p_l) | rANS-only ratio | layers rANS '
    '| encode s | decode s |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for k in KS:
    r = bench_model(k, rng)
    print(
      f'| {r["k"]} | {r["bpe"]:.4f} | {r["h"]:.4f} | {r["ratio"]:.4f} '
      f'| {r["rans_ratio"]:.4f} | {r["n_rans"]}/{r["n_layers"]} '
      f'| {r["enc"]:.3f} | {r["dec"]:.3f} |'
    )

  print('\nsingle masks, rANS forced (size includes the header):\n')
  print('| n | k | bytes | n*H(p)/8 | ratio | encode s | decode s |')
  print('|---|---|---|---|---|---|---|')
  for n in (10_000, 65_536, 600_000):
    for k in (0.3, 0.1, 0.05):
      r = bench_single(n, k, rng)
      print(
        f'| {r["n"]:,} | {r["k"]} | {r["bytes"]:,} | {r["bound"]:,.1f} '
        f'| {r["ratio"]:.4f} | {r["enc"]:.3f} | {r["dec"]:.3f} |'
      )


if __name__ == '__main__':
  main()
