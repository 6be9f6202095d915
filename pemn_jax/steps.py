"""The jitted steps and where their arrays live: mesh, shardings, train state, train/eval steps.

Everything that runs a model on devices goes through here: the trainer (``pemn_jax.train``), the
artifact evaluator and the benchmarks import the same functions, so a step is made, placed and
jitted one way only.

Parallelism: one ``('data',)`` mesh over every device of every process (``AxisType.Auto``). The
state is replicated and the batch sharded over ``'data'``; ``jax.jit`` with ``NamedSharding``
partitions the step, so BatchNorm statistics and the loss are over the GLOBAL batch with no
``axis_name`` and no ``pmap``. Each process feeds its own slice of every global batch
(``to_global``).

The frozen random weights are an argument of every step, never closed over (XLA would
constant-fold them into the executable) and never part of the train state (nothing trains or
checkpoints them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pemn_jax import layers, native

DATA_AXIS = 'data'

# ----------------------------------------------------------------------------------------------
# Mesh and shardings.


class Shardings(NamedTuple):
  """The data mesh and the two shardings every step uses."""

  mesh: jax.sharding.Mesh
  replicated: NamedSharding  # the state and the frozen weights
  batch: NamedSharding  # batch-major arrays, split over 'data'


def mesh_and_shardings() -> Shardings:
  """The ``('data',)`` mesh over all devices of all processes, and its two shardings."""
  mesh = jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))
  return Shardings(mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS)))


def to_global(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's slice of a batch -> one global array per key, sharded over 'data'."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def in_mesh(fn: Callable, mesh: jax.sharding.Mesh, native_kernels: str = 'auto') -> Callable:
  """``fn`` traced under ``mesh``'s abstract mesh, with ``native_kernels`` switched on.

  The step's arrays carry their shardings anyway; the abstract mesh tells ops that XLA cannot
  partition how the batch is split: ``pemn_jax.native``'s kernels then run per 'data' shard
  through ``shard_map``. ``native_kernels`` (``model.native_kernels``) chooses which native
  kernels the trace may use; it acts at trace time, so every setting gets its own jitted
  function (the ``jit_*`` helpers below make a fresh one per call).
  """

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), native.kernels(native_kernels):
      return fn(*args)

  return traced


def compiler_options() -> dict | None:
  """XLA options for the train step: on CPU, the memory-optimised scheduler.

  It cut the step's scratch buffer of ConvMixer-256/8 at batch 128 from 3.4 to 2.6 GB with no
  measurable slowdown (experiments/results/PERFORMANCE.md); other backends keep their defaults.
  """
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
  return None


# ----------------------------------------------------------------------------------------------
# Optimizer and train state.


class TrainState(flax.struct.PyTreeNode):
  """Everything that trains (and is checkpointed). The frozen weights are NOT here."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def lr_schedule(train_config: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """The reference's piecewise-linear schedule over fractional training progress.

  lr(step) = interp((step + 1) / total, [0, warmup, decay, 1], [0, peak, peak * final, 0]):
  the reference evaluates it at the end of each step's fractional epoch, and so do we.
  """
  t = train_config
  xs = jnp.array([0.0, t.warmup_fraction, t.decay_fraction, 1.0])
  ys = jnp.array([0.0, t.peak_lr, t.peak_lr * t.final_lr_scale, 0.0])
  return lambda step: jnp.interp((step + 1) / total_steps, xs, ys)


def make_optimizer(
  train_config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """AdamW on every trainable leaf (scores and BN; kernels too in the dense baseline)."""
  t = train_config
  return optax.adamw(
    lr_schedule(t, total_steps), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay
  )


def _new_state(tx, params, batch_stats) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params)
  )


def create_train_state(
  variables: dict, tx: optax.GradientTransformation, sharding: jax.sharding.Sharding | None = None
) -> TrainState:
  """Step 0 of training: ``variables``' params and batch_stats, a fresh optimizer state.

  Args:
    variables: from ``build.init_variables`` (the frozen collection, if any, is left out).
    tx: the optimizer.
    sharding: where the state lives (replicated over the mesh in training); default: JAX's.
  """
  init = jax.jit(lambda p, b: _new_state(tx, p, b), out_shardings=sharding)
  return init(variables['params'], variables.get('batch_stats', {}))


def abstract_train_state(
  variables: dict, tx: optax.GradientTransformation, sharding: jax.sharding.Sharding
) -> TrainState:
  """``create_train_state``'s shapes and dtypes with ``sharding`` attached, no array made.

  What a checkpoint is restored into (onto any device count).
  """
  shapes = jax.eval_shape(
    lambda p, b: _new_state(tx, p, b), variables['params'], variables.get('batch_stats', {})
  )
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


# ----------------------------------------------------------------------------------------------
# The steps.


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _variables(params, batch_stats, frozen) -> dict:
  variables = {'params': params, 'batch_stats': batch_stats}
  if frozen is not None:
    variables[layers.FROZEN] = frozen
  return variables


def make_train_step(model, tx: optax.GradientTransformation) -> Callable:
  """The pure train step ``(state, frozen, batch) -> (state, metrics)``.

  ``metrics`` are global-batch means: ``loss``, ``accuracy`` and the gradient's ``grad_norm``.
  """

  def train_step(state: TrainState, frozen, batch):
    def loss_fn(params):
      logits, updates = model.apply(
        _variables(params, state.batch_stats, frozen),
        batch['image'],
        train=True,
        mutable=['batch_stats'],
      )
      loss = cross_entropy(logits, batch['label']).mean()
      return loss, (logits, updates.get('batch_stats', state.batch_stats))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'grad_norm': optax.tree.norm(grads),
    }
    new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      batch_stats=batch_stats,
      opt_state=opt_state,
    )
    return new_state, metrics

  return train_step


def make_eval_step(model) -> Callable:
  """``(params, batch_stats, frozen, batch) -> sums``: correct, loss and count over real rows.

  ``batch['mask']`` is 1 for real examples and 0 for the padding that fills the last batch.
  """

  def eval_step(params, batch_stats, frozen, batch):
    logits = model.apply(_variables(params, batch_stats, frozen), batch['image'], train=False)
    mask = batch['mask']
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {
      'correct': jnp.sum(correct * mask),
      'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
      'count': jnp.sum(mask),
    }

  return eval_step


def jit_train_step(
  model, tx: optax.GradientTransformation, shardings: Shardings, native_kernels: str = 'auto'
) -> Callable:
  """``make_train_step`` jitted: state replicated and donated, batch sharded over 'data'."""
  return jax.jit(
    in_mesh(make_train_step(model, tx), shardings.mesh, native_kernels),
    in_shardings=(shardings.replicated, shardings.replicated, shardings.batch),
    out_shardings=(shardings.replicated, shardings.replicated),
    donate_argnums=(0,),
    compiler_options=compiler_options(),
  )


def jit_eval_step(model, shardings: Shardings, native_kernels: str = 'auto') -> Callable:
  """``make_eval_step`` jitted with the variables replicated and the batch sharded."""
  r = shardings.replicated
  return jax.jit(
    in_mesh(make_eval_step(model), shardings.mesh, native_kernels),
    in_shardings=(r, r, r, shardings.batch),
    out_shardings=r,
  )


def evaluate(
  eval_step: Callable, params, batch_stats, frozen, batches: Iterable[dict], sharding
) -> dict:
  """Accuracy and mean loss over ``batches`` (this process's slices of every global batch).

  Returns:
    ``{'accuracy', 'loss', 'num_examples'}`` over the real (unpadded) examples.
  """
  totals = {'correct': 0.0, 'loss': 0.0, 'count': 0.0}
  for batch in batches:
    sums = jax.device_get(eval_step(params, batch_stats, frozen, to_global(batch, sharding)))
    for k in totals:
      totals[k] += float(sums[k])
  n = max(totals['count'], 1.0)
  return {
    'accuracy': totals['correct'] / n,
    'loss': totals['loss'] / n,
    'num_examples': int(totals['count']),
  }
