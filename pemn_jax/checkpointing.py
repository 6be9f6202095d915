"""orbax-checkpoint plumbing: save, keep the latest few plus the best, restore verified anywhere.

A checkpoint holds the TRAINABLE state only (step, params, batch_stats, optimizer state) and a
JSON ``meta`` item: the frozen-weight fingerprint, the identity of the run it belongs to (the
config fields a resumed run must keep), the run's best test accuracy so far and the state's
digest. The frozen random weights are never stored: they are regenerated from the seed and
strategy, and the fingerprint proves the regeneration matches.

Integrity. orbax's OCDBT format checksums its index, not the value files, so one flipped byte in
a value file would restore silently as other numbers. ``save`` hashes the state on the host
(``state_digest``: sha256 over every leaf's path, shape, dtype and bytes) into the meta, and
``restore`` hashes what it restored and refuses a mismatch in one line naming the step, its
directory and the newest earlier kept checkpoint that verifies (delete the damaged step
directory to resume from that one). The state is replicated, so in a multi-process run every
process hashes its own full copy and all get the same digest. Checkpoints written before the
digest existed restore with a logged warning, unverified. ``save`` also refuses a state holding
a non-finite value (``NonFiniteStateError``): a diverged run never saves its damage.

What a resumed run may change. ``identity`` is the run's config less ``MAY_CHANGE_ON_RESUME``:
seed, model and strategy (which network), the data fields that change the examples and the
train fields that change the updates. ``check_identity`` names every field that differs. What
may change is the stopping point (``train.num_steps`` / ``train.num_epochs``, to extend a run:
the lr schedule is then re-evaluated over the new total for the remaining steps) and how the run
executes (intervals, progress, eval batch, data paths and prefetch, remat, native kernels, the
path a base model is read from: its content is fingerprinted, ``build.base_run_fingerprint``).

Step directories. An empty directory named like a step (left by a crash or a user) is no
checkpoint: it is skipped with a warning and left where it is (``_SkipEmptySteps``).

Preservation: the latest ``train.max_checkpoints`` checkpoints plus the one with the best test
accuracy (an orbax ``AnyPreservationPolicy`` of ``LatestN`` and ``BestN``). orbax writes each
checkpoint into a temporary directory and renames it when complete, so a process killed at any
moment leaves the previous checkpoints intact and no half-written one that reads as valid.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

# Config groups that say which network a checkpoint belongs to ...
MODEL_FIELDS = ('seed', 'model', 'strategy')
# ... and those that say how it was trained (which examples, which updates).
RUN_FIELDS = ('data', 'train')
# Everything a workdir's checkpoints record and a run that resumes them must agree on.
IDENTITY_FIELDS = MODEL_FIELDS + RUN_FIELDS
# Fields under IDENTITY_FIELDS a resumed run may change: the stopping point, and switches that
# choose how the run executes, not which network it trains on which examples with which updates
# (same variables, same values at every step the runs share).
MAY_CHANGE_ON_RESUME = {
  # base_source / base_name_map: where the base is read from (its content is fingerprinted)
  'model': ('remat_blocks', 'gelu_bn_residuals', 'native_kernels', 'base_source', 'base_name_map'),
  'data': ('data_dir', 'source_dir', 'source_path', 'prefetch'),
  'train': (
    'num_steps',
    'num_epochs',
    'log_every_steps',
    'checkpoint_every_steps',
    'max_checkpoints',
    'eval_every_epochs',
    'eval_batch_size',
    'progress',
    'eval_at_start',
  ),
}
STOPPING_POINT = ('train.num_steps', 'train.num_epochs')
# The meta key of the state's sha256 (absent in checkpoints written before it existed).
DIGEST_KEY = 'state_sha256'
# Hashed first: a future change of what the digest covers gets a new tag, not false alarms.
_DIGEST_SCHEME = b'pemn-jax state digest v1\n'


def _accuracy(metrics: dict) -> float:
  """Ranking key of a checkpoint: its test accuracy (-inf for checkpoints saved without eval)."""
  return metrics.get('accuracy', float('-inf'))


# ----------------------------------------------------------------------------------------------
# Step directories.

_warned_empty: set[str] = set()


def _is_empty_dir(path) -> bool:
  return path.is_dir() and next(iter(path.iterdir()), None) is None


class _SkipEmptySteps(ocp.path.step.NameFormat):
  """orbax's standard step names (``checkpoints/<step>``), blind to empty step directories.

  orbax lists an empty ``checkpoints/7/`` as step 7, the latest, and every resume then fails
  reading it. It holds nothing to lose, but it is not ours to delete: it is skipped with one
  warning per process and left in place.
  """

  def __init__(self):
    self._standard = ocp.path.step.standard_name_format()

  def build_name(self, step: int) -> str:
    return self._standard.build_name(step)

  def find_all(self, base_path) -> Iterator[Any]:
    for metadata in self._standard.find_all(base_path):
      if _is_empty_dir(metadata.path):
        if str(metadata.path) not in _warned_empty:
          _warned_empty.add(str(metadata.path))
          logging.warning(
            'pemn: %s is an empty step directory, not a checkpoint: skipped (left in place)',
            metadata.path,
          )
        continue
      yield metadata

  def find_step(self, base_path, step: int) -> Any:
    metadata = self._standard.find_step(base_path, step)
    if _is_empty_dir(metadata.path):
      raise ValueError(f'{metadata.path} is an empty directory, not a checkpoint')
    return metadata


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
    step_name_format=_SkipEmptySteps(),
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options
  )


# ----------------------------------------------------------------------------------------------
# The state's digest.


def _on_host(x) -> np.ndarray:
  """``x`` as a host array; of a multi-process array, this process's full replica."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:  # the train state is replicated; anything else is a bug
      raise ValueError(f'cannot hash a state leaf sharded over processes ({x.sharding})')
    x = x.addressable_data(0)
  return np.asarray(x)


