"""``mask_model``: any Linen model becomes a PEMN network, without editing its source.

``mask_model(module, rules, keep_fraction=...)`` returns a module of the same class, fields and
call signature in which every matched ``nn.Dense``, ``nn.DenseGeneral`` (so also the projections
of ``nn.MultiHeadDotProductAttention`` / ``nn.SelfAttention``) and ``nn.Conv`` (strides, padding,
dilation, ``feature_group_count``) computes with ``frozen_kernel * score_mask(scores)``:

- ``frozen/<layer path>/kernel``: fixed random weights, plain Kaiming normal ``N(0, 2 / fan_in)``
  drawn from the ``'frozen'`` rng stream (in PyTorch layout for 2-D and 4-D kernels, as
  ``pemn_jax.layers`` draws them), never in ``params``: no optimizer or gradient sees them;
- ``params/<layer path>/scores``: one learned score per weight, ``U(-1/sqrt(fan_in), +)``,
  trained through the straight-through top-k of ``pemn_jax.masking``;
- everything else (BatchNorm, LayerNorm, unmatched layers, biases of matched layers unless
  ``bias='freeze'``) stays where the original module put it and trains as before.

How: the original ``__call__`` runs under ``nn.map_variables``, which shows the layers the
kernels they expect (``params/.../kernel`` = the masked frozen kernel, differentiable in the
scores) and stores what the masked network keeps; ``nn.intercept_methods`` records, at init,
which layers are called, in which order and of which type. The variable tree has the original
module's paths (no wrapper level), so checkpoints and strategies name layers as the user does.

Weight strategies (``strategy=``, ``rp_ratio=``) are applied at init over the matched kernels in
the order their layers are first CALLED (the depth order of the forward pass), not the order of
dict keys or attributes; ``order=`` gives it explicitly (module paths such as ``'encoder/q'``).

Example::

  model = pemn.mask_model(MyCNN(), keep_fraction=0.5, strategy='random_vector_padding',
                          rp_ratio=1e-2)
  variables = model.init({'params': k1, 'frozen': k2}, x)
  # variables['params']: scores + BN + biases; variables['frozen']: the random kernels
"""

from __future__ import annotations

import dataclasses
import re
import sys
import zlib
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pemn_jax import layers, masking, strategies

