"""``train_and_evaluate(config, workdir)``: the sharded, resumable training loop.

Sections: state and optimizer; the jitted steps; evaluation; the loop (resume, checkpoints,
metrics, preemption); ``evaluate_workdir``.

Parallelism: one ``('data',)`` mesh over every device of every process (Auto axis type). The
state is replicated, the batch sharded over 'data'; ``jax.jit`` with ``NamedSharding`` partitions
the step, so BatchNorm statistics and the loss are over the GLOBAL batch with no ``axis_name``
and no ``pmap``. Each process feeds its own slice of every global batch
(``jax.make_array_from_process_local_data``).

Reproducibility: the frozen random weights come from ``build.init_variables`` (seed, strategy)
and are passed to the step as an argument (never closed over, never checkpointed); the data
order and augmentation are functions of (seed, epoch, position). So a run killed at any moment
and resumed from its last checkpoint ends with the same parameters, bit for bit on CPU, as an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from pemn_jax import build, checkpointing, layers
from pemn_jax.data import pipeline

# ----------------------------------------------------------------------------------------------
# State and optimizer.


class TrainState(flax.struct.PyTreeNode):
  """Everything that trains (and is checkpointed). The frozen weights are NOT here."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def lr_schedule(config: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """The reference's piecewise-linear schedule over fractional training progress.

  lr(step) = interp((step + 1) / total, [0, warmup, decay, 1], [0, peak, peak * final, 0]):
  the reference evaluates it at the end of each step's fractional epoch, and so do we.
  """
  t = config.train
  xs = jnp.array([0.0, t.warmup_fraction, t.decay_fraction, 1.0])
  ys = jnp.array([0.0, t.peak_lr, t.peak_lr * t.final_lr_scale, 0.0])
  return lambda step: jnp.interp((step + 1) / total_steps, xs, ys)


def total_train_steps(config: ml_collections.ConfigDict, info) -> int:
  """``train.num_steps`` if set, else ``train.num_epochs`` full epochs (the schedule's length)."""
  t = config.train
  return t.num_steps or t.num_epochs * pipeline.steps_per_epoch(info, t.batch_size)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """AdamW on every trainable leaf (scores and BN; kernels too in the dense baseline)."""
  t = config.train
  if t.optimizer != 'adamw':
    raise ValueError(f"train.optimizer must be 'adamw', got {t.optimizer!r}")
  return optax.adamw(
    lr_schedule(config, total_steps), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay
  )


def step_compiler_options() -> dict | None:
  """XLA options for the train step: on CPU, the memory-optimised scheduler.

  It cut the step's scratch buffer of ConvMixer-256/8 at batch 128 from 3.4 to 2.6 GB with no
  measurable slowdown (experiments/results/PERFORMANCE.md); other backends keep their defaults.
  """
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
  return None


def mesh_and_shardings():
  """The ('data',) mesh over all devices, and the replicated / batch-sharded shardings."""
  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))
  return mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))


# ----------------------------------------------------------------------------------------------
# The jitted steps.


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def make_train_step(model, tx):
  """The pure train step ``(state, frozen, batch) -> (state, metrics)``."""

  def train_step(state: TrainState, frozen, batch):
    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      if frozen is not None:
        variables[layers.FROZEN] = frozen
      logits, updates = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
      loss = cross_entropy(logits, batch['label']).mean()
      return loss, (logits, updates.get('batch_stats', state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'grad_norm': optax.tree.norm(grads),
    }
    return state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    ), metrics

  return train_step


def in_mesh(fn: Callable, mesh) -> Callable:
  """``fn`` traced under ``mesh``'s abstract mesh.

  The step's arrays carry their shardings anyway; this tells ops that cannot be partitioned by
  XLA how the batch is split: ``pemn_jax.native``'s kernels then run per 'data' shard through
  ``shard_map`` (without it they would fall back to the XLA formulation on several devices).
  """

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def jit_eval_step(model, replicated, batch_sharding):
  """``make_eval_step`` jitted with the state replicated and the batch sharded over 'data'."""
  return jax.jit(
    in_mesh(make_eval_step(model), batch_sharding.mesh),
    in_shardings=(replicated, replicated, replicated, batch_sharding),
    out_shardings=replicated,
  )


def make_eval_step(model):
  """``(params, batch_stats, frozen, batch) -> sums``: correct, loss and count over real rows."""

  def eval_step(params, batch_stats, frozen, batch):
    variables = {'params': params, 'batch_stats': batch_stats}
    if frozen is not None:
      variables[layers.FROZEN] = frozen
    logits = model.apply(variables, batch['image'], train=False)
    mask = batch['mask']
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    return {
      'correct': jnp.sum(correct * mask),
      'loss': jnp.sum(cross_entropy(logits, batch['label']) * mask),
      'count': jnp.sum(mask),
    }

  return eval_step