def _digest_and_nonfinite(state: Any) -> tuple[str, str | None]:
  """sha256 of ``state`` and the path of its first leaf holding a non-finite value (or None)."""
  h = hashlib.sha256(_DIGEST_SCHEME)
  nonfinite = None
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    a = np.ascontiguousarray(_on_host(leaf))
    name = jax.tree_util.keystr(path)
    # The header fixes how many bytes follow, so no two trees hash the same byte stream.
    h.update(f'{name} {a.shape} {a.dtype}\n'.encode())
    h.update(a.reshape(-1).view(np.uint8))
    if nonfinite is None and jnp.issubdtype(a.dtype, jnp.inexact) and not np.isfinite(a).all():
      nonfinite = name
  return h.hexdigest(), nonfinite


def state_digest(state: Any) -> str:
  """sha256 (hex) over every leaf's path, shape, dtype and bytes, computed on the host.

  Equal for a state and its restored copy on any device count (the values are replicated).
  """
  return _digest_and_nonfinite(state)[0]


class NonFiniteStateError(ValueError):
  """``save`` refused a state with a NaN or infinite value (``leaf`` names the first one)."""

  def __init__(self, step: int, leaf: str):
    super().__init__(f'not saving checkpoint step {step}: state leaf {leaf} is not finite')
    self.step, self.leaf = step, leaf


# ----------------------------------------------------------------------------------------------
# Save and restore.


def save(
  mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, accuracy: float | None = None
) -> None:
  """Saves (asynchronously) the state and meta; ``accuracy`` makes it a best-candidate.

  The state is first copied to the host and hashed (its digest goes into the saved meta, not
  into ``meta``); a state with a non-finite value is refused before anything is written.

  Raises:
    NonFiniteStateError: a leaf of ``state`` holds a NaN or an infinity.
  """
  digest, nonfinite = _digest_and_nonfinite(state)
  if nonfinite is not None:
    raise NonFiniteStateError(step, nonfinite)
  # Always a dict: with best_fn set, orbax warns on every save that has no metrics.
  metrics = {} if accuracy is None else {'accuracy': float(accuracy)}
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, DIGEST_KEY: digest})
    ),
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


