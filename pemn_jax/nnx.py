"""Flax NNX layers: the masked layers of ``pemn_jax.layers`` as NNX modules, and their strategies.

``MaskedLinear`` and ``MaskedConv`` hold

* ``scores``: an ``nnx.Param``, one learned score per weight (``layers.uniform_fan_in``);
* ``kernel``: a ``Frozen`` variable, the fixed random weights (``layers.kaiming_normal_frozen``:
  Kaiming normal drawn in PyTorch layout, transposed into Flax layout).

``Frozen`` is an ``nnx.Variable`` but not an ``nnx.Param``: ``nnx.grad`` and
``nnx.value_and_grad`` (in NNX's default graph mode; see "Tree mode" below) and
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` never see it, and ``nnx.state(model, Frozen)``
selects it. It is registered as the Linen collection ``'frozen'`` (``layers.FROZEN``), so
``nnx.bridge`` maps the Linen layers' ``frozen`` collection to ``Frozen`` and back. The forward
pass is the Linen layers' (``stop_gradient(kernel) * masking.score_mask(scores, ...)``), with the
same values and the same gradients for the same variables.

Drawn values. A layer draws one key from ``rngs.frozen()`` for its kernel, then one from
``rngs.params()`` for its scores, and nothing else (``nnx.Rngs`` without a ``frozen`` stream
falls back to ``default``). The values are exactly ``layers.kaiming_normal_frozen(kf, shape)``
and ``layers.uniform_fan_in(kp, shape)`` of those two keys, the functions the Linen layer applies
to its ``make_rng('frozen')`` and ``make_rng('params')``: for the same per-layer keys, the same
values, bit for bit. The per-layer keys themselves differ: ``nnx.Rngs(frozen=k)`` hands out
``fold_in(k, n)`` for its n-th draw, Linen folds a hash of the module's path and call count into
``k``. So the same top-level seed does NOT give the Linen and the NNX model the same weights;
copy variables across (``nnx.bridge``, or ``nnx.update``) to run one model in both APIs.

Strategies. ``apply_strategy(model, name, rp_ratio, order)`` rewrites the ``Frozen`` kernels of
a model as ``pemn_jax.strategies`` prescribes. The strategies need the layers in depth order,
which for Linen is the collection's order (the order of first call). NNX records no such order:
its state is sorted by attribute name ('block10' before 'block2', 'head' before 'stem'), and
nothing in a module says when it was built or called. So the order is the order of first CALL,
measured by ``call_order(model, x)``: an abstract trace of one call on a copy of the model, in
which each masked layer reports itself to a context-local log (the module graph holds no shared
object, no counter and no stamp, so it stays a tree and two builds of one architecture have the
same graphdef). ``apply_strategy`` requires that order unless it cannot matter (strategy
``'mask'``, or a single masked layer).

An existing model. ``mask_model(model, rules, keep_fraction=..., rngs=...)`` takes an NNX model
written without pemn-jax and replaces, in place, its matched ``nnx.Linear`` / 2-D ``nnx.Conv``
layers by ``MaskedLinear`` / ``MaskedConv`` (same features, strides, padding, groups, bias values),
with the rules of the Linen ``pemn_jax.convert.mask_model``; what the masked layers cannot compute
as the original did (``nnx.LinearGeneral``, ``nnx.Einsum``, dilation, 1-D / 3-D convs, custom
``dot_general`` or precision, ...) is refused with a one-line error naming the layer.

Tree mode. Nothing here references a module or variable from two places, so every function works
under ``nnx.set_graph_mode(False)`` too. There ``nnx.grad`` is ``jax.grad`` of the whole module
pytree: its output does hold a ``Frozen`` entry, of exact zeros (the kernel is behind
``stop_gradient``), which ``nnx.Optimizer(..., wrt=nnx.Param)`` ignores; differentiate the
``nnx.Param`` part of ``nnx.split(model, nnx.Param, ...)`` to leave it out.

NNX recipe (``tests/test_nnx.py`` runs this block verbatim)::

    import jax, jax.numpy as jnp, optax
    from flax import nnx
    from pemn_jax import nnx as pnnx

    class Net(nnx.Module):
      def __init__(self, rngs):
        self.conv = pnnx.MaskedConv(1, 8, 3, keep_fraction=0.5, rngs=rngs)
        self.head = pnnx.MaskedLinear(8, 10, keep_fraction=0.5, rngs=rngs)

      def __call__(self, x):
        return self.head(jax.nn.relu(self.conv(x)).mean((1, 2)))

    x, y = jax.random.normal(jax.random.key(2), (16, 8, 8, 1)), jnp.arange(16) % 10
    model = Net(nnx.Rngs(params=0, frozen=1))        # scores from 'params', kernels from 'frozen'
    order = pnnx.call_order(model, x)                # [('conv', 'kernel'), ('head', 'kernel')]
    pnnx.apply_strategy(model, 'random_vector_padding', rp_ratio=0.1, order=order)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)   # scores only

    @nnx.jit
    def train_step(model, optimizer, x, y):
      def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
      loss, grads = nnx.value_and_grad(loss_fn)(model)   # grads of the nnx.Param only
      optimizer.update(model, grads)
      return loss

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.nnx import graphlib
from flax.nnx.nn.linear import canonicalize_padding
from jax.ad_checkpoint import checkpoint_name

from pemn_jax import layers, masking, ops, strategies

Path = strategies.Path
Dtype = Any


class Frozen(nnx.Variable):
  """The fixed random weights of a masked layer: a variable that is deliberately not a Param.

  Filters: ``nnx.state(model, Frozen)`` selects these kernels; ``nnx.Param`` (what ``nnx.grad``
  differentiates by default and what an ``nnx.Optimizer(..., wrt=nnx.Param)`` updates) does not.
  """


# The bridge maps Linen collections to NNX variable types by name. Overwriting makes `Frozen` the
# type of 'frozen' even where the bridge already auto-created a plain type for that name.
nnx.register_variable_name(layers.FROZEN, Frozen, overwrite=True)

# Set only by `call_order` while it traces a copy of a model: the masked layers append themselves
# when called. It lives in the context, not in the module graph, so the graph stays a tree.
_CALL_LOG: contextvars.ContextVar[list | None] = contextvars.ContextVar('_CALL_LOG', default=None)


def masked_kernel(
  kernel: jax.Array, scores: jax.Array, keep_fraction: float, score_abs: bool = True
) -> jax.Array:
  """The effective weight of a masked layer: frozen kernel x straight-through top-k mask.

  Args:
    kernel: the frozen random weights (no gradient flows into them).
    scores: the learned scores, same shape.
    keep_fraction: static fraction of entries kept, in (0, 1].
    score_abs: rank by ``|score|`` (the reference code) or by the raw score (the paper).

  Returns:
    ``stop_gradient(kernel) * mask``, in the kernel's dtype; the mask's gradient reaches the
    scores unchanged (``masking.score_mask``).
  """
  mask = masking.score_mask(scores, keep_fraction, score_abs)
  return jax.lax.stop_gradient(kernel) * mask.astype(kernel.dtype)


class _MaskedLayer(nnx.Module):
  """What both masked layers share: the two variables and the mask."""

  def _init_variables(self, shape, out_features, keep_fraction, score_abs, use_bias, dtype, rngs):
    self.keep_fraction = masking.validate_keep_fraction(keep_fraction, 'keep_fraction')
    self.score_abs = bool(score_abs)
    self.use_bias = bool(use_bias)
    self.dtype = dtype
    # Frozen first, then scores: with a single 'default' stream both draw from it in this order.
    self.kernel = Frozen(layers.kaiming_normal_frozen(rngs.frozen(), shape))
    self.scores = nnx.Param(layers.uniform_fan_in(rngs.params(), shape))
    if use_bias:
      self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))
    else:
      self.bias = nnx.data(None)

  def mask(self) -> jax.Array:
    """The current 0/1 mask of the scores (``masking.num_kept`` ones), in the kernel's dtype."""
    kernel = self.kernel[...]
    return masking.score_mask(self.scores[...], self.keep_fraction, self.score_abs).astype(
      kernel.dtype
    )

  def effective_kernel(self) -> jax.Array:
    """``stop_gradient(kernel) * mask(scores)``: the weight the layer computes with."""
    log = _CALL_LOG.get()
    if log is not None:
      log.append(self)
    return masked_kernel(self.kernel[...], self.scores[...], self.keep_fraction, self.score_abs)

  def _finish(self, y, dtype):
    if self.bias is not None:
      b = self.bias[...]
      if isinstance(self.bias, Frozen):  # a frozen bias (mask_model's bias='freeze') takes no
        b = jax.lax.stop_gradient(b)  # gradient, as a frozen kernel, in tree mode too
      y = y + b.astype(dtype)
    # The Linen layers' checkpoint name, so the same remat policies apply to NNX models.
    return checkpoint_name(y, layers.CHECKPOINT_NAME)


