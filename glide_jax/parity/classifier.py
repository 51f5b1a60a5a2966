"""Parity for guided-diffusion's noisy classifier (`tests/fixtures/parity/classifier`).

Loads `model.pt` into `EncoderUNet` and recomputes t_sinusoid, emb, trace.*, logits and the
classifier-guidance gradient. NCHW exists only at this boundary.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.models.unet import EncoderUNet, EncoderUNetConfig
from glide_jax.parity.unet import intermediates, load_params


def classifier_grad(model: EncoderUNet, params, x, t, y, scale: float):
    """(scale * d/dx sum_b log_softmax(model(x, t))[b, y_b], (logits, sown state)); x NHWC."""

    def selected(x):
        logits, state = model.apply({"params": params}, x, t, mutable=["intermediates"])
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[:, None], axis=-1)
        return logp.sum(), (logits, state)

    grad, aux = jax.grad(selected, has_aux=True)(x)
    return grad * scale, aux


def compute(fixture_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every output array of the classifier fixture (float32; cond_grad NCHW)."""
    fixture_dir = pathlib.Path(fixture_dir)
    config = EncoderUNetConfig.from_hparams(json.loads((fixture_dir / "hparams.json").read_text()))
    meta = json.loads((fixture_dir / "meta.json").read_text())
    wanted = {k for k, v in meta["arrays"].items() if v["role"] == "output"}
    with np.load(fixture_dir / "io.npz") as f:
        io = {k: f[k] for k in f.files}
    model = EncoderUNet(config)
    params = load_params(fixture_dir / "model.pt", model)

    x = jnp.asarray(io["x_t"].transpose(0, 2, 3, 1))
    t = jnp.asarray(io["timesteps"], jnp.int32)
    y = jnp.asarray(io["y"], jnp.int32)
    scale = float(meta["settings"]["classifier_scale"])
    with jax.default_matmul_precision("highest"):
        grad, (logits, state) = jax.jit(
            lambda p, x, t, y: classifier_grad(model, p, x, t, y, scale)
        )(params, x, t, y)
    out = {"logits": logits, "cond_grad": np.transpose(np.asarray(grad), (0, 3, 1, 2))}
    out.update({k: v for k, v in intermediates(state).items() if k in wanted})
    return {k: np.asarray(v, np.float32) for k, v in out.items() if k in wanted}
