"""The public surface: ``import pemn_jax as pemn`` lists a curated API and stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pemn_jax as pemn

HEAVY = ('orbax', 'tensorflow_datasets', 'matplotlib', 'tensorflow')


def test_dir_is_the_curated_api():
  assert dir(pemn) == pemn.__all__ == sorted(pemn.__all__)
  for expected in ('MaskedConv', 'MaskedDense', 'score_mask', 'apply_strategy', 'STRATEGIES',
                   'build_model', 'train_and_evaluate', 'evaluate_workdir', 'export', 'load',
                   'materialize_dense', 'storage_report'):  # fmt: skip
    assert expected in pemn.__all__


@pytest.mark.parametrize('name', pemn.__all__)
def test_every_name_resolves_to_a_documented_object(name):
  value = getattr(pemn, name)
  if callable(value):
    assert (value.__doc__ or '').strip(), f'pemn.{name} has no docstring'


def test_unknown_name_is_an_attribute_error():
  with pytest.raises(AttributeError, match='no attribute'):
    pemn.not_a_name  # noqa: B018


def test_import_and_the_model_api_pull_in_no_heavy_dependency():
  code = (
    'import sys, pemn_jax as pemn\n'
    'pemn.MaskedConv, pemn.score_mask, pemn.apply_strategy, pemn.build_model, pemn.export\n'
    f'print([m for m in {HEAVY!r} if m in sys.modules])\n'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


def test_importing_a_submodule_first_leaves_every_api_name_as_it_is():
  code = (
    'import pemn_jax.convert, pemn_jax.nnx, pemn_jax.steps, pemn_jax.layers\n'
    'import pemn_jax as pemn\n'
    'assert callable(pemn.mask_model) and callable(pemn.MaskedConv), pemn.mask_model\n'
    "assert pemn.steps.__name__ == 'pemn_jax.steps' and pemn.nnx.__name__ == 'pemn_jax.nnx'\n"
  )
  subprocess.run([sys.executable, '-c', code], check=True)
