"""Parity for GLIDE's noised CLIP (`tests/fixtures/parity/clip`).

Loads `clip_image_enc.pt` / `clip_text_enc.pt` into `ClipModel`'s `image_enc` / `text_enc`
subtrees and recomputes every output of the fixture. Images are NCHW at this boundary only.
"""
from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from glide_jax.models.clip import ClipConfig, ClipModel, normalize
from glide_jax.convert import torch_to_flax
from glide_jax.pt_reader import load_state_dict, to_float32

WEIGHT_FILES = {"image_enc": "clip_image_enc.pt", "text_enc": "clip_text_enc.pt"}


def load_params(fixture_dir: pathlib.Path, model: ClipModel) -> dict:
    """The fixture's two state dicts as one `ClipModel` params tree (float32)."""
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.init_inputs())["params"]
    return {
        sub: torch_to_flax(to_float32(load_state_dict(fixture_dir / fname)), abstract, prefix=(sub,))[sub]
        for sub, fname in WEIGHT_FILES.items()
    }


def _traces(intermediates) -> dict[str, jax.Array]:
    """Sown `trace.*` values keyed by their sow name (the last path component)."""
    flat = traverse_util.flatten_dict(nn.unbox(intermediates))
    return {path[-1]: value[0] for path, value in flat.items() if path[-1].startswith("trace.")}


def compute(fixture_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every output array of the CLIP fixture (float32; cond_grad NCHW)."""
    fixture_dir = pathlib.Path(fixture_dir)
    config = ClipConfig.from_hparams(json.loads((fixture_dir / "hparams.json").read_text()))
    settings = json.loads((fixture_dir / "meta.json").read_text())["settings"]
    with np.load(fixture_dir / "io.npz") as f:
        io = {k: f[k] for k in f.files}
    model = ClipModel(config)
    params = load_params(fixture_dir, model)

    grad_scale = float(settings["grad_scale"])

    @jax.jit
    def run(params, images, t, tokens, lens):
        variables = {"params": params}
        image_enc, image_state = model.apply(variables, images, t, method=ClipModel.encode_image,
                                             mutable=["intermediates"])
        text_enc, text_state = model.apply(variables, tokens, lens, method=ClipModel.encode_text,
                                           mutable=["intermediates"])
        text_emb = normalize(text_enc)
        cond_grad = model.apply(variables, images, t, text_emb, grad_scale, method=ClipModel.guidance_grad)
        return {
            "image_enc": image_enc,
            "image_emb": normalize(image_enc),
            "text_enc": text_enc,
            "text_emb": text_emb,
            "cond_grad": jnp.transpose(cond_grad, (0, 3, 1, 2)),  # NHWC -> NCHW
            **_traces(image_state["intermediates"]),
            **_traces(text_state["intermediates"]),
        }

    with jax.default_matmul_precision("highest"):
        out = run(
            params,
            jnp.asarray(io["images"].transpose(0, 2, 3, 1)),  # NCHW -> NHWC
            jnp.asarray(io["image_timesteps"], jnp.int32),
            jnp.asarray(io["text_tokens"], jnp.int32),
            jnp.asarray(io["text_lens"], jnp.int32),
        )
    return {k: np.asarray(v, np.float32) for k, v in out.items()}
