"""What ``make demo`` runs: a masked ConvMixer-96/4 with random vector padding (r = 1e-2) on the
embedded Fashion-MNIST subset (10,000 train / 2,000 test images shipped in the package).

Only the masks and BatchNorm train: every weight is one of 93 random values, regenerated from
the seed. A few minutes on 2 CPU cores:

  pemn train --config pemn_jax/configs/demo.py --workdir workdirs/demo
"""

from pemn_jax.configs import common


def get_config():
  c = common.base_config()
  c.model.name = 'convmixer'
  c.model.dim, c.model.depth, c.model.kernel_size, c.model.patch_size = 96, 4, 5, 2
  c.strategy.name, c.strategy.rp_ratio, c.strategy.keep_fraction = (
    'random_vector_padding',
    1e-2,
    0.5,
  )
  c.data.name = 'fashion_mnist_embedded'
  c.data.augment = False
  c.train.batch_size = 128
  c.train.eval_batch_size = 500
  c.train.num_epochs = 6
  c.train.peak_lr = 0.02
  c.train.checkpoint_every_steps = 50
  c.train.log_every_steps = 10
  return c
