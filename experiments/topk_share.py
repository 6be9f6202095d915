"""The share of a masked train step spent computing its masks (the per-layer top-k).

  python -m experiments.topk_share [--config PATH] [--config.FIELD=VALUE ...]
                                   [--batch-size N] [--steps N] [--json]

Two measurements, in one process:

* **step difference**: the library's masked step (``bench_step.build_step``) against the same
  step traced with ``masking.topk_mask`` replaced by a threshold at the layer's mean
  (``x >= mean(x)``: one reduction and one elementwise pass, the same shapes and dtypes, a
  density near one half, and the same straight-through backward), alternated step by step;
  ``share = (step - step_without_topk) / step``.
* **masks alone**: every masked layer's ``masking.score_mask`` of the current scores, jitted as
  one function and timed by itself (the top-k work of one forward pass; with
  ``model.remat_blocks`` the backward recomputes it).

The target on the GPU: under 5 % of the step (a threshold by selection instead of
``lax.top_k``'s sort if not).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

from experiments import bench_step, common


@contextlib.contextmanager
def threshold_masks():
  """``masking.topk_mask`` -> ``(x >= mean(x))`` while a step is traced inside."""
  import jax.numpy as jnp

  from pemn_jax import masking

  orig = masking.topk_mask
  masking.topk_mask = lambda x, keep_fraction: (x >= jnp.mean(x)).astype(x.dtype)
  try:
    yield
  finally:
    masking.topk_mask = orig


def masks_alone(config, state, reps: int) -> dict:
  """Seconds of every masked layer's score_mask of ``state``'s scores, as one jitted call."""
  import jax
  from flax import traverse_util

  from pemn_jax import masking, native

  m = config.model
  flat = traverse_util.flatten_dict(jax.device_get(state.params))
  scores = [v for k, v in flat.items() if k[-1] == 'scores']
  st = config.strategy
  keep, score_abs = st.get('keep_fraction', 0.5), st.get('score_abs', True)
  with native.kernels(m.native_kernels):
    fn = jax.jit(lambda ss: [masking.score_mask(s, keep, score_abs) for s in ss])
    jax.block_until_ready(fn(scores))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(scores))
    ts.append(time.perf_counter() - t0)
  return {
    'layers': len(scores),
    'entries': int(sum(s.size for s in scores)),
    'masks_s': min(ts),
    'masks_median_s': statistics.median(ts),
  }


def measure(config, batch_size: int, steps: int) -> dict:
  import jax

  with_topk = bench_step.build_step(config, batch_size, True, count_flops=False)
  with threshold_masks():
    without = bench_step.build_step(config, batch_size, True, count_flops=False)
  variants = {
    name: dict(step=v[0], state=v[1], frozen=v[2], batch=v[3])
    for name, v in (('with_topk', with_topk), ('threshold', without))
  }
  times = bench_step.run_steps(variants, steps)
  alone = masks_alone(config, variants['with_topk']['state'], max(3, steps))
  ts, tt = statistics.median(times['with_topk']), statistics.median(times['threshold'])
  del jax
  return {
    'model': bench_step.describe(config),
    'batch_size': batch_size,
    'steps': steps,
    'step_s': ts,
    'step_threshold_masks_s': tt,
    'share_by_difference': (ts - tt) / ts,
    **alone,
    'share_masks_alone': alone['masks_s'] / ts,
    'step_times_s': times['with_topk'],
    'step_threshold_times_s': times['threshold'],
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    prog='python -m experiments.topk_share', description=__doc__.split('\n')[0]
  )
  p.add_argument('--config', default=bench_step.DEFAULT_CONFIG)
  p.add_argument('--batch-size', type=int, default=128)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--json', action='store_true')
  args, rest = common.parse_args(p, argv)
  config = common.load_config(args.config, rest)
  r = measure(config, args.batch_size, args.steps)
  m = common.machine()
  r.update(machine=common.machine_line(m), machine_info=m, date=common.utc_now())
  r['command'] = common.command_line('experiments.topk_share', argv)
  if args.json:
    print(json.dumps(r, indent=2))
  else:
    print(
      f'{r["machine"]}\n{r["model"]} batch {r["batch_size"]}: step {r["step_s"]:.4f} s, with '
      f'threshold masks {r["step_threshold_masks_s"]:.4f} s -> top-k share '
      f'{r["share_by_difference"]:.1%} (by difference); the {r["layers"]} masks alone '
      f'{r["masks_s"] * 1e3:.2f} ms = {r["share_masks_alone"]:.1%} of the step'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
