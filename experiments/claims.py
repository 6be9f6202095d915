"""Writes experiments/results/README.md: the paper's five claims against our grid records.

Every number is computed here from the per-run JSON records that ``experiments.grid run`` wrote
(each with its command, date and machine); nothing is typed by hand. The verdict rules are
stated beside each claim.

  python -m experiments.claims [--results DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np

from experiments import grid
from pemn_jax import fileio

MAIN_GRIDS = ('cifar_convmixer', 'fmnist_convmixer')


def acc(records, label):
  xs = [r['best_accuracy'] * 100 for r in records if r['label'] == label]
  return (float(np.mean(xs)), len(xs)) if xs else (None, 0)


def fmt(x):
  return '—' if x is None else f'{x:.2f}'


def claim1(records):
  dense, _ = acc(records, 'Dense')
  mask, _ = acc(records, 'Mask')
  if dense is None or mask is None:
    return 'not measured yet', []
  gap = dense - mask
  verdict = (
    'supported'
    if 0 < gap <= 5
    else 'contradicted (Mask above Dense)'
    if gap <= 0
    else f'only partly: Mask is below Dense, but {gap:.1f} points is not "close" '
    '(rule: gap <= 5 points)'
  )
  return verdict, [f'Dense {fmt(dense)}%, Mask {fmt(mask)}%: gap {gap:.2f} points']


def claim2(records):
  mask, _ = acc(records, 'Mask')
  labels = ['Mask', 'One-layer', 'MP', 'RP 1e-1', 'RP 1e-2', 'RP 1e-3']
  low = ['RP 1e-4', 'RP 1e-5']
  vals = {lbl: acc(records, lbl)[0] for lbl in labels + low}
  have = [lbl for lbl in labels if vals[lbl] is not None]
  lines = [', '.join(f'{lbl} {fmt(vals[lbl])}%' for lbl in labels + low if vals[lbl] is not None)]
  uniq = {r['label']: r['unique_values'] for r in records}
  lines.append(
    'unique random values in this (scaled) model: '
    + ', '.join(f'{lbl} {uniq[lbl]:,}' for lbl in labels + low if lbl in uniq)
    + " (the paper's "
    'ConvMixer-256 has 6554 / 656 / 66 / 7 / 1 at RP 1e-1..1e-5: the same ratio leaves a '
    'smaller model fewer values)'
  )
  if mask is None or len(have) < len(labels) or any(vals[lbl] is None for lbl in low):
    return 'not fully measured yet (grid incomplete)', lines
  slow = max(mask - vals[lbl] for lbl in labels)
  drop = min(mask - vals[lbl] for lbl in low)
  lines.append(
    f'largest drop from Mask down to RP 1e-3: {slow:.2f} points; smallest drop at '
    f'RP 1e-4 / 1e-5: {drop:.2f} points'
  )
  ok = slow <= 2.0 and drop > slow + 1.0
  return ('supported' if ok else 'not supported at this scale'), lines


def spread(records, label):
  xs = [r['best_accuracy'] * 100 for r in records if r['label'] == label]
  return float(np.std(xs)) if len(xs) > 1 else None


def seeds(n):
  return f'{n} seed' + ('s' if n != 1 else '')


def claim3(shallow, deep):
  """Claim 3 from the depth-4 grid and its depth-8 twin (same recipe, Dense and Mask)."""
  lines, gaps = [], {}
  for name, records in (('depth 4', shallow), ('depth 8', deep)):
    dense, nd = acc(records, 'Dense')
    mask, nm = acc(records, 'Mask')
    if dense is None or mask is None:
      return 'not measured yet', lines
    gaps[name] = dense - mask
    lines.append(
      f'{name}: Dense {fmt(dense)}% ({seeds(nd)}), Mask {fmt(mask)}% ({seeds(nm)}): '
      f'gap {gaps[name]:.2f} points'
    )
  change = gaps['depth 4'] - gaps['depth 8']
  lines.append(
    f'the gap {"narrows" if change > 0 else "widens"} by {abs(change):.2f} points '
    'from depth 4 to depth 8'
  )
  if change >= 1.0:
    return 'supported', lines
  if change <= -1.0:
    return 'contradicted (the gap widens with depth)', lines
  return 'not supported at this scale (the gap moves by less than 1 point)', lines


def claim5_depth(r32, r56):
  """Claim 5, second half: ResNet-56 loses less to its dense twin than ResNet-32 does."""
  gaps = {}
  for name, records in (('ResNet-32', r32), ('ResNet-56', r56)):
    dense, _ = acc(records, 'Dense')
    for label in ('MP', 'RP 1e-2'):
      point, _ = acc(records, label)
      if dense is not None and point is not None:
        gaps[name, label] = dense - point
  lines, changes = [], []
  for label in ('MP', 'RP 1e-2'):
    g32, g56 = gaps.get(('ResNet-32', label)), gaps.get(('ResNet-56', label))
    if g32 is None or g56 is None:
      have = [
        f'{fmt(g)} points at {n[-2:]} layers'
        for n, g in (('ResNet-32', g32), ('ResNet-56', g56))
        if g is not None
      ]
      if have:
        lines.append(f'{label}: loses {", ".join(have)} to Dense; the other depth not run')
      continue
    change = g32 - g56
    changes.append(change)
    lines.append(
      f'{label}: loses {g32:.2f} points to Dense at depth 32, {g56:.2f} at depth 56 '
      f'({"less" if change > 0 else "more"} by {abs(change):.2f})'
    )
  if len(changes) < 2:
    return 'not measured yet', lines
  if all(c >= 1.0 for c in changes):
    return 'supported', lines
  if all(c <= -1.0 for c in changes):
    return 'contradicted (ResNet-56 loses more)', lines
  return 'not supported at this scale (not both PEMN points lose at least 1 point less)', lines


def relative_drop(records, label):
  """(Mask - point) / (Mask - chance): the share of Mask's above-chance accuracy lost."""
  mask, _ = acc(records, 'Mask')
  point, _ = acc(records, label)
  if mask is None or point is None:
    return None
  return (mask - point) / (mask - 10.0)


