"""What the whole suite shares: its caches, one prepared dataset and one CLI launcher.

Session-wide (``pytest_configure``, before any test module imports JAX or TFDS): every cache a
test could otherwise write into the user's home points into one temporary directory, removed at
the end, and the environment carries it to every subprocess the suite starts:

- ``PEMN_JAX_CACHE_DIR``: the native kernels' compiled library (``pemn_jax.native.build``),
  compiled once per session by the first test that loads it and reused by every subprocess;
- ``XDG_CACHE_HOME`` / ``XDG_CONFIG_HOME`` / ``MPLCONFIGDIR``: our builders' default TFDS dir
  (``data.sources.default_cache_dir``) and matplotlib's font cache and config;
- ``TFDS_DATA_DIR``: TFDS's own default data dir (read when TFDS is imported);
- JAX's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, every executable stored):
  the same programs (init, train and eval steps of the smoke config) are compiled again by every
  ``train_and_evaluate`` and every ``pemn`` subprocess, and eager ops repeat across modules; a
  cached executable computes exactly what a fresh compilation would, so only the repeats get
  cheaper (on 2 cores: test_train + test_artifact + test_steps 135 s -> 92 s, the op-level
  modules 98 s -> 91 s).

``PEMN_TEST_MARCH=LEVEL`` (e.g. ``x86-64-v3``) builds the native kernels for that CPU level
instead of ``-march=native``: ``test_native.py`` runs part of the suite so, to cover the 8-lane
AVX2 code paths on a machine with AVX-512.

Fixtures: ``data_dir`` (the embedded Fashion-MNIST subset prepared once into a temporary TFDS
data dir) and ``pemn_cli`` (runs ``python -m pemn_jax.main ...`` on N host CPU devices).
``SLOW_TESTS`` below marks the heavy tests of modules that do not mark them themselves.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 300  # seconds: the longest a test's subprocess may run before it fails
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# Set, the session builds the native kernels with -march=VALUE instead of -march=native.
MARCH_VARIABLE = 'PEMN_TEST_MARCH'

# Environment variable -> its directory under the session's temporary directory.
_CACHE_DIRS = {
  'PEMN_JAX_CACHE_DIR': 'pemn_jax',
  'XDG_CACHE_HOME': 'xdg_cache',
  'XDG_CONFIG_HOME': 'xdg_config',
  'MPLCONFIGDIR': 'matplotlib',
  'TFDS_DATA_DIR': 'tensorflow_datasets',
  'JAX_COMPILATION_CACHE_DIR': 'jax_compilation_cache',
}
# Store every executable, however small or quick to compile (the defaults skip most of ours).
_JAX_CACHE_FLAGS = {
  'jax_persistent_cache_min_compile_time_secs': 0.0,
  'jax_persistent_cache_min_entry_size_bytes': 0,
}
_session: dict = {}

# Compile-heavy (or training, fuzzing, subprocess) tests of modules that do not mark them `slow`
# themselves: deselected by `make test-fast` (`-m "not slow"`), still run by `make test`.
# module -> {test function: the parameter ids of it that stay in the fast run}; () marks every
# case slow. A family keeps one or two representatives that still reach its code paths. A
# module's author may as well move its entries into the module as `@pytest.mark.slow`.
SLOW_TESTS = {
  'test_ops_perf.py': {
    'test_depthwise_stride1_vjp_matches_xla': (),
    'test_depthwise_oversized_padding_matches_brute_force': (),
    'test_depthwise_kernel_grad_chunked_scan_is_exact': (),
    'test_depthwise_convmixer_shape_matches_xla': (),
    'test_depthwise_bfloat16_grads_close_to_float32': (),
    'test_strided_depthwise_still_uses_autodiff_and_matches_xla': (),
  },
  'test_ops.py': {  # the strides and paddings of both kernel sizes, not every combination
    'test_depthwise_shift_add_matches_xla': (
      '3-s1-same',
      '3-s2-valid',
      '5-s1-explicit',
      '5-s2-same',
    ),
  },
  'test_native.py': {
    'test_native_matches_brute_force': ('5x5-c19',),
    'test_native_kernel_grad_groups': (),
    'test_fused_gelu_batch_norm_matches_flax': (),
    'test_native_negative_pads_crop': (),
    'test_gelu_batch_norm_factory_paths': (),
  },
  'test_models.py': {
    'test_remat_blocks_same_values_gradients_and_batch_stats': (),
    'test_vit_remat_blocks_same_values_and_gradients': (),
  },
  'test_layers.py': {
    'test_frozen_is_kaiming_normal_drawn_in_torch_layout': (
      'module0-x_shape0-flax_shape0-torch_shape0',
    ),
  },
  'test_data.py': {
    'test_concurrent_preparation_from_two_processes': (),
    'test_jax_augmentation_matches_numpy': (),
  },
  'test_grid.py': {
    'test_report_of_the_committed_records_is_the_committed_readme': ('fmnist_convmixer',),
  },
  'test_checkpoint_integrity.py': {  # every test of its trained run (the fixture trains)
    'test_no_earlier_intact_checkpoint_is_said': (),
    'test_checkpoint_without_digest_restores_with_a_warning': (),
    'test_resume_with_other_training_settings_is_refused_untouched': (),
    'test_a_model_change_with_a_settings_change_says_different_model': (),
    'test_a_flip_that_alters_values_is_refused_everywhere': (),
    'test_a_flipped_byte_anywhere_is_refused_or_changes_nothing': (),
    'test_the_advice_works_delete_the_damaged_step_and_resume': (),
    'test_a_diverging_run_stops_before_its_first_checkpoint': (),
    'test_extension_and_execution_changes_resume_and_append_to_the_history': (),
    'test_an_empty_stray_step_directory_is_skipped_and_left': (),
    'test_a_start_with_no_checkpoint_to_keep_may_use_new_settings': (),
    'test_a_diverging_resume_keeps_the_last_good_checkpoint': (),
    'test_checkpoints_of_earlier_versions_are_checked_against_config_json': (),
  },
  'test_mask_model.py': {
    'test_a_trained_mask_model_network_learns_well_above_chance': (),
    'test_every_supported_layer_is_masked_with_exact_counts': (),
    'test_frozen_is_kaiming_normal_in_pytorch_layout': (),
    'test_frozen_never_in_gradients_or_optimizer_state_and_the_step_traces_once': (),
    'test_an_unsupported_layer_matched_by_a_rule_is_named': (),
    'test_strategies_store_the_counted_values': (),
    'test_as_a_field_of_another_module_and_under_jit': (),
    'test_unmatched_and_excluded_layers_keep_training_as_they_were': (),
  },
  'test_nnx_mask_model.py': {
    'test_cnn_layers_become_masked_layers_with_exact_counts': (),
    'test_at_keep_one_the_model_computes_what_it_did_with_the_frozen_kernels': (),
    'test_jitted_training_lowers_the_loss_and_leaves_frozen_alone': (),
    'test_transformer_with_attention_excluded': (),
    'test_values_are_drawn_as_the_masked_layers_draw_them': (),
  },
  'test_nnx.py': {
    'test_forward_and_gradients_equal_linen': ('dense_bias-True', 'dense_bias-False'),
    'test_docstring_recipe_runs_verbatim': (),
    'test_frozen_not_in_grads_nor_optimizer': (),
    'test_nnx_jit_training_lowers_loss_and_keeps_kernels': (),
  },
  'test_readme.py': {
    'test_recipe_runs_and_ends_in_a_finite_loss': (),
  },
  'test_artifact_hostile.py': {
    'test_sparse_positions_outside_the_random_mask': (),
    'test_cli_refusals_are_one_line': (),
  },
  'test_fuzz.py': {  # hypothesis: many examples each
    'test_mutated_bytes_are_refused': (),
    'test_mutated_headers_give_a_valid_model_or_an_artifact_error': (),
    'test_mutated_payloads_give_a_valid_model_or_an_artifact_error': (),
    'test_the_fuzz_targets_start_from_a_loadable_file': (),
  },
}


def pytest_configure(config):
  root = tempfile.mkdtemp(prefix='pemn-jax-tests-')
  env = {name: os.path.join(root, sub) for name, sub in _CACHE_DIRS.items()}
  env.update({name.upper(): str(value) for name, value in _JAX_CACHE_FLAGS.items()})
  for d in _CACHE_DIRS:
    os.makedirs(env[d])
  _session.update(root=root, old={name: os.environ.get(name) for name in env})
  os.environ.update(env)
  # JAX reads these variables when it is imported; a plugin may have imported it already.
  import jax

  jax.config.update('jax_compilation_cache_dir', env['JAX_COMPILATION_CACHE_DIR'])
  for name, value in _JAX_CACHE_FLAGS.items():
    jax.config.update(name, value)
  march = os.environ.get(MARCH_VARIABLE)
  if march:  # the native kernels built for another CPU level (test_native's AVX2 build test)
    from pemn_jax.native import build

    build.FLAGS = tuple(f'-march={march}' if f == '-march=native' else f for f in build.FLAGS)


def pytest_unconfigure(config):
  if not _session:
    return
  for name, value in _session['old'].items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  shutil.rmtree(_session['root'], ignore_errors=True)
  _session.clear()


def pytest_collection_modifyitems(config, items):
  for item in items:
    keep = SLOW_TESTS.get(item.path.name, {}).get(getattr(item, 'originalname', item.name))
    callspec = getattr(item, 'callspec', None)
    if keep is not None and (callspec.id if callspec else None) not in keep:
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with the embedded Fashion-MNIST subset prepared (the smoke config's data)."""
  from pemn_jax.configs import common, smoke
  from pemn_jax.data import sources

  d = str(tmp_path_factory.mktemp('tfds'))
  sources.prepare(common.with_overrides(smoke.get_config(), {'data.data_dir': d}).data)
  return d


