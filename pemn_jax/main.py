"""The ``pemn`` command: the only module that parses flags.

  pemn inspect  --config CONFIG.py [--config.FIELD=VALUE ...] [--json]
  pemn train    --config CONFIG.py [--config.FIELD=VALUE ...] --workdir DIR
  pemn evaluate --workdir DIR [--best] [--json]
  pemn evaluate --artifact MODEL.pemn [--reference REF.pemn] [--json]
  pemn evaluate --artifact DELTA.pemn --base PATH [--base_format F] [--base_name_map MAP.json]
  pemn export   --workdir DIR [--best] --out MODEL.pemn [--bn full|fp32-folded|fp16|bf16]
  pemn inspect  --artifact MODEL.pemn [--json]

Exit status: 0 done; 1 an error (one line on stderr); 2 a usage mistake; 143 / 130 a training
run stopped by SIGTERM / SIGINT after its checkpoint (the same command resumes it).

Multi-host: ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the cluster
environment JAX detects by itself: Slurm, Open MPI, TPU pods) initialise JAX's distributed
runtime before anything else touches a device.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import threading
import time

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
# artifact.BN_CHOICES (not imported here: flags are parsed before any heavy import)
flags.DEFINE_enum(
  'bn',
  'full',
  ['full', 'fp32-folded', 'fp16', 'bf16'],
  'export: BatchNorm as stored (full: bit-exact) or folded to one scale and shift per channel '
  'in float32, float16 or bfloat16.',
)
flags.DEFINE_string(
  'reference',
  None,
  'evaluate --artifact: another .pemn of the same network (e.g. the full-BN export of a folded '
  'file) to report top-1 agreement with.',
)
flags.DEFINE_string(
  'base',
  None,
  'evaluate --artifact: the base model a mask delta was trained over (its fingerprint must be '
  'the recorded one): a workdir, orbax directory, flax msgpack or safetensors file.',
)
# pretrained.FORMATS (not imported here, as above)
flags.DEFINE_enum(
  'base_format',
  None,
  ['workdir', 'orbax', 'flax', 'safetensors'],
  'evaluate --base: how to read it (default: the format the delta records).',
)
flags.DEFINE_string(
  'base_name_map', None, "evaluate --base: a safetensors base's JSON {variable path: tensor name}."
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process index (multi-host).')
flags.DEFINE_string('cpu_collectives', None, "CPU collectives for multi-process CPU runs: 'gloo'.")
flags.DEFINE_integer(
  'heartbeat_timeout',
  20,
  'Multi-host: seconds without a heartbeat after which a process counts as dead; the others '
  'then stop within about this time with one line (JAX defaults to 100).',
)

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
      heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
    )
    _watch_peers()
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
  summary = train.train_and_evaluate(_config(), _require('workdir'))
  if not summary['finished']:
    # Stopped by a signal (the resume hint is printed): the shell's 128 + the signal's number
    # (143 SIGTERM, 130 SIGINT; 143 for a signal another process got), so a scheduler never
    # takes an unfinished run as done.
    import signal

    sig = getattr(signal, str(summary.get('stopped_by')), signal.SIGTERM)
    return 128 + int(sig)
  return 0


def cmd_evaluate() -> int:
  if FLAGS.artifact:
    from pemn_jax import artifact

    result = artifact.evaluate(
      FLAGS.artifact,
      FLAGS.config,
      _env_native_kernels(),
      reference=FLAGS.reference,
      base=FLAGS.base,
      base_format=FLAGS.base_format,
      base_name_map=FLAGS.base_name_map,
    )
  else:
    if FLAGS.base is not None:
      raise UsageError('--base is for evaluate --artifact (a mask delta), not --workdir')
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
    if 'agreement' in result:
      print(
        f'reference {FLAGS.reference}: accuracy {result["reference_accuracy"]:.4f}  '
        f'top-1 agreement {result["agreement"]:.4%}  '
        f'max |logit difference| {result["max_logit_difference"]:.3g}'
      )
  return 0


def cmd_export() -> int:
  from pemn_jax import train

  info = train.export_workdir(_require('workdir'), _require('out'), best=FLAGS.best, bn=FLAGS.bn)
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
    status = _run(commands[argv[1]], argv[1])
  except Exception as e:
    if not _in_multi_process_run():
      raise
    # A peer died (or this process failed on its own): the collectives fail at once, but the
    # interpreter's shutdown would wait for JAX's distributed runtime to give up on the peer and
    # abort. Nothing more can be done together: say why in one line and leave now.
    _leave(
      f'pemn {argv[1]}: error: {type(e).__name__}: {_first_line(e)} (process '
      f'{_process_index()} of a multi-process run; the checkpoints already written are intact: '
      'start every process again with the same command to resume)'
    )
  if status and _in_multi_process_run():
    _leave(None, status)  # its line is printed; do not wait for the peers at shutdown
  return status


_LEAVING = threading.Lock()


def _leave(line: str | None, status: int = 1) -> None:
  """Prints ``line`` (if any) and ends the process now, once: the first caller wins (the main
  thread's error and the peer watch may both see a dead peer)."""
  if not _LEAVING.acquire(blocking=False):
    time.sleep(60)  # the other caller is ending the process
  if line:
    print(line, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def _watch_peers(period_s: float = 1.0) -> None:
  """A daemon thread that leaves this process, with one line, once a peer is dead.

  A process blocked in a collective or a barrier whose peer died would otherwise wait until
  JAX's distributed runtime gives up and aborts it (many lines of C++ logs). The coordination
  service knows which processes still send heartbeats; polling it costs one small RPC a second.
  """
  from jax._src import distributed

  client, n = distributed.global_state.client, distributed.global_state.num_processes
  if client is None or not n or n < 2:
    return

  def watch():
    while True:
      time.sleep(period_s)
      try:
        live = client.get_live_nodes(list(range(n)))
      except Exception:  # noqa: BLE001 - the service itself is gone: the same situation
        live = {}
      if len(live) < n:
        dead = sorted(set(range(n)) - set(live))
        _leave(
          f'pemn: error: process(es) {dead} of this {n}-process run stopped responding; '
          f'process {distributed.global_state.process_id} stops too (the checkpoints already '
          'written are intact: start every process again with the same command to resume)'
        )

  threading.Thread(target=watch, name='pemn-peer-watch', daemon=True).start()


def _in_multi_process_run() -> bool:
  jax = sys.modules.get('jax')
  try:
    return jax is not None and jax.process_count() > 1
  except Exception:  # noqa: BLE001 - a backend that failed to start: not a multi-process run
    return False


def _process_index() -> int:
  return sys.modules['jax'].process_index()


def _run(command, name: str) -> int:
  """``command()``, with the mistakes a user can make reported as one line (exit 1 or 2)."""
  try:
    return command()
  except UsageError as e:
    print(f'pemn {name}: {e}', file=sys.stderr)
    return 2
  except (ValueError, OSError) as e:
    # Configuration and input errors, and what the OS refused (a read-only or full disk): one
    # line, no traceback. Everything else (genuine bugs) keeps its trace.
    if isinstance(e, OSError) and e.errno is not None:
      line = _os_error_line(e, name)
    elif _DISK_FULL.search(str(e)):  # tensorstore's report of a full disk (an orbax save)
      path = re.search(r'"(/[^"]+)"', str(e))  # the first absolute path it quotes
      line = _disk_full_line(path.group(1) if path else None, name)
    elif isinstance(e, ValueError | FileNotFoundError | FileExistsError):
      line = _first_line(e)
    else:
      line = None
    if line is None:
      raise
    logging.debug('error', exc_info=True)
    print(f'pemn {name}: error: {line}', file=sys.stderr)
    if line.startswith('no space left on device'):
      # A save that failed half-way leaves tensorstore's writer threads behind; exiting through
      # the interpreter's shutdown then aborts in C++ (status 134). Nothing is left to write.
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(1)
    return 1


# ----------------------------------------------------------------------------------------------
# Mistakes on the command line, in the config file and from the OS, as one line each.

# What the OS reports about a path the user chose (a workdir, an output, a data dir): no bug.
_OS_ERRNOS = (
  errno.EACCES,
  errno.EPERM,
  errno.EROFS,
  errno.ENOSPC,
  errno.EDQUOT,
  errno.EEXIST,
  errno.ENOTDIR,
  errno.EISDIR,
  errno.ENOENT,
  errno.ENAMETOOLONG,
  errno.EIO,
)
_DISK_FULL = re.compile(r"No space left on device|os_error_code='(28|122)'")
_CONFIG_ARG = re.compile(r'^--?config(=|$)')
_OVERRIDE_ARG = re.compile(r'^--?(?:no)?config\.([^=]+)(?:=(.*))?$', re.DOTALL)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  lines = text.splitlines()
  if not lines:
    return type(e).__name__
  return lines[0] + (' [...]' if len(lines) > 1 else '')


def _last_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[-1].strip() if lines else type(e).__name__


def _shown_path(filename) -> str | None:
  """The path an OSError names, as the user knows it: an atomic write's temporary file
  (``.NAME.XXXX.tmp``, ``NAME.tmp-PID``) is shown as the file it was writing."""
  if filename is None:
    return None
  path = os.fspath(filename)
  head, base = os.path.split(path)
  m = re.fullmatch(r'\.(.+)\.[^.]+\.tmp', base) or re.fullmatch(r'(.+)\.tmp-\d+', base)
  return os.path.join(head, m.group(1)) if m else path


def _disk_full_line(path: str | None, command: str) -> str:
  """The one line for a full disk: what was being written, and that what was written before
  is intact (a checkpoint is written in a temporary directory and renamed once complete)."""
  if path:
    step = re.match(r'(.*?)\.orbax-checkpoint-tmp', path)  # orbax's checkpoint in progress
    path = f'checkpoint {step.group(1)}' if step else _shown_path(path)
  if not path and command == 'train' and FLAGS.workdir:  # a write that named no file
    path = f'in {FLAGS.workdir}'
  line = 'no space left on device' + (f' writing {path}' if path else '')
  if command == 'train' and FLAGS.workdir:
    line += (
      f'; the checkpoints already written in {FLAGS.workdir} are intact: free some space and '
      'run the same command to resume'
    )
  elif command == 'export' and FLAGS.out:
    line += f'; {FLAGS.out} was not written'
  return line


def _os_error_line(e: OSError, command: str) -> str | None:
  """One line for an OSError of a write or read the user's paths decide; None for other
  OSErrors (they keep their traceback)."""
  path = _shown_path(e.filename)
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return _disk_full_line(path, command)
  if path is None:
    return f'{e.strerror} (errno {e.errno})' if e.errno in _OS_ERRNOS else None
  return f'{path}: {e.strerror or _first_line(e)}'


def _fail(line: str, status: int):
  print(line, file=sys.stderr)
  sys.exit(status)


def _prefix(argv: list[str]) -> str:
  """'pemn CMD' for messages: the subcommand named on the command line, if any."""
  command = next((a for a in argv[1:] if a in SUBCOMMANDS), None)
  return f'pemn {command}' if command else 'pemn'


def _config_path(argv: list[str]) -> str | None:
  """The file ``--config`` names (as ml_collections finds it: the last ``--config`` given,
  less a ``:ARG`` suffix), or None."""
  path = None
  for i, arg in enumerate(argv):
    m = _CONFIG_ARG.match(arg)
    if m:
      path = arg[m.end() :] if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else '')
  return None if path is None else path.split(':', 1)[0]


def _missing_override(argv: list[str], path: str | None) -> str | None:
  """The first ``--config.FIELD`` override naming no field, as one line with the closest field
  (the config is loaded again: only in this error path)."""
  if not path:
    return None
  from pemn_jax.configs import common

  config = common.load(path)
  for arg in argv:
    m = _OVERRIDE_ARG.match(arg)
    problem = m and common.missing_field(config, m.group(1))
    if problem:
      return f'--config.{m.group(1)}: {problem}'
  return None


def _check_parsed_config(argv: list[str], path: str | None) -> None:
  """After parsing: the config file really loaded, and booleans were given as True / False
  (absl would take ``--config.model.masked=1`` or ``=t`` for True)."""
  config = FLAGS['config'].value
  if config is None:
    return
  if not isinstance(config, ml_collections.ConfigDict):
    try:
      config.keys()  # ml_collections keeps a failed load until the config is read
    except OSError as e:
      raise ValueError(f'--config {path} cannot be loaded: {_last_line(e)}') from None
    raise ValueError(
      f'--config {path}: get_config() returned {type(config).__name__}, not a ConfigDict'
    )
  for arg in argv:
    m = _OVERRIDE_ARG.match(arg)
    if not m or m.group(2) is None:
      continue
    value = config
    for name in m.group(1).split('.'):
      value = value[name]
    if isinstance(value, bool) and m.group(2).strip().lower() not in ('true', 'false'):
      raise UsageError(f'--config.{m.group(1)} must be True or False, got {m.group(2)!r}')


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (``app.run``'s ``flags_parser``), with a mistake as one line on stderr:
  exit status 2 for a usage mistake (an unknown flag or config field, a value of the wrong
  type), 1 for a config file that cannot be used (missing, a directory, a syntax error, no
  ``get_config``, or ``get_config`` failing on a ValueError / TypeError)."""
  from pemn_jax.configs import common

  prefix, path = _prefix(argv), _config_path(argv)
  try:
    if path is not None:
      common.check_config_file(path, '--config')  # before ml_collections executes it
  except (ValueError, FileNotFoundError) as e:
    _fail(f'{prefix}: error: {e}', 1)
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    if 'Error whilst parsing config file' in text:  # get_config raised; its last line says why
      why = text.strip().splitlines()[-1]
      _fail(f'{prefix}: error: --config {path}: get_config() failed: {why}', 1)
    _fail(f'{prefix}: {_first_line(e)}', 2)  # absl's message names the flag
  except (AttributeError, KeyError) as e:
    if isinstance(e, AttributeError) and e.name == 'get_config':
      _fail(f'{prefix}: error: --config {path} defines no get_config()', 1)
    problem = _missing_override(argv, path)
    if problem is None:
      raise
    _fail(f'{prefix}: {problem}', 2)
  except OSError as e:  # an override applied to a config file that failed to load
    _fail(f'{prefix}: error: --config {path} cannot be loaded: {_last_line(e)}', 1)
  try:
    _check_parsed_config(argv, path)
  except UsageError as e:
    _fail(f'{prefix}: {e}', 2)
  except ValueError as e:
    _fail(f'{prefix}: error: {e}', 1)
  return rest


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


def _quiet_orbax_background_errors() -> None:
  """Drops the ERROR logs of a failed background save (a full disk), with their tracebacks.

  orbax logs the failure from its save thread (and asyncio the same OSError of the file writes
  it left unawaited), then raises the error in the main thread at the next save or wait, which
  the CLI reports as one line; ``--verbosity`` given keeps them.
  """
  import logging

  def keep(record) -> bool:
    orbax = f'{os.sep}orbax{os.sep}' in (record.pathname or '')
    return not (orbax and record.levelno >= logging.ERROR and FLAGS['verbosity'].present == 0)

  def keep_asyncio(record) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or (exc is not None and bool(_DISK_FULL.search(str(exc))))  # tensorstore's
    return not (full and FLAGS['verbosity'].present == 0)

  logging.getLogger('absl').addFilter(keep)
  logging.getLogger('asyncio').addFilter(keep_asyncio)


def _not_an_unretrieved_orbax_read(record) -> bool:
  """``logging`` filter: False for asyncio's report of an orbax read nobody awaited."""
  msg = str(record.msg)
  return not (msg.startswith('Future exception was never retrieved') and 'async_deserialize' in msg)


def run():
  """Console-script entry point."""
  # Huge pages for malloc and the large-allocation cache, read at process start: the command
  # re-executes itself once with them (pemn_jax.native.process).
  from pemn_jax.native import process

  process.reexec_tuned('pemn_jax.main')
  import logging as std_logging

  _ignore_closed_loop_callbacks()
  _quiet_orbax_background_errors()

  # JAX probes for a TPU on every start and logs the miss at INFO: noise on CPU and GPU hosts.
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
