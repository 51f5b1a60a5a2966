"""Samples a fixed batch with the public API and saves it: run with 8 (fake) devices, compared
with `samples()` in a 1-device process (tests/test_sample.py).

    python tests/scripts/sample_sharded.py NUM_DEVICES OUT.npy
"""
import os
import sys

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import TINY, xla_flags  # noqa: E402

from glide_jax import experiment  # noqa: E402
from glide_jax.sample import sample_images  # noqa: E402
from glide_jax.tokenizer import GlideBPE  # noqa: E402


def samples() -> np.ndarray:
    """[4, 16, 16, 3] CFG samples of a perturbed random tiny base model, on all devices."""
    jax.config.update("jax_default_matmul_precision", "highest")
    model = experiment.from_hparams(TINY["base"])
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **model.init_inputs(1))["params"])
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    prompts = ["a red circle", "a blue square", "a green triangle", "a purple circle"]
    x = sample_images(model, params, GlideBPE(text_ctx=8), prompts, hparams=TINY["base"], guidance_scale=3.0,
                      respacing="4", sampler="ddpm", seed=0)
    return np.asarray(x)


if __name__ == "__main__":
    # read when jax starts its CPU backend (the first computation), not at import
    os.environ["XLA_FLAGS"] = xla_flags(int(sys.argv[1]))
    assert jax.device_count() == int(sys.argv[1])
    np.save(sys.argv[2], samples())
