"""The README's "Use pemn-jax in your own code" recipes run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def recipes() -> dict[str, str]:
  text = README.read_text()
  section = text.split('## Use pemn-jax in your own code', 1)[1].split('\n## ', 1)[0]
  found = {}
  for title, body in re.findall(r'### (Recipe \d+)[^\n]*\n(.*?)(?=\n### |\Z)', section, re.S):
    blocks = re.findall(r'```python\n(.*?)```', body, re.S)
    assert len(blocks) == 1, title
    found[title] = blocks[0]
  return found


def test_the_readme_has_the_recipes():
  assert set(recipes()) >= {'Recipe 1', 'Recipe 2', 'Recipe 3'}


@pytest.mark.parametrize('title', sorted(recipes()))
def test_recipe_runs_and_ends_in_a_finite_loss(title):
  import numpy as np

  namespace: dict = {}
  exec(compile(recipes()[title], f'README {title}', 'exec'), namespace)  # noqa: S102
  loss = namespace['metrics']['loss'] if 'metrics' in namespace else namespace['loss']
  assert np.isfinite(float(loss))
