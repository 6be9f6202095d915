"""Storage accounting: what a PEMN model costs to store, under the paper's rules and ours.

All sizes are in bits. For a model whose masked layers have ``d_l`` weights each:

* ``dense_fp32_bits``: every weight as a float32 (the dense network).
* ``paper_bits``: the paper's convention, C = C_w + C_m: the random values that cannot be
  derived from others (``strategies.stored_value_count``) at 32 bits, plus one bit per mask
  entry. Under this rule the plain Mask strategy costs MORE than the dense network (33 vs 32
  bits a weight), and the ceiling is 32x.
* ``key_only_bits`` (ours): the PRNG key and the strategy replace every stored value, because the
  values are regenerated bit-exactly; masks at one bit per entry.
* ``entropy_bits`` (ours): as ``key_only_bits``, masks at their entropy bound ``n * H(kept / n)``
  per layer, so keep fractions below 0.5 go below one bit a weight.
* ``*_with_bn``: plus the normalisation layers at 32 bits per value. We count what inference
  needs: a folded affine map, 2 values per channel (BN scale and shift, LN scale and bias). The
  paper does not say whether it counts BN; both are reported.

``csr_bits`` is the conventional sparse baseline: values plus CSR indices; ``binary_bits`` the
learned 1-bit-weight baseline (``pemn_jax.binary``): one bit per weight plus a float32 scale per
output channel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from pemn_jax import masking, strategies

FLOAT_BITS = 32
KEY_BITS = 64  # a threefry2x32 key: two uint32 words
STRATEGY_BITS = 136  # strategy id (8 bits), rp ratio and keep fraction (float64 each)


def binary_entropy(p: float) -> float:
  """H(p) in bits; 0 at p in {0, 1}."""
  if p <= 0.0 or p >= 1.0:
    return 0.0
  return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


@dataclasses.dataclass(frozen=True)
class StorageReport:
  """Bits needed to store a model, by convention (see the module docstring)."""

  strategy: str
  rp_ratio: float | None
  keep_fraction: float
  masked_weights: int
  stored_values: int
  norm_values: int
  dense_fp32_bits: int
  paper_bits: int
  key_only_bits: int
  entropy_bits: float

  @property
  def norm_bits(self) -> int:
    return FLOAT_BITS * self.norm_values

  @property
  def dense_fp32_bits_with_bn(self) -> int:
    return self.dense_fp32_bits + self.norm_bits

  @property
  def paper_bits_with_bn(self) -> int:
    return self.paper_bits + self.norm_bits

  def as_dict(self) -> dict:
    """JSON-ready: the fields, the with-BN totals and the compression ratios vs dense fp32."""
    d = dataclasses.asdict(self)
    d.update(
      dense_fp32_bits_with_bn=self.dense_fp32_bits_with_bn,
      paper_bits_with_bn=self.paper_bits_with_bn,
      key_only_bits_with_bn=self.key_only_bits + self.norm_bits,
      entropy_bits_with_bn=self.entropy_bits + self.norm_bits,
      ratio_paper=self.dense_fp32_bits / self.paper_bits,
      ratio_paper_with_bn=self.dense_fp32_bits_with_bn / self.paper_bits_with_bn,
      ratio_key_only=self.dense_fp32_bits / self.key_only_bits,
      ratio_entropy=self.dense_fp32_bits / self.entropy_bits,
      ratio_entropy_with_bn=self.dense_fp32_bits_with_bn / (self.entropy_bits + self.norm_bits),
    )
    return d


def mask_entropy_bits(shapes: Sequence[tuple[int, ...]], keep_fraction: float) -> float:
  """Sum over layers of n * H(kept / n), with the exact per-layer kept count."""
  total = 0.0
  for s in shapes:
    n = int(np.prod(s))
    total += n * binary_entropy(masking.num_kept(n, keep_fraction) / n)
  return total


def report(
  shapes: Sequence[tuple[int, ...]],
  norm_values: int,
  strategy: str,
  keep_fraction: float,
  rp_ratio: float | None = None,
) -> StorageReport:
  """Storage of a masked model.

  Args:
    shapes: masked kernel shapes ordered by depth.
    norm_values: normalisation values needed at inference (2 per BN/LN channel).
    strategy: one of ``strategies.STRATEGIES``.
    keep_fraction: mask keep fraction k.
    rp_ratio: r for random vector padding.
  """
  masking.validate_keep_fraction(keep_fraction)
  keeps = [keep_fraction] * len(shapes)
  return _report(shapes, keeps, norm_values, strategy, rp_ratio, keep_fraction)


def _report(shapes, keeps, norm_values: int, strategy: str, rp_ratio, keep_fraction=None):
  """The ``StorageReport`` of masked layers ``shapes`` with keep fractions ``keeps`` (one per
  layer); its ``keep_fraction`` is ``keep_fraction``, or if None the kept share of all weights."""
  sizes = [int(np.prod(s)) for s in shapes]
  p = sum(sizes)
  kept = [masking.num_kept(n, k) for n, k in zip(sizes, keeps, strict=True)]
  stored = strategies.stored_value_count(shapes, strategy, rp_ratio)
  header = KEY_BITS + STRATEGY_BITS
  return StorageReport(
    strategy=strategy,
    rp_ratio=rp_ratio if strategy == 'random_vector_padding' else None,
    keep_fraction=sum(kept) / p if keep_fraction is None else keep_fraction,
    masked_weights=p,
    stored_values=stored,
    norm_values=norm_values,
    dense_fp32_bits=FLOAT_BITS * p,
    paper_bits=FLOAT_BITS * stored + p,
    key_only_bits=header + p,
    entropy_bits=header + sum(n * binary_entropy(m / n) for n, m in zip(sizes, kept)),
  )


def report_tree(
  variables,
  keep_fraction=0.5,
  strategy: str = 'mask',
  rp_ratio: float | None = None,
) -> StorageReport:
  """Storage of any masked variable tree (a ``mask_model`` network, a model of the layers).

  The masked layers are those with ``params/.../scores``, in the tree's order (``model.init``'s
  call order; strategies count stored values by it); the normalisation values are 2 per channel
  of every module with a ``scale`` param and no ``kernel`` or ``scores`` beside it (BatchNorm,
  LayerNorm; a learned 1-bit layer's scale is part of its weights).

  Args:
    variables: the model's variables (or its ``params`` alone).
    keep_fraction: one keep fraction for every masked layer, or ``{layer path: keep}`` with
      ``'/'``-joined paths (what ``mask_model`` rules gave); the report's ``keep_fraction`` is
      then the kept share of all masked weights.
    strategy, rp_ratio: where the frozen values came from (``strategies.STRATEGIES``).
  """
  from flax import traverse_util

  params = variables.get('params', variables) if isinstance(variables, dict) else variables
  flat = traverse_util.flatten_dict(dict(params))
  layers_ = [(p[:-1], tuple(leaf.shape)) for p, leaf in flat.items() if p[-1] == 'scores']
  if not layers_:
    raise ValueError('the variables have no masked layer (no params .../scores)')
  keeps = []
  for layer, _ in layers_:
    name = '/'.join(layer)
    if isinstance(keep_fraction, dict):
      if name not in keep_fraction:
        raise ValueError(f'keep_fraction names no keep for the masked layer {name!r}')
      keeps.append(keep_fraction[name])
    else:
      keeps.append(keep_fraction)
  for k in set(keeps):
    masking.validate_keep_fraction(k)
  shapes = [shape for _, shape in layers_]
  owners = {p[:-1] for p in flat if p[-1] in ('kernel', 'scores')}
  norm = sum(
    2 * int(np.prod(leaf.shape))
    for p, leaf in flat.items()
    if p[-1] == 'scale' and p[:-1] not in owners
  )
  return _report(shapes, keeps, norm, strategy, rp_ratio)


def csr_bits(
  shapes: Sequence[tuple[int, ...]],
  sparsity: float,
  value_bits: int = FLOAT_BITS,
  index_bits: int = 32,
) -> int:
  """A conventional sparse network in CSR: kept values + column indices + row pointers.

  Each kernel is viewed in PyTorch layout as a (out, in * kh * kw) matrix; a fraction
  ``sparsity`` of its weights is removed (``round`` per layer).
  """
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f'sparsity must be in [0, 1), got {sparsity!r}')
  total = 0
  for s in shapes:
    d = int(np.prod(s))
    rows = s[-1]  # Flax layout: output features last
    nnz = round((1.0 - sparsity) * d)
    total += (value_bits + index_bits) * nnz + index_bits * (rows + 1)
  return total


def binary_bits(shapes: Sequence[tuple[int, ...]], scale_bits: int = FLOAT_BITS) -> int:
  """A network with learned 1-bit weights (``pemn_jax.binary``): per layer, one bit per weight
  (its sign) plus a ``scale_bits`` scale per output channel (the last axis of the Flax shape).

  Counts the kernels only: normalisation layers and any bias are extra, as in every other
  convention here (``report``'s ``*_with_bn`` adds the normalisation values).
  """
  return sum(int(np.prod(s)) + scale_bits * int(s[-1]) for s in shapes)


def format_table(r: StorageReport) -> str:
  """A human-readable storage table."""
  d = r.as_dict()
  mb = lambda bits: f'{bits / 8 / 2**20:9.3f} MiB'
  rows = [
    ('dense fp32', r.dense_fp32_bits, r.dense_fp32_bits_with_bn),
    ('paper convention (values + 1-bit masks)', r.paper_bits, r.paper_bits_with_bn),
    ('ours: key + 1-bit masks', r.key_only_bits, d['key_only_bits_with_bn']),
    ('ours: key + entropy-coded masks (bound)', r.entropy_bits, d['entropy_bits_with_bn']),
  ]
  strat = r.strategy + (f' r={r.rp_ratio:g}' if r.rp_ratio else '')
  lines = [
    f'storage ({strat}, keep {r.keep_fraction:g}; {r.masked_weights:,} masked weights, '
    f'{r.stored_values:,} stored random values, {r.norm_values:,} norm values)',
    f'  {"":42s} {"BN excluded":>25s} {"BN included":>25s}',
  ]
  for name, bits, bits_bn in rows:
    lines.append(
      f'  {name:42s} {mb(bits)} {r.dense_fp32_bits / bits:7.2f}x '
      f'{mb(bits_bn)} {r.dense_fp32_bits_with_bn / bits_bn:7.2f}x'
    )
  return '\n'.join(lines)
