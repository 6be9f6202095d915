"""The main job (``make demo``): train the demo config, then say what happened and where.

Trains a masked ConvMixer with random vector padding on the embedded Fashion-MNIST subset
(resuming if the workdir already holds checkpoints), then prints the test accuracy, the
storage table, and the paths of the workdir, metrics and checkpoints.

  python experiments/demo.py [--workdir workdirs/demo] [--config.FIELD=VALUE ...]
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pemn_jax import build, train

config_flags.DEFINE_config_file(
  'config',
  os.path.join(os.path.dirname(__file__), '..', 'pemn_jax', 'configs', 'demo.py'),
  'Config file (default: pemn_jax/configs/demo.py).',
  lock_config=True,
)
flags.DEFINE_string('workdir', 'workdirs/demo', 'Where checkpoints and metrics go.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  workdir = FLAGS.workdir
  s = config.strategy
  print(
    f'pemn demo: masked ConvMixer-{config.model.dim}/{config.model.depth}, {s.name} '
    f'r={s.rp_ratio:g}, keep {s.keep_fraction}, on {config.data.name}, '
    f'{config.train.num_epochs} epochs; workdir {workdir}',
    flush=True,
  )
  try:
    summary = train.train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f'pemn demo: error: {e}', file=sys.stderr)
    return 1
  if not summary['finished']:
    return 130
  print()
  print(
    f'test accuracy: final {summary["final_accuracy"]:.4f}, best {summary["best_accuracy"]:.4f}'
    f' (epoch {summary["best_epoch"]}); chance is 0.1000'
  )
  print(build.summarize(config)['storage_table'])
  wd = summary['workdir']
  print(f'workdir      {wd}')
  print(f'metrics      {os.path.join(wd, "metrics.jsonl")} (TensorBoard: {wd}/tensorboard)')
  print(f'checkpoints  {os.path.join(wd, "checkpoints")}')
  print(f'evaluate     .venv/bin/pemn evaluate --workdir {wd}')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
