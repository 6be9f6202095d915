"""Masked ConvMixer-256/8 on CIFAR-10 (JPEG-q75 mirror), random vector padding r = 1e-3.

The reference recipe (docs/method.md, section 4): AdamW, weight decay 0.005, batch 512, 100 epochs,
lr 0 -> 0.05 -> 0.0025 -> 0, full augmentation. Every point of the paper's ConvMixer grid is an
override, e.g.::

  pemn train --config pemn_jax/configs/convmixer_cifar10.py --workdir /tmp/cm \
      --config.data.source_path=PATH/cifar10_jpeg_q75.npz \
      --config.model.dim=512 --config.model.depth=6 \
      --config.strategy.name=max_layer_padding          # or mask, one_layer
  ... --config.strategy.rp_ratio=1e-5                     # RP 1e-1 .. 1e-5
  ... --config.model.masked=False                         # the dense baseline
"""

from pemn_jax.configs import common


def get_config():
  c = common.base_config()
  c.model.name = 'convmixer'
  c.model.dim, c.model.depth, c.model.kernel_size, c.model.patch_size = 256, 8, 5, 2
  c.strategy.name, c.strategy.rp_ratio, c.strategy.keep_fraction = (
    'random_vector_padding',
    1e-3,
    0.5,
  )
  c.data.name = 'cifar10_jpeg'
  return c
