"""A tiny masked ConvMixer on the embedded Fashion-MNIST subset: seconds on a laptop CPU.

pemn train --config pemn_jax/configs/smoke.py --workdir /tmp/smoke
"""

from pemn_jax.configs import common


def get_config():
  c = common.base_config()
  c.model.name = 'convmixer'
  c.model.dim, c.model.depth, c.model.kernel_size, c.model.patch_size = 16, 2, 3, 4
  c.strategy.name, c.strategy.rp_ratio = 'random_vector_padding', 1e-2
  c.data.name = 'fashion_mnist_embedded'
  c.data.augment = False
  c.train.batch_size = 64
  c.train.eval_batch_size = 500
  c.train.num_epochs = 1
  c.train.num_steps = 20
  c.train.peak_lr = 0.01
  c.train.checkpoint_every_steps = 10
  c.train.log_every_steps = 5
  c.train.progress = False
  return c
