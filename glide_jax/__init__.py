"""glide_jax: OpenAI's GLIDE (text-guided diffusion) in JAX/Flax, built for TPU-pod training."""

__version__ = "0.1.0"
