"""pemn-jax: Parameter-Efficient Masking Networks in JAX/Flax."""
