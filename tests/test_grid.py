"""experiments.grid: every grid's runs are valid configs that differ only where they should;
a run's record has today's fields; experiments.common's machine line keeps its format."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the root there
  sys.path.insert(0, ROOT)

from experiments import common, grid  # noqa: E402
from pemn_jax import build, summary  # noqa: E402


def _config(run):
  # a base under the workroot (grid.WORKROOT) need not exist here: an existing directory stands in
  overrides = {
    k: ROOT if isinstance(v, str) and v.startswith(grid.WORKROOT) else v
    for k, v in run['overrides'].items()
  }
  return common.load_config(os.path.join(grid.CONFIGS, run['config']), overrides)


@pytest.mark.parametrize('name', sorted(grid.GRIDS))
def test_every_run_builds_and_names_are_unique(name):
  runs = grid.GRIDS[name]()
  assert len({r['name'] for r in runs}) == len(runs)
  for run in runs:
    build.validate_config(_config(run))


@pytest.mark.parametrize('name', sorted(grid.GRIDS))
def test_runs_of_a_grid_share_one_recipe(name):
  # Within a grid only the strategy point and the seed may differ: the comparison is fair.
  runs = grid.GRIDS[name]()
  point_fields = (
    'strategy.',
    'model.masked',
    'model.sparsity',
    'model.binary_weights',
    'model.dtype',
    'model.base_',  # which base (its seed's), or none
    'seed',
  )
  recipes = {
    tuple(sorted((k, str(v)) for k, v in r['overrides'].items() if not k.startswith(point_fields)))
    for r in runs
  }
  assert len(recipes) == 1, recipes


def test_only_runs_in_the_order_given_and_rejects_unknown_names():
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.grid',
      'run',
      '--grid',
      'cifar_resnet',
      '--only',
      'mp_s0,nope_s0',
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    check=False,
  )
  assert proc.returncode == 2
  assert 'no run named nope_s0 in grid cifar_resnet' in proc.stderr


def test_machine_line_keeps_the_format_of_the_records():
  m = {
    'nproc': 2,
    'cpu_model': 'AMD EPYC',
    'os': 'Linux',
    'arch': 'x86_64',
    'device': 'cpu:cpu',
    'device_count': 1,
    'native_kernels': {'available': True, 'reason': None, 'enabled': ['depthwise', 'topk']},
  }
  assert common.machine_line(m) == '2 cores, AMD EPYC, Linux x86_64, CPU only'
  assert common.native_line(m) == 'depthwise, topk'
  gpu = {**m, 'device': 'gpu:NVIDIA H200', 'device_count': 8}
  assert common.machine_line(gpu) == '2 cores, AMD EPYC, Linux x86_64, 8 x gpu NVIDIA H200'
  off = {**m, 'native_kernels': {'available': False, 'reason': 'RuntimeError: no g++'}}
  assert common.native_line(off) == 'none (RuntimeError: no g++)'


def test_machine_describes_this_machine_as_json():
  m = json.loads(json.dumps(common.machine()))
  assert set(m['isa']) == set(common.ISA_FLAGS)
  assert m['nproc'] == os.cpu_count() and m['python'] and m['jax'] and m['jaxlib']
  assert set(m['native_kernels']) == {'available', 'reason', 'enabled'}
  assert common.machine_line(m).startswith(f'{os.cpu_count()} cores, ')


def _committed_grids():
  return sorted(g for g in grid.GRIDS if grid.load_records(g))


@pytest.mark.parametrize('name', _committed_grids())
def test_report_of_the_committed_records_is_the_committed_readme(name, tmp_path):
  # The committed records stay readable, and the report made from them is the committed one
  # (the line naming the command that regenerates it aside).
  shutil.copytree(os.path.join(grid.RESULTS, name), tmp_path / name)
  assert grid.main(['report', '--grid', name, '--results', str(tmp_path)]) == 0

  def lines(path):
    with open(path) as f:
      return [ln for ln in f.read().splitlines() if not ln.startswith('Regenerate this file')]

  assert lines(tmp_path / name / 'README.md') == lines(
    os.path.join(grid.RESULTS, name, 'README.md')
  )


@pytest.mark.slow
def test_a_run_writes_the_record_of_today_and_is_skipped_when_done(tmp_path, monkeypatch, capsys):
  points = [('Mask', {'strategy.name': 'mask'})]
  monkeypatch.setitem(
    grid.GRIDS, 'smoke', lambda: grid._grid({'train.progress': False}, 'smoke.py', (0,), points)
  )
  monkeypatch.setitem(os.environ, 'XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # do_run's default
  argv = ['run', '--grid', 'smoke', '--results', str(tmp_path), '--workroot', str(tmp_path)]
  assert grid.main(argv) == 0
  with open(tmp_path / 'smoke' / 'runs' / 'mask_s0.json') as f:
    rec = json.load(f)
  # The fields of the committed records (those since native_kernels), in their order, with the
  # machine dict after the machine line and the kernels.
  with open(os.path.join(grid.RESULTS, 'cifar_vit', 'runs', 'mask_s1.json')) as f:
    old = list(json.load(f))
  at = old.index('native_kernels') + 1
  old = [*old[:at], 'machine_info', *old[at:]]
  # ... and the 16-bit-value CSR and 1-bit accounting after csr_bits (None for a masked run).
  at = old.index('csr_bits') + 1
  assert list(rec) == [*old[:at], 'csr16_bits', 'binary_bits', *old[at:]]
  assert rec['csr16_bits'] is None and rec['binary_bits'] is None
  workdir = os.path.join(tmp_path, 'smoke', 'mask_s0')
  with open(os.path.join(workdir, 'summary.json')) as f:
    run_summary = json.load(f)
  assert rec['command'].split()[:2] == ['.venv/bin/pemn', 'train']
  assert '--config.strategy.name=mask' in rec['command'].split()
  assert rec['best_accuracy'] == run_summary['best_accuracy']
  assert rec['steps'] == run_summary['total_steps'] == 20
  config = common.load_config(os.path.join(grid.CONFIGS, 'smoke.py'), {'strategy.name': 'mask'})
  info = summary.summarize(config)
  assert rec['unique_values'] == info['unique_values']
  assert rec['storage'] == json.loads(json.dumps(info['storage']))
  assert rec['artifact']['file_bytes'] == os.path.getsize(os.path.join(workdir, 'model.pemn'))
  assert rec['machine'] == common.machine_line(rec['machine_info'])
  assert rec['native_kernels'] == common.native_line(rec['machine_info'])
  capsys.readouterr()
  assert grid.main(argv) == 0  # done already: no second training
  assert 'mask_s0: done already' in capsys.readouterr().out


@pytest.mark.parametrize('name', grid.PRETRAINED_GRIDS)
def test_pretrained_report_of_made_up_records(name, tmp_path):
  # The report of a grid over a trained base, from records shaped as record() writes them
  # (values made up): one row per point, the one-shot rows of the LJ points, the figure.
  runs_dir = tmp_path / name / 'runs'
  runs_dir.mkdir(parents=True)
  for i, run in enumerate(grid.GRIDS[name]()):
    over = run['overrides']
    rec = {
      'run': run['name'],
      'label': run['label'],
      'seed': run['seed'],
      'command': shlex.join(grid.command(run, f'workdirs/{name}/{run["name"]}', {})),
      'date': '2026-12-01T00:00:00+00:00',
      'machine': '2 cores, test',
      'wall_seconds': 1.0,
      'dataset': grid.DATASET_LABELS['cifar10_jpeg'],
      'best_accuracy': 0.5 + i / 1000,
      'final_accuracy': 0.5 + i / 2000,
      'initial_accuracy': 0.3,
      'artifact': {'file_bytes': 1000 + i},
    }
    if 'model.base_source' in over:
      rec['base'] = {'workdir': 'w', 'best_accuracy': 0.7, 'final_accuracy': 0.7}
      if over.get('model.masked', True):
        rec['base'].update(ratio_vs_base_fp32=12.5, lora_equal_params_fp32_bytes=4000)
    (runs_dir / f'{run["name"]}.json').write_text(json.dumps(rec))
  assert grid.main(['report', '--grid', name, '--results', str(tmp_path)]) == 0
  text = (tmp_path / name / 'README.md').read_text()
  labels = dict.fromkeys(r['label'] for r in grid.GRIDS[name]())
  for label in labels:
    assert f'| {label} |' in text
    if label.startswith('LJ '):
      assert f'| {label.replace("LJ", "Magnitude one-shot")} |' in text
  assert 'Dense start: 70.00%' in text
  assert (tmp_path / name / 'accuracy_vs_keep.png').stat().st_size > 0


@pytest.mark.slow
def test_a_run_over_a_base_needs_it_first_and_records_it(data_dir, tmp_path, monkeypatch, capsys):
  # A grid point over a base (grid.WORKROOT path) refuses to start before its base run exists;
  # once the base is trained, its record carries the step-0 accuracy, the base's and the delta's.
  smoke = {'train.progress': False, 'data.data_dir': data_dir}
  lj = {**grid.MASK_OVER_BASE, 'strategy.keep_fraction': 0.5}
  lj['model.base_source'] = grid.WORKROOT + 'smoke_bases/dense_s{seed}'
  monkeypatch.setitem(
    grid.GRIDS, 'smoke_bases', lambda: grid._grid(smoke, 'smoke.py', (0,), grid.STRATEGY_POINTS[:1])
  )
  monkeypatch.setitem(
    grid.GRIDS,
    'smoke_lj',
    lambda: grid._grid({**smoke, 'train.eval_at_start': True}, 'smoke.py', (0,), [('LJ', lj)]),
  )
  monkeypatch.setitem(os.environ, 'XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  where = ['--results', str(tmp_path), '--workroot', str(tmp_path / 'w')]
  assert grid.main(['run', '--grid', 'smoke_lj', *where]) == 2
  assert 'is no finished run; train it first' in capsys.readouterr().out
  assert grid.main(['run', '--grid', 'smoke_bases', *where]) == 0
  assert grid.main(['run', '--grid', 'smoke_lj', *where]) == 0
  with open(tmp_path / 'smoke_lj' / 'runs' / 'lj_s0.json') as f:
    rec = json.load(f)
  with open(tmp_path / 'smoke_bases' / 'runs' / 'dense_s0.json') as f:
    base = json.load(f)
  assert 0 <= rec['initial_accuracy'] <= 1
  assert rec['base']['final_accuracy'] == base['final_accuracy']
  assert rec['base']['ratio_vs_base_fp32'] > 1 and rec['base']['lora_equal_params_fp32_bytes'] > 0
  assert '--config.model.base_source=' in rec['command']
