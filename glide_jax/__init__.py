"""glide_jax: OpenAI's GLIDE (text-guided diffusion) in JAX/Flax, built for TPU-pod training.

Importing the package has no side effects; the command-line tools tune CPU hosts themselves
(`glide_jax.host`)."""

__version__ = "0.1.0"
