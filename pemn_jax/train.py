"""``train_and_evaluate(config, workdir)``: the resumable training loop, and a workdir's readers.

Sections: checks; the model and its state; restore or start; the loop; reading a workdir back
(``restore_workdir``, ``evaluate_workdir``, ``export_workdir``).

The steps themselves, the mesh and the shardings are in ``pemn_jax.steps``; metric files,
progress and stop signals in ``pemn_jax.monitoring``; checkpoint files in
``pemn_jax.checkpointing``.

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
import time
from typing import Any

import flax.struct
import jax
import ml_collections

from pemn_jax import (
  artifact,
  build,
  checkpointing,
  fileio,
  layers,
  monitoring,
  pretrained,
  steps,
  workdirs,
)
from pemn_jax.configs import common
from pemn_jax.data import pipeline, sources

# ----------------------------------------------------------------------------------------------
# Checks.


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  """Checks every ``train`` field, before anything is written: counts are integers in
  [1, 2**31 - 1] (the state counts steps in int32), numbers are finite (in float32 too), the
  Adam betas in [0, 1), ``eps`` and ``peak_lr`` > 0, ``weight_decay`` >= 0, the schedule's
  fractions and ``final_lr_scale`` in [0, 1]. What needs the dataset (a batch no larger than
  the training split) is ``check_train_data``.

  Raises:
    ValueError: one line naming the field and what is allowed.
  """
  t = config.train
  for field in (
    'batch_size',
    'eval_batch_size',
    'num_epochs',
    'checkpoint_every_steps',
    'max_checkpoints',
    'log_every_steps',
    'eval_every_epochs',
  ):
    common.check_positive_int(t[field], f'train.{field}', maximum=common.INT32_MAX)
  common.check_positive_int(
    t.num_steps, 'train.num_steps', allow_none=True, maximum=common.INT32_MAX
  )
  n = jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if t[field] % n:
      raise ValueError(
        f'train.{field} ({t[field]}) must be divisible by the number of devices '
        f'({n}); choose a multiple of {n}'
      )
  big = common.FLOAT32_MAX
  common.check_real(t.peak_lr, 'train.peak_lr', 0.0, big, low_open=True)
  common.check_real(t.weight_decay, 'train.weight_decay', 0.0, big)
  common.check_real(t.b1, 'train.b1', 0.0, 1.0, high_open=True)
  common.check_real(t.b2, 'train.b2', 0.0, 1.0, high_open=True)
  common.check_real(t.eps, 'train.eps', 0.0, big, low_open=True)
  common.check_real(t.warmup_fraction, 'train.warmup_fraction', 0.0, 1.0)
  common.check_real(t.decay_fraction, 'train.decay_fraction', 0.0, 1.0)
  if not t.warmup_fraction <= t.decay_fraction:
    raise ValueError(
      'train.warmup_fraction must be <= train.decay_fraction (the lr rises, then decays), '
      f'got {t.warmup_fraction} and {t.decay_fraction}'
    )
  common.check_real(t.final_lr_scale, 'train.final_lr_scale', 0.0, 1.0)
  common.check_bool(t.progress, 'train.progress')
  common.check_bool(t.eval_at_start, 'train.eval_at_start')


def check_train_data(
  config: ml_collections.ConfigDict, info: sources.DatasetInfo
) -> ml_collections.ConfigDict:
  """The ``train`` checks that need the dataset; returns the config to train with.

  ``train.batch_size`` must be at most the training split, and the run at most 2**31 - 1 steps.
  A ``train.eval_batch_size`` larger than the test split needs (``pipeline.fit_eval_batch_size``:
  the split rounded up to a multiple of the device count) would only be padding, memory that
  grows with the field: it is lowered to that, with a note, in a copy of the config (the one
  ``config.json`` records).

  Raises:
    ValueError: naming the field, the split's size and what is allowed.
  """
  t = config.train
  if t.batch_size > info.num_train:
    raise ValueError(
      f'train.batch_size ({t.batch_size}) must be at most the {info.num_train} training '
      f'examples of data.name={info.name!r}'
    )
  total = total_train_steps(config, info)
  if total > common.INT32_MAX:
    raise ValueError(
      f'train.num_epochs ({t.num_epochs}) x {pipeline.steps_per_epoch(info, t.batch_size)} '
      f'steps per epoch is {total:,} steps, more than the {common.INT32_MAX:,} a run may take; '
      'lower train.num_epochs or set train.num_steps'
    )
  fitted = pipeline.fit_eval_batch_size(info, t.eval_batch_size, jax.device_count())
  if fitted < t.eval_batch_size:
    monitoring.announce(
      f'pemn: train.eval_batch_size {t.eval_batch_size} is more than the {info.num_test} test '
      f'examples of data.name={info.name!r} need; evaluating in one batch of {fitted}'
    )
    config = config.copy_and_resolve_references()
    config.train.eval_batch_size = fitted
  return config


def total_train_steps(config: ml_collections.ConfigDict, info: sources.DatasetInfo) -> int:
  """``train.num_steps`` if set, else ``train.num_epochs`` full epochs (the schedule's length)."""
  t = config.train
  return t.num_steps or t.num_epochs * pipeline.steps_per_epoch(info, t.batch_size)


def is_time(step: int, every: int, last: int) -> bool:
  """Whether a periodic action falls after ``step`` (1-based count of steps done): every
  ``every`` steps, and always after the ``last``."""
  return step % every == 0 or step == last


# ----------------------------------------------------------------------------------------------
# The model and its state.


@flax.struct.dataclass
class Setup:
  """A built model with its variables, placed replicated over the mesh."""

  model: Any = flax.struct.field(pytree_node=False)
  frozen: Any  # the frozen collection (None for dense models)
  fingerprint: str = flax.struct.field(pytree_node=False)  # of ``frozen``; 'dense' if none
  variables: Any
  input_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # (H, W, C) of one example


def setup_model(
  config: ml_collections.ConfigDict, shape: tuple[int, ...], replicated, model=None
) -> Setup:
  """Builds the model, draws its variables (strategy applied) and places them replicated.

  ``model``: a Linen module the caller built (e.g. with ``pemn.mask_model``) instead of the one
  ``config.model`` describes; it is initialised with the config seed's keys (``params`` and
  ``frozen`` streams) on one example, and its fingerprint covers the structure of its variables
  too, so its checkpoints never restore into another module. With ``model.base_source`` the
  fingerprint covers the whole base model (``build.base_run_fingerprint``): a resume reloads
  the base and refuses another one.
  """
  given = model is not None
  if given:
    variables = build.init_module(model, config, shape)
  else:
    model = build.build_model(config)
    variables = build.init_variables(model, config, shape)
  frozen = variables.get(layers.FROZEN)
  fingerprint = build.frozen_fingerprint(frozen) if frozen is not None else 'dense'
  if given:
    fingerprint = build.structure_fingerprint(variables, fingerprint)
  base = build.base_of(config)
  if base is not None:  # the whole base, not only the kernels a masked model keeps frozen
    fingerprint = build.base_run_fingerprint(base.fingerprint, fingerprint)
  variables = jax.device_put(variables, replicated)
  return Setup(model, variables.get(layers.FROZEN), fingerprint, variables, tuple(shape))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """The run's optimizer: ``steps.make_optimizer``, and for a masked model over a base with
  ``model.base_unmasked='freeze'`` only the scores' updates (``pretrained.mask_only``; a given
  module's leaves too: the layers its rules leave unmasked stay the base's)."""
  tx = steps.make_optimizer(config.train, total_steps)
  m = config.model
  if m.get('base_source') and m.get('base_unmasked') == 'freeze':
    tx = pretrained.mask_only(tx)
  return tx


def restore_checkpoint(mngr, step: int, template, s: Setup, workdir: str, identity=None):
  """``(state, meta)`` of checkpoint ``step``, after checking it belongs to this model.

  The identity (when given) is checked from the meta alone, so a checkpoint of another model
  (or of a run with other training settings) fails naming the fields that differ, not with a
  shape mismatch from restoring its state; then the state's digest (``checkpointing.restore``)
  and the frozen-weight fingerprint, so no altered state and no state paired with other random
  weights is ever used.
  """
  saved_meta = checkpointing.restore_meta(mngr, step, template)
  if identity is not None:
    saved = saved_meta['identity']
    missing = [g for g in identity if g not in saved]
    if missing and os.path.exists(os.path.join(workdir, 'config.json')):
      # Checkpoints of earlier versions record no data/train settings; the config.json those
      # versions rewrote at every start is their record of the run that wrote the checkpoint.
      recorded = checkpointing.identity(load_config(workdir))
      saved = {**{g: recorded[g] for g in missing}, **saved}
    checkpointing.check_identity(saved, identity, workdir)
  # The fingerprint before the state: a checkpoint of another module (another state shape) is
  # refused as such, not reported as a corrupted checkpoint by the restore.
  build.check_fingerprint(
    saved_meta.get('fingerprint'), s.fingerprint, f'checkpoint step {step} of {workdir}'
  )
  state, meta = checkpointing.restore(mngr, step, template)
  return state, meta


def restore_or_start(config, workdir: str, mngr, state, s: Setup, replicated):
  """The state to train from: the latest checkpoint of ``workdir`` if there is one, else
  ``state``; and the run's meta (best accuracy so far).

  A resume must keep the run's identity (``checkpointing.check_identity``: model, and the data
  and train settings that change what is trained); only the stopping point and execution-only
  fields may change (``checkpointing.MAY_CHANGE_ON_RESUME``). Extending ``train.num_steps``
  re-evaluates the lr schedule over the new total for the remaining steps (the steps done
  followed the shorter schedule), so an extended run is not the run the longer ``num_steps``
  would have trained from the start. Once the checks pass the record is written:
  ``config.json`` is the config of the run's start from step 0 (a start with no checkpoint to
  keep writes it anew), and every later start appends ``{step, started, config}`` to
  ``config_history.jsonl``, so the record of the earlier parts is never overwritten.
  """
  identity = checkpointing.identity(config)
  config_path = os.path.join(workdir, 'config.json')
  history_path = os.path.join(workdir, HISTORY_FILE)
  meta = {
    'fingerprint': s.fingerprint,
    'identity': identity,
    'best_accuracy': -1.0,
    'best_step': None,
    'best_epoch': None,
    'initial_accuracy': None,
  }
  latest = mngr.latest_step()
  if latest is not None:
    template = checkpointing.abstract_like(state, replicated)
    state, saved = restore_checkpoint(mngr, latest, template, s, workdir, identity)
    meta.update({k: saved[k] for k in ('best_accuracy', 'best_step', 'best_epoch')})
    meta['initial_accuracy'] = saved.get('initial_accuracy')  # absent before eval_at_start
    monitoring.announce(f'pemn: resuming from checkpoint step {latest} in {workdir}')
  elif os.path.exists(config_path):  # every process checks, so none is left waiting
    # Nothing trained is kept, so the run starts afresh: only the model must be the same.
    recorded, model = checkpointing.identity(load_config(workdir)), checkpointing.MODEL_FIELDS
    checkpointing.check_identity(
      {k: recorded[k] for k in model}, {k: identity[k] for k in model}, workdir
    )
  if jax.process_index() == 0:
    if latest is None or not os.path.exists(config_path):
      fileio.atomic_write_json(config_path, config.to_dict())
    if latest is not None or os.path.exists(history_path):
      _append_history(history_path, latest or 0, config)
  return state, meta


HISTORY_FILE = 'config_history.jsonl'


def _append_history(path: str, step: int, config: ml_collections.ConfigDict) -> None:
  """One line per start after the first: the step it started from, when, and its config."""
  line = {
    'step': step,
    'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    'config': config.to_dict(),
  }
  old = ''
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
  fileio.atomic_write(path, old + json.dumps(line) + '\n')


# ----------------------------------------------------------------------------------------------
# The loop.


def _train_batches(config, epoch: int, pos: int):
  """This process's training batches of ``epoch`` from batch ``pos`` on (resumable order)."""
  return iter(
    pipeline.train_batches(
      config.data,
      global_batch_size=config.train.batch_size,
      seed=config.seed,
      epoch=epoch,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_step_in_epoch=pos,
    )
  )


def evaluate_state(eval_step, config, s: Setup, shardings, params, batch_stats) -> dict:
  """Accuracy and loss of ``params`` / ``batch_stats`` over the whole test split."""
  batches = pipeline.eval_batches(
    config.data,
    global_batch_size=config.train.eval_batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  return steps.evaluate(eval_step, params, batch_stats, s.frozen, batches, shardings.batch)


def _mean_metrics(running: list[dict]) -> dict:
  return {k: sum(float(m[k]) for m in running) / len(running) for k in running[0]}


def _diverged(what: str, step: int, mngr, t) -> ValueError:
  """The one-line error that stops a run whose loss or state became non-finite."""
  last = mngr.latest_step()
  if last is None:
    kept = 'no checkpoint was written. Train again with a lower train.peak_lr'
  else:
    kept = (
      f'the last good checkpoint, step {last}, is kept in {mngr.directory}. Train again with '
      'a lower train.peak_lr in a new --workdir'
    )
  return ValueError(
    f'training diverged: {what} at step {step} (train.peak_lr={t.peak_lr:g}); nothing '
    f'non-finite was saved and {kept}.'
  )


def _check_loss(metrics: list[dict], first_step: int, mngr, t) -> None:
  """Raises ``_diverged`` at the first non-finite loss of the train-step ``metrics`` of steps
  ``first_step``, ``first_step + 1``, ... (reading them is a device->host sync)."""
  for i, m in enumerate(metrics):
    loss = float(m['loss'])
    if not math.isfinite(loss):
      raise _diverged(f'the train loss is {loss}', first_step + i, mngr, t)


def _save(mngr, step: int, state, meta: dict, t, accuracy: float | None = None) -> None:
  """``checkpointing.save``; a state with a non-finite value stops the run, unsaved."""
  try:
    checkpointing.save(mngr, step, state, meta, accuracy=accuracy)
  except checkpointing.NonFiniteStateError as e:
    raise _diverged(f'the state ({e.leaf}) is not finite', step, mngr, t) from None


def _finish(workdir, done, total_steps, meta, last_eval, seconds, s: Setup, interrupted) -> dict:
  """The run's summary; written to ``summary.json`` unless a signal stopped the run early."""
  finished = done >= total_steps
  summary = {
    'workdir': os.path.abspath(workdir),
    'step': done,
    'total_steps': total_steps,
    'finished': finished,
    **{k: meta[k] for k in ('best_accuracy', 'best_epoch', 'best_step')},
    'final_accuracy': last_eval['accuracy'] if finished else None,
    'final_loss': last_eval['loss'] if finished else None,
    'train_seconds_this_run': seconds,
    'fingerprint': s.fingerprint,
  }
  if meta.get('initial_accuracy') is not None:
    summary['initial_accuracy'] = meta['initial_accuracy']  # train.eval_at_start
  if interrupted:
    summary['stopped_by'] = interrupted  # the CLI's exit status (128 + the signal's number)
    monitoring.announce(
      f'pemn: stopped by {interrupted} at step {done}/{total_steps}; checkpoint written. '
      f'Resume with the same command (pemn train --config ... --workdir {workdir}).',
      warning=True,
    )
  elif jax.process_index() == 0:
    fileio.atomic_write_json(os.path.join(workdir, 'summary.json'), summary)
  return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, model=None) -> dict:
  """Trains the model a config describes, resuming from ``workdir`` if it holds checkpoints.

  Args:
    config: a full config (see ``pemn_jax.configs.common``).
    model: optional Linen module to train instead of the one ``config.model`` describes (e.g.
      one made with ``pemn.mask_model``); called as ``model(x, train=...)``; its logits must
      have the dataset's number of classes. ``config``'s data, train and seed sections apply.
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard events, ``config.json`` (and, when
      resumed, ``config_history.jsonl``; see ``restore_or_start``) and ``summary.json`` are
      written here.

  A non-finite train loss stops the run with a ValueError naming the step; the last good
  checkpoint is kept. The loss is read on the host at the logging steps (every step since the
  last log is checked) and before every evaluation and checkpoint, not at every step (each read
  is a device->host sync); ``checkpointing.save`` refuses a non-finite state besides, so no
  non-finite state is ever saved.

  Returns:
    The summary: best and final test accuracy, steps, wall time, workdir paths; when a signal
    stopped the run, ``finished`` is False and ``stopped_by`` names the signal.
  """
  # Checks (every field, the workdir), then the data's description (process 0 prepares the
  # dataset if needed) and the checks that need it; the model's size is checked before its
  # variables are drawn (build.init_variables). Nothing is written to the workdir before.
  build.validate_config(config)
  validate_train_config(config)
  sources.validate(config.data)
  workdirs.check(workdir)
  if jax.process_index() == 0:
    sources.prepare(config.data)
  info = sources.get_dataset_info(config.data)
  shape = build.check_data(config, info.image_shape, info.num_classes, model)
  config = check_train_data(config, info)
  t = config.train
  steps_per_epoch = pipeline.steps_per_epoch(info, t.batch_size)
  total_steps = total_train_steps(config, info)
  num_epochs = math.ceil(total_steps / steps_per_epoch)
  shardings = steps.mesh_and_shardings()
  s = setup_model(config, shape, shardings.replicated, model)  # checks the model's size first
  with workdirs.exclusive(workdir, is_main=jax.process_index() == 0):  # one run per workdir
    return _train(config, workdir, s, shardings, steps_per_epoch, total_steps, num_epochs)


def _train(config, workdir, s, shardings, steps_per_epoch, total_steps, num_epochs) -> dict:
  """``train_and_evaluate`` once the config is checked and the workdir is this run's."""
  t = config.train
  # State (the workdir's latest checkpoint if any), the jitted steps.
  tx = make_optimizer(config, total_steps)
  mngr = checkpointing.manager(workdir, t.max_checkpoints)
  state = steps.create_train_state(s.variables, tx, shardings.replicated)
  state, meta = restore_or_start(config, workdir, mngr, state, s, shardings.replicated)
  train_step = steps.jit_train_step(s.model, tx, shardings, config.model.native_kernels)
  eval_step = steps.jit_eval_step(s.model, shardings, config.model.native_kernels)
  evaluate = lambda st: evaluate_state(eval_step, config, s, shardings, st.params, st.batch_stats)  # noqa: E731

  # The loop over global steps; ``done`` counts the steps finished.
  start = done = int(jax.device_get(state.step))
  writer = monitoring.MetricWriter(workdir, start)
  progress = monitoring.Progress(total_steps, start, t.progress)
  last_eval = interrupted = batches = None
  running, t0 = [], time.time()
  if start == 0 and t.eval_at_start:  # the initial state, before any update (train.eval_at_start)
    initial = evaluate(state)
    meta['initial_accuracy'] = initial['accuracy']
    writer.write('eval', 0, {**initial, 'epoch': 0})
    progress.note(
      f'step 0/{total_steps} (before training): test accuracy {initial["accuracy"]:.4f} '
      f'loss {initial["loss"]:.4f}'
    )
  try:
    with monitoring.StopSignal() as stop:
      for step in range(start, total_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        if batches is None or pos == 0:
          batches = _train_batches(config, epoch, pos)
        state, metrics = train_step(
          state, s.frozen, steps.to_global(next(batches), shardings.batch)
        )
        done = step + 1
        running.append(metrics)

        logged = None
        if is_time(done, t.log_every_steps, total_steps):
          _check_loss(running, done - len(running) + 1, mngr, t)
          logged = _mean_metrics(running)
          logged['lr'] = float(steps.lr_schedule(t, total_steps)(step))
          logged['steps_per_s'] = (done - start) / max(time.time() - t0, 1e-9)
          writer.write('train', done, logged)
          running = []
        progress.update(logged)

        end_of_epoch = pos + 1 == steps_per_epoch or done == total_steps
        evaluating = end_of_epoch and is_time(epoch + 1, t.eval_every_epochs, num_epochs)
        if evaluating or is_time(done, t.checkpoint_every_steps, total_steps):
          _check_loss([metrics], done, mngr, t)  # before evaluating and saving this state
        if evaluating:
          last_eval = {**evaluate(state), 'epoch': epoch + 1}
          # >=: on ties the later checkpoint is the best, as orbax's BestN keeps the later one
          # (with > the recorded best_step could name a checkpoint BestN has deleted).
          if last_eval['accuracy'] >= meta['best_accuracy']:
            meta.update(best_accuracy=last_eval['accuracy'], best_step=done, best_epoch=epoch + 1)
          writer.write('eval', done, last_eval)
          progress.note(
            f'epoch {epoch + 1}/{num_epochs} step {done}/{total_steps}: test accuracy '
            f'{last_eval["accuracy"]:.4f} loss {last_eval["loss"]:.4f} '
            f'(best {meta["best_accuracy"]:.4f} at epoch {meta["best_epoch"]})'
          )
          _save(mngr, done, state, meta, t, accuracy=last_eval['accuracy'])
        elif is_time(done, t.checkpoint_every_steps, total_steps):
          _save(mngr, done, state, meta, t)

        if done < total_steps and stop.should_stop():  # at the last step: just finish
          interrupted = stop.reason
          if mngr.latest_step() != done:
            _check_loss([metrics], done, mngr, t)
            _save(mngr, done, state, meta, t)
          break
  finally:
    mngr.wait_until_finished()
    progress.close()
    writer.close()

  # A finished workdir run again trains nothing: evaluate so the summary has the final accuracy.
  if done >= total_steps and last_eval is None:
    last_eval = evaluate(state)
  return _finish(workdir, done, total_steps, meta, last_eval, time.time() - t0, s, interrupted)


# ----------------------------------------------------------------------------------------------
# Reading a workdir back.


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was last trained with: the last start's in ``config_history.jsonl``
  if it was resumed, else ``config.json`` (they differ only in what a resume may change)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'--workdir {workdir} holds no config.json: not a pemn training '
      'directory (run pemn train there first)'
    )
  history = os.path.join(workdir, HISTORY_FILE)
  lines = []
  if os.path.exists(history):
    with open(history) as f:
      lines = [ln for ln in f if ln.strip()]
  source = history if lines else path
  try:
    if lines:
      return common.complete(ml_collections.ConfigDict(json.loads(lines[-1])['config']))
    with open(path) as f:
      return common.complete(ml_collections.ConfigDict(json.load(f)))
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f'{source} is not a readable pemn config record: {e}') from e