class Launcher:
  """Runs this interpreter in a subprocess as the ``pemn`` command line does, on host CPUs.

  ``launcher(*args)`` runs ``python -m pemn_jax.main ARGS`` to completion; ``start`` and
  ``finish`` split that in two (for signals sent mid-run, or several processes at once);
  ``python(*argv)`` runs ``python ARGV`` (e.g. ``'-c', code``) the same way. Each takes
  ``devices`` (host CPU devices: ``--xla_force_host_platform_device_count``, set when JAX
  starts; 1 is this process's count) and ``env``, variables set on top. The environment is this
  one's (so the session's caches) with ``JAX_PLATFORMS=cpu``, unbuffered output and this
  process's ``XLA_FLAGS`` less any device count. Runs in the repository root.
  """

  def env(self, devices: int = 1, env: dict | None = None) -> dict:
    e = dict(os.environ)
    e.update(JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
    flags = [f for f in e.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
    if devices != 1:
      flags.append(f'{DEVICE_COUNT_FLAG}={devices}')
    if flags:
      e['XLA_FLAGS'] = ' '.join(flags)
    else:
      e.pop('XLA_FLAGS', None)
    e.update(env or {})
    return e

  def start_python(self, *argv, devices: int = 1, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
      [sys.executable, *map(str, argv)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=self.env(devices, env),
      cwd=REPO,
    )

  def start(self, *args, devices: int = 1, env: dict | None = None) -> subprocess.Popen:
    """``python -m pemn_jax.main ARGS`` started; ``finish`` waits for it."""
    return self.start_python('-m', 'pemn_jax.main', *args, devices=devices, env=env)

  def finish(
    self, proc: subprocess.Popen, timeout: float = SUBPROCESS_TIMEOUT
  ) -> subprocess.CompletedProcess:
    """Waits for ``proc``; past ``timeout`` seconds kills it and fails the test with its output."""
    try:
      out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, err = proc.communicate()
      pytest.fail(f'timed out after {timeout} s: {proc.args}\nstdout:\n{out}\nstderr:\n{err}')
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

  def python(
    self, *argv, devices: int = 1, env: dict | None = None, timeout: float = SUBPROCESS_TIMEOUT
  ) -> subprocess.CompletedProcess:
    return self.finish(self.start_python(*argv, devices=devices, env=env), timeout)

  def __call__(
    self, *args, devices: int = 1, env: dict | None = None, timeout: float = SUBPROCESS_TIMEOUT
  ) -> subprocess.CompletedProcess:
    return self.finish(self.start(*args, devices=devices, env=env), timeout)


@pytest.fixture(scope='session')
def pemn_cli() -> Launcher:
  """``pemn_cli('train', '--config', ..., devices=8)`` -> ``subprocess.CompletedProcess``."""
  return Launcher()
