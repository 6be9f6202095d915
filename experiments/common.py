"""What the experiment scripts share: where a record was made, config loading, record writing.

* ``machine()``: a dict describing this machine and software (CPU model, cores, the ISA flags
  that matter for speed, OS/arch, Python, jax and jaxlib, the JAX devices, which
  ``pemn_jax.native`` kernels are available and enabled); ``machine_line(m)`` is one human line
  of it for markdown reports (the ``'machine'`` string of grid records), ``native_line(m)`` the
  ``'native_kernels'`` string of grid records. Every JSON record a script writes carries both
  the line and the dict (``'machine'`` and ``'machine_info'``).
* ``load_config(path, overrides)``: ``pemn_jax.configs.common.load``, the one override parser
  (``--config.a.b=v`` strings or a dict).
* ``parse_args(parser, argv)``: argparse plus ``--config.FIELD=VALUE`` overrides, for the
  scripts that take a config.
* ``write_record(path, record)``: a JSON record, written atomically.
* ``utc_now()``, ``command_line(module)``: a record's date and the command that made it.

``python -m experiments.common`` prints this machine's line (``--json``: the dict).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys

from pemn_jax.configs.common import load as load_config  # noqa: F401  (re-exported)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'experiments', 'results')
CONFIGS = os.path.join(ROOT, 'pemn_jax', 'configs')
# The /proc/cpuinfo flags that decide which vector code XLA and the native kernels can use.
ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile')


def cpu_info() -> tuple[str, set[str]]:
  """(CPU model name, feature flags) from /proc/cpuinfo; ('unknown CPU', set()) without it."""
  model, flags = 'unknown CPU', set()
  try:
    with open('/proc/cpuinfo') as f:
      for ln in f:
        key, _, value = ln.partition(':')
        key = key.strip()
        if key == 'model name' and model == 'unknown CPU':
          model = value.strip()
        elif key in ('flags', 'Features') and not flags:
          flags = set(value.split())
  except OSError:
    pass
  return model, flags


def machine() -> dict:
  """Where a record is made (JSON-ready).

  Keys: ``cpu_model``, ``nproc`` (``os.cpu_count()``), ``isa`` (each of ``ISA_FLAGS``: present
  or not), ``os``, ``os_release``, ``arch``, ``python``, ``jax``, ``jaxlib``, ``device``
  (``platform:kind`` of the first JAX device), ``device_count`` and ``native_kernels``
  (``available``, ``reason`` it is not, ``enabled``: the kernels on by default here), and
  ``gemm_library`` (``'KIND PATH'`` of the bf16 GEMM library of native feature ``'gemm'``, or
  None).

  It initialises JAX's default backend (to name the device) and loads the native kernels
  (compiling them on a machine's first use).
  """
  import jax
  import jaxlib

  from pemn_jax import native

  model, flags = cpu_info()
  d = jax.devices()[0]
  available = native.available()
  gemm = native.build._state.get('gemm') if native.gemm_available() else None
  backed = {'gemm': gemm is not None, 'amx': native.amx_available()}
  return {
    'cpu_model': model,
    'nproc': os.cpu_count(),
    'isa': {f: f in flags for f in ISA_FLAGS},
    'os': platform.system(),
    'os_release': platform.release(),
    'arch': platform.machine(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'device': f'{d.platform}:{getattr(d, "device_kind", "")}',
    'device_count': jax.device_count(),
    'native_kernels': {
      'available': available,
      'reason': native.unavailable_reason(),
      # 'gemm' is on only with a bf16 GEMM library behind it (oneDNN or MKL: gemm_library),
      # 'amx' only on a CPU with AMX-BF16 (amx_available).
      'enabled': [f for f in native.FEATURES if native.enabled(f) and backed.get(f, True)]
      if available
      else [],
    },
    'gemm_library': gemm,
  }


def machine_line(m: dict) -> str:
  """``machine()`` as one line: '2 cores, AMD EPYC, Linux x86_64, CPU only'."""
  platform_, _, kind = m['device'].partition(':')
  devices = 'CPU only' if platform_ == 'cpu' else f'{m["device_count"]} x {platform_} {kind}'
  return f'{m["nproc"]} cores, {m["cpu_model"]}, {m["os"]} {m["arch"]}, {devices}'


def native_line(m: dict) -> str:
  """The enabled native kernels of ``machine()``, comma-separated, or 'none (why)'."""
  nk = m['native_kernels']
  if not nk['available']:
    return f'none ({nk["reason"]})'
  return ', '.join(nk['enabled'])


def utc_now() -> str:
  """The current UTC time, to the second, ISO 8601: a record's date."""
  return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


def command_line(module: str, argv: list[str] | None = None) -> str:
  """How this process was started, as ``python -m MODULE ARGS`` (a record's command)."""
  return shlex.join(['python', '-m', module, *(sys.argv[1:] if argv is None else argv)])


def write_record(path: str, record: dict) -> None:
  """``record`` as JSON (indent 2) to ``path``, atomically (``pemn_jax.fileio``)."""
  from pemn_jax import fileio

  fileio.atomic_write_json(path, record)


def parse_args(
  parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> tuple[argparse.Namespace, list[str]]:
  """``parser``'s arguments and the ``--config.FIELD=VALUE`` overrides among ``argv``.

  Anything else the parser does not know is an error (exit status 2), as with
  ``parse_args``.
  """
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.') or '=' not in a]
  if bad:
    parser.error(f'unrecognised arguments: {" ".join(bad)} (overrides are --config.FIELD=VALUE)')
  return args, rest


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog='python -m experiments.common',
    description='Prints where records made here would say they were.',
  )
  p.add_argument('--json', action='store_true', help='the whole machine() dict, as JSON')
  args = p.parse_args(argv)
  m = machine()
  print(json.dumps(m, indent=2) if args.json else machine_line(m))
  return 0


if __name__ == '__main__':
  sys.exit(main())
