"""Run and report the paper-claim grids: the paper's claims, checked on scaled-down recipes.

Each grid is a list of runs; each run is one ``pemn train`` subprocess with config overrides,
in its own workdir (so an interrupted grid resumes where it stopped: finished runs are skipped,
a half-done run resumes from its checkpoint). After each run, a JSON record goes to
``experiments/results/<grid>/runs/<run>.json`` with the exact command, date, machine, dataset,
best/final accuracy and storage accounting (the model's report, ``summary.summarize``, and its
exported ``.pemn`` file's, ``artifact.inspect``, both computed in this process). ``report``
turns the records into a markdown table and PNG plots.

  python -m experiments.grid run    --grid cifar_convmixer --cifar-npz PATH
  python -m experiments.grid report --grid cifar_convmixer
  python -m experiments.grid list   --grid cifar_convmixer

PATH is the CIFAR-10 npz (``cifar10_jpeg_q75.npz``; docs/data.md says how to build it), needed
by the CIFAR-10 grids only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from experiments import common

ROOT = common.ROOT
RESULTS = common.RESULTS
CONFIGS = common.CONFIGS

STRATEGY_POINTS = [  # (label, overrides) of figure 3, in the paper's order
  ('Dense', {'model.masked': False}),
  ('Mask', {'strategy.name': 'mask'}),
  ('One-layer', {'strategy.name': 'one_layer'}),
  ('MP', {'strategy.name': 'max_layer_padding'}),
  ('RP 1e-1', {'strategy.name': 'random_vector_padding', 'strategy.rp_ratio': 1e-1}),
  ('RP 1e-2', {'strategy.name': 'random_vector_padding', 'strategy.rp_ratio': 1e-2}),
  ('RP 1e-3', {'strategy.name': 'random_vector_padding', 'strategy.rp_ratio': 1e-3}),
  ('RP 1e-4', {'strategy.name': 'random_vector_padding', 'strategy.rp_ratio': 1e-4}),
  ('RP 1e-5', {'strategy.name': 'random_vector_padding', 'strategy.rp_ratio': 1e-5}),
]

# Scaled-down recipe shared by every point of a grid (see the grid's README for the why).
_RECIPE = {  # after each grid's batch size and epochs, so the commands keep their order
  'train.peak_lr': 0.01,
  'train.checkpoint_every_steps': 200,
  'train.log_every_steps': 50,
  'train.progress': False,
}
CIFAR_BASE = {
  'model.dim': 128,
  'model.depth': 4,
  'model.kernel_size': 5,
  'model.patch_size': 4,
  'train.batch_size': 128,
  'train.num_epochs': 4,
  **_RECIPE,
  'data.name': 'cifar10_jpeg',
}
FMNIST_BASE = {
  'model.dim': 64,
  'model.depth': 4,
  'model.kernel_size': 5,
  'model.patch_size': 2,
  'train.batch_size': 128,
  'train.num_epochs': 2,
  **_RECIPE,
  'data.name': 'fashion_mnist',
  'data.augment': False,
}


VIT_POINTS = [p for p in STRATEGY_POINTS if p[0] in ('Dense', 'Mask', 'MP', 'RP 1e-2', 'RP 1e-4')]
RESNET_POINTS = [p for p in STRATEGY_POINTS if p[0] in ('Dense', 'MP', 'RP 1e-1', 'RP 1e-2')] + [
  (
    f'{method.capitalize()} {s:.0%}',
    {'model.masked': False, 'model.sparsity_method': method, 'model.sparsity': s},
  )
  for method in ('random', 'magnitude')
  for s in (0.90, 0.92, 0.94, 0.96)
]
DEPTH_POINTS = [p for p in STRATEGY_POINTS if p[0] in ('Dense', 'Mask')]
# Claim 5, second half (ResNet-56 loses less than ResNet-32): dense and two PEMN points.
RESNET_DEPTH_POINTS = [p for p in STRATEGY_POINTS if p[0] in ('Dense', 'MP', 'RP 1e-2')]
# The accuracy effect of the bfloat16 compute option (model.dtype): the demo, both dtypes.
DTYPE_POINTS = [('float32', {'model.dtype': 'float32'}), ('bfloat16', {'model.dtype': 'bfloat16'})]
KEEP_POINTS = [
  (
    f'k={k:g}',
    {
      'strategy.name': 'random_vector_padding',
      'strategy.rp_ratio': 1e-2,
      'strategy.keep_fraction': k,
    },
  )
  for k in (0.5, 0.3, 0.1, 0.05)
]
# The equal-bytes comparison (accuracy against measured .pemn bytes) on the
# cifar_convmixer recipe: PEMN Mask and RP 1e-2 at three keep fractions, the dense network, the
# magnitude-pruned sparse baseline, and dense networks with learned 1-bit weights.
PARETO_PEMN_POINTS = [
  (
    f'{name} k={k:g}',
    {'strategy.name': strategy, **extra, 'strategy.keep_fraction': k},
  )
  for name, strategy, extra in (
    ('Mask', 'mask', {}),
    ('RP 1e-2', 'random_vector_padding', {'strategy.rp_ratio': 1e-2}),
  )
  for k in (0.5, 0.3, 0.1)
]
PARETO_BASELINE_POINTS = [
  ('Dense', {'model.masked': False}),
  *[
    (
      f'Magnitude {s:.0%}',
      {'model.masked': False, 'model.sparsity_method': 'magnitude', 'model.sparsity': s},
    )
    for s in (0.90, 0.96)
  ],
]
BINARY_POINTS = [('1-bit', {'model.masked': False, 'model.binary_weights': True})]
CIFAR_VIT_BASE = {
  'model.dim': 128,
  'model.depth': 4,
  'model.patch_size': 4,
  'model.mlp_ratio': 2.0,
  'train.batch_size': 128,
  'train.num_epochs': 4,
  **_RECIPE,
  'train.peak_lr': 1e-3,
  'data.name': 'cifar10_jpeg',
}
CIFAR_RESNET_BASE = {
  'model.depth': 20,
  'train.batch_size': 128,
  'train.num_epochs': 2,
  **_RECIPE,
  'data.name': 'cifar10_jpeg',
}


# Masks over pretrained weights (mask fine-tuning, lottery jackpots). Every point of these grids
# that names a base starts from the dense run of its seed of grid cifar_mft_bases (``BASE_RUN``:
# the cifar_convmixer grid's Dense point, ConvMixer-128/4, 4 epochs, the CIFAR_BASE recipe), so
# that grid comes first:
#   python -m experiments.grid run --grid cifar_mft_bases --cifar-npz P
# A value starting with WORKROOT is a path under the grid's --workroot (``resolve``). Every run
# also evaluates its initial state (train.eval_at_start): a mask over the base with
# score_init='magnitude' starts as the one-shot magnitude-pruned base, so a lottery-jackpot
# run's record carries the one-shot pruning baseline (no training at all) as initial_accuracy.
WORKROOT = '@workroot/'
BASE_RUN = WORKROOT + 'cifar_mft_bases/dense_s{seed}'
OVER_BASE = {'model.base_source': BASE_RUN, 'model.base_format': 'workdir'}
MASK_OVER_BASE = {  # only the masks learn: no weight update (BN affine frozen too)
  'strategy.name': 'mask',
  **OVER_BASE,
  'strategy.score_init': 'magnitude',
  'model.base_unmasked': 'freeze',
}
LJ_KEEPS = (0.5, 0.3, 0.1)
LJ_POINTS = [
  point
  for k in LJ_KEEPS
  for point in (
    # lottery jackpot: masks over the trained weights, first mask = magnitude pruning
    (f'LJ k={k:g}', {**MASK_OVER_BASE, 'strategy.keep_fraction': k}),
    # magnitude pruning of the trained weights, then the same epochs of weight fine-tuning
    (
      f'Magnitude FT k={k:g}',
      {
        'model.masked': False,
        'model.sparsity_method': 'magnitude',
        'model.sparsity': round(1 - k, 10),
        **OVER_BASE,
      },
    ),
    # PEMN: masks over random weights, the same keep and epochs
    (f'PEMN k={k:g}', {'strategy.name': 'mask', 'strategy.keep_fraction': k}),
  )
]
MFT_POINTS = [
  # one more epoch of ordinary dense fine-tuning of the base: the same cost as one MFT epoch
  ('Dense FT', {'model.masked': False, **OVER_BASE}),
  *[(f'MFT k={k:g}', {**MASK_OVER_BASE, 'strategy.keep_fraction': k}) for k in (0.9, 0.95, 0.99)],
]
# Mask fine-tuning of a band of blocks (the method's own setting: a few selected layers masked,
# the rest untouched): ConvMixer-128/4's last two blocks (their depthwise and pointwise convs),
# the stem, the first blocks and the head left as the base's, unmasked and frozen.
MFT_BAND = 'block[23]_.*'
MFT_BAND_POINTS = [
  (
    f'MFT band k={k:g}',
    {**MASK_OVER_BASE, 'strategy.masked_layers': MFT_BAND, 'strategy.keep_fraction': k},
  )
  for k in (0.9, 0.95, 0.99)
]
PRETRAINED_BASE = {**CIFAR_BASE, 'train.eval_at_start': True}


def resolve(overrides: dict, workroot: str) -> dict:
  """``overrides`` with every ``WORKROOT``-prefixed value a path under ``workroot``."""
  return {
    k: os.path.join(workroot, v[len(WORKROOT) :])
    if isinstance(v, str) and v.startswith(WORKROOT)
    else v
    for k, v in overrides.items()
  }


def _slug(label):
  return label.lower().replace(' ', '').replace('-', '_').replace('%', '').replace('=', '')


def _grid(base, config, seeds, points=STRATEGY_POINTS):
  runs = []
  for seed in seeds:
    for label, over in points:
      runs.append(
        {
          'name': f'{_slug(label)}_s{seed}',
          'label': label,
          'seed': seed,
          'config': config,
          'overrides': {
            **base,
            **{k: v.format(seed=seed) if isinstance(v, str) else v for k, v in over.items()},
            'seed': seed,
          },
        }
      )
  return runs


GRIDS = {
  'cifar_convmixer': lambda: _grid(CIFAR_BASE, 'convmixer_cifar10.py', (0, 1)),
  'fmnist_convmixer': lambda: _grid(FMNIST_BASE, 'convmixer_cifar10.py', (0, 1)),
  # Claim 3 (deeper models narrow the gap): the CIFAR grid's recipe at depth 8, Dense and Mask.
  'cifar_convmixer_d8': lambda: _grid(
    {**CIFAR_BASE, 'model.depth': 8}, 'convmixer_cifar10.py', (0, 1), DEPTH_POINTS
  ),
  'cifar_vit': lambda: _grid(CIFAR_VIT_BASE, 'vit_cifar10.py', (0, 1), VIT_POINTS),
  'cifar_resnet': lambda: _grid(CIFAR_RESNET_BASE, 'resnet_cifar10.py', (0,), RESNET_POINTS),
  # Claim 5, second half: the ResNet-20 grid's recipe at depths 32 and 56.
  'cifar_resnet32': lambda: _grid(
    {**CIFAR_RESNET_BASE, 'model.depth': 32}, 'resnet_cifar10.py', (0,), RESNET_DEPTH_POINTS
  ),
  'cifar_resnet56': lambda: _grid(
    {**CIFAR_RESNET_BASE, 'model.depth': 56}, 'resnet_cifar10.py', (0,), RESNET_DEPTH_POINTS
  ),
  # Equal bytes: seed 0 of everything first, then the second seed of the PEMN and 1-bit points.
  'cifar_pareto': lambda: (
    _grid(CIFAR_BASE, 'convmixer_cifar10.py', (0,), PARETO_PEMN_POINTS + PARETO_BASELINE_POINTS)
    + _grid(CIFAR_BASE, 'convmixer_cifar10.py', (1,), PARETO_PEMN_POINTS)
    + _grid(CIFAR_BASE, 'convmixer_cifar10.py', (0, 1), BINARY_POINTS)
  ),
  'fmnist_keep': lambda: _grid(FMNIST_BASE, 'convmixer_cifar10.py', (0,), KEEP_POINTS),
  # Keep fraction against accuracy and .pemn file size on a small model: the demo's model and data.
  'embedded_keep': lambda: _grid({'train.progress': False}, 'demo.py', (0,), KEEP_POINTS),
  'embedded_dtype': lambda: _grid({'train.progress': False}, 'demo.py', (0,), DTYPE_POINTS),
  # Masks over pretrained weights. The bases (BASE_RUN): cifar_convmixer's Dense runs
  # again, in workdirs of their own (that grid's are not kept).
  'cifar_mft_bases': lambda: _grid(CIFAR_BASE, 'convmixer_cifar10.py', (0, 1), STRATEGY_POINTS[:1]),
  # Lottery jackpots: 2 epochs of
  # masks over the trained weights at keep 0.5 / 0.3 / 0.1 against magnitude pruning (one-shot:
  # the LJ runs' initial_accuracy; + fine-tuning) and PEMN over random weights.
  'cifar_lj': lambda: _grid(
    {**PRETRAINED_BASE, 'train.num_epochs': 2}, 'convmixer_cifar10.py', (0, 1), LJ_POINTS
  ),
  # Mask fine-tuning: 1 epoch of masks at keep 0.9-0.99 over the whole trained model against one
  # more epoch of dense fine-tuning (the dense start: the base's record); the recipe's lr, and
  # a tenth of it (scores of |w| ~ 0.05 move by ~lr per step: 0.01 may reshuffle the masks).
  'cifar_mft': lambda: _grid(
    {**PRETRAINED_BASE, 'train.num_epochs': 1}, 'convmixer_cifar10.py', (0, 1), MFT_POINTS
  ),
  'cifar_mft_band': lambda: _grid(
    {**PRETRAINED_BASE, 'train.num_epochs': 1}, 'convmixer_cifar10.py', (0, 1), MFT_BAND_POINTS
  ),
  # bfloat16 compute against float32 on the cifar_convmixer recipe's Mask point (keep 0.5),
  # one seed, both dtypes in one grid.
  'cifar_dtype': lambda: _grid(
    CIFAR_BASE,
    'convmixer_cifar10.py',
    (0,),
    [(label, {'strategy.name': 'mask', **over}) for label, over in DTYPE_POINTS],
  ),
  'cifar_mft_lr1e_3': lambda: _grid(
    {**PRETRAINED_BASE, 'train.num_epochs': 1, 'train.peak_lr': 1e-3},
    'convmixer_cifar10.py',
    (0, 1),
    MFT_POINTS,
  ),
}
DATASET_LABELS = {
  'fashion_mnist_embedded': (
    'embedded Fashion-MNIST subset (pemn_jax/data_files: 10,000 train / 2,000 test)'
  ),
  'cifar10_jpeg': 'CIFAR-10 (JPEG-q75 mirror), 50,000 train / 10,000 test',
  'fashion_mnist': (
    'Fashion-MNIST (official files, Debian dataset-fashion-mnist), 60,000 / 10,000'
  ),
}


def command(run, workdir, extra, workroot='workdirs') -> list[str]:
  """The run's ``pemn train`` command (``WORKROOT`` values resolved under ``workroot``)."""
  cmd = [
    os.path.join('.venv', 'bin', 'pemn'),
    'train',
    f'--config={os.path.join("pemn_jax", "configs", run["config"])}',
    f'--workdir={workdir}',
  ]
  for k, v in resolve({**run['overrides'], **extra}, workroot).items():
    cmd.append(f'--config.{k}={v}')
  return cmd


