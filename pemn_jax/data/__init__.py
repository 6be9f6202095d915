"""Input data for pemn-jax: TFDS builders (TF-free, array_record), input pipeline, augmentation.

- `pemn_jax.data.pipeline`: what the trainer calls (`default_data_config`, `prepare`,
  `get_dataset_info`, `train_batches`, `eval_batches`, `steps_per_epoch`, `eval_steps`).
- `pemn_jax.data.builders`: the project's TFDS builders (`fashion_mnist_embedded`,
  `fashion_mnist_local`, `cifar10_jpeg`) and the lock-guarded `prepare_builder`.
- `pemn_jax.data.augment`: the reference CIFAR augmentation (flip, RandAugment, colour jitter,
  random erasing) in vectorised NumPy.
"""