def claim4(vit, convmixer):
  lines, drops = [], {}
  for name, records in (('ViT', vit), ('ConvMixer', convmixer)):
    uniq = {r['label']: r['unique_values'] for r in records}
    parts = []
    for lbl in ('RP 1e-2', 'RP 1e-4'):
      d = relative_drop(records, lbl)
      if d is None:
        return 'not measured yet', lines
      drops[name, lbl] = d
      parts.append(
        f'{lbl} {fmt(acc(records, lbl)[0])}% ({uniq[lbl]:,} values; loses '
        f"{d:.0%} of Mask's above-chance accuracy)"
      )
    lines.append(
      f'{name}: Dense {fmt(acc(records, "Dense")[0])}%, Mask '
      f'{fmt(acc(records, "Mask")[0])}%, ' + ', '.join(parts)
    )
  vit_d, cm_d = drops['ViT', 'RP 1e-4'], drops['ConvMixer', 'RP 1e-4']
  if vit_d > cm_d + 0.05:
    return 'supported', lines
  if vit_d < cm_d - 0.05:
    return 'contradicted (ViT loses less than ConvMixer at RP 1e-4)', lines
  return 'not supported at this scale (ViT and ConvMixer lose about the same)', lines


PEMN_LABELS = ('MP', 'RP 1e-1', 'RP 1e-2')