class _Damaged(Exception):
  """A checkpoint that does not restore as it was written; the text says what is wrong."""

  def __init__(self, detail: str, maybe_other_model: bool):
    super().__init__(detail)
    self.maybe_other_model = maybe_other_model


def _read_error(e: Exception) -> _Damaged:
  # orbax/tensorstore messages end with the whole tensorstore spec (kilobytes of JSON): keep the
  # first line up to it, which names the file and what is wrong with it.
  detail = str(e).splitlines()[0] if str(e) else ''
  for tail in (' [tensorstore_spec', ' See full TensorStore details'):
    detail = detail.split(tail)[0]
  if len(detail) > 400:
    detail = detail[:400] + '...'
  return _Damaged(f'{type(e).__name__}: {detail}', maybe_other_model=True)


def _restore_verified(mngr, step: int, abstract_state: Any) -> tuple[Any, dict, bool]:
  """``(state, meta, verified)`` of ``step``; ``verified`` is False for a checkpoint written
  without a digest. Raises ``_Damaged``."""
  try:
    restored = mngr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
  except Exception as e:  # orbax raises many types; the user needs one clear message
    raise _read_error(e) from e
  state, meta = restored['state'], restored['meta']
  expected = meta.get(DIGEST_KEY) if isinstance(meta, dict) else None
  if expected is None:
    return state, meta, False
  if state_digest(state) != expected:
    raise _Damaged(
      'its state does not match the sha256 digest saved with it (a value file changed after '
      'it was written)',
      maybe_other_model=False,
    )
  return state, meta, True


def _unreadable(mngr, step: int, damage: _Damaged, abstract_state: Any = None) -> ValueError:
  """The one clear error for a checkpoint that cannot be restored, with the way out: the newest
  earlier kept checkpoint that restores intact (tried when ``abstract_state`` is given)."""
  step_dir = os.path.join(str(mngr.directory), str(step))
  if abstract_state is None:
    way_out = (
      'Delete that step directory to resume from an earlier checkpoint, or use a new --workdir.'
    )
  else:
    way_out = 'No earlier kept checkpoint restores intact: use a new --workdir.'
    for earlier in sorted((s for s in mngr.all_steps() if s < step), reverse=True):
      try:
        _, _, verified = _restore_verified(mngr, earlier, abstract_state)
      except _Damaged:
        continue
      how = 'verifies' if verified else 'restores (written without a digest, unverified)'
      way_out = (
        f'Checkpoint step {earlier} {how}: delete {step_dir} to resume (or evaluate, export) '
        f'from step {earlier}, or use a new --workdir.'
      )
      break
  cause = ' (or was written for a different model)' if damage.maybe_other_model else ''
  return ValueError(
    f'cannot restore checkpoint step {step} in {mngr.directory}: {damage}. The checkpoint is '
    f'corrupted{cause}; it was left untouched. {way_out}'
  )