# Grids whose records also export and evaluate the run with BatchNorm folded to float16.
FOLDED_BN_GRIDS = ('cifar_pareto',)
ARTIFACT_FIELDS = (
  'file_bytes',
  'dense_fp32_bytes',
  'mask_bytes',
  'mask_bits_per_entry',
  'other_bytes',
  'ratio_vs_dense_fp32',
  'sparse_kernel_bytes',
  'csr_bytes',
  'binary_kernel_bytes',
  'bn_storage',
)


# A mask delta's accounting against its base (``artifact.inspect`` of a run over a base).
DELTA_FIELDS = ('base_fp32_bytes', 'ratio_vs_base_fp32', 'lora_equal_params_fp32_bytes')


def record(grid, run, cmd, workdir, started) -> dict:
  """The JSON record of one finished run, from its workdir (``ROOT``-relative ``workdir``).

  The model's report is ``summary.summarize`` of the config the command trained (its config
  file with the command's overrides); the artifact is the workdir's best checkpoint exported
  (``train.export_workdir``) to ``<workdir>/model.pemn`` and read back by ``artifact.inspect``,
  all in this process.
  ``wall_seconds`` runs from ``started`` (``time.time()`` before the training) to the end of
  these.
  """
  from pemn_jax import artifact, summary, train

  with open(os.path.join(ROOT, workdir, 'summary.json')) as f:
    run_summary = json.load(f)
  with open(os.path.join(ROOT, workdir, 'config.json')) as f:
    summary_config = json.load(f)
  config = common.load_config(
    os.path.join(CONFIGS, run['config']), [a for a in cmd if a.startswith('--config.')]
  )
  info = summary.summarize(config)
  art_path = os.path.join(ROOT, workdir, 'model.pemn')
  train.export_workdir(os.path.join(ROOT, workdir), art_path, best=True)
  art = artifact.inspect(art_path)
  extra = {}
  if run_summary.get('initial_accuracy') is not None:  # train.eval_at_start
    extra['initial_accuracy'] = run_summary['initial_accuracy']
  base = config.model.get('base_source')
  if base:  # the base run's own summary (the dense start), and the delta's accounting
    with open(os.path.join(ROOT, base, 'summary.json')) as f:
      base_summary = json.load(f)
    extra['base'] = {
      'workdir': base,
      'best_accuracy': base_summary['best_accuracy'],
      'final_accuracy': base_summary['final_accuracy'],
    }
    for k in DELTA_FIELDS:
      if k in art:
        extra['base'][k] = art[k]
  if grid in FOLDED_BN_GRIDS:
    # The same checkpoint with BatchNorm folded to float16, evaluated against the full file.
    folded_path = os.path.join(ROOT, workdir, 'model_bn_fp16.pemn')
    folded = train.export_workdir(os.path.join(ROOT, workdir), folded_path, best=True, bn='fp16')
    check = artifact.evaluate(folded_path, config, reference=art_path)
    extra['artifact_bn_fp16'] = {
      **{k: folded.get(k) for k in ARTIFACT_FIELDS},
      'bn_bytes': folded['bn_bytes'],
      'accuracy': check['accuracy'],
      'full_accuracy': check['reference_accuracy'],
      'agreement': check['agreement'],
      'max_logit_difference': check['max_logit_difference'],
    }
  m = common.machine()
  data_name = summary_config['data']['name']
  return {
    'grid': grid,
    'run': run['name'],
    'label': run['label'],
    'seed': run['seed'],
    'command': shlex.join(cmd),
    'cwd': ROOT,
    'date': common.utc_now(),
    'machine': common.machine_line(m),
    'native_kernels': common.native_line(m),
    'machine_info': m,
    'wall_seconds': time.time() - started,
    'dataset': DATASET_LABELS.get(data_name, data_name),
    'best_accuracy': run_summary['best_accuracy'],
    'best_epoch': run_summary['best_epoch'],
    'final_accuracy': run_summary['final_accuracy'],
    'steps': run_summary['total_steps'],
    'masked_weights': info['masked_weights'],
    'unique_values': info['unique_values'],
    'storage': info['storage'],
    'csr_bits': info.get('csr_bits'),
    'csr16_bits': info.get('csr16_bits'),
    'binary_bits': info.get('binary_bits'),
    'artifact': {k: art.get(k) for k in ARTIFACT_FIELDS},
    **extra,
  }


