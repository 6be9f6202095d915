"""Masked CIFAR ResNet-32 on CIFAR-10 (JPEG-q75 mirror), max-layer padding.

The paper publishes no ResNet recipe; we use the ConvMixer recipe (AdamW, wd 0.005,
piecewise-linear lr with peak 0.05, batch 512). ``--config.model.depth=20|32|56`` picks the
network; ``--config.strategy.name=random_vector_padding --config.strategy.rp_ratio=1e-1`` the
RP points of the paper's figure 4.
"""

from pemn_jax.configs import common


def get_config():
  c = common.base_config()
  c.model.name = 'resnet'
  c.model.depth = 32
  c.strategy.name = 'max_layer_padding'
  c.data.name = 'cifar10_jpeg'
  return c
