"""experiments/grid.py: every grid's runs are valid configs that differ only where they should."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'experiments'))
import grid  # noqa: E402

from pemn_jax import build  # noqa: E402
from pemn_jax.configs import common  # noqa: E402


def _config(run):
  import importlib.util

  spec = importlib.util.spec_from_file_location(
    'cfg', os.path.join(ROOT, 'pemn_jax', 'configs', run['config'])
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return common.with_overrides(mod.get_config(), run['overrides'])


@pytest.mark.parametrize('name', sorted(grid.GRIDS))
def test_every_run_builds_and_names_are_unique(name):
  runs = grid.GRIDS[name]()
  assert len({r['name'] for r in runs}) == len(runs)
  for run in runs:
    build.validate_config(_config(run))


@pytest.mark.parametrize('name', sorted(grid.GRIDS))
def test_runs_of_a_grid_share_one_recipe(name):
  # Within a grid only the strategy point and the seed may differ (the fairness rule).
  runs = grid.GRIDS[name]()
  point_fields = ('strategy.', 'model.masked', 'model.sparsity', 'model.dtype', 'seed')
  recipes = {
    tuple(sorted((k, str(v)) for k, v in r['overrides'].items() if not k.startswith(point_fields)))
    for r in runs
  }
  assert len(recipes) == 1, recipes


def test_only_runs_in_the_order_given_and_rejects_unknown_names():
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, 'experiments', 'grid.py'),
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