class MaskedLinear(_MaskedLayer):
  """Dense layer on a frozen random kernel with a learned top-k mask (``layers.MaskedDense``).

  Args:
    in_features: input features (the kernel is ``(in_features, out_features)``).
    out_features: output features.
    keep_fraction: fraction of the weights kept, in (0, 1].
    score_abs: rank by ``|score|`` (default, the reference) or by the raw score (the paper).
    use_bias: add a trainable bias (zeros), as ``layers.MaskedDense(use_bias=True)``.
    dtype: computation dtype (default: the input's); variables are float32.
    rngs: ``nnx.Rngs``; one key is drawn from ``frozen`` (the kernel), then one from ``params``
      (the scores). See the module docstring for what is guaranteed about the values.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    keep_fraction: float = 0.5,
    score_abs: bool = True,
    use_bias: bool = False,
    dtype: Dtype | None = None,
    rngs: nnx.Rngs,
  ):
    self.in_features, self.out_features = int(in_features), int(out_features)
    shape = (self.in_features, self.out_features)
    self._init_variables(shape, out_features, keep_fraction, score_abs, use_bias, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x @ effective_kernel()`` (+ bias) over the last axis of ``x``."""
    kernel = self.effective_kernel()
    dtype = self.dtype or x.dtype
    return self._finish(jnp.dot(x.astype(dtype), kernel.astype(dtype)), dtype)


