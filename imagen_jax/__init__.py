"""imagen-jax: Imagen in JAX / Flax NNX."""
