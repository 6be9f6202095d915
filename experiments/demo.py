"""The main job (``make demo``): train the demo config, then say what happened and where.

Trains a masked ConvMixer with random vector padding on the embedded Fashion-MNIST subset
(resuming if the workdir already holds checkpoints), then prints the test accuracy, the
storage table, and the paths of the workdir, metrics and checkpoints.

  python -m experiments.demo [--workdir workdirs/demo] [--config CONFIG.py]
                             [--config.FIELD=VALUE ...] [--verbosity warning]
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments import common

DEFAULT_CONFIG = os.path.join(common.CONFIGS, 'demo.py')


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog='python -m experiments.demo',
    description=__doc__.split('\n')[0],
    epilog='Any config field can be set with --config.FIELD=VALUE (e.g. '
    '--config.train.num_epochs=2).',
  )
  p.add_argument(
    '--config',
    default=DEFAULT_CONFIG,
    help='config file (default: pemn_jax/configs/demo.py)',
  )
  p.add_argument('--workdir', default='workdirs/demo', help='where checkpoints and metrics go')
  p.add_argument(
    '--verbosity',
    default='warning',
    choices=('debug', 'info', 'warning', 'error'),
    help='absl log level of the library (default warning: orbax logs every checkpoint at info)',
  )
  args, overrides = common.parse_args(p, argv)
  try:
    config = common.load_config(args.config, overrides)
  except (ValueError, TypeError) as e:
    p.error(str(e))
  from pemn_jax import native

  spec = native.kernels_from_env(os.environ)  # PEMN_JAX_NATIVE(_OFF), as the pemn command reads
  if spec is not None:
    config.model.native_kernels = spec
  config.lock()  # as the pemn command's: a misspelt field is an error, not a new field

  from absl import logging

  from pemn_jax import summary, train

  logging.set_verbosity(args.verbosity)
  workdir = args.workdir
  s = config.strategy
  print(
    f'pemn demo: masked ConvMixer-{config.model.dim}/{config.model.depth}, {s.name} '
    f'r={s.rp_ratio:g}, keep {s.keep_fraction}, on {config.data.name}, '
    f'{config.train.num_epochs} epochs; workdir {workdir}',
    flush=True,
  )
  try:
    result = train.train_and_evaluate(config, workdir)
  except (ValueError, FileNotFoundError) as e:
    print(f'pemn demo: error: {e}', file=sys.stderr)
    return 1
  if not result['finished']:
    return 130
  print()
  print(
    f'test accuracy: final {result["final_accuracy"]:.4f}, best {result["best_accuracy"]:.4f}'
    f' (epoch {result["best_epoch"]}); chance is 0.1000'
  )
  print(summary.summarize(config)['storage_table'])
  wd = result['workdir']
  print(f'workdir      {wd}')
  print(f'metrics      {os.path.join(wd, "metrics.jsonl")} (TensorBoard: {wd}/tensorboard)')
  print(f'checkpoints  {os.path.join(wd, "checkpoints")}')
  print(f'evaluate     .venv/bin/pemn evaluate --workdir {wd}')
  return 0


if __name__ == '__main__':
  from pemn_jax.native import process

  process.reexec_tuned('experiments.demo')  # huge pages and the allocation cache (process.py)
  sys.exit(main())