def do_run(args) -> int:
  runs = GRIDS[args.grid]()
  if args.only:  # in the order given, so a short budget runs the most wanted points first
    by_name = {r['name']: r for r in runs}
    unknown = [n for n in args.only.split(',') if n not in by_name]
    if unknown:
      print(
        f'--only: no run named {", ".join(unknown)} in grid {args.grid} '
        f'(have: {", ".join(by_name)})',
        file=sys.stderr,
      )
      return 2
    runs = [by_name[n] for n in args.only.split(',')]
  extra = {}
  if args.cifar_npz:
    extra['data.source_path'] = os.path.relpath(os.path.abspath(args.cifar_npz), ROOT)
  outdir = os.path.join(args.results, args.grid, 'runs')
  os.makedirs(outdir, exist_ok=True)
  # The training subprocesses get this environment as it is; this process, which only reports
  # (and exports) small models, must not take an accelerator's memory from them (JAX would
  # preallocate most of a GPU's at its first use here).
  train_env = dict(os.environ)
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  for run in runs:
    record_path = os.path.join(outdir, f'{run["name"]}.json')
    if os.path.exists(record_path):
      print(f'[grid] {run["name"]}: done already ({record_path})', flush=True)
      continue
    workdir = os.path.relpath(os.path.join(args.workroot, args.grid, run['name']), ROOT)
    run_extra = dict(extra) if 'cifar10' in run['overrides'].get('data.name', '') else {}
    workroot = os.path.relpath(args.workroot, ROOT)
    cmd = command(run, workdir, run_extra, workroot)
    base = resolve(run['overrides'], workroot).get('model.base_source')
    if base and not os.path.exists(os.path.join(ROOT, base, 'summary.json')):
      print(
        f'[grid] {run["name"]}: its base {base} is no finished run; train it first (its grid '
        f'and run: {os.path.relpath(base, workroot)})',
        flush=True,
      )
      return 2
    print(f'[grid] {run["name"]}: {shlex.join(cmd)}', flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=train_env, check=False)
    if proc.returncode != 0:
      print(f'[grid] {run["name"]}: exit {proc.returncode}; stopping the grid', flush=True)
      return proc.returncode
    rec = record(args.grid, run, cmd, workdir, t0)
    common.write_record(record_path, rec)
    print(
      f'[grid] {run["name"]}: best {rec["best_accuracy"]:.4f} final '
      f'{rec["final_accuracy"]:.4f} ({rec["wall_seconds"]:.0f} s)',
      flush=True,
    )
  return 0