# ----------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(eval_fn, params, batch_stats, frozen, config, batch_sharding) -> dict:
  """Accuracy and loss over the whole test split (every example exactly once)."""
  totals = {'correct': 0.0, 'loss': 0.0, 'count': 0.0}
  for batch in pipeline.eval_batches(
    config.data,
    global_batch_size=config.train.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  ):
    batch = to_global(batch, batch_sharding)
    sums = jax.device_get(eval_fn(params, batch_stats, frozen, batch))
    for k in totals:
      totals[k] += float(sums[k])
  n = max(totals['count'], 1.0)
  return {
    'accuracy': totals['correct'] / n,
    'loss': totals['loss'] / n,
    'num_examples': int(totals['count']),
  }


def to_global(local_batch: dict, sharding) -> dict:
  """This process's slice of a batch -> one global array per key, sharded over 'data'."""
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


# ----------------------------------------------------------------------------------------------
# Setup shared by training and evaluation.


@flax.struct.dataclass
class Setup:
  model: Any = flax.struct.field(pytree_node=False)
  frozen: Any
  fingerprint: str = flax.struct.field(pytree_node=False)
  variables: Any


def setup_model(config: ml_collections.ConfigDict, replicated) -> Setup:
  """Builds the model, draws its variables (strategy applied) and places them replicated."""
  model = build.build_model(config)
  variables = build.init_variables(model, config)
  frozen = variables.get(layers.FROZEN)
  fingerprint = build.frozen_fingerprint(frozen) if frozen is not None else 'dense'
  variables = jax.device_put(variables, replicated)
  return Setup(
    model=model, frozen=variables.get(layers.FROZEN), fingerprint=fingerprint, variables=variables
  )


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  """Checks the train fields that a run needs before anything is written."""
  t = config.train
  n = jax.device_count()
  for field in (
    'batch_size',
    'eval_batch_size',
    'num_epochs',
    'checkpoint_every_steps',
    'max_checkpoints',
    'log_every_steps',
    'eval_every_epochs',
  ):
    v = t[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f'train.{field} must be a positive integer, got {v!r}')
  if t.num_steps is not None and (not isinstance(t.num_steps, int) or t.num_steps < 1):
    raise ValueError(f'train.num_steps must be a positive integer or unset, got {t.num_steps!r}')
  for field in ('batch_size', 'eval_batch_size'):
    if t[field] % n:
      raise ValueError(
        f'train.{field} ({t[field]}) must be divisible by the number of devices '
        f'({n}); choose a multiple of {n}'
      )
  if not (0.0 <= t.warmup_fraction <= t.decay_fraction <= 1.0):
    raise ValueError(
      'train.warmup_fraction <= train.decay_fraction must both be in [0, 1], '
      f'got {t.warmup_fraction} and {t.decay_fraction}'
    )
  if not (t.peak_lr > 0 and t.weight_decay >= 0):
    raise ValueError(
      f'train.peak_lr must be > 0 and train.weight_decay >= 0, got {t.peak_lr} and {t.weight_decay}'
    )


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)


