"""Every earlier artifact format stays loadable: committed files of format version 1.

The fixtures (tests/fixtures, written by ``make_v1_fixtures.py`` with the pemn-jax of format
version 1) must load with this reader into the variables that version loaded, bit for bit, and
compute its logits (to the float rounding of the machine: the fixtures' logits come from one CPU,
and CPUs differ in the last bits of a convolution).
"""

import os

import numpy as np
import pytest
from flax import traverse_util

from pemn_jax import artifact

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')
NAMES = ('v1_masked_rp', 'v1_dense', 'v1_sparse_magnitude')


def _fixed_input():
  import jax.numpy as jnp

  shape = (2, 28, 28, 1)
  return jnp.linspace(-1.0, 1.0, int(np.prod(shape)), dtype=jnp.float32).reshape(shape)


@pytest.mark.parametrize('name', NAMES)
def test_version_1_files_load_and_compute_the_recorded_logits(name):
  path = os.path.join(FIXTURES, f'{name}.pemn')
  _, model, variables, header = artifact.load(path)
  assert header['format_version'] == 1
  flat = {'/'.join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(variables).items()}
  with np.load(os.path.join(FIXTURES, f'{name}.variables.npz')) as want:
    assert sorted(flat) == sorted(want.files)
    for k in want.files:
      assert flat[k].dtype == want[k].dtype, k
      np.testing.assert_array_equal(flat[k], want[k], err_msg=k)
  got = np.asarray(model.apply(variables, _fixed_input(), train=False))
  want = np.load(os.path.join(FIXTURES, f'{name}.logits.npy'))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  info = artifact.inspect(path)
  assert info['format_version'] == 1 and info['step'] == 7
  assert ('key' in header) and ((header['key'] is None) == (name != 'v1_masked_rp'))