def _pair(value: int | Sequence[int], field: str) -> tuple[int, int]:
  """``3 -> (3, 3)``; a pair stays a pair; anything else is an error naming ``field``."""
  if isinstance(value, int | np.integer):
    return (int(value), int(value))
  pair = tuple(int(v) for v in value)
  if len(pair) != 2:
    raise ValueError(f'{field} must be an int or a pair (2-D convs only), got {value!r}')
  return pair


class MaskedConv(_MaskedLayer):
  """2-D NHWC conv on a frozen random kernel with a learned top-k mask (``layers.MaskedConv``).

  The convolution is ``pemn_jax.ops.conv``, as in the Linen layer (depthwise, 1x1 and patchify
  convs take its fast exact formulations on the CPU).

  Args:
    in_features: input channels.
    out_features: output channels (the kernel is ``(kh, kw, in / groups, out)``, HWIO).
    kernel_size: ``k`` or ``(kh, kw)``.
    strides: ``s`` or ``(sh, sw)``.
    padding: ``'SAME'``, ``'VALID'`` or ``((lo, hi), (lo, hi))``.
    feature_group_count: groups; must divide both channel counts (``in_features`` for a
      depthwise conv).
    keep_fraction: fraction of the weights kept, in (0, 1].
    score_abs: rank by ``|score|`` (default, the reference) or by the raw score (the paper).
    use_bias: add a trainable bias (zeros).
    dtype: computation dtype (default: the input's); variables are float32.
    conv_impl: ``ops.conv``'s ``impl`` (``'auto'``, ``'xla'``, ``'fast'``, ``'native'``).
    rngs: ``nnx.Rngs``; one key from ``frozen`` (the kernel), then one from ``params``.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = 'SAME',
    feature_group_count: int = 1,
    keep_fraction: float = 0.5,
    score_abs: bool = True,
    use_bias: bool = False,
    dtype: Dtype | None = None,
    conv_impl: str = 'auto',
    rngs: nnx.Rngs,
  ):
    g = int(feature_group_count)
    if g < 1 or in_features % g or out_features % g:
      raise ValueError(
        f'feature_group_count={feature_group_count} must divide in_features ({in_features}) '
        f'and out_features ({out_features})'
      )
    self.in_features, self.out_features = int(in_features), int(out_features)
    self.kernel_size = _pair(kernel_size, 'kernel_size')
    self.strides = _pair(strides, 'strides')
    # Explicit padding as nested tuples: static attributes must be hashable.
    self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
    self.feature_group_count = g
    self.conv_impl = conv_impl
    shape = (*self.kernel_size, self.in_features // g, self.out_features)
    self._init_variables(shape, out_features, keep_fraction, score_abs, use_bias, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """The convolution of ``x`` (NHWC, ``in_features`` channels) with ``effective_kernel()``."""
    if x.shape[-1] != self.in_features:
      raise ValueError(f'expected {self.in_features} input channels, got shape {x.shape}')
    kernel = self.effective_kernel()
    dtype = self.dtype or x.dtype
    y = ops.conv(
      x.astype(dtype),
      kernel.astype(dtype),
      self.strides,
      self.padding,
      self.feature_group_count,
      self.conv_impl,
    )
    return self._finish(y, dtype)


def masked_layers(model: Any) -> list[tuple[Path, _MaskedLayer]]:
  """``(path, layer)`` of every masked layer in ``model``, in NNX's graph order.

  Args:
    model: an NNX module (or any graph of them).

  Returns:
    The layers in the order ``nnx.iter_graph`` visits them (attributes sorted by name: not the
    depth order, see ``call_order``); a path is the layer's NNX path (``()`` for a model that is
    itself one masked layer).
  """
  return [
    (tuple(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, _MaskedLayer)
  ]


def frozen_kernels(model: Any, order: Sequence[Path] | None = None) -> dict:
  """The model's frozen kernels as the nested dict the Linen ``frozen`` collection is.

  Args:
    model: an NNX module.
    order: kernel paths to insert first, in this order (e.g. ``call_order(model, x)``); the
      other kernels follow in graph order.

  Returns:
    ``{...layer path...: {'kernel': array}}`` (for a bare layer, ``{'kernel': array}``), the
    form ``strategies`` and ``strategies.unique_values`` take.
  """
  flat = {(*path, 'kernel'): layer.kernel[...] for path, layer in masked_layers(model)}
  first = [tuple(p) for p in order or () if tuple(p) in flat]
  return traverse_util.unflatten_dict({p: flat[p] for p in [*first, *flat]})


def _is_array(leaf) -> bool:
  return isinstance(leaf, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def call_order(model: Any, *args, **kwargs) -> list[Path]:
  """Kernel paths of the masked layers in the order ``model(*args, **kwargs)`` first calls them.

  The call is traced abstractly (``jax.eval_shape``) on a copy of the model (``nnx.split`` /
  ``nnx.merge``): nothing is computed and ``model`` is left unchanged (BatchNorm statistics,
  rng counts). Array arguments may be ``jax.ShapeDtypeStruct``; others are passed as they are.

  Args:
    model: an NNX module.
    *args: positional inputs of the call.
    **kwargs: keyword inputs of the call.

  Returns:
    One path per masked layer, in order of first call: the depth order the strategies need.

  Raises:
    ValueError: if a masked layer is not called, or is called inside a transform that copies it
      (``nnx.scan``, ``nnx.vmap``, ...), where its call cannot be attributed to a path.
  """
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten((args, kwargs))
  traced_at = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
  order: list[Path] = []

  def trace(state, traced):
    copy = nnx.merge(graphdef, state)
    paths = {id(layer): (*path, 'kernel') for path, layer in masked_layers(copy)}
    filled = list(leaves)
    for i, value in zip(traced_at, traced):
      filled[i] = value
    call_args, call_kwargs = jax.tree.unflatten(treedef, filled)
    log: list = []
    token = _CALL_LOG.set(log)
    try:
      copy(*call_args, **call_kwargs)
    finally:
      _CALL_LOG.reset(token)
    for layer in log:
      path = paths.get(id(layer))
      if path is not None and path not in order:
        order.append(path)
    missing = [p for p in paths.values() if p not in order]
    if missing:
      raise ValueError(
        f'masked layers {missing} were not called directly by the model (never called, or called '
        'inside a transform that copies them); pass the order explicitly'
      )

  jax.eval_shape(trace, state, [leaves[i] for i in traced_at])
  return order


def apply_strategy(
  model: Any, name: str, rp_ratio: float | None = None, order: Sequence[Path] | None = None
) -> None:
  """Rewrites the model's ``Frozen`` kernels, in place, as a weight strategy prescribes.

  Apply it once, to the freshly built model (independent draws per layer), before training.

  Args:
    model: an NNX module holding ``MaskedLinear`` / ``MaskedConv`` layers.
    name: one of ``strategies.STRATEGIES``.
    rp_ratio: r for ``random_vector_padding``.
    order: the kernel paths by depth, every masked layer once: ``call_order(model, x)``. It may
      be left out only where it cannot matter: ``name='mask'`` or a single masked layer.

  Returns:
    None. Each layer's ``kernel`` variable is set to its new value (same shape and dtype); the
    variables stay distinct objects, so the model stays a tree.

  Raises:
    ValueError: on an unknown strategy or RP ratio, a missing ``order`` where it matters, or an
      ``order`` that does not list every masked layer's kernel exactly once.
  """
  strategies.validate(name, rp_ratio)
  by_path = {(*path, 'kernel'): layer for path, layer in masked_layers(model)}
  if order is None:
    if name != 'mask' and len(by_path) > 1:
      raise ValueError(
        f'strategy {name!r} places values by depth: pass order=call_order(model, x) (NNX keeps '
        'no depth order of its own; its state is sorted by attribute name)'
      )
    order = list(by_path)
  order = [tuple(p) for p in order]
  if len(order) != len(by_path) or set(order) != set(by_path):
    raise ValueError(
      f'order must list every masked kernel exactly once: expected {sorted(map(str, by_path))}, '
      f'got {[str(p) for p in order]}'
    )
  frozen = frozen_kernels(model, order)
  new = strategies.apply_strategy(frozen, order, name, rp_ratio)
  for path in order:
    by_path[path].kernel.set_value(strategies.get_path(new, path))


# -- mask_model: an existing NNX model becomes a PEMN network --------------------------------------

SUPPORTED = (nnx.Linear, nnx.Conv)
# The defaults of the options a masked layer has no counterpart for: a layer that changed one of
# them computes something the masked layer would not, so it is refused rather than approximated.
_LINEAR_DEFAULTS = nnx.Linear.__init__.__kwdefaults__
_CONV_DEFAULTS = nnx.Conv.__init__.__kwdefaults__
_SHARED_OPTIONS = ('precision', 'preferred_element_type', 'promote_dtype')


def _all_ones(value) -> bool:
  """``None``, ``1`` or a sequence of ones: no dilation."""
  if value is None:
    return True
  if isinstance(value, int | np.integer):
    return int(value) == 1
  return all(int(v) == 1 for v in value)


def _conv_padding(padding) -> Any:
  """An ``nnx.Conv`` padding as ``MaskedConv`` takes it, or None where it cannot express it."""
  if isinstance(padding, str):
    return padding.upper() if padding.upper() in ('SAME', 'VALID') else None
  try:
    pads = canonicalize_padding(padding, 2)
  except (TypeError, ValueError):
    return None
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def _unsupported(layer: nnx.Module) -> str | None:
  """Why ``layer`` cannot become a masked layer computing what it computed; None if it can."""
  if not isinstance(layer, SUPPORTED):
    return (
      'mask_model handles nnx.Linear and 2-D nnx.Conv (not nnx.LinearGeneral, nnx.Einsum, '
      'nnx.ConvTranspose, ...)'
    )
  base = nnx.Linear if isinstance(layer, nnx.Linear) else nnx.Conv
  if type(layer).__call__ is not base.__call__:
    return f'its class overrides {base.__name__}.__call__, which the masked layer would not run'
  defaults = _LINEAR_DEFAULTS if base is nnx.Linear else _CONV_DEFAULTS
  custom = 'dot_general' if base is nnx.Linear else 'conv_general_dilated'
  for option in (*_SHARED_OPTIONS, custom):
    if getattr(layer, option) is not defaults[option]:
      return (
        f'it sets {option}={getattr(layer, option)!r}, which the masked layer has no option for'
      )
  shape = layer.kernel[...].shape
  if base is nnx.Linear:
    expected = (layer.in_features, layer.out_features)
    return None if shape == expected else f'its kernel is {shape}, its features say {expected}'
  if len(layer.kernel_size) != 2:
    return f'it is a {len(layer.kernel_size)}-D conv; MaskedConv is 2-D (NHWC)'
  for option in ('kernel_dilation', 'input_dilation'):
    if not _all_ones(getattr(layer, option)):
      return f'it sets {option}={getattr(layer, option)!r}; MaskedConv has no dilation'
  if layer.mask is not None:
    return 'it has a fixed kernel mask (mask=...), which the masked layer would drop'
  if _conv_padding(layer.padding) is None:
    return (
      f"its padding {layer.padding!r} is not 'SAME', 'VALID' or explicit pads, all MaskedConv takes"
    )
  strides = 1 if layer.strides is None else layer.strides
  if not isinstance(strides, int | np.integer) and len(tuple(strides)) != 2:
    return f'its strides {layer.strides!r} are not an int or a pair'
  g = layer.feature_group_count
  expected = (*layer.kernel_size, layer.in_features // g, layer.out_features)
  if layer.in_features % g or layer.out_features % g or shape != expected:
    return f'its kernel is {shape}, its features and groups say {expected}'
  return None


def _masked_twin(layer, keep, score_abs: bool, bias: str, rngs) -> _MaskedLayer:
  """The masked layer standing in for ``layer``: its features, options and bias."""
  use_bias = layer.bias is not None
  common = dict(
    keep_fraction=keep, score_abs=score_abs, use_bias=use_bias, dtype=layer.dtype, rngs=rngs
  )
  if isinstance(layer, nnx.Linear):
    twin = MaskedLinear(layer.in_features, layer.out_features, **common)
  else:
    twin = MaskedConv(
      layer.in_features,
      layer.out_features,
      tuple(layer.kernel_size),
      strides=1 if layer.strides is None else layer.strides,
      padding=_conv_padding(layer.padding),
      feature_group_count=layer.feature_group_count,
      **common,
    )
  if use_bias:
    variable_type = nnx.Param if bias == 'train' else Frozen
    twin.bias = variable_type(jnp.asarray(layer.bias[...]))
  return twin


def _kernel_owners(model: nnx.Module) -> list[tuple[Path, nnx.Module]]:
  """``(path, module)`` of every module below ``model`` holding a ``kernel`` variable.

  The candidates rules are matched against, as the Linen ``mask_model`` matches the layers that
  own a kernel; masked layers are no candidates (their kernel is already frozen).
  """
  return [
    (tuple(path), node)
    for path, node in nnx.iter_graph(model, graph=True)
    if path
    and isinstance(node, nnx.Module)
    and not isinstance(node, _MaskedLayer)
    and isinstance(vars(node).get('kernel'), nnx.Variable)
  ]


def _references(model: nnx.Module, targets: dict[int, str]) -> list[tuple[Any, Any, Any, Any]]:
  """Every ``(container, node impl, key, layer)`` holding one of ``targets`` (ids), shared or not.

  ``nnx.iter_graph`` visits a node once, under its first path; the containers are all visited,
  so looking into each finds every reference to a layer, and replacing them all keeps a shared
  layer shared.
  """
  refs = []
  for path, node in nnx.iter_graph(model, graph=True):
    impl = graphlib.get_node_impl(node)
    if impl is None:  # a leaf or a Variable: holds no module
      continue
    for key, child in impl.node_dict(node).items():
      if id(child) not in targets:
        continue
      if impl.set_key is None:
        where = '/'.join(map(str, path)) or 'the model'
        raise ValueError(
          f'layer {targets[id(child)]!r} is held in a {type(node).__name__} ({where}), which '
          'cannot be changed in place; hold it in a module attribute, an nnx.List or an nnx.Dict'
        )
      refs.append((node, impl, key, child))
  return refs


def _linen_mask_model():
  """``pemn_jax.convert``, the Linen ``mask_model``'s module, whose rules ``mask_model`` shares
  (imported on first use: it imports this module back to dispatch NNX models here)."""
  from pemn_jax import convert

  return convert


def mask_model(
  model: nnx.Module,
  rules: Any = None,
  *,
  keep_fraction: float = 0.5,
  score_abs: bool = True,
  rngs: nnx.Rngs,
  bias: str = 'train',
) -> nnx.Module:
  """Turns an NNX model written without pemn-jax into a PEMN network, IN PLACE, and returns it.

  Every matched ``nnx.Linear`` and 2-D ``nnx.Conv`` is replaced, at every place the model holds
  it (as ``nnx.LoRA`` users rewire a model: the module's attribute, list entry or dict entry is
  set to the new layer), by a ``MaskedLinear`` / ``MaskedConv`` with the same features, use of a
  bias, dtype and, for a conv, kernel size, strides, padding and ``feature_group_count``. The
  original kernel is dropped: the new layer's frozen kernel and scores are drawn from ``rngs``
  as the masked layers draw them (one key from ``frozen``, then one from ``params``, layer after
  layer in the order ``nnx.iter_graph`` visits them, attribute names sorted). The original bias
  is copied: a trainable ``nnx.Param`` with ``bias='train'``, a ``Frozen`` variable (no gradient,
  no optimizer) with ``bias='freeze'``. Everything else (BatchNorm, LayerNorm, unmatched layers)
  stays as it was. Nothing changes unless every check passes.

  Weight strategies are then applied to the masked kernels in the order of first call::

    pnnx.apply_strategy(model, name, rp_ratio, order=pnnx.call_order(model, x))

  With ``dtype=None`` a masked layer computes in its input's dtype, where ``nnx.Linear`` /
  ``nnx.Conv`` promote the input with their parameters: the same for float32 inputs. A masked
  conv takes batched NHWC inputs only. The variables of a masked layer are float32.

  Args:
    model: the NNX model (not itself a single layer: the layers are replaced in their parents).
    rules: ``(pattern, keep)`` pairs (or an ordered dict), tried in order against each layer's
      path in the model (``'/'``-joined, list indices as numbers, ``re.fullmatch``): ``keep`` is
      the fraction of that layer's weights the mask keeps, ``None`` leaves the layer as it was.
      Default: every layer at ``keep_fraction``. Layers no rule matches are left as they were.
      A layer is a module holding a ``kernel`` variable; one reachable by several paths is
      matched by the first one ``nnx.iter_graph`` gives it and replaced at all of them.
    keep_fraction: the keep fraction of the default rule.
    score_abs: rank ``|score|`` (the reference code) or the raw score (the paper's equation).
    rngs: ``nnx.Rngs`` with ``frozen`` and ``params`` streams (or a ``default`` one).
    bias: biases of masked layers: ``'train'`` or ``'freeze'``.

  Returns:
    ``model`` itself, modified.

  Raises:
    ValueError: a bad rule or keep fraction, a rule matching no layer, a matched layer that is
      not an ``nnx.Linear`` / ``nnx.Conv`` or whose options the masked layer cannot express
      (dilation, 1-D / 3-D kernels, a custom dot_general or precision, a fixed mask, circular
      padding...), or a layer held where it cannot be replaced (a tuple). Each names the layer.
  """
  linen = _linen_mask_model()
  if bias not in linen.BIAS_CHOICES:
    raise ValueError(f'bias must be one of {linen.BIAS_CHOICES}, got {bias!r}')
  if not isinstance(model, nnx.Module):
    raise ValueError(f'mask_model needs an NNX module, got {type(model).__name__}')
  if rngs is None:
    raise ValueError('mask_model needs rngs=nnx.Rngs(params=..., frozen=...) for the new layers')
  if isinstance(model, SUPPORTED):
    raise ValueError(
      f'mask_model replaces layers inside a model; for a single {type(model).__name__} use '
      'MaskedLinear / MaskedConv directly'
    )
  rules = linen._canonical_rules(rules, keep_fraction)
  owners = _kernel_owners(model)
  matched, used = [], set()
  for path, layer in owners:
    name = '/'.join(map(str, path))
    hit = next((i for i, (p, _) in enumerate(rules) if re.fullmatch(p, name)), None)
    if hit is None:
      continue
    used.add(hit)
    keep = rules[hit][1]
    if keep is None:
      continue
    reason = _unsupported(layer)
    if reason is not None:
      raise ValueError(
        f'rule {rules[hit][0]!r} matches layer {name!r}, a {type(layer).__name__}: {reason} '
        '(exclude it with a rule giving None)'
      )
    matched.append((name, layer, keep))
  unused = [p for i, (p, _) in enumerate(rules) if i not in used]
  if unused:
    names = ', '.join('/'.join(map(str, p)) for p, _ in owners) or 'none'
    raise ValueError(f'mask_model rule(s) {unused} match no layer; the layers are: {names}')
  refs = _references(model, {id(layer): name for name, layer, _ in matched})
  # Every check has passed: build all the new layers, then rewire, so an error leaves the model.
  twins = {
    id(layer): _masked_twin(layer, keep, score_abs, bias, rngs) for _, layer, keep in matched
  }
  for container, impl, key, layer in refs:
    impl.set_key(container, key, twins[id(layer)])
  return model


def _from_linen_mask_model(model, rules, *, strategy, rp_ratio, order, **kwargs) -> nnx.Module:
  """``pemn_jax.convert.mask_model`` given an NNX model: the Linen-only options refused."""
  if strategy != 'mask' or rp_ratio is not None or order is not None:
    raise ValueError(
      'for an NNX model, apply strategies after mask_model: pemn_jax.nnx.apply_strategy(model, '
      'name, rp_ratio, order=pemn_jax.nnx.call_order(model, x))'
    )
  if kwargs.get('rngs') is None:
    raise ValueError(
      'mask_model of an NNX model needs rngs=nnx.Rngs(params=..., frozen=...) for its new layers'
    )
  return mask_model(model, rules, **kwargs)
