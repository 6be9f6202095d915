"""The ``pemn`` command: the only module that parses flags.

  pemn inspect  --config CONFIG.py [--config.FIELD=VALUE ...] [--json]
  pemn train    --config CONFIG.py [--config.FIELD=VALUE ...] --workdir DIR
  pemn evaluate --workdir DIR [--best] [--json]    |   --artifact MODEL.pemn [--json]
  pemn export   --workdir DIR [--best] --out MODEL.pemn
  pemn inspect  --artifact MODEL.pemn [--json]

Multi-host: ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the cluster
environment JAX detects by itself: Slurm, Open MPI, TPU pods) initialise JAX's distributed
runtime before anything else touches a device.
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

SUBCOMMANDS = ('inspect', 'train', 'evaluate', 'export')

config_flags.DEFINE_config_file(
  'config', None, 'Path to an ml_collections config file.', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and config.json.')
flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
flags.DEFINE_bool('best', False, 'Use the best checkpoint (by test accuracy), not the latest.')
flags.DEFINE_string('artifact', None, 'A .pemn artifact file (evaluate, inspect).')
flags.DEFINE_string('out', None, 'Output artifact path (export).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')
flags.DEFINE_string('cpu_collectives', None, "CPU collectives for multi-process CPU runs: 'gloo'.")

FLAGS = flags.FLAGS


class UsageError(Exception):
  """A command-line mistake: reported as one line on stderr, exit status 2."""


def _require(flag: str):
  value = getattr(FLAGS, flag)
  if value is None:
    raise UsageError(f'--{flag} is required for this command')
  return value


def maybe_initialize_distributed() -> None:
  """Starts JAX's distributed runtime when flags or a known cluster environment ask for it."""
  import os

  import jax

  if FLAGS.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', FLAGS.cpu_collectives)
  if FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  elif any(
    v in os.environ
    for v in (
      'SLURM_JOB_ID',
      'OMPI_COMM_WORLD_SIZE',
      'TPU_WORKER_HOSTNAMES',
      'MEGASCALE_COORDINATOR_ADDRESS',
    )
  ):
    jax.distributed.initialize()


def _config() -> ml_collections.ConfigDict:
  """``--config`` with the environment's overrides applied (``native_kernels``)."""
  config = _require('config')
  from pemn_jax import native

  spec = native.kernels_from_env(os.environ)
  if spec is not None:  # PEMN_JAX_NATIVE / PEMN_JAX_NATIVE_OFF, the documented switches
    config.model.native_kernels = spec
  return config


def _env_native_kernels(default: str | None = 'auto') -> str | None:
  from pemn_jax import native

  return native.kernels_from_env(os.environ) or default


def cmd_inspect() -> int:
  if FLAGS.artifact:
    from pemn_jax import artifact

    info = artifact.inspect(FLAGS.artifact)
    print(json.dumps(info, indent=2) if FLAGS.json else artifact.format_inspect(info))
    return 0
  from pemn_jax import summary

  report = summary.summarize(_config())
  if FLAGS.json:
    report.pop('storage_table')
    print(json.dumps(report, indent=2))
  else:
    print(summary.format_summary(report))
  return 0


def cmd_train() -> int:
  from pemn_jax import train

  maybe_initialize_distributed()
  train.train_and_evaluate(_config(), _require('workdir'))
  return 0


def cmd_evaluate() -> int:
  if FLAGS.artifact:
    from pemn_jax import artifact

    result = artifact.evaluate(FLAGS.artifact, FLAGS.config, _env_native_kernels())
  else:
    from pemn_jax import train

    maybe_initialize_distributed()
    result = train.evaluate_workdir(
      _require('workdir'), best=FLAGS.best, native_kernels=_env_native_kernels(None)
    )
  if FLAGS.json:
    print(json.dumps(result))
  else:
    print(
      f'accuracy {result["accuracy"]:.4f}  loss {result["loss"]:.4f}  '
      f'examples {result["num_examples"]}  step {result["step"]}'
    )
  return 0


