"""Folded BatchNorm on a trained masked ConvMixer-256/8 at keep 0.5: bytes, accuracy, agreement.

  python -m experiments.bn_folding --cifar-npz PATH [--steps 200]

Trains a short run of the ``convmixer_cifar10`` config (ConvMixer-256/8, RP 1e-3, keep 0.5; batch
128, ``--steps`` steps at peak lr 0.01, so that its BatchNorm statistics and masks are trained
ones) unless its workdir is finished already, exports its last checkpoint once per BatchNorm
storage (``artifact.BN_CHOICES``), and evaluates every file on the CIFAR-10 test split against
the bit-exact ``full`` one (``artifact.evaluate(..., reference=...)``: accuracy, top-1 agreement,
largest logit difference). The record (``experiments/results/bn_folding.json``, with a markdown
table beside it) names the commands, the date, the machine and the dataset. The goal it checks:
with fp16 folding at most 92 KB (92,000 bytes) in total, accuracy within 0.05 points of the full
file and top-1 agreement of at least 99.9%.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time

from experiments import common
from experiments.grid import shown_command

ROOT = common.ROOT
GOAL_BYTES, GOAL_POINTS, GOAL_AGREEMENT = 92_000, 0.05, 0.999


def train_command(workdir: str, steps: int, npz: str | None) -> list[str]:
  cmd = [
    os.path.join('.venv', 'bin', 'pemn'),
    'train',
    f'--config={os.path.join("pemn_jax", "configs", "convmixer_cifar10.py")}',
    f'--workdir={workdir}',
    '--config.train.batch_size=128',
    f'--config.train.num_steps={steps}',
    '--config.train.peak_lr=0.01',
    f'--config.train.checkpoint_every_steps={steps}',
    '--config.train.progress=False',
  ]
  if npz:
    cmd.append(f'--config.data.source_path={npz}')
  return cmd


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m experiments.bn_folding', description=__doc__)
  p.add_argument('--cifar-npz', metavar='PATH', help='cifar10_jpeg_q75.npz (docs/data.md)')
  p.add_argument('--steps', type=int, default=200, help='training steps of the short run')
  p.add_argument('--workdir', default=os.path.join('workdirs', 'bn_folding', 'convmixer256_8'))
  p.add_argument('--results', default=common.RESULTS)
  args = p.parse_args(argv)
  from pemn_jax import artifact, train
  from pemn_jax.configs import common as cfg

  npz = os.path.relpath(os.path.abspath(args.cifar_npz), ROOT) if args.cifar_npz else None
  cmd = train_command(args.workdir, args.steps, npz)
  t0 = time.time()
  if not os.path.exists(os.path.join(ROOT, args.workdir, 'summary.json')):
    print(f'[bn_folding] {shlex.join(cmd)}', flush=True)
    if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
      return 1
  train_seconds = time.time() - t0
  workdir = os.path.join(ROOT, args.workdir)
  paths = {bn: os.path.join(workdir, f'model_{bn}.pemn') for bn in artifact.BN_CHOICES}
  data = cfg.base_config()
  if npz:
    data.data.source_path = os.path.join(ROOT, npz)
  rows = {}
  for bn, path in paths.items():
    info = train.export_workdir(workdir, path, bn=bn)
    result = artifact.evaluate(path, data, reference=paths['full'])
    rows[bn] = {
      'file_bytes': info['file_bytes'],
      'mask_bytes': info['mask_bytes'],
      'bn_bytes': info['bn_bytes'],
      'other_bytes': info['other_bytes'],
      'format_version': info['format_version'],
      'accuracy': result['accuracy'],
      'agreement': result['agreement'],
      'max_logit_difference': result['max_logit_difference'],
      'num_examples': result['num_examples'],
    }
    print(f'[bn_folding] {bn}: {rows[bn]}', flush=True)
  full, fp16 = rows['full'], rows['fp16']
  points = 100 * abs(fp16['accuracy'] - full['accuracy'])
  goal = {
    'bytes': fp16['file_bytes'] <= GOAL_BYTES,
    'accuracy_points': points <= GOAL_POINTS,
    'agreement': fp16['agreement'] >= GOAL_AGREEMENT,
  }
  m = common.machine()
  record = {
    'command': common.command_line('experiments.bn_folding', argv),
    'train_command': shlex.join(cmd),
    'cwd': ROOT,
    'date': common.utc_now(),
    'machine': common.machine_line(m),
    'native_kernels': common.native_line(m),
    'machine_info': m,
    'dataset': 'CIFAR-10 (JPEG-q75 mirror), 50,000 train / 10,000 test',
    'model': 'masked ConvMixer-256/8 (kernel 5, patch 2), RP 1e-3, keep 0.5',
    'steps': args.steps,
    'train_seconds': train_seconds,
    'rows': rows,
    'fp16_accuracy_difference_points': points,
    'goal': {
      'bytes_at_most': GOAL_BYTES,
      'points_at_most': GOAL_POINTS,
      'agreement_at_least': GOAL_AGREEMENT,
      'met': goal,
    },
  }
  out = os.path.join(args.results, 'bn_folding.json')
  common.write_record(out, record)
  md = [
    '# Folded BatchNorm on a trained masked ConvMixer-256/8 (keep 0.5)',
    '',
    f'Dataset: {record["dataset"]}. Machine: {record["machine"]}. Date: {record["date"]}.',
    '',
    f'A short run: {args.steps} steps at batch 128 (`{shown_command(shlex.join(cmd))}`; a path '
    'outside the repository shows as `PATH/`, the JSON record keeps it); every file is its last '
    'checkpoint exported with the BatchNorm storage of the row, evaluated on the 10,000 test '
    'images against the `full` file.',
    '',
    '| BN storage | format | file bytes | masks | BN | other arrays | accuracy | top-1 agreement '
    '| max abs logit diff |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for bn, r in rows.items():
    md.append(
      f'| {bn} | v{r["format_version"]} | {r["file_bytes"]:,} | {r["mask_bytes"]:,} | '
      f'{r["bn_bytes"]:,} | {r["other_bytes"]:,} | {100 * r["accuracy"]:.2f}% | '
      f'{100 * r["agreement"]:.2f}% | {r["max_logit_difference"]:.3g} |'
    )
  shown = re.sub(r'--cifar-npz \S*/', '--cifar-npz PATH/', record['command'])
  verdict = ', '.join(f'{k}: {"met" if v else "NOT met"}' for k, v in goal.items())
  md += [
    '',
    f'Goal (fp16: at most {GOAL_BYTES:,} bytes, within {GOAL_POINTS} accuracy points of full, '
    f'top-1 agreement at least {GOAL_AGREEMENT:.1%}): {verdict} (difference {points:.2f} points).',
    '',
    f'Command: `{shown}` (cwd = repository root).',
  ]
  from pemn_jax import fileio

  fileio.atomic_write(os.path.join(args.results, 'bn_folding.md'), ('\n'.join(md) + '\n').encode())
  print(f'wrote {out} and bn_folding.md; goal: {verdict}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
