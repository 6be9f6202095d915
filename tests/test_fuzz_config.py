"""Bounded property-based fuzzing of the config validators (Hypothesis, derandomized).

Random values for random fields of the smoke config (any type: None, bools, huge and tiny
numbers, NaN, strings, tuples, dicts) must either pass every check the trainer runs before it
writes anything, or fail with a one-line ValueError naming a config field; never another
exception type. The same holds for command-line values (``--config.FIELD=TEXT``) going through
``common.parse_value`` and ``common.with_overrides``.
"""

from __future__ import annotations

import ml_collections
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pemn_jax import build
from pemn_jax.configs import common, smoke
from tests.test_hostile_config import BAD, INFO, config_with, leaf_fields, validate

# Sized to run in a few seconds on a 2-core machine; derandomized: every run tries the same.
FUZZ = dict(
  derandomize=True,
  database=None,
  deadline=None,
  max_examples=400,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FIELDS = sorted(leaf_fields(common.base_config()))


def _get(d: dict, dotted: str):
  for name in dotted.split('.'):
    d = d[name]
  return d


NAMES = [*FIELDS, 'data.augment_options']  # what a message may name
# Strings the validators know, so that examples reach the checks behind the first one.
WORDS = (
  'convmixer vit resnet mlp mask one_layer max_layer_padding random_vector_padding auto none '
  'xla fast native float32 bfloat16 full save_convs random magnitude depthwise topk gelu_bn '
  'fashion_mnist_embedded cifar10_jpeg'
).split()

SCALARS = st.one_of(
  st.none(),
  st.booleans(),
  st.integers(-3, 70),
  st.integers(),
  st.sampled_from([2**31 - 1, 2**31, 2**63 - 1, 2**63, 10**400, -(2**63) - 1]),
  st.floats(0, 1),
  st.floats(allow_nan=True, allow_infinity=True),
  st.sampled_from([1e-45, 1e-40, 3.5e38, 1e39, 1e300]),
  st.text(max_size=6),
  st.sampled_from(WORDS),
)
VALUES = st.one_of(
  SCALARS,
  st.lists(st.integers(-2, 40), max_size=4).map(tuple),
  st.lists(SCALARS, max_size=3),
  st.dictionaries(st.sampled_from(['a', 'flip', 'name']), SCALARS, max_size=2),
)


DEFAULTS = dict(zip(FIELDS, (_get(smoke.get_config().to_dict(), f) for f in FIELDS), strict=True))


def _plausible(field: str):
  """Values near the field's own type and range, so that examples reach the later checks."""
  default = DEFAULTS[field]
  if isinstance(default, bool):
    return st.booleans()
  if isinstance(default, int):
    return st.integers(0, 64)
  if isinstance(default, float):
    return st.floats(0, 1)
  if isinstance(default, str):
    return st.sampled_from(WORDS)
  if isinstance(default, tuple):
    return st.lists(st.integers(1, 64), max_size=3).map(tuple)
  return st.none()


@st.composite
def changes(draw) -> dict:
  """1 to 3 fields, each set to a value of any kind or a plausible one."""
  fields = draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3, unique=True))
  return {f: draw(st.one_of(VALUES, _plausible(f), _plausible(f))) for f in fields}


def _with(changes: dict) -> ml_collections.ConfigDict:
  config = config_with('seed', 0)
  d = config.to_dict()
  for key, value in changes.items():
    *parents, leaf = key.split('.')
    node = d
    for p in parents:
      node = node[p]
    node[leaf] = value
  return ml_collections.ConfigDict(d)


def _check(run) -> None:
  """``run()`` passes, or raises a one-line ValueError naming a field (anything else fails)."""
  try:
    run()
  except ValueError as e:
    text = str(e)
    assert '\n' not in text, text
    assert any(name in text for name in NAMES) or text.startswith('seed '), text
    event('refused')
  else:
    event('valid')  # --hypothesis-show-statistics: how many examples got through every check


def test_fuzz_covers_the_swept_fields():
  assert set(FIELDS) == set(BAD)


@settings(**FUZZ)
@given(changes())
def test_random_values_are_valid_or_a_value_error_naming_a_field(changes):
  config = _with(changes)

  def run():
    validate(config, INFO)
    build.build_model(config)  # the module itself, from what passed (no arrays)

  _check(run)


@settings(**FUZZ)
@given(st.sampled_from(FIELDS), st.one_of(st.text(max_size=12), st.sampled_from(WORDS)))
def test_command_line_values_are_valid_or_a_value_error_naming_a_field(field, raw):
  def run():
    config = common.with_overrides(smoke.get_config(), [f'--config.{field}={raw}'])
    validate(config, INFO)

  _check(run)
