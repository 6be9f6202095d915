"""`pemn inspect` and the shipped configs."""

from __future__ import annotations

import importlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from pemn_jax import build, layers, strategies, summary

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'pemn_jax' / 'configs'
SMOKE = str(CONFIGS / 'smoke.py')
SHIPPED = ('convmixer_cifar10', 'resnet_cifar10', 'vit_cifar10', 'mlp_mnist', 'smoke')
SLOW = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# pemn inspect.


@pytest.mark.slow
def test_inspect_smoke_json(pemn_cli):
  proc = pemn_cli('inspect', '--config', SMOKE, '--json')
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout)  # exactly one JSON object on stdout
  assert isinstance(summary, dict)
  for key in ('masked_weights', 'unique_values', 'storage'):
    assert key in summary
  for key in (
    'dense_fp32_bits',
    'paper_bits',
    'paper_bits_with_bn',
    'key_only_bits',
    'entropy_bits',
  ):
    assert key in summary['storage'], key
  # smoke: ConvMixer-16/2, kernel 3, patch 4, on 28x28x1, 10 classes:
  # stem 4*4*1*16 = 256; per block 3*3*16 + 16*16 = 400; head 16*10 = 160.
  assert summary['masked_weights'] == 256 + 2 * 400 + 160 == 1216
  # RP 1e-2: the largest layer has 256 entries (stem and pointwise tie): floor(2.56) + 1 = 3.
  assert summary['unique_values'] == 3
  assert summary['distinct_values_present'] == 3
  st = summary['storage']
  assert st['dense_fp32_bits'] == 32 * 1216
  assert st['paper_bits'] == 32 * 3 + 1216
  # 5 BatchNorms x 16 channels x (scale, shift), at 32 bits.
  assert st['paper_bits_with_bn'] == st['paper_bits'] + 32 * 5 * 16 * 2
  assert st['key_only_bits'] == 64 + 136 + 1216
  assert st['entropy_bits'] == pytest.approx(st['key_only_bits'])  # k = 0.5, even sizes
  assert [layer['path'] for layer in summary['layers']] == [
    'stem',
    'block0_depthwise',
    'block0_pointwise',
    'block1_depthwise',
    'block1_pointwise',
    'head',
  ]


@pytest.mark.slow
def test_inspect_overrides_take_effect_text_mode(pemn_cli):
  proc = pemn_cli(
    'inspect',
    '--config',
    SMOKE,
    '--config.model.dim=32',
    '--config.strategy.name=max_layer_padding',
    '--config.strategy.keep_fraction=0.1',
  )
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  # dim 32: stem 512; per block 288 + 1024; head 320.
  assert 'masked weights 3,456' in out
  # MP stores the largest layer: the 32x32 pointwise conv.
  assert 'unique random values 1,024' in out
  assert 'max_layer_padding, keep 0.1' in out
  assert 'block1_pointwise' in out and '(1, 1, 32, 32)' in out
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize(
  'override, field',
  [
    ('--config.strategy.name=bogus', 'strategy.name'),
    # One subprocess each: the first case is the fast run's.
    pytest.param('--config.strategy.keep_fraction=1.5', 'strategy.keep_fraction', marks=SLOW),
    pytest.param('--config.strategy.rp_ratio=0', 'strategy.rp_ratio', marks=SLOW),
    pytest.param('--config.model.name=densenet', 'model.name', marks=SLOW),
  ],
)
def test_inspect_bad_config_is_one_line_naming_the_field(pemn_cli, override, field):
  proc = pemn_cli('inspect', '--config', SMOKE, override, '--json')
  assert proc.returncode != 0
  assert proc.stdout == ''
  assert 'Traceback' not in proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stderr
  assert field in lines[0]


def test_inspect_without_config_is_a_usage_error(pemn_cli):
  proc = pemn_cli('inspect')
  assert proc.returncode == 2
  assert '--config' in proc.stderr and 'Traceback' not in proc.stderr


