"""Input data for pemn-jax: TFDS datasets read TF-free from array_record, batches, augmentation.

One job per module:

- ``pemn_jax.data.sources``: which dataset ``config.data`` names and what it is: resolving and
  opening it (``prepare``, ``get_dataset_info``, ``DatasetInfo``, ``open_dataset``,
  ``clear_cache``), its normalisation statistics, ``image_shape`` without opening it, and
  ``complete`` (a partial data config filled from ``pemn_jax.configs.common``, where every
  ``data.*`` default lives).
- ``pemn_jax.data.pipeline``: the order and the batches the trainer reads (``train_batches``,
  ``eval_batches``, ``steps_per_epoch``, ``eval_steps``, ``epoch_permutation``), built ahead in a
  thread.
- ``pemn_jax.data.builders``: the project's TFDS builders (``fashion_mnist_embedded``,
  ``fashion_mnist_local``, ``cifar10_jpeg``) and the lock-guarded ``prepare_builder``.
- ``pemn_jax.data.augment``: the reference CIFAR augmentation of a batch (flip, RandAugment, colour
  jitter, normalisation, random erasing) in vectorised NumPy, driven by per-example uniforms.
- ``pemn_jax.data.image_ops``: the torchvision-faithful image ops it draws from (the 14 RandAugment
  ops, colour adjustments, nearest-neighbour affine warps).
"""