def claim5(records):
  """PEMN points against every sparse baseline that needs at least as much storage."""
  by_label = {}
  for r in records:
    by_label.setdefault(r['label'], []).append(r)
  pemn = [lbl for lbl in PEMN_LABELS if lbl in by_label]
  sparse = [lbl for lbl in by_label if grid.family(lbl) in ('Random', 'Magnitude')]
  if not pemn or not sparse:
    return 'not measured yet', []
  lines = [
    '| run | best acc | paper convention (bytes) | our .pemn file (bytes) |',
    '|---|---|---|---|',
  ]
  for lbl in ['Dense', *pemn, *sparse]:
    if lbl in by_label:
      r = by_label[lbl][0]
      lines.append(
        f'| {lbl} | {fmt(acc(records, lbl)[0])} | '
        f'{grid.storage_bytes(r, "paper"):,.0f} | {grid.storage_bytes(r, "file"):,} |'
      )
  wins, losses = [], []  # (pemn label, baseline label, convention, accuracy difference)
  for conv in ('paper', 'file'):
    for p in pemn:
      for b in sparse:
        if grid.storage_bytes(by_label[p][0], conv) <= grid.storage_bytes(by_label[b][0], conv):
          diff = acc(records, p)[0] - acc(records, b)[0]
          (wins if diff > 0 else losses).append((p, b, conv, diff))
  text = (
    f'{len(wins)} of {len(wins) + len(losses)} comparisons at equal or smaller storage won by PEMN'
  )
  if wins:
    margins = [w[3] for w in wins]
    text += (
      f' (by {min(margins):+.2f} to {max(margins):+.2f} points, against '
      f'{", ".join(sorted({w[1] for w in wins}))})'
    )
  if losses:
    text += ': lost ' + '; '.join(
      f'{p} vs {b} ({conv}, {d:+.2f} points)' for p, b, conv, d in losses
    )
  lines = [text, ''] + lines
  if not wins and not losses:
    return 'not measured (no PEMN point is as small as a baseline)', lines
  if not losses:
    return 'supported (first half; ResNet-56 vs -32 not run)', lines
  if not wins:
    return 'contradicted at this scale: PEMN loses every comparison', lines
  return f'only partly: PEMN wins {len(wins)} of {len(wins) + len(losses)} comparisons', lines