def do_rerecord(args) -> int:
  """Recomputes the derived fields of finished runs' records from their workdirs (after the
  record format grew), keeping what the training run itself recorded: its command, date, wall
  time and machine. The record says when and where it was recomputed (``rerecorded``)."""
  runs = {r['name']: r for r in GRIDS[args.grid]()}
  outdir = os.path.join(args.results, args.grid, 'runs')
  kept = ('command', 'cwd', 'date', 'machine', 'native_kernels', 'machine_info', 'wall_seconds')
  done = 0
  for name in sorted(os.listdir(outdir)) if os.path.isdir(outdir) else []:
    if not name.endswith('.json') or name[: -len('.json')] not in runs:
      continue
    path = os.path.join(outdir, name)
    with open(path) as f:
      old = json.load(f)
    run = runs[old['run']]
    if old.get('rerecorded') and not args.force:
      continue  # recomputed already (--force: again)
    workdir = os.path.relpath(os.path.join(args.workroot, args.grid, run['name']), ROOT)
    if not os.path.exists(os.path.join(ROOT, workdir, 'summary.json')):
      print(f'[grid] {run["name"]}: no finished workdir at {workdir}; record kept as it is')
      continue
    rec = record(args.grid, run, shlex.split(old['command']), workdir, time.time())
    rec.update({k: old[k] for k in kept if k in old})
    rec['rerecorded'] = {'date': common.utc_now(), 'machine': common.machine_line(common.machine())}
    for k in ('best_accuracy', 'final_accuracy', 'steps'):
      if rec[k] != old[k]:
        raise SystemExit(f'{run["name"]}: the workdir has {k} {rec[k]}, the record {old[k]}')
    common.write_record(path, rec)
    done += 1
    print(f'[grid] {run["name"]}: record recomputed', flush=True)
  print(f'[grid] {done} records recomputed')
  return 0


