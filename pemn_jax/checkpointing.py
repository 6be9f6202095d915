"""orbax-checkpoint plumbing: save, keep the latest few plus the best, restore onto any mesh.

A checkpoint holds the TRAINABLE state only (step, params, batch_stats, optimizer state) and a
JSON ``meta`` item: the frozen-weight fingerprint, the model/strategy/seed config it belongs
to, and the run's best test accuracy so far. The frozen random weights are never stored: they
are regenerated from the seed and strategy, and the fingerprint proves the regeneration matches.

Preservation: the latest ``train.max_checkpoints`` checkpoints plus the one with the best test
accuracy (an orbax ``AnyPreservationPolicy`` of ``LatestN`` and ``BestN``). orbax writes each
checkpoint into a temporary directory and renames it when complete, so a process killed at any
moment leaves the previous checkpoints intact and no half-written one that reads as valid.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

# Config fields that must agree between a workdir's checkpoints and a run that resumes them.
IDENTITY_FIELDS = ('seed', 'model', 'strategy')
# Fields under IDENTITY_FIELDS that choose how the step runs, not which network it trains
# (same variables, same values): a run may resume with them changed, e.g. to save memory.
EXECUTION_ONLY = {'model': ('remat_blocks', 'native_kernels')}


def _accuracy(metrics: dict) -> float:
  """Ranking key of a checkpoint: its test accuracy (-inf for checkpoints saved without eval)."""
  return metrics.get('accuracy', float('-inf'))


def manager(workdir: str, max_to_keep: int = 2, read_only: bool = False) -> ocp.CheckpointManager:
  """The run's CheckpointManager over ``workdir/checkpoints``."""
  policy = pp.AnyPreservationPolicy(
    [
      pp.LatestN(n=max_to_keep),
      pp.BestN(get_metric_fn=_accuracy, n=1, keep_checkpoints_without_metrics=False),
    ]
  )
  # Readers (evaluate, export) open the manager without create and without tmp clean-up, so
  # they never touch the directory; orbax's own read_only mode only adds warnings.
  # ``best_fn`` makes orbax write each step's metrics to disk (it does so only when best_fn is
  # set) and read them back when a manager is reopened: without it a resumed run sees the
  # earlier evaluated checkpoints as metric-less, and BestN deletes the best one.
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    best_fn=_accuracy,
    best_mode='max',
    create=not read_only,
    enable_async_checkpointing=True,
    cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options
  )


def save(
  mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, accuracy: float | None = None
) -> None:
  """Saves (asynchronously) the state and meta; ``accuracy`` makes it a best-candidate."""
  # Always a dict: with best_fn set, orbax warns on every save that has no metrics.
  metrics = {} if accuracy is None else {'accuracy': float(accuracy)}
  mngr.save(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    metrics=metrics,
    force=True,
  )


def best_step(mngr: ocp.CheckpointManager) -> int | None:
  """The kept step with the highest test accuracy, as recorded in the latest checkpoint's meta."""
  latest = mngr.latest_step()
  if latest is None:
    return None
  step = restore_meta(mngr, latest).get('best_step')
  return step if step in mngr.all_steps() else None


def _unreadable(mngr: ocp.CheckpointManager, step: int, e: Exception) -> ValueError:
  """The one clear error for a checkpoint that cannot be read."""
  # orbax/tensorstore messages end with the whole tensorstore spec (kilobytes of JSON): keep the
  # first line up to it, which names the file and what is wrong with it.
  detail = str(e).splitlines()[0] if str(e) else ''
  for tail in (' [tensorstore_spec', ' See full TensorStore details'):
    detail = detail.split(tail)[0]
  if len(detail) > 400:
    detail = detail[:400] + '...'
  return ValueError(
    f'cannot restore checkpoint step {step} in {mngr.directory}: {type(e).__name__}: '
    f'{detail}. The checkpoint is corrupted (or was written for a different model); it was '
    'left untouched. Delete that step directory to resume from an earlier checkpoint, or use '
    'a new --workdir.'
  )


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON ``meta`` item of ``step`` (fingerprint, identity, best so far), state unread.

  Raises:
    ValueError: the meta item is unreadable (see ``restore``).
  """
  try:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # orbax raises many types; the user needs one clear message
    raise _unreadable(mngr, step, e) from e


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores ``step`` into ``abstract_state`` (ShapeDtypeStructs carrying shardings).

  Check the meta (``restore_meta`` + ``check_identity``) first: a checkpoint of a different
  model then fails with a message naming the differing config fields, not a shape mismatch.

  Raises:
    ValueError: the checkpoint is unreadable or does not fit this model; the message says which
      step and directory, and the checkpoints are left untouched.
  """
  try:
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
  except Exception as e:  # orbax raises many types; the user needs one clear message
    raise _unreadable(mngr, step, e) from e
  return restored['state'], restored['meta']


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of ``tree`` with ``sharding`` attached (restore onto any device count)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def identity(config) -> dict:
  """The config fields that define which network a checkpoint belongs to (JSON-ready)."""
  return _without_execution_fields(
    {
      k: (config[k].to_dict() if hasattr(config[k], 'to_dict') else config[k])
      for k in IDENTITY_FIELDS
    }
  )


def _without_execution_fields(ident: dict) -> dict:
  out = dict(ident)
  for group, fields in EXECUTION_ONLY.items():
    if isinstance(out.get(group), dict):
      out[group] = {k: v for k, v in out[group].items() if k not in fields}
  return out


def check_identity(saved: dict, current: dict, where: str) -> None:
  """Raises ValueError naming every field that differs between a workdir and this run.

  A field the workdir's record lacks (it was added to pemn-jax later) matches when this run
  leaves it at its default, so adding a config field does not orphan existing workdirs.
  """
  from pemn_jax.configs import common  # configs import nothing from here

  defaults = identity(common.base_config())
  saved, current = _without_execution_fields(saved), _without_execution_fields(current)
  diffs = []

  def walk(a, b, d, prefix):
    for k in sorted(set(a) | set(b)):
      va, vb, dv = a.get(k), b.get(k), (d or {}).get(k)
      if isinstance(va, dict) and isinstance(vb, dict):
        walk(va, vb, dv if isinstance(dv, dict) else {}, f'{prefix}{k}.')
      elif k not in a and k in (d or {}) and _norm(vb) == _norm(dv):
        continue
      elif _norm(va) != _norm(vb):
        diffs.append(f'{prefix}{k}: checkpoint {va!r} vs config {vb!r}')

  walk(saved, current, defaults, '')
  if diffs:
    raise ValueError(
      f'{where} holds checkpoints of a different model ('
      + '; '.join(diffs)
      + '). Use a new --workdir, or the matching config. '
      'The existing checkpoints were left untouched.'
    )


def _norm(v):
  return list(v) if isinstance(v, tuple) else v