def recipe(base):
  """One line naming a grid's scaled recipe, from its override dict (nothing typed by hand)."""
  skip = ('train.checkpoint_every_steps', 'train.log_every_steps', 'train.progress')
  return ', '.join(
    f'{"data" if k == "data.name" else k.split(".")[-1]}={v}'
    for k, v in base.items()
    if k not in skip
  )


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog='python -m experiments.claims',
    description=__doc__,
    formatter_class=argparse.RawTextHelpFormatter,
  )
  p.add_argument(
    '--results',
    default=grid.RESULTS,
    help='the grid records (<results>/<grid>/runs) to read; README.md is written there '
    '(default experiments/results)',
  )
  args = p.parse_args(argv)

  def load_records(g):
    return grid.load_records(g, args.results)

  out = [
    "# The paper's claims, checked on scaled grids",
    '',
    f'Generated by `python -m experiments.claims` on {datetime.date.today()} from the run '
    'records under `experiments/results/<grid>/runs/` (each holds the exact command, date, '
    'machine and dataset). Accuracy = best test accuracy over epochs (as the reference '
    'reports), mean over the seeds run. CIFAR-10 results are on the JPEG-q75 mirror.',
    '',
    '## What was scaled, and why',
    '',
    'The paper trains for 100 epochs on GPUs; this machine has 2 CPU cores. Every point of '
    "a grid uses the same recipe (the reference's AdamW, weight decay 0.005, "
    'piecewise-linear schedule) and differs only in the strategy. The recipes, as the grid '
    'definitions in `experiments/grid.py` give them:',
    '',
    f'- `cifar_convmixer` (claims 1-2, 4): ConvMixer, {recipe(grid.CIFAR_BASE)}; the '
    'reference augmentation (flip, RandAugment 2/12, colour jitter 0.2, random erasing 0.2);',
    '- `cifar_convmixer_d8` (claim 3): the same at depth 8;',
    f'- `fmnist_convmixer` (claims 1-2): ConvMixer, {recipe(grid.FMNIST_BASE)};',
    f'- `cifar_vit` (claim 4): ViT, {recipe(grid.CIFAR_VIT_BASE)}, heads = dim / 64, '
    'fixed sine-cosine positions, mean pooling;',
    f'- `cifar_resnet` (claim 5): CIFAR ResNet (option A shortcuts), '
    f'{recipe(grid.CIFAR_RESNET_BASE)}; sparse baselines train the kept weights of a fixed '
    'random or magnitude mask (removal 90-96 %);',
    '- `cifar_resnet32`, `cifar_resnet56` (claim 5, second half): the same at depths 32 '
    'and 56, Dense, MP and RP 1e-2;',
    '- `fmnist_keep`: the `fmnist_convmixer` recipe at RP 1e-2 with keep fractions 0.5, '
    '0.3, 0.1, 0.05;',
    '- `embedded_keep`: the demo model (ConvMixer-96/4, RP 1e-2) on the embedded '
    'Fashion-MNIST subset, 6 epochs.',
    '',
    "So absolute accuracies are far below the paper's; the comparisons between strategies "
    'within a grid are what these runs test.',
    '',
    'Arithmetic: the ConvMixer runs recorded here computed in pure XLA (they predate '
    '`pemn_jax.native`); since then, training on the CPU uses native depthwise-conv and '
    'GELU+BatchNorm kernels, equal to float rounding, so a rerun may differ in the last '
    'digits; `PEMN_JAX_NATIVE=0` reproduces the old formulation exactly. The native top-k '
    "kernel gives the same masks as XLA's TopK (the ResNet-56 runs used it). Records made "
    'since name the kernels in their `native_kernels` field.',
    '',
  ]
  missing = []

  def section(title, verdict_lines, text, name):
    verdict, lines = verdict_lines
    out.extend(
      ([title, ''] if title else []) + [f'**{name}.** {text}', '', f'- Verdict: **{verdict}**.']
    )
    out.extend(f'- {ln}' if ln and not ln.startswith('|') else ln for ln in lines)
    out.append('')
    if verdict.startswith('not measured'):
      missing.append(name)

  def header(g, records):
    seeds = sorted({r['seed'] for r in records})
    return (
      f'## Grid `{g}` ({grid.short_dataset(records[0]["dataset"])}; seeds {seeds}; '
      f'{len(records)} runs; table and plots in [{g}/]({g}/README.md))'
    )

  for g in MAIN_GRIDS:
    records = load_records(g)
    if not records:
      missing.append(f'grid {g}')
      continue
    out += [header(g, records), '']
    for name, fn, text in (
      (
        'Claim 1',
        claim1,
        'Mask on fixed random weights reaches accuracy close to, but below, '
        'dense training. Rule: supported if 0 < Dense - Mask <= 5 points.',
      ),
      (
        'Claim 2',
        claim2,
        'Accuracy falls slowly as unique values shrink (Mask, OL, MP, RP '
        '1e-1..1e-3) and drops clearly only at RP 1e-4 and 1e-5. Rule: supported if no point '
        'down to RP 1e-3 is more than 2 points below Mask and both RP 1e-4 and 1e-5 drop at '
        'least 1 point more than that.',
      ),
    ):
      section(None, fn(records), text, name)
  cifar = load_records('cifar_convmixer')
  deep = load_records('cifar_convmixer_d8')
  section(
    '## Claim 3: depth ([cifar_convmixer_d8/](cifar_convmixer_d8/README.md))',
    claim3(cifar, deep) if deep else ('not measured yet', []),
    'Deeper or wider models narrow the gap to dense. Compared: ConvMixer-128/4 and '
    '-128/8 on CIFAR-10 (JPEG-q75 mirror), same recipe. Rule: supported if Dense - Mask '
    'is at least 1 point smaller at depth 8 (seed spread of Dense and Mask at depth 4: '
    f'{fmt(spread(cifar, "Dense"))} and {fmt(spread(cifar, "Mask"))} points).',
    'Claim 3',
  )
  vit = load_records('cifar_vit')
  section(
    '## Claim 4: ViT ([cifar_vit/](cifar_vit/README.md))',
    claim4(vit, cifar) if vit else ('not measured yet', []),
    'ViT is less stable than ConvMixer at very few unique values. Measured as the share of '
    "Mask's above-chance accuracy lost at RP 1e-4, (Mask - RP) / (Mask - 10 %), ViT "
    'against the CIFAR ConvMixer grid. Rule: supported if ViT loses at least 5 percentage '
    'points more of it than ConvMixer.',
    'Claim 4',
  )
  resnet = load_records('cifar_resnet')
  section(
    '## Claim 5: PEMN against sparse baselines ([cifar_resnet/](cifar_resnet/README.md))',
    claim5(resnet) if resnet else ('not measured yet', []),
    'At equal or higher compression, PEMN beats sparse random/magnitude baselines; '
    'ResNet-56 loses less than ResNet-32. Compared on ResNet-20: every PEMN point (MP, '
    'RP 1e-1, RP 1e-2) against every sparse baseline that needs at least as much storage, '
    "under the paper's convention (masks at 1 bit + unique values at 32 bits; CSR with "
    '32-bit values and indices for the baselines; BN excluded) and under ours (the .pemn '
    'file, BN and header included). Rule: supported if PEMN wins every such comparison. '
    'The second half (ResNet-56 against -32) is the next section.',
    'Claim 5',
  )
  r32, r56 = load_records('cifar_resnet32'), load_records('cifar_resnet56')
  links = ', '.join(
    f'[{g}/]({g}/README.md)' for g, r in (('cifar_resnet32', r32), ('cifar_resnet56', r56)) if r
  )
  section(
    '## Claim 5, second half: depth' + (f' ({links})' if links else ''),
    claim5_depth(r32, r56),
    'ResNet-56 loses less than ResNet-32. Compared: Dense - PEMN for MP and RP 1e-2, at '
    "depths 32 and 56, the ResNet-20 grid's recipe. Rule: supported if both gaps are at "
    'least 1 point smaller at depth 56.',
    'Claim 5, second half',
  )
  for g, what in (
    ('fmnist_keep', 'the `fmnist_convmixer` model and recipe, RP 1e-2, full Fashion-MNIST'),
    ('embedded_keep', 'the demo model, RP 1e-2, embedded Fashion-MNIST subset'),
  ):
    keep = load_records(g)
    if not keep:
      continue
    out += [
      f'## Past the paper: keep fraction vs accuracy and file size, {what} ([{g}/]({g}/README.md))',
      '',
      '| keep fraction | seeds | best acc | final acc | .pemn file bytes | mask bits / entry |',
      '|---|---|---|---|---|---|',
    ]
    by_keep = {}
    for r in keep:
      by_keep.setdefault(r['label'].split('=')[1], []).append(r)
    for k in sorted(by_keep, key=lambda k: -float(k)):
      rs = by_keep[k]
      a = rs[0].get('artifact') or {}
      best = sum(r['best_accuracy'] for r in rs) / len(rs) * 100
      final = sum(r['final_accuracy'] for r in rs) / len(rs) * 100
      out.append(
        f'| {k} | {len(rs)} | {best:.2f} | {final:.2f} | '
        f'{a.get("file_bytes", 0):,} | {a.get("mask_bits_per_entry", 0):.4f} |'
      )
    out.append('')
  out += ['## Not yet run', '']
  out += [f'- {m}: no records yet.' for m in missing]
  for g in sorted(grid.GRIDS):
    done = {r['run'] for r in load_records(g)}
    todo = [r['name'] for r in grid.GRIDS[g]() if r['name'] not in done]
    if todo:
      cifar = any('cifar10' in r['overrides'].get('data.name', '') for r in grid.GRIDS[g]())
      npz = ' --cifar-npz PATH' if cifar else ''
      where = (
        ', PATH the CIFAR-10 npz, built as '
        '[docs/data.md](../../docs/data.md#cifar-10-jpeg-q75-mirror) describes'
        if cifar
        else ''
      )
      out.append(
        f'- Grid `{g}`, defined but not run: {", ".join(todo)} '
        f'(`python -m experiments.grid run --grid {g}{npz}`{where}).'
      )
  if out[-1] == '':  # nothing missing
    one_seed = [g for g in sorted(grid.GRIDS) if len({r['seed'] for r in grid.GRIDS[g]()}) == 1]
    out.append(
      'Every run of every grid defined in `experiments/grid.py` has a record. One seed '
      f'only: {", ".join(f"`{g}`" for g in one_seed)}.'
    )
  out.append('')
  path = os.path.join(args.results, 'README.md')
  fileio.atomic_write(path, '\n'.join(out))
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