def short_dataset(label: str) -> str:
  """A plot-title name for a dataset label (CIFAR results always carry the mirror's name)."""
  if label.startswith('CIFAR-10'):
    return 'CIFAR-10 (JPEG-q75 mirror)'
  if label.startswith('embedded'):
    return 'Fashion-MNIST subset (embedded)'
  return label.split(' (')[0]


def family(label: str) -> str:
  """'Dense', 'PEMN', or the sparse baseline's method ('Random' / 'Magnitude') of a point."""
  if label.startswith(('Random ', 'Magnitude ')):
    return label.split()[0]
  if label == '1-bit':
    return '1-bit'
  return 'Dense' if label == 'Dense' else 'PEMN'


def storage_bytes(record, convention):
  """Bytes of a run's model under one convention: 'paper' (values + 1-bit masks, CSR for the
  sparse baselines, BN excluded) or 'file' (our .pemn file on disk, everything included)."""
  if convention == 'paper':
    return (record['csr_bits'] if record.get('csr_bits') else record['storage']['paper_bits']) / 8
  return (record.get('artifact') or {}).get('file_bytes')


def load_records(grid, results=RESULTS):
  """Every record of a grid under ``results`` (``experiments/results``), by file name."""
  d = os.path.join(results, grid, 'runs')
  out = []
  for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
    if name.endswith('.json'):
      with open(os.path.join(d, name)) as f:
        out.append(json.load(f))
  return out


SOURCE_PATH_FLAG = '--config.data.source_path='


def shown_command(command: str) -> str:
  """A recorded command as a report shows it: an npz path outside the repository (which a
  clone does not have) becomes ``PATH/<file name>``; the run's JSON record keeps it verbatim."""
  args = shlex.split(command)
  for i, a in enumerate(args):
    if a.startswith(SOURCE_PATH_FLAG) and a[len(SOURCE_PATH_FLAG) :].startswith('../'):
      args[i] = f'{SOURCE_PATH_FLAG}PATH/{os.path.basename(a[len(SOURCE_PATH_FLAG) :])}'
  return shlex.join(args)


def source_path_note(records) -> list[str]:
  """Lines saying where the commands' CIFAR-10 npz lay, if they pass one (else none)."""
  paths = sorted(
    {
      a[len(SOURCE_PATH_FLAG) :]
      for r in records
      for a in shlex.split(r['command'])
      if a.startswith(SOURCE_PATH_FLAG)
    }
  )
  if not paths:
    return []
  if all(p.startswith('../') for p in paths):
    where = (
      'outside the repository, in a folder beside it: the commands show it as `PATH/` (each '
      "run's JSON record under `runs/` keeps the exact command)"
    )
  else:
    where = 'at the path the commands give, from the repository root'
  return [
    f'The commands below pass the CIFAR-10 npz with `{SOURCE_PATH_FLAG}`; when they ran, it lay '
    f'{where}. It is built as [docs/data.md](../../../docs/data.md#cifar-10-jpeg-q75-mirror) '
    'describes; pass its path on your machine.',
    '',
  ]


def do_report(args) -> int:
  import numpy as np

  records = load_records(args.grid, args.results)
  if not records:
    print(f'no records for grid {args.grid}', file=sys.stderr)
    return 1
  order = [
    lbl for pts in (STRATEGY_POINTS, RESNET_POINTS, KEEP_POINTS, DTYPE_POINTS) for lbl, _ in pts
  ]
  labels = list(dict.fromkeys(lbl for lbl in order if any(r['label'] == lbl for r in records)))
  rows, means, spreads = [], [], []
  for lbl in labels:
    rs = [r for r in records if r['label'] == lbl]
    best = np.array([r['best_accuracy'] for r in rs]) * 100
    final = np.array([r['final_accuracy'] for r in rs]) * 100
    st = rs[0]['storage']
    means.append(best.mean())
    spreads.append(best.std() if len(best) > 1 else 0.0)
    art = rs[0].get('artifact') or {}
    paper = (
      st['dense_fp32_bits'] / rs[0]['csr_bits'] if rs[0].get('csr_bits') else st['ratio_paper']
    )
    rows.append(
      f'| {lbl} | {len(rs)} | {best.mean():.2f} ± {spreads[-1]:.2f} | '
      f'{final.mean():.2f} ± {(final.std() if len(final) > 1 else 0):.2f} | '
      f'{rs[0]["unique_values"]:,} | {paper:.2f}x | {st["ratio_entropy"]:.2f}x | '
      f'{art.get("file_bytes", 0):,} |'
    )
  r0 = records[0]
  md = [
    f'# Grid `{args.grid}`',
    '',
    f'Dataset: {r0["dataset"]}. Machine: {r0["machine"]}.',
    '',
    'Accuracy in % (mean ± std over seeds); best = best epoch (as the reference reports), '
    'final = last epoch. Compression vs dense fp32 weights, BN excluded.',
    '',
    'Sparse baselines: the paper-convention column is CSR (32-bit values and indices).',
    '',
    '| strategy | seeds | best acc | final acc | unique random values | paper convention '
    '| ours (key + entropy-coded masks, bound) | .pemn file bytes (seed 0) |',
    '|---|---|---|---|---|---|---|---|',
    *rows,
    '',
  ]
  out = write_readme(args, md, records)
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 3.6))
  x = np.arange(len(labels))
  ax.bar(
    x,
    means,
    yerr=spreads,
    color=['#777777' if lbl == 'Dense' else '#3b75af' for lbl in labels],
    capsize=3,
  )
  ax.set_xticks(x, labels, rotation=30)
  lo = max(0.0, min(means) - 10)
  ax.set_ylim(lo, min(100, max(means) + 5))
  ax.set_ylabel('best test accuracy (%)')
  ax.set_title(f'{short_dataset(r0["dataset"])}: accuracy vs weight strategy')
  for xi, m in zip(x, means):
    ax.text(xi, m + 0.3, f'{m:.1f}', ha='center', fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'accuracy.png'), dpi=120)
  plt.close(fig)
  # Accuracy against storage, two ways (the paper's figures 4-5): the paper's convention (CSR
  # for sparse baselines) and the real .pemn file on disk; sparse baselines as lines by method.
  styles = {
    'PEMN': dict(marker='*', s=90, color='#3b75af'),
    'Dense': dict(marker='o', s=40, color='#777777'),
    'Random': dict(marker='s', s=30, color='#d9822b'),
    'Magnitude': dict(marker='^', s=34, color='#4c9a2a'),
  }
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  panels = (
    (
      "paper's convention: 32-bit unique values + 1-bit masks; CSR for sparse; BN excluded",
      'paper',
    ),
    ('our .pemn file on disk (BN, header and key included)', 'file'),
  )
  for ax, (title, convention) in zip(axes, panels):
    fams = {}
    for lbl, mean in zip(labels, means):
      r = next(r for r in records if r['label'] == lbl)
      if storage_bytes(r, convention):
        fams.setdefault(family(lbl), []).append((storage_bytes(r, convention), mean, lbl))
    for fam, pts in fams.items():
      pts.sort()
      xs, ys = [p[0] for p in pts], [p[1] for p in pts]
      ax.scatter(
        xs, ys, label=fam if fam != 'PEMN' else 'PEMN (masks on random weights)', **styles[fam]
      )
      if fam in ('Random', 'Magnitude'):
        ax.plot(xs, ys, color=styles[fam]['color'], lw=1)
      for x_, y_, lbl in pts:
        ax.annotate(
          lbl.replace('Random ', '').replace('Magnitude ', ''),
          (x_, y_),
          fontsize=7,
          xytext=(3, 3),
          textcoords='offset points',
        )
    ax.set_xscale('log')
    xs_all = [p[0] for pts in fams.values() for p in pts]
    if label_minor_bytes(ax, xs_all):  # less than a decade: zoom to the data too
      ax.set_xlim(min(xs_all) / 1.25, max(xs_all) * 1.25)
    else:
      ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel('storage (bytes, log scale)')
    ax.set_title(title, fontsize=8)
  axes[0].set_ylabel('best test accuracy (%)')
  axes[0].legend(fontsize=7)
  fig.suptitle(f'{short_dataset(r0["dataset"])}: accuracy vs storage')
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'accuracy_vs_storage.png'), dpi=120)
  plt.close(fig)
  print(f'wrote {out}/README.md, accuracy.png and accuracy_vs_storage.png')
  return 0


