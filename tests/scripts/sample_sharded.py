"""Samples a fixed batch with the public API and saves it: run with 1 and with 8 (fake) devices.

    python tests/scripts/sample_sharded.py NUM_DEVICES OUT.npy
"""
import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={sys.argv[1]}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import TINY  # noqa: E402

from glide_jax import experiment  # noqa: E402
from glide_jax.sample import sample_images  # noqa: E402
from glide_jax.tokenizer import GlideBPE  # noqa: E402


def main():
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == int(sys.argv[1])
    model = experiment.from_hparams(TINY["base"])
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **model.init_inputs(1))["params"])
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    prompts = ["a red circle", "a blue square", "a green triangle", "a purple circle"]
    x = sample_images(model, params, GlideBPE(text_ctx=8), prompts, hparams=TINY["base"], guidance_scale=3.0,
                      respacing="4", sampler="ddpm", seed=0)
    np.save(sys.argv[2], np.asarray(x))


if __name__ == "__main__":
    main()
