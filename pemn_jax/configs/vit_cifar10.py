"""Masked ViT-256/6 on CIFAR-10 (JPEG-q75 mirror), random vector padding r = 1e-2.

Our choices where the paper is silent (see ``pemn_jax.models.vit``): patch 4, heads dim / 64,
MLP ratio 2, fixed sine-cosine positions, mean pooling. Peak lr 1e-3 (0.05 makes a
transformer's scores diverge in our short runs). Grid: ``--config.model.dim=256|512``,
``--config.model.depth=6|8``.
"""

from pemn_jax.configs import common


def get_config():
  c = common.base_config()
  c.model.name = 'vit'
  c.model.dim, c.model.depth, c.model.patch_size, c.model.mlp_ratio = 256, 6, 4, 2.0
  c.strategy.name, c.strategy.rp_ratio = 'random_vector_padding', 1e-2
  c.data.name = 'cifar10_jpeg'
  c.train.peak_lr = 1e-3
  return c