def restore_workdir(workdir: str, best: bool = False, model=None):
  """``(config, Setup, TrainState, step)`` of a workdir's latest or best checkpoint.

  ``model``: the module the run trained, when it was not the one its config describes.
  """
  config = load_config(workdir)
  replicated = steps.mesh_and_shardings().replicated
  info = sources.get_dataset_info(config.data)
  shape = build.check_data(config, info.image_shape, info.num_classes, model)
  s = setup_model(config, shape, replicated, model)
  mngr = checkpointing.manager(workdir, read_only=True)
  step = checkpointing.best_step(mngr) if best else mngr.latest_step()
  if step is None:
    raise FileNotFoundError(
      f'--workdir {workdir} holds no {"evaluated " if best else ""}checkpoint'
    )
  tx = make_optimizer(config, total_train_steps(config, info))
  template = steps.abstract_train_state(s.variables, tx, replicated)
  state, _ = restore_checkpoint(mngr, step, template, s, workdir)
  return config, s, state, step


def evaluate_workdir(
  workdir: str, best: bool = False, native_kernels: str | None = None, model=None
) -> dict:
  """Evaluates a workdir's latest (or best) checkpoint on the test split.

  ``native_kernels`` overrides the run's ``model.native_kernels`` (how the step runs only);
  ``model`` is the module the run trained, when it was not its config's.

  Returns:
    ``{'accuracy', 'loss', 'num_examples', 'step'}``.
  """
  config, s, state, step = restore_workdir(workdir, best, model)
  shardings = steps.mesh_and_shardings()
  eval_step = steps.jit_eval_step(s.model, shardings, native_kernels or config.model.native_kernels)
  result = evaluate_state(eval_step, config, s, shardings, state.params, state.batch_stats)
  return {**result, 'step': step}


def export_workdir(workdir: str, out_path: str, best: bool = False, bn: str = 'full') -> dict:
  """Writes a workdir's latest (or best) checkpoint as a ``.pemn`` file; see ``artifact.export``
  (``bn``: how BatchNorm is stored, ``artifact.BN_CHOICES``)."""
  config, s, state, step = restore_workdir(workdir, best)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  if s.frozen is not None:
    variables[layers.FROZEN] = s.frozen
  # Only a masked model over a base is a mask delta; a dense run started from a base (the
  # fine-tuning baselines) stores its own weights like any dense model.
  base = build.base_of(config) if config.model.get('masked', True) else None
  return artifact.export(
    config,
    variables,
    out_path,
    step=step,
    # over a base the file records the frozen kernels' fingerprint and the base's (its own)
    fingerprint=None if base is not None else s.fingerprint,
    base=base,
    input_shape=s.input_shape,
    bn=bn,
  )
