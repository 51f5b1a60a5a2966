"""glide_jax: OpenAI's GLIDE (text-guided diffusion) in JAX/Flax, built for TPU-pod training."""

from glide_jax import xla_cpu as _xla_cpu

_xla_cpu.reexec_with_malloc_tunables()  # `python -m glide_jax.<tool>` only; see glide_jax/xla_cpu.py
_xla_cpu.apply()  # before anything creates jax's CPU client

__version__ = "0.1.0"