def test_console_script_is_installed():
  script = pathlib.Path(sys.executable).parent / 'pemn'
  assert script.exists(), 'pip install -e . installs the `pemn` console script'


# ---------------------------------------------------------------------------------------------
# Shipped configs and the paper's grid (abstract builds: no arrays, no compile).


def _load(name):
  return importlib.import_module(f'pemn_jax.configs.{name}').get_config()


def _abstract_summary(config):
  """What `pemn inspect` reports, computed from abstract variables (no init compile)."""
  model = build.build_model(config)
  abstract = jax.eval_shape(lambda: build.init_variables(model, config))
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
  return abstract, summary.summarize(config, zeros)


@pytest.mark.parametrize('name', SHIPPED)
def test_every_shipped_config_builds(name):
  config = _load(name)
  abstract, summary = _abstract_summary(config)
  assert (layers.FROZEN in abstract) == config.model.masked
  assert summary['masked_weights'] > 0
  assert summary['storage']['dense_fp32_bits'] == 32 * summary['masked_weights']


@pytest.mark.parametrize('masked', [True, False])
def test_summary_lists_layers_by_depth(masked):
  # 12 blocks: a sorted listing would put block10 before block2, and head before stem.
  config = _load('smoke')
  config.model.depth, config.model.masked = 12, masked
  _, summary = _abstract_summary(config)
  expected = (
    ['stem']
    + [f'block{i}_{kind}' for i in range(12) for kind in ('depthwise', 'pointwise')]
    + ['head']
  )
  assert [layer['path'] for layer in summary['layers']] == expected
  assert summary['masked_weights'] == 256 + 12 * 400 + 160


def test_shipped_defaults():
  c = _load('convmixer_cifar10')
  assert (c.model.name, c.model.dim, c.model.depth, c.model.kernel_size, c.model.patch_size) == (
    'convmixer',
    256,
    8,
    5,
    2,
  )
  assert (c.strategy.name, c.strategy.rp_ratio, c.strategy.keep_fraction) == (
    'random_vector_padding',
    1e-3,
    0.5,
  )
  assert _load('resnet_cifar10').model.name == 'resnet'
  assert _load('vit_cifar10').model.name == 'vit'
  assert _load('mlp_mnist').model.name == 'mlp'
  _, summary = _abstract_summary(c)
  assert summary['masked_weights'] == 581_120
  assert summary['unique_values'] == 66


@pytest.mark.parametrize(
  'name, overrides',
  [
    ('convmixer_cifar10', dict(dim=256, depth=6)),
    ('convmixer_cifar10', dict(dim=512, depth=6)),
    ('convmixer_cifar10', dict(dim=512, depth=8)),
    ('resnet_cifar10', dict(depth=32)),
    ('resnet_cifar10', dict(depth=56)),
    ('vit_cifar10', dict(dim=256, depth=8)),
    ('vit_cifar10', dict(dim=512, depth=6)),
    ('vit_cifar10', dict(dim=512, depth=8)),
  ],
)
def test_paper_grid_reachable_by_overrides(name, overrides):
  config = _load(name)
  for k, v in overrides.items():
    config.model[k] = v
  model = build.build_model(config)
  shape = build.input_shape(config)
  abstract = jax.eval_shape(
    model.init,
    {'params': jax.random.key(0), layers.FROZEN: jax.random.key(1)},
    jax.ShapeDtypeStruct((1, *shape), jnp.float32),
  )
  shapes = [a.shape for a in jax.tree.leaves(abstract[layers.FROZEN])]
  for strategy in strategies.STRATEGIES:
    assert strategies.stored_value_count(shapes, strategy, 1e-2) > 0
  if name == 'convmixer_cifar10' and overrides == dict(dim=512, depth=6):
    # stem 512*3*2*2 + 6 * (512*25 + 512*512) + head 512*10.
    assert sum(a.size for a in jax.tree.leaves(abstract[layers.FROZEN])) == 1_660_928