def pareto_points(records) -> list[dict]:
  """The equal-bytes figure's points, one per label: mean accuracy over seeds and bytes.

  Bytes are those of the seed-0 run's ``.pemn`` file with BatchNorm folded to float16
  (measured), except where no file of that kind exists: the sparse baseline with 16-bit CSR
  values (its measured file with the sparse kernels' bytes replaced by the CSR accounting) and
  dense float16 weights (the dense file with its float32 kernels counted at 16 bits).
  """
  import numpy as np

  points = []
  labels = list(dict.fromkeys(r['label'] for r in records))
  for lbl in labels:
    rs = sorted((r for r in records if r['label'] == lbl), key=lambda r: r['seed'])
    acc = np.array([r['best_accuracy'] for r in rs]) * 100
    folded_acc = np.array([r['artifact_bn_fp16']['accuracy'] for r in rs]) * 100
    a = rs[0]['artifact_bn_fp16']
    base = {
      'label': lbl,
      'seeds': len(rs),
      'accuracy': float(acc.mean()),
      'std': float(acc.std()) if len(rs) > 1 else 0.0,
      'folded_accuracy': float(folded_acc.mean()),
      'agreement': min(r['artifact_bn_fp16']['agreement'] for r in rs),
      'full_bytes': rs[0]['artifact']['file_bytes'],
    }
    if lbl.startswith('Magnitude'):
      fam = 'Magnitude'
      csr16 = rs[0]['csr16_bits'] / 8
      points.append(
        {
          **base,
          'family': fam,
          'bytes': a['file_bytes'],
          'how': 'measured (fp32 values + coded positions)',
        }
      )
      points.append(
        {
          **base,
          'label': lbl + ' CSR16',
          'family': 'Magnitude CSR16',
          'bytes': a['file_bytes'] - a['sparse_kernel_bytes'] + csr16,
          'how': 'accounted (16-bit values, 32-bit CSR indices)',
        }
      )
    elif lbl == 'Dense':
      points.append(
        {**base, 'family': 'Dense', 'bytes': a['file_bytes'], 'how': 'measured (fp32 weights)'}
      )
      points.append(
        {
          **base,
          'label': 'Dense fp16',
          'family': 'Dense',
          'bytes': a['file_bytes'] - a['dense_fp32_bytes'] / 2,
          'how': 'accounted (weights at 16 bits; accuracy of fp32)',
        }
      )
    else:
      fam = '1-bit' if lbl == '1-bit' else lbl.split(' k=')[0]
      points.append({**base, 'family': fam, 'bytes': a['file_bytes'], 'how': 'measured'})
  return points