FROZEN = layers.FROZEN
SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Conv)
BIAS_CHOICES = ('train', 'freeze')


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What ``mask_model`` was asked for (validated once, shared by every call)."""

  rules: tuple[tuple[str, float | None], ...]
  score_abs: bool
  strategy: str
  rp_ratio: float | None
  order: tuple[str, ...] | None
  bias: str


def _canonical_rules(rules, keep_fraction) -> tuple[tuple[str, float | None], ...]:
  if rules is None:
    rules = [('.*', keep_fraction)]
  elif isinstance(rules, Mapping):
    rules = list(rules.items())
  out = []
  for item in rules:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise ValueError(f'rules must be (pattern, keep_fraction or None) pairs, got {item!r}')
    pattern, keep = item
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'rule pattern {pattern!r} is not a regular expression: {e}') from None
    if keep is not None:
      masking.validate_keep_fraction(keep, f'the keep fraction of rule {pattern!r}')
    out.append((pattern, keep))
  return tuple(out)


def mask_model(
  module: nn.Module,
  rules: Mapping[str, float | None] | Sequence[tuple[str, float | None]] | None = None,
  *,
  keep_fraction: float = 0.5,
  score_abs: bool = True,
  strategy: str = 'mask',
  rp_ratio: float | None = None,
  order: Sequence[str] | None = None,
  bias: str = 'train',
  **nnx_kwargs,
) -> nn.Module:
  """A PEMN version of ``module``: matched layers compute with frozen random kernels x masks.

  Args:
    module: a Linen module written without pemn-jax (unbound).
    rules: ``(pattern, keep)`` pairs (or an ordered dict), tried in order against each layer's
      module path relative to ``module`` (``'/'``-joined, ``re.fullmatch``): ``keep`` is the
      fraction of that layer's weights the mask keeps, ``None`` leaves the layer as it was.
      Default: every supported layer at ``keep_fraction``. Layers no rule matches are left as
      they were; a rule that matches no layer is an error at init.
    keep_fraction: the keep fraction of the default rule.
    score_abs: rank ``|score|`` (the reference code) or the raw score (the paper's equation).
    strategy: ``pemn_jax.strategies.STRATEGIES``: where the frozen values come from.
    rp_ratio: r of ``random_vector_padding``.
    order: module paths of the masked layers by depth, for the strategies; default: the order
      in which they are first called at init.
    bias: biases of masked layers: ``'train'`` (they stay trainable params, like BatchNorm) or
      ``'freeze'`` (kept at their initial value in the ``frozen`` collection).

  Returns:
    A module of ``module``'s class with the same fields and call signature. An NNX model is
    handed to ``pemn_jax.nnx.mask_model`` (with its ``rngs=``), which changes it in place.
  """
  # flax.nnx absent from sys.modules: the argument cannot be an NNX module, and Linen users do not
  # pay for importing it.
  if 'flax.nnx' in sys.modules and isinstance(module, sys.modules['flax.nnx'].Module):
    from pemn_jax import nnx as pnnx

    options = dict(keep_fraction=keep_fraction, score_abs=score_abs, bias=bias)
    return pnnx._from_linen_mask_model(
      module, rules, strategy=strategy, rp_ratio=rp_ratio, order=order, **options, **nnx_kwargs
    )
  if nnx_kwargs:
    raise TypeError(f'mask_model got {sorted(nnx_kwargs)}, options of NNX models only')
  strategies.validate(strategy, rp_ratio)
  if bias not in BIAS_CHOICES:
    raise ValueError(f'bias must be one of {BIAS_CHOICES}, got {bias!r}')
  if not isinstance(module, nn.Module):
    raise ValueError(f'mask_model needs a Linen module, got {type(module).__name__}')
  if module.scope is not None or isinstance(module.parent, nn.Module):
    raise ValueError(
      'mask_model needs a module made outside any other module (e.g. pass '
      'pemn.mask_model(Backbone()) to the parent as a field), not one created inside a '
      'compact method or bound by init/apply'
    )
  plan = _Plan(
    _canonical_rules(rules, keep_fraction),
    bool(score_abs),
    strategy,
    rp_ratio,
    tuple(order) if order is not None else None,
    bias,
  )
  cls = type(module)
  masked_cls = _masked_class(cls, plan)
  fields = {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(module)
    if f.init and f.name not in ('parent', 'name')
  }
  return masked_cls(**fields, name=module.name)


def _masked_class(cls: type, plan: _Plan) -> type:
  original_call = cls.__call__

  def __call__(self, *args, **kwargs):  # noqa: N807
    init = self.is_initializing()
    seen: dict[str, tuple[type, int]] = {}  # path (relative to self) -> (class, fan-in dims)
    keys = {}
    if init:
      keys = {'frozen': self.make_rng(FROZEN), 'params': self.make_rng('params')}
    prefix = len(self.path)

    def record(next_fun, args_, kwargs_, context):
      m = context.module
      if context.method_name == '__call__' and m is not self:
        seen.setdefault('/'.join(m.path[prefix:]), (type(m), _fan_in_dims(m)))
      return next_fun(*args_, **kwargs_)

    mapped = nn.map_variables(
      lambda mdl, *a, **k: original_call(mdl, *a, **k),
      ['params', FROZEN],
      trans_in_fn=lambda vs: _show_masked(vs, plan),
      trans_out_fn=lambda vs: _store(vs, plan, seen, keys) if init else vs,
      init=init,
      mutable=init,
    )
    with nn.intercept_methods(record):
      return mapped(self, *args, **kwargs)

  # ``_pemn_plan``: the rules, read by ``module_artifact`` to recompute the masks on export/load.
  return type(
    cls.__name__,
    (cls,),
    {'__call__': __call__, '__module__': cls.__module__, '_pemn_plan': plan},
  )


def _keep_of(path: str, plan: _Plan) -> tuple[float | None, int | None]:
  """(keep fraction or None, index of the rule that decided) of a layer path."""
  for i, (pattern, keep) in enumerate(plan.rules):
    if re.fullmatch(pattern, path):
      return keep, i
  return None, None


def _fan_in_dims(m: nn.Module) -> int:
  """How many leading kernel dims a supported layer contracts with its input (its fan-in)."""
  if isinstance(m, nn.DenseGeneral):
    if m.batch_dims:
      return -1  # a kernel per batch index: not a layer of one random draw; unsupported
    return len(m.axis) if isinstance(m.axis, Sequence) else 1
  if isinstance(m, nn.Conv):
    ks = m.kernel_size
    return (len(ks) if isinstance(ks, Sequence) else 1) + 1  # spatial dims, in / groups
  return 1


def _draw(key, shape, n_in, kind: str):
  fan_in = int(np.prod(shape[:n_in]))
  if kind == 'frozen':
    std = np.sqrt(2.0 / fan_in)
    tshape = layers.torch_shape(shape)
    w = jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(tshape)
    return layers.to_flax_layout(w * jnp.float32(std))
  bound = 1.0 / np.sqrt(fan_in)
  return jax.random.uniform(key, (int(np.prod(shape)),), jnp.float32, -bound, bound).reshape(shape)


def _layer_key(key, path: str):
  """A key per layer from its path (stable: adding a layer elsewhere changes no other draw)."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _store(vs: dict, plan: _Plan, seen: dict[str, type], keys: dict) -> dict:
  """At init: the original module's variables -> what the masked network stores."""
  params = traverse_util.flatten_dict(vs.get('params', {}))
  frozen = traverse_util.flatten_dict(vs.get(FROZEN, {}))
  owners = {p[:-1] for p in params if p[-1] == 'kernel'}
  masked, used = [], set()
  for path, (cls, n_in) in seen.items():
    tpath = tuple(path.split('/')) if path else ()
    if tpath not in owners:
      continue  # owns no kernel (BatchNorm, a container module): never masked
    keep, rule = _keep_of(path, plan)
    if rule is not None:
      used.add(rule)
    if keep is None:
      continue
    if not issubclass(cls, SUPPORTED) or n_in < 1:
      raise ValueError(
        f'rule {plan.rules[rule][0]!r} matches layer {path!r}, a {cls.__name__}: mask_model '
        'handles nn.Dense, nn.DenseGeneral (without batch_dims) and nn.Conv (exclude it with a '
        'rule giving None)'
      )
    masked.append((tpath, keep))
  unused = [p for i, (p, _) in enumerate(plan.rules) if i not in used]
  if unused:
    layer_paths = ', '.join(p for p in seen if tuple(p.split('/')) in owners) or 'none'
    raise ValueError(f'mask_model rule(s) {unused} match no layer; the layers are: {layer_paths}')
  for tpath, _ in masked:
    kernel = params.pop(tpath + ('kernel',))
    path = '/'.join(tpath)
    n_in = seen[path][1]
    frozen[tpath + ('kernel',)] = _draw(
      _layer_key(keys['frozen'], path), kernel.shape, n_in, 'frozen'
    )
    params[tpath + ('scores',)] = _draw(_layer_key(keys['params'], path), kernel.shape, n_in, 's')
    if plan.bias == 'freeze' and tpath + ('bias',) in params:
      frozen[tpath + ('bias',)] = params.pop(tpath + ('bias',))
  out = dict(vs)
  out['params'] = traverse_util.unflatten_dict(params)
  frozen_tree = traverse_util.unflatten_dict(frozen) if frozen else {}
  order = _strategy_order(plan, [t for t, _ in masked])  # checks an explicit order, always
  if masked and plan.strategy != 'mask':
    frozen_tree = strategies.apply_strategy(frozen_tree, order, plan.strategy, plan.rp_ratio)
  out[FROZEN] = frozen_tree
  if not out[FROZEN]:
    del out[FROZEN]
  return out


def _strategy_order(plan: _Plan, call_order: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
  kernel_paths = [t + ('kernel',) for t in call_order]
  if plan.order is None:
    return kernel_paths
  given = [tuple(p.split('/')) + ('kernel',) for p in plan.order]
  if sorted(given) != sorted(kernel_paths):
    raise ValueError(
      f'order must name every masked layer once: {sorted("/".join(p[:-1]) for p in kernel_paths)}'
      f', got {list(plan.order)}'
    )
  return given


def _show_masked(vs: dict, plan: _Plan) -> dict:
  """At apply: the stored variables -> what the original layers read (masked kernels)."""
  params = traverse_util.flatten_dict(vs.get('params', {}))
  frozen = traverse_util.flatten_dict(vs.get(FROZEN, {}))
  for fpath in [p for p in frozen if p[-1] == 'kernel']:
    tpath = fpath[:-1]
    scores = params.pop(tpath + ('scores',), None)
    if scores is None:  # at init, before the layer's own variables were replaced
      continue
    keep, _ = _keep_of('/'.join(tpath), plan)
    mask = masking.score_mask(scores, keep, plan.score_abs)
    kernel = jax.lax.stop_gradient(frozen[fpath])
    params[tpath + ('kernel',)] = kernel * mask.astype(kernel.dtype)
    if tpath + ('bias',) in frozen:
      params[tpath + ('bias',)] = jax.lax.stop_gradient(frozen[tpath + ('bias',)])
  return {'params': traverse_util.unflatten_dict(params)} if params else {}
