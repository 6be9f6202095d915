"""Compression of every strategy, the paper's way and ours, for the paper's architectures.

For each model and strategy (keep fraction 0.5): dense fp32 / storage under the paper's
convention (stored random values at 32 bits + 1-bit masks), with and without BN; ours (key +
strategy + 1-bit masks; + entropy-coded masks). For ConvMixer-256/8 it also writes a real
``.pemn`` artifact of a freshly initialised network per strategy and reports its size on disk,
and repeats that for keep fractions 0.3 / 0.1 / 0.05, where entropy coding goes below 1 bit.

  python -m experiments.storage_table > experiments/results/storage.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

from experiments.common import machine, machine_line
from pemn_jax import artifact, build, layers, summary
from pemn_jax.configs import common

MODELS = [
  ('ConvMixer-256/6', dict(name='convmixer', dim=256, depth=6)),
  ('ConvMixer-256/8', dict(name='convmixer', dim=256, depth=8)),
  ('ConvMixer-512/6', dict(name='convmixer', dim=512, depth=6)),
  ('ConvMixer-512/8', dict(name='convmixer', dim=512, depth=8)),
  ('ResNet-32', dict(name='resnet', depth=32)),
  ('ResNet-56', dict(name='resnet', depth=56)),
  ('ViT-256/6', dict(name='vit', dim=256, depth=6, patch_size=4)),
]
STRATS = [
  ('Mask', 'mask', None),
  ('One-layer', 'one_layer', None),
  ('MP', 'max_layer_padding', None),
] + [(f'RP {r:g}', 'random_vector_padding', r) for r in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)]


def config_for(model, strategy, rp, keep=0.5):
  c = common.base_config()
  for k, v in model.items():
    c.model[k] = v
  c.strategy.name, c.strategy.keep_fraction = strategy, keep
  if rp is not None:
    c.strategy.rp_ratio = rp
  return c


def main(argv: list[str] | None = None) -> int:
  argparse.ArgumentParser(
    prog='python -m experiments.storage_table',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  ).parse_args(argv)
  m = machine()
  print("# Storage of every strategy: the paper's convention and ours")
  print()
  print(
    f'Command: `python -m experiments.storage_table > experiments/results/storage.md`; '
    f'{datetime.date.today()}; {machine_line(m)}, jax {m["jax"]}. '
    'Ratios are dense fp32 weights / storage (BN excluded unless said); keep fraction 0.5. '
    'Arithmetic from `pemn_jax.storage` (no training needed: storage does not depend on '
    'the trained values at a fixed keep fraction).'
  )
  for title, model in MODELS:
    print(f'\n## {title}\n')
    print(
      '| strategy | unique values | paper | paper, BN incl. | ours: key + 1-bit masks '
      '| ours: key + entropy-coded masks |'
    )
    print('|---|---|---|---|---|---|')
    for label, strategy, rp in STRATS:
      shapes_info = summary.summarize(config_for(model, strategy, rp), abstract=True)
      st = shapes_info['storage']
      print(
        f'| {label} | {shapes_info["unique_values"]:,} | {st["ratio_paper"]:.2f}x | '
        f'{st["ratio_paper_with_bn"]:.2f}x | {st["ratio_key_only"]:.2f}x | '
        f'{st["ratio_entropy"]:.2f}x |'
      )
  print('\n## Real artifact files: ConvMixer-256/8 (freshly initialised, k = 0.5)\n')
  print(
    'The `.pemn` file holds the config, key, masks, BN parameters and running statistics, '
    'and a JSON header; ratios are dense fp32 weights (2,324,480 bytes) / file size. The last '
    'two columns are the same network exported with BatchNorm folded to one float16 scale and '
    'shift per channel (`pemn export --bn fp16`).\n'
  )
  print(
    '| strategy | keep | file bytes | mask bits / entry | ratio vs dense fp32 '
    '| file bytes, BN fp16 | ratio, BN fp16 |'
  )
  print('|---|---|---|---|---|---|---|')
  model = MODELS[1][1]
  rows = [(lbl, s, r, 0.5) for lbl, s, r in STRATS] + [
    ('RP 0.01', 'random_vector_padding', 1e-2, k) for k in (0.3, 0.1, 0.05)
  ]
  with tempfile.TemporaryDirectory() as tmp:
    for label, strategy, rp, keep in rows:
      c = config_for(model, strategy, rp, keep)
      m = build.build_model(c)
      v = build.init_variables(m, c)
      path = os.path.join(tmp, 'm.pemn')
      trained = {'params': v['params'], 'batch_stats': v['batch_stats']}
      fingerprint = build.frozen_fingerprint(v[layers.FROZEN])
      info = artifact.export(c, trained, path, fingerprint=fingerprint)
      folded = artifact.export(c, trained, path, fingerprint=fingerprint, bn='fp16')
      print(
        f'| {label} | {keep} | {info["file_bytes"]:,} | {info["mask_bits_per_entry"]:.4f} | '
        f'{info["ratio_vs_dense_fp32"]:.2f}x | {folded["file_bytes"]:,} | '
        f'{folded["ratio_vs_dense_fp32"]:.2f}x |'
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