def do_pareto_report(args) -> int:
  """The equal-bytes report: a table and the accuracy-vs-bytes figure (``pareto_points``)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  records = load_records(args.grid, args.results)
  if not records:
    print(f'no records for grid {args.grid}', file=sys.stderr)
    return 1
  points = pareto_points(records)
  r0 = records[0]
  machines = sorted({r['machine'] for r in records})
  md = [
    f'# Grid `{args.grid}`: accuracy against bytes',
    '',
    f'Dataset: {r0["dataset"]}. Machine: {"; ".join(machines)}.',
    '',
    'The cifar_convmixer recipe (ConvMixer-128/4, kernel 5, patch 4, 4 epochs, batch 128). '
    'Accuracy in % (best epoch, mean ± std over seeds, from training); "fp16-BN acc" is the '
    "same checkpoint's .pemn file with BatchNorm folded to float16 (`pemn export --bn fp16`), "
    'evaluated on the test split, and "agreement" the lowest top-1 agreement over seeds between '
    'that file and the full one. Bytes: the seed-0 file with fp16-folded BN, measured, except '
    'the rows marked accounted.',
    '',
    '| point | family | seeds | best acc | fp16-BN acc | agreement | bytes | how | full-BN file |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for p in points:
    md.append(
      f'| {p["label"]} | {p["family"]} | {p["seeds"]} | {p["accuracy"]:.2f} ± {p["std"]:.2f} | '
      f'{p["folded_accuracy"]:.2f} | {p["agreement"]:.4f} | {p["bytes"]:,.0f} | {p["how"]} | '
      f'{p["full_bytes"]:,} |'
    )
  md += ['', '![accuracy vs bytes](accuracy_vs_bytes.png)', '']
  out = write_readme(args, md, records)
  styles = {
    'Mask': dict(marker='*', color='#3b75af', s=90),
    'RP 1e-2': dict(marker='P', color='#6a3d9a', s=60),
    '1-bit': dict(marker='D', color='#d62728', s=40),
    'Magnitude': dict(marker='^', color='#4c9a2a', s=34),
    'Magnitude CSR16': dict(marker='v', color='#4c9a2a', s=34),
    'Dense': dict(marker='o', color='#777777', s=40),
  }
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for fam in styles:
    pts = sorted((p for p in points if p['family'] == fam), key=lambda p: p['bytes'])
    if not pts:
      continue
    xs, ys = [p['bytes'] for p in pts], [p['accuracy'] for p in pts]
    ax.errorbar(xs, ys, yerr=[p['std'] for p in pts], fmt='none', ecolor=styles[fam]['color'], lw=1)
    ax.scatter(xs, ys, label=fam, **styles[fam])
    if len(pts) > 1 and fam != 'Dense':
      ax.plot(xs, ys, color=styles[fam]['color'], lw=0.8, alpha=0.6)
    for p in pts:
      ax.annotate(
        p['label'].replace(fam, '').strip() or p['label'],
        (p['bytes'], p['accuracy']),
        fontsize=6,
        xytext=(3, 3),
        textcoords='offset points',
      )
  ax.set_xscale('log')
  ax.set_xlabel('bytes (.pemn with fp16-folded BN; sparse CSR16 and dense fp16 accounted)')
  ax.set_ylabel('best test accuracy (%)')
  ax.set_title(f'{short_dataset(r0["dataset"])}: accuracy vs bytes, ConvMixer-128/4', fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'accuracy_vs_bytes.png'), dpi=120)
  plt.close(fig)
  print(f'wrote {out}/README.md and accuracy_vs_bytes.png')
  return 0


# Grids over a trained base: their own report (``do_pretrained_report``).
PRETRAINED_GRIDS = ('cifar_lj', 'cifar_mft', 'cifar_mft_band', 'cifar_mft_lr1e_3')


def point_keep(overrides: dict) -> float:
  """The fraction of weights a point keeps: the mask's, 1 - a sparse baseline's sparsity, or 1."""
  if overrides.get('model.masked', True):
    return float(overrides.get('strategy.keep_fraction', 0.5))
  if overrides.get('model.sparsity_method'):
    return round(1.0 - float(overrides['model.sparsity']), 10)
  return 1.0


def label_minor_bytes(ax, values) -> bool:
  """On a log x axis over ``values`` spanning less than a decade, where no major (power-of-ten)
  tick would be labelled, labels the minor ticks in plain bytes; returns whether it did."""
  import matplotlib

  if not values or max(values) >= 10 * min(values):
    return False
  ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:,.0f}'))
  ax.tick_params(axis='x', which='minor', labelsize=7)
  return True


def write_readme(args, md: list[str], records: list) -> str:
  """Writes ``md`` and the commands section as the grid's README.md; returns its folder."""
  out = os.path.join(args.results, args.grid)
  with open(os.path.join(out, 'README.md'), 'w') as f:
    f.write('\n'.join([*md, *commands_section(args.grid, records)]) + '\n')
  return out


def commands_section(grid: str, records: list) -> list[str]:
  """A report's closing lines: each run's command as executed (with its date and wall time, and
  when its record was recomputed by ``rerecord``), and how to regenerate the report."""
  md = ['## Commands (one per run, exactly as executed; cwd = repository root)', '']
  md += source_path_note(records)
  for r in records:
    line = (
      f'- `{r["run"]}` ({r["date"]}, {r["wall_seconds"]:.0f} s): `{shown_command(r["command"])}`'
    )
    if r.get('rerecorded'):
      line += f' (record recomputed {r["rerecorded"]["date"]})'
    md.append(line)
  report = f'`python -m experiments.grid report --grid {grid}`'
  if any(r.get('rerecorded') for r in records):
    return md + [
      '',
      'The records were (re)computed from the workdirs with '
      f'`python -m experiments.grid rerecord --grid {grid}`; regenerate this file and the '
      f'plot: {report}',
    ]
  return md + ['', f'Regenerate this file and the plot: {report}']


def pretrained_rows(grid: str, records: list) -> list[dict]:
  """One row per point of a grid over a base (in the grid's order), its seeds pooled; plus, for
  each lottery-jackpot point, the one-shot magnitude pruning its runs measured at step 0."""
  import numpy as np

  points = {}
  for run in GRIDS[grid]():
    points.setdefault(run['label'], run['overrides'])

  def stats(values):
    a = np.array(values, float) * 100
    return a.mean(), (a.std() if len(a) > 1 else 0.0)

  rows = []
  for label, over in points.items():
    rs = [r for r in records if r['label'] == label]
    if not rs:
      continue
    r0 = min(rs, key=lambda r: r['seed'])
    base_acc = [r['base']['final_accuracy'] for r in rs if r.get('base')]
    delta = (r0.get('base') or {}).get('ratio_vs_base_fp32')
    row = {
      'label': label,
      'keep': point_keep(over),
      'seeds': len(rs),
      'best': stats([r['best_accuracy'] for r in rs]),
      'final': stats([r['final_accuracy'] for r in rs]),
      'base': stats(base_acc) if base_acc else None,
      'bytes': (r0.get('artifact') or {}).get('file_bytes'),
      'ratio_vs_base': delta,
      'lora_bytes': (r0.get('base') or {}).get('lora_equal_params_fp32_bytes'),
      'family': label.rsplit(' k=', 1)[0],
    }
    rows.append(row)
    initial = [r['initial_accuracy'] for r in rs if r.get('initial_accuracy') is not None]
    if label.startswith('LJ ') and initial:
      rows.append(
        {
          **row,
          'label': label.replace('LJ', 'Magnitude one-shot'),
          'family': 'Magnitude one-shot',
          'best': stats(initial),
          'final': stats(initial),
          'bytes': None,
          'ratio_vs_base': None,
          'lora_bytes': None,
        }
      )
  return rows


