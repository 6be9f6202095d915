"""``pemn_jax.steps`` on its own: the mesh and shardings, the train state, ``to_global``, the
jitted train and eval steps (each traced once, ``chex.assert_max_traces``) and ``evaluate``.

The smoke config's model (a masked ConvMixer-16/2 on 28x28x1) on random batches: no dataset.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pemn_jax import build, layers, steps
from pemn_jax.configs import smoke

BATCH = 8


@pytest.fixture(scope='module')
def setup():
  """(model, variables, optimizer, shardings) of the smoke config."""
  config = smoke.get_config()
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  tx = steps.make_optimizer(config.train, total_steps=10)
  return model, variables, tx, steps.mesh_and_shardings()


@pytest.fixture
def fresh_trace_counters():
  """``chex.assert_max_traces`` counts per definition site: start each test from zero."""
  chex.clear_trace_counter()
  yield
  chex.clear_trace_counter()


def batch(seed: int, size: int = BATCH) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    'image': rng.standard_normal((size, 28, 28, 1), dtype=np.float32),
    'label': rng.integers(0, 10, size).astype(np.int32),
  }


def test_mesh_and_shardings():
  mesh, replicated, batch_sharding = steps.mesh_and_shardings()
  assert mesh.axis_names == (steps.DATA_AXIS,) == ('data',)
  assert mesh.devices.tolist() == jax.devices()
  assert replicated.mesh is mesh and replicated.spec == P()
  assert batch_sharding.mesh is mesh and batch_sharding.spec == P('data')


def test_to_global_keeps_values_dtypes_and_shards_over_data():
  sharding = steps.mesh_and_shardings().batch
  local = {**batch(0), 'mask': np.ones(BATCH, np.float32)}
  arrays = steps.to_global(local, sharding)
  assert arrays.keys() == local.keys()
  for k, v in local.items():
    assert arrays[k].sharding == sharding and arrays[k].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(arrays[k]), v)


def test_create_and_abstract_train_state_agree(setup):
  _, variables, tx, shardings = setup
  state = steps.create_train_state(variables, tx, shardings.replicated)
  abstract = steps.abstract_train_state(variables, tx, shardings.replicated)
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert (x.shape, x.dtype, x.sharding) == (a.shape, a.dtype, a.sharding)
    assert a.sharding == shardings.replicated
  assert int(state.step) == 0 and state.step.dtype == jnp.int32
  chex.assert_trees_all_equal(state.params, variables['params'])
  chex.assert_trees_all_equal(state.batch_stats, variables['batch_stats'])
  chex.assert_trees_all_equal(state.opt_state, tx.init(variables['params']))
  # What trains is the state; the frozen random weights are not in it.
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(state)[0]]
  assert layers.FROZEN in variables and not any(layers.FROZEN in p for p in paths)


def test_train_step_traces_once_over_new_batches_and_donated_states(
  setup, monkeypatch, fresh_trace_counters
):
  model, variables, tx, shardings = setup
  make_train_step = steps.make_train_step
  monkeypatch.setattr(
    steps, 'make_train_step', lambda m, t: chex.assert_max_traces(make_train_step(m, t), n=1)
  )
  train_step = steps.jit_train_step(model, tx, shardings)  # jits the wrapped step
  frozen = jax.device_put(variables[layers.FROZEN], shardings.replicated)
  state = steps.create_train_state(variables, tx, shardings.replicated)
  # No value of a state is read before it is donated: a NumPy view of a buffer pins it (XLA then
  # copies instead of donating, silently).
  for i in range(4):
    old = state
    state, metrics = train_step(state, frozen, steps.to_global(batch(i), shardings.batch))
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert all(x.is_deleted() for x in jax.tree.leaves(old)), 'the state was not donated'
  assert int(state.step) == 4
  assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, state.params, variables['params'])))

  # The check bites: a batch of another size is a new trace, refused.
  with pytest.raises(AssertionError, match='is traced > 1 times'):
    train_step(state, frozen, steps.to_global(batch(9, size=2 * BATCH), shardings.batch))


def test_eval_step_traces_once_and_evaluate_counts_every_example_once(
  setup, monkeypatch, fresh_trace_counters
):
  """10 examples in batches of 4: the last batch holds 2 real rows and 2 of padding (garbage
  images, label 0, mask 0), which count for nothing."""
  model, variables, _, shardings = setup
  make_eval_step = steps.make_eval_step
  monkeypatch.setattr(
    steps, 'make_eval_step', lambda m: chex.assert_max_traces(make_eval_step(m), n=1)
  )
  eval_step = steps.jit_eval_step(model, shardings)
  real = batch(1, size=10)
  padded = {
    'image': np.concatenate([real['image'], np.full((2, 28, 28, 1), 1e3, np.float32)]),
    'label': np.concatenate([real['label'], np.zeros(2, np.int32)]),
    'mask': np.concatenate([np.ones(10, np.float32), np.zeros(2, np.float32)]),
  }
  batches = [{k: v[i : i + 4] for k, v in padded.items()} for i in range(0, 12, 4)]
  params, batch_stats, frozen = (
    variables['params'],
    variables['batch_stats'],
    variables[layers.FROZEN],
  )
  result = steps.evaluate(eval_step, params, batch_stats, frozen, batches, shardings.batch)
  assert result['num_examples'] == 10

  # Independent: the 10 real examples as one batch, straight through the model.
  logits = model.apply(variables, real['image'], train=False)
  accuracy = float(np.mean(np.argmax(logits, -1) == real['label']))
  loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, real['label']).mean())
  assert result['accuracy'] == pytest.approx(accuracy, abs=1e-6)
  assert result['loss'] == pytest.approx(loss, rel=1e-5)
  # Evaluating again reuses the one trace.
  assert steps.evaluate(eval_step, params, batch_stats, frozen, batches, shardings.batch) == result


def test_lr_schedule_ends_at_zero_after_warmup_to_peak():
  train = smoke.get_config().train
  lr = steps.lr_schedule(train, total_steps=100)
  warmup_end = round(train.warmup_fraction * 100) - 1  # lr(step) at progress (step + 1) / total
  assert float(lr(warmup_end)) == pytest.approx(train.peak_lr, rel=1e-5)
  assert float(lr(99)) == 0.0
  assert 0.0 < float(lr(0)) < train.peak_lr