class _MetricWriter:
  """JSON lines + TensorBoard events in the workdir, written by process 0 only."""

  def __init__(self, workdir: str, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if not self.enabled:
      return
    # Lines past the step we resume from were written by the killed run after its last
    # checkpoint; the resumed run writes them again, so drop them to keep one line per event.
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [ln for ln in f if ln.strip() and json.loads(ln).get('step', 0) <= resume_step]
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    from tensorboardX import SummaryWriter

    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, kind: str, step: int, values: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'kind': kind, 'step': step, **values}) + '\n')
    for k, v in values.items():
      if isinstance(v, (int, float)):
        self.tb.add_scalar(f'{kind}/{k}', v, step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


class _StopSignal:
  """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits."""

  def __init__(self):
    self.received = None
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def should_stop(self) -> bool:
    stop = self.received is not None
    if jax.process_count() > 1:  # every process must stop at the same step
      from jax.experimental import multihost_utils

      stop = bool(np.any(multihost_utils.process_allgather(np.array(stop))))
    return stop

  def restore(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the model a config describes, resuming from ``workdir`` if it holds checkpoints.

  Args:
    config: a full config (see ``pemn_jax.configs.common``).
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard events, ``config.json`` and
      ``summary.json`` are written here.

  Returns:
    The summary: best and final test accuracy, steps, wall time, workdir paths.
  """
  build.validate_config(config)
  validate_train_config(config)
  is_main = jax.process_index() == 0
  if is_main:
    pipeline.prepare(config.data)
  info = pipeline.get_dataset_info(config.data)
  if config.model.num_classes != info.num_classes:
    raise ValueError(
      f'model.num_classes ({config.model.num_classes}) does not match the '
      f'{info.num_classes} classes of data.name={config.data.name!r}'
    )
  t = config.train
  steps_per_epoch = pipeline.steps_per_epoch(info, t.batch_size)
  total_steps = total_train_steps(config, info)
  num_epochs = math.ceil(total_steps / steps_per_epoch)

  mesh, replicated, batch_sharding = mesh_and_shardings()
  s = setup_model(config, replicated)
  tx = make_optimizer(config, total_steps)
  variables = s.variables
  state = jax.jit(
    lambda p, b: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, batch_stats=b, opt_state=tx.init(p)
    ),
    out_shardings=replicated,
  )(variables['params'], variables.get('batch_stats', {}))

  # Resume (the default), after checking the workdir belongs to this model.
  os.makedirs(workdir, exist_ok=True)
  identity = checkpointing.identity(config)
  config_path = os.path.join(workdir, 'config.json')
  mngr = checkpointing.manager(workdir, t.max_checkpoints)
  latest = mngr.latest_step()
  meta = {
    'fingerprint': s.fingerprint,
    'identity': identity,
    'best_accuracy': -1.0,
    'best_step': None,
    'best_epoch': None,
  }
  if latest is not None:
    # Identity first (meta only): a checkpoint of another model must fail naming the fields
    # that differ, not with a shape or tree mismatch from restoring its state.
    saved = checkpointing.restore_meta(mngr, latest)
    checkpointing.check_identity(saved['identity'], identity, workdir)
    if saved['fingerprint'] != s.fingerprint:
      raise ValueError(
        f'the frozen random weights regenerated for {workdir} do not match the '
        'fingerprint stored with its checkpoints (a different JAX random stream '
        'or strategy code?); refusing to resume on different weights'
      )
    abstract = checkpointing.abstract_like(state, replicated)
    state, saved = checkpointing.restore(mngr, latest, abstract)
    meta.update({k: saved[k] for k in ('best_accuracy', 'best_step', 'best_epoch')})
    logging.info('resuming from step %d in %s', latest, workdir)
    if is_main:
      print(f'pemn: resuming from checkpoint step {latest} in {workdir}', flush=True)
  elif os.path.exists(config_path):  # every process checks, so none is left waiting
    with open(config_path) as f:
      checkpointing.check_identity(
        checkpointing.identity(ml_collections.ConfigDict(json.load(f))), identity, workdir
      )
  if is_main:
    _write_json_atomic(config_path, config.to_dict())

  train_step = jax.jit(
    in_mesh(make_train_step(s.model, tx), mesh),
    in_shardings=(replicated, replicated, batch_sharding),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
    compiler_options=step_compiler_options(),
  )
  eval_step = jit_eval_step(s.model, replicated, batch_sharding)

  start = int(jax.device_get(state.step))
  writer = _MetricWriter(workdir, start)
  stopper = _StopSignal()
  progress = None
  if is_main and t.progress and start < total_steps:
    from tqdm import tqdm

    progress = tqdm(total=total_steps, initial=start, unit='step', dynamic_ncols=True, desc='train')
  last_eval = None
  step = start
  t0 = time.time()
  interrupted = None
  try:
    for epoch in range(start // steps_per_epoch, num_epochs):
      first = step - epoch * steps_per_epoch
      epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
      batches = pipeline.train_batches(
        config.data,
        global_batch_size=t.batch_size,
        seed=config.seed,
        epoch=epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step_in_epoch=first,
      )
      running = []
      for _, local in zip(range(first, epoch_steps), batches):
        state, metrics = train_step(state, s.frozen, to_global(local, batch_sharding))
        step += 1
        running.append(metrics)
        if progress is not None:
          progress.update(1)
        if step % t.log_every_steps == 0 or step == total_steps:
          m = {k: float(np.mean([float(x[k]) for x in running])) for k in running[0]}
          m['lr'] = float(lr_schedule(config, total_steps)(step - 1))
          m['steps_per_s'] = (step - start) / max(time.time() - t0, 1e-9)
          writer.write('train', step, m)
          if progress is not None:
            progress.set_postfix(loss=f'{m["loss"]:.3f}', acc=f'{m["accuracy"]:.3f}')
          running = []
        end_of_epoch = step == epoch * steps_per_epoch + epoch_steps
        if end_of_epoch and ((epoch + 1) % t.eval_every_epochs == 0 or step == total_steps):
          last_eval = evaluate(
            eval_step, state.params, state.batch_stats, s.frozen, config, batch_sharding
          )
          last_eval.update(epoch=epoch + 1)
          # >=: on ties the later checkpoint is the best, as orbax's BestN keeps the later one
          # (with > the recorded best_step could name a checkpoint BestN has deleted).
          if last_eval['accuracy'] >= meta['best_accuracy']:
            meta.update(best_accuracy=last_eval['accuracy'], best_step=step, best_epoch=epoch + 1)
          writer.write('eval', step, last_eval)
          line = (
            f'epoch {epoch + 1}/{num_epochs} step {step}/{total_steps}: test accuracy '
            f'{last_eval["accuracy"]:.4f} loss {last_eval["loss"]:.4f} '
            f'(best {meta["best_accuracy"]:.4f} at epoch {meta["best_epoch"]})'
          )
          logging.info(line)
          if progress is not None:
            progress.write(line)
          elif is_main:
            print(line, flush=True)
          checkpointing.save(mngr, step, state, meta, accuracy=last_eval['accuracy'])
        elif step % t.checkpoint_every_steps == 0 or step == total_steps:
          checkpointing.save(mngr, step, state, meta)
        if step < total_steps and stopper.should_stop():  # at the last step: just finish
          interrupted = stopper.received or 'a signal on another process'
          if mngr.latest_step() != step:
            checkpointing.save(mngr, step, state, meta)
          break
      if interrupted:
        break
  finally:
    mngr.wait_until_finished()
    stopper.restore()
    if progress is not None:
      progress.close()
    writer.close()

  if step >= total_steps and last_eval is None:
    # Nothing left to train (a finished or fully checkpointed workdir run again): evaluate the
    # final state so the summary still reports the final accuracy.
    last_eval = evaluate(
      eval_step, state.params, state.batch_stats, s.frozen, config, batch_sharding
    )
  summary = {
    'workdir': os.path.abspath(workdir),
    'step': step,
    'total_steps': total_steps,
    'finished': step >= total_steps,
    'best_accuracy': meta['best_accuracy'],
    'best_epoch': meta['best_epoch'],
    'best_step': meta['best_step'],
    'final_accuracy': last_eval['accuracy'] if last_eval and step >= total_steps else None,
    'final_loss': last_eval['loss'] if last_eval and step >= total_steps else None,
    'train_seconds_this_run': time.time() - t0,
    'fingerprint': s.fingerprint,
  }
  if interrupted:
    msg = (
      f'pemn: stopped by {interrupted} at step {step}/{total_steps}; checkpoint written. '
      f'Resume with the same command (pemn train --config ... --workdir {workdir}).'
    )
    logging.warning(msg)
    if is_main:
      print(msg, flush=True)
  elif is_main:
    _write_json_atomic(os.path.join(workdir, 'summary.json'), summary)
  return summary


# ----------------------------------------------------------------------------------------------
# Evaluating a workdir.


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'--workdir {workdir} holds no config.json: not a pemn training '
      'directory (run pemn train there first)'
    )
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_workdir(workdir: str, best: bool = False):
  """(config, Setup, restored TrainState, step) of a workdir's latest or best checkpoint."""
  config = load_config(workdir)
  _, replicated, _ = mesh_and_shardings()
  s = setup_model(config, replicated)
  mngr = checkpointing.manager(workdir, read_only=True)
  step = checkpointing.best_step(mngr) if best else mngr.latest_step()
  if step is None:
    raise FileNotFoundError(
      f'--workdir {workdir} holds no {"evaluated " if best else ""}checkpoint'
    )
  info = pipeline.get_dataset_info(config.data)
  tx = make_optimizer(config, total_train_steps(config, info))
  template = jax.eval_shape(
    lambda p, b: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, batch_stats=b, opt_state=tx.init(p)
    ),
    s.variables['params'],
    s.variables.get('batch_stats', {}),
  )
  state, meta = checkpointing.restore(mngr, step, checkpointing.abstract_like(template, replicated))
  if meta['fingerprint'] != s.fingerprint:
    raise ValueError(
      f'the frozen weights regenerated for {workdir} do not match its checkpoint fingerprint'
    )
  return config, s, state, step


def evaluate_workdir(workdir: str, best: bool = False) -> dict:
  """Evaluates a workdir's latest (or best) checkpoint on the test split.

  Returns:
    ``{'accuracy', 'loss', 'num_examples', 'step'}``.
  """
  config, s, state, step = restore_workdir(workdir, best)
  _, replicated, batch_sharding = mesh_and_shardings()
  eval_step = jit_eval_step(s.model, replicated, batch_sharding)
  result = evaluate(eval_step, state.params, state.batch_stats, s.frozen, config, batch_sharding)
  result['step'] = step
  return result