def restore_meta(mngr: ocp.CheckpointManager, step: int, abstract_state: Any = None) -> dict:
  """The JSON ``meta`` item of ``step`` (fingerprint, identity, best so far), state unread.

  Raises:
    ValueError: the meta item is unreadable (see ``restore``; ``abstract_state``, when given,
      lets the message name an earlier checkpoint that restores intact).
  """
  try:
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # orbax raises many types; the user needs one clear message
    raise _unreadable(mngr, step, _read_error(e), abstract_state) from e


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
  """Restores ``step`` into ``abstract_state`` (ShapeDtypeStructs carrying shardings), verified.

  The restored state's digest must equal the one saved with it; a checkpoint written before
  digests existed is restored with a logged warning. Check the meta (``restore_meta`` +
  ``check_identity``) first: a checkpoint of a different model then fails with a message naming
  the differing config fields, not a shape mismatch.

  Raises:
    ValueError: the checkpoint is unreadable, altered, or does not fit this model; one line
      naming the step and directory, and the newest earlier checkpoint that restores intact.
      The checkpoints are left untouched.
  """
  try:
    state, meta, verified = _restore_verified(mngr, step, abstract_state)
  except _Damaged as damage:
    raise _unreadable(mngr, step, damage, abstract_state) from damage.__cause__
  if not verified:
    logging.warning(
      'pemn: checkpoint step %d in %s has no state digest (written by an earlier pemn-jax): '
      'restored unverified',
      step,
      mngr.directory,
    )
  return state, meta


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """ShapeDtypeStructs of ``tree`` with ``sharding`` attached (restore onto any device count)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


# ----------------------------------------------------------------------------------------------
# Identity: what a resumed run must keep.


def identity(config) -> dict:
  """The config fields a workdir's checkpoints belong to (JSON-ready): ``IDENTITY_FIELDS`` less
  ``MAY_CHANGE_ON_RESUME``."""
  return _comparable(
    {
      k: (config[k].to_dict() if hasattr(config[k], 'to_dict') else config[k])
      for k in IDENTITY_FIELDS
    }
  )


def _comparable(ident: dict) -> dict:
  out = dict(ident)
  for group, fields in MAY_CHANGE_ON_RESUME.items():
    if isinstance(out.get(group), dict):
      out[group] = {k: v for k, v in out[group].items() if k not in fields}
  return out


def check_identity(saved: dict, current: dict, where: str) -> None:
  """Raises ValueError naming every field that differs between a workdir and this run.

  A field the workdir's record lacks (it was added to pemn-jax later) matches when this run
  leaves it at its default, so adding a config field does not orphan existing workdirs. A whole
  group the record lacks (checkpoints written before the data and train settings were recorded)
  is not compared: its defaults say nothing about what that run used.
  """
  from pemn_jax.configs import common  # configs import nothing from here

  defaults = identity(common.base_config())
  saved, current = _comparable(saved), _comparable(current)
  current = {k: v for k, v in current.items() if k in saved}
  diffs, groups = [], set()

  def walk(a, b, d, prefix):
    for k in sorted(set(a) | set(b)):
      va, vb, dv = a.get(k), b.get(k), (d or {}).get(k)
      if isinstance(va, dict) and isinstance(vb, dict):
        walk(va, vb, dv if isinstance(dv, dict) else {}, f'{prefix}{k}.')
      elif k not in a and k in (d or {}) and _norm(vb) == _norm(dv):
        continue
      elif _norm(va) != _norm(vb):
        diffs.append(f'{prefix}{k}: checkpoint {va!r} vs config {vb!r}')
        groups.add((prefix or k).split('.')[0])

  walk(saved, current, defaults, '')
  if not diffs:
    return
  if groups & set(MODEL_FIELDS):
    raise ValueError(
      f'{where} holds checkpoints of a different model ('
      + '; '.join(diffs)
      + '). Use a new --workdir, or the matching config. '
      'The existing checkpoints were left untouched.'
    )
  may_change = [
    f'{g}.{f}'
    for g, fields in MAY_CHANGE_ON_RESUME.items()
    for f in fields
    if f'{g}.{f}' not in STOPPING_POINT
  ]
  raise ValueError(
    f'{where} holds a run trained with other settings ('
    + '; '.join(diffs)
    + f'). A resumed run may change only its stopping point ({", ".join(STOPPING_POINT)}, to '
    f'extend it) and how it executes ({", ".join(may_change)}). Use a new --workdir, or the '
    "run's settings (its config.json and config_history.jsonl). "
    'The existing checkpoints were left untouched.'
  )


def _norm(v):
  return list(v) if isinstance(v, tuple) else v
