"""The paper's [784, 100, 100, 100, 10] MLP, masked, on full Fashion-MNIST, one-layer strategy
(its two 100x100 layers share one random matrix; the 784x100 layer and the classifier keep their
own draws: 89,400 stored values for 99,400 weights)."""

from pemn_jax.configs import common


def get_config():
  c = common.base_config()
  c.model.name = 'mlp'
  c.model.hidden_dims = (100, 100, 100)
  c.strategy.name = 'one_layer'
  c.data.name = 'fashion_mnist'
  c.data.augment = False
  c.train.batch_size = 256
  c.train.num_epochs = 10
  c.train.peak_lr = 0.01
  return c