def do_pretrained_report(args) -> int:
  """The table and figures of a grid over a trained base: accuracy against the keep fraction
  and against the .pemn bytes, beside the dense start (the base run's own accuracy)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  records = load_records(args.grid, args.results)
  if not records:
    print(f'no records for grid {args.grid}', file=sys.stderr)
    return 1
  rows = pretrained_rows(args.grid, records)
  r0 = records[0]
  machines = sorted({r['machine'] for r in records})
  bases = [r['base']['final_accuracy'] * 100 for r in records if r.get('base')]
  start = sum(bases) / len(bases) if bases else None

  def pm(x):
    return f'{x[0]:.2f} ± {x[1]:.2f}'

  md = [
    f'# Grid `{args.grid}`: masks over a trained model',
    '',
    f'Dataset: {r0["dataset"]}. Machine: {"; ".join(machines)}.',
    '',
    'Every point over a base starts from the dense ConvMixer-128/4 run of its seed (grid '
    '`cifar_mft_bases`, the cifar_convmixer recipe); "dense start" is that run\'s final '
    'accuracy. Accuracy in % (mean ± std over seeds). LJ / MFT: masks over the trained weights '
    '(magnitude-initialised scores, no weight or BN-affine update); "Magnitude one-shot": the '
    'same runs evaluated before their first step (layer-wise magnitude pruning, no training); '
    '"Magnitude FT": magnitude pruning of the trained weights, then weight fine-tuning; "PEMN": '
    'masks over random weights; "Dense FT": the dense start fine-tuned for the same epochs. '
    'Bytes: the seed-0 .pemn file; a mask delta stores no weight (x = the base in fp32 / file; '
    'LoRA = an adapter of as many fp32 trainable parameters as the masks have scores).',
    '',
    (f'Dense start: {start:.2f}% (mean over the bases of these runs).' if start else ''),
    '',
    '| point | keep | seeds | best acc | final acc | final - dense start | .pemn bytes '
    '| base fp32 / file | LoRA-equal bytes |',
    '|---|---|---|---|---|---|---|---|---|',
  ]

  def num(x, spec=','):
    return '' if x is None else format(x, spec)

  for row in rows:
    ref = row['base'][0] if row['base'] else start  # PEMN over random weights: the grid's
    diff = f'{row["final"][0] - ref:+.2f}' if ref is not None else ''
    ratio = num(row['ratio_vs_base'], '.1f') + ('x' if row['ratio_vs_base'] else '')
    md.append(
      f'| {row["label"]} | {row["keep"]:g} | {row["seeds"]} | {pm(row["best"])} | '
      f'{pm(row["final"])} | {diff} | {num(row["bytes"])} | {ratio} | '
      f'{num(row["lora_bytes"])} |'
    )
  md += ['', '![accuracy vs keep](accuracy_vs_keep.png)', '']
  out = write_readme(args, md, records)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  families = list(dict.fromkeys(row['family'] for row in rows))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  sizes = []
  for i, fam in enumerate(families):
    colour = colours[i % len(colours)]
    pts = [(row['keep'], row['final'][0], row['bytes']) for row in rows if row['family'] == fam]
    pts.sort(key=lambda p: p[0])
    axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker='o', color=colour, label=fam)
    sized = [p for p in pts if p[2]]
    sizes += [p[2] for p in sized]
    if sized:
      axes[1].scatter([p[2] for p in sized], [p[1] for p in sized], color=colour, label=fam)
  for ax in axes:
    if start:
      ax.axhline(start, color='#777777', ls='--', lw=1, label='dense start')
  axes[0].set_xlabel('keep fraction')
  axes[0].set_ylabel('final test accuracy (%)')
  axes[1].set_xscale('log')
  label_minor_bytes(axes[1], sizes)
  axes[1].set_xlabel('.pemn file bytes (seed 0, log scale)')
  axes[0].legend(fontsize=7)
  fig.suptitle(f'{short_dataset(r0["dataset"])}: {args.grid}, masks over a trained model')
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'accuracy_vs_keep.png'), dpi=120)
  plt.close(fig)
  print(f'wrote {out}/README.md and accuracy_vs_keep.png')
  return 0


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog='python -m experiments.grid',
    description=__doc__,
    formatter_class=argparse.RawTextHelpFormatter,
  )
  p.add_argument('action', choices=('run', 'report', 'list', 'rerecord'))
  p.add_argument('--grid', choices=sorted(GRIDS), required=True)
  p.add_argument('--only', help='run: comma-separated run names, run in this order')
  p.add_argument(
    '--force', action='store_true', help='rerecord: also the records recomputed already'
  )
  p.add_argument(
    '--cifar-npz',
    metavar='PATH',
    help='the CIFAR-10 npz, cifar10_jpeg_q75.npz (docs/data.md); CIFAR-10 grids only',
  )
  p.add_argument('--workroot', default=os.path.join(ROOT, 'workdirs'), help='run: workdirs go here')
  p.add_argument(
    '--results',
    default=RESULTS,
    help='where the records are (<results>/<grid>/runs) and the report goes '
    '(default experiments/results)',
  )
  args = p.parse_args(argv)
  if args.action == 'list':
    for r in GRIDS[args.grid]():
      workroot = os.path.relpath(args.workroot, ROOT)
      print(r['name'], shlex.join(command(r, '<workdir>', {}, workroot)))
    return 0
  if args.action == 'rerecord':
    return do_rerecord(args)
  if args.action == 'report' and args.grid == 'cifar_pareto':
    return do_pareto_report(args)
  if args.action == 'report' and args.grid in PRETRAINED_GRIDS:
    return do_pretrained_report(args)
  return do_run(args) if args.action == 'run' else do_report(args)


if __name__ == '__main__':
  sys.exit(main())