def cmd_export() -> int:
  from pemn_jax import train

  info = train.export_workdir(_require('workdir'), _require('out'), best=FLAGS.best)
  print(
    json.dumps(info)
    if FLAGS.json
    else f'wrote {FLAGS.out}: {info["file_bytes"]:,} bytes '
    f'(dense fp32 weights / file = {info["ratio_vs_dense_fp32"]:.2f}x)'
  )
  return 0


def main(argv) -> int:
  commands = {
    'inspect': cmd_inspect,
    'train': cmd_train,
    'evaluate': cmd_evaluate,
    'export': cmd_export,
  }
  if not FLAGS['verbosity'].present:
    # orbax logs every checkpoint step at INFO; our own progress goes to stdout.
    logging.set_verbosity(logging.WARNING)
  if len(argv) != 2 or argv[1] not in commands:
    print(
      f'usage: pemn {{{",".join(SUBCOMMANDS)}}} [flags]  (see pemn --helpfull)', file=sys.stderr
    )
    return 2
  try:
    return commands[argv[1]]()
  except UsageError as e:
    print(f'pemn {argv[1]}: {e}', file=sys.stderr)
    return 2
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    # Configuration and input errors: one line, no traceback. Everything else keeps its trace.
    logging.debug('error', exc_info=True)
    print(f'pemn {argv[1]}: error: {e}', file=sys.stderr)
    return 1


def _ignore_closed_loop_callbacks() -> None:
  """Drops the 'Event loop is closed' errors that follow a failed orbax restore.

  orbax reads a checkpoint's arrays concurrently on a private asyncio loop. When one read fails
  (a corrupted checkpoint) the loop is closed while tensorstore finishes the other reads, whose
  completion callbacks then raise RuntimeError('Event loop is closed') as "unraisable"
  exceptions: dozens of tracebacks on stderr after the one-line error. They carry no
  information, so the CLI drops exactly those; every other unraisable exception is reported.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
      return
    previous(unraisable)

  sys.unraisablehook = hook
  # The same failed restore can leave orbax's other array reads as futures whose exception is
  # never retrieved; asyncio then logs each at exit, three lines apiece, after the one-line error.
  import logging

  logging.getLogger('asyncio').addFilter(_not_an_unretrieved_orbax_read)


def _not_an_unretrieved_orbax_read(record) -> bool:
  """``logging`` filter: False for asyncio's report of an orbax read nobody awaited."""
  msg = str(record.msg)
  return not (msg.startswith('Future exception was never retrieved') and 'async_deserialize' in msg)


# XLA:CPU mallocs the step's whole scratch buffer every step; with glibc's default that is a
# fresh mmap whose pages are faulted in and zeroed each time (~900K faults and 2.6 s of system
# time per ConvMixer-256/8 step). Transparent huge pages for malloc cut the faults ~500x and
# halve the demo's step time (experiments/results/PERFORMANCE.md). The tunable is read when the
# process starts, so the command re-executes itself once with it set.
MALLOC_TUNABLE = 'glibc.malloc.hugetlb=1'


def _reexec_with_malloc_tunable() -> None:
  import os

  if sys.platform != 'linux' or 'GLIBC_TUNABLES' in os.environ or os.environ.get('PEMN_NO_REEXEC'):
    return
  env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLE)
  try:
    os.execve(sys.executable, [sys.executable, '-m', 'pemn_jax.main', *sys.argv[1:]], env)
  except OSError:
    pass  # keep running without it


def run():
  """Console-script entry point."""
  _reexec_with_malloc_tunable()
  import logging as std_logging

  _ignore_closed_loop_callbacks()

  # JAX probes for a TPU on every start and logs the miss at INFO: noise on CPU and GPU hosts.
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == '__main__':
  run()
