"""Shared test helpers: tiny hyper-parameters and random-weight converted checkpoints."""
import os

import flax.linen as nn
import jax
import numpy as np

from glide_jax import experiment


def xla_flags(devices: int) -> str:
    """The test session's XLA_FLAGS (conftest) with a fake CPU device count, for subprocesses."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


TINY_UNET = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", num_head_channels=32,
                 attention_resolutions="8", dropout=0.0, text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2)
TINY = {
    "base": dict(kind="base", **TINY_UNET),
    "base-inpaint": dict(kind="base-inpaint", inpaint=True, **TINY_UNET),
    "upsample": dict(kind="upsample", super_res=True, noise_schedule="linear",
                     **dict(TINY_UNET, image_size=32, channel_mult="1,2,2")),
    "clip": dict(kind="clip", logit_scale=100.0, beta_schedule="squaredcos_cap_v2", n_timesteps=1000,
                 image_size=16, patch_size=4, n_vocab=49408, max_text_len=77, n_embd=16, n_head_state_text=8,
                 n_head_text=2, n_xf_blocks_text=1, n_head_state_image=8, n_head_image=2, n_xf_blocks_image=1),
    "classifier": dict(kind="classifier", image_size=16, model_channels=32, out_channels=18, num_res_blocks=1,
                       attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=32, pool="attention"),
}


def random_checkpoint(kind: str, out, hparams: dict | None = None) -> None:
    """A converted-format checkpoint (config.json + orbax params) with random, non-zero weights."""
    from glide_jax.convert import save_converted

    full = experiment.hparams_with_defaults(kind, hparams or TINY[kind])
    model = experiment.from_hparams(full)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **model.init_inputs(1))["params"])
    leaves, tree = jax.tree.flatten(params)  # zero-initialised output layers: perturb everything
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [np.asarray(p) + 0.02 * rng.standard_normal(p.shape).astype(np.float32)
                                       for p in leaves])
    save_converted(str(out), full, params)
