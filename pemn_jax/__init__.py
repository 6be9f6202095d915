"""pemn-jax: Parameter-Efficient Masking Networks (Bai et al., NeurIPS 2022) in JAX/Flax.

The public API, for ``import pemn_jax as pemn``:

- layers: ``MaskedConv``, ``MaskedDense`` (frozen random kernel x learned top-k mask) and their
  trainable twins ``Conv``, ``Dense``; ``FROZEN``, the collection and rng stream of the fixed
  random weights; ``DenseBase`` / ``ConvBase``, the base classes they share (a subclass defines
  ``effective_kernel(shape)``: the seam for new kinds of masked layers);
- masks: ``score_mask`` (the straight-through top-k a masked layer applies to its scores) and
  ``topk_mask``;
- weight strategies: ``apply_strategy`` over a ``frozen`` collection, ``STRATEGIES``,
  ``kernel_order`` (the depth order the strategies place values in);
- any Linen model as a PEMN network: ``mask_model`` (matched layers on frozen random kernels x
  masks, by module-path rules);
- models from configs: ``build_model``, ``init_variables``, ``frozen_fingerprint``;
- training: ``train_and_evaluate``, ``evaluate_workdir``, ``export_workdir``;
- the ``.pemn`` file: ``export``, ``load``, ``inspect_artifact``, ``materialize_dense`` for
  config-described models; ``export_module``, ``load_module`` for any Linen module (masked by
  ``mask_model`` or built from the layers): the file stores masks and trained leaves, the
  caller brings the module;
- storage accounting: ``storage_report`` (layer shapes), ``storage_report_tree`` (any masked
  variable tree);
- ``steps``: the train state and the jitted train/eval steps the trainer uses (a module);
- ``nnx``: the NNX masked layers, their ``Frozen`` variable type and strategies (a module);
- ``pretrained``: masks over a trained model's weights (mask fine-tuning, lottery jackpots):
  ``load_base``, ``apply_base``, ``init_scores``, ``mask_only`` (a module).

Everything else is reachable through its module (``pemn_jax.steps``, ``pemn_jax.data``, ...)
but not promised. Names are resolved on first use, so ``import pemn_jax`` imports neither the
trainer's dependencies (orbax, tensorflow-datasets) nor matplotlib.
"""

from __future__ import annotations

import importlib

# name -> (module, attribute in it; None: the module itself)
_API = {
  'FROZEN': ('pemn_jax.layers', 'FROZEN'),
  'Conv': ('pemn_jax.layers', 'Conv'),
  'ConvBase': ('pemn_jax.layers', 'ConvBase'),
  'DenseBase': ('pemn_jax.layers', 'DenseBase'),
  'Dense': ('pemn_jax.layers', 'Dense'),
  'MaskedConv': ('pemn_jax.layers', 'MaskedConv'),
  'MaskedDense': ('pemn_jax.layers', 'MaskedDense'),
  'score_mask': ('pemn_jax.masking', 'score_mask'),
  'topk_mask': ('pemn_jax.masking', 'topk_mask'),
  'STRATEGIES': ('pemn_jax.strategies', 'STRATEGIES'),
  'apply_strategy': ('pemn_jax.strategies', 'apply_strategy'),
  'kernel_order': ('pemn_jax.build', 'kernel_order'),
  'mask_model': ('pemn_jax.convert', 'mask_model'),
  'build_model': ('pemn_jax.build', 'build_model'),
  'init_variables': ('pemn_jax.build', 'init_variables'),
  'frozen_fingerprint': ('pemn_jax.build', 'frozen_fingerprint'),
  'train_and_evaluate': ('pemn_jax.train', 'train_and_evaluate'),
  'evaluate_workdir': ('pemn_jax.train', 'evaluate_workdir'),
  'export_workdir': ('pemn_jax.train', 'export_workdir'),
  'export': ('pemn_jax.artifact', 'export'),
  'load': ('pemn_jax.artifact', 'load'),
  'inspect_artifact': ('pemn_jax.artifact', 'inspect'),
  'export_module': ('pemn_jax.module_artifact', 'export_module'),
  'load_module': ('pemn_jax.module_artifact', 'load_module'),
  'materialize_dense': ('pemn_jax.artifact', 'materialize_dense'),
  'storage_report': ('pemn_jax.storage', 'report'),
  'storage_report_tree': ('pemn_jax.storage', 'report_tree'),
  'steps': ('pemn_jax.steps', None),  # a module
  'nnx': ('pemn_jax.nnx', None),  # a module: the NNX layers
  'pretrained': ('pemn_jax.pretrained', None),  # a module: masks over a trained model's weights
}

__all__ = sorted(_API)


def __getattr__(name: str):
  if name in _API:
    module, attr = _API[name]
    value = importlib.import_module(module)
    if attr is not None:
      value = getattr(value, attr)
    globals()[name] = value  # resolved once
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__() -> list[str]:
  return __all__
