"""Parity for GLIDE's four UNet kinds (base, upsample, base-inpaint, upsample-inpaint).

Loads `model.pt` into `Text2ImUNet` and recomputes every output of the fixture: the model
output, the sown intermediates, the classifier-free-guided output (`cfg_output`) and the short
sampling loop (`loop_timestep_map`, `loop_samples`). NCHW exists only at this boundary.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from glide_jax.diffusion import guidance
from glide_jax.diffusion.schedules import make_schedule
from glide_jax.models.unet import Text2ImUNet, UNetConfig
from glide_jax.convert import torch_to_flax
from glide_jax.pt_reader import load_state_dict
from glide_jax.sample import generate

# meta.json settings.loop.sampler -> glide_jax.diffusion.sampling sampler name.
_SAMPLERS = {"p_sample": "ddpm", "ddim": "ddim"}


def _nhwc(a: np.ndarray) -> jax.Array:
    return jnp.asarray(np.moveaxis(a, -3, -1))


def _nchw(a) -> np.ndarray:
    return np.moveaxis(np.asarray(a), -1, -3)


def load_params(weights: pathlib.Path, model: nn.Module) -> dict:
    """A PyTorch state-dict file as `model`'s float32 params tree."""
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.init_inputs()))["params"]
    return torch_to_flax(load_state_dict(weights), abstract)


def intermediates(state) -> dict[str, np.ndarray]:
    """Sown values keyed by their sow name."""
    flat = traverse_util.flatten_dict(state["intermediates"])
    return {path[-1]: np.asarray(v[0]) for path, v in flat.items()}


def _model_kwargs(io: Mapping[str, np.ndarray], prefix: str, config: UNetConfig) -> dict:
    kw = dict(tokens=jnp.asarray(io[prefix + "tokens"], jnp.int32),
              mask=jnp.asarray(io[prefix + "mask"], bool))
    if config.super_res:
        kw["low_res"] = _nhwc(io[prefix + "low_res"])
    if config.inpaint:
        kw["inpaint_image"] = _nhwc(io[prefix + "inpaint_image"])
        kw["inpaint_mask"] = _nhwc(io[prefix + "inpaint_mask"])
    return kw


def _loop(model: Text2ImUNet, params, config: UNetConfig, hparams, loop: Mapping[str, Any],
          io: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """GLIDE notebook's sampling loop through the public sampling API `glide_jax.sample.generate`.

    Returns (timestep_map [N], samples [N, n, 3, S, S]) using the fixture's stored noise.
    """
    sched = make_schedule(hparams["noise_schedule"], hparams["diffusion_steps"], loop["timestep_respacing"])
    noise = _nhwc(io["loop_noise"])
    guided = loop["guidance_scale"] is not None
    _, samples = generate(
        model, params, _model_kwargs(io, "loop_", config), sched=sched,
        sampler=_SAMPLERS[loop["sampler"]], eta=loop["eta"] or 0.0,
        guidance="cfg" if guided else "none", scale=float(loop["guidance_scale"] or 0.0),
        x_T=noise[0], noise=noise[1:] if noise.shape[0] > 1 else None,
        inpaint_known=bool(loop["inpaint_denoised_fn"]), return_all=True,
    )
    return np.asarray(sched.timestep_map, np.int64), _nchw(samples)


def compute(fixture_dir: pathlib.Path, **runtime: Any) -> dict[str, np.ndarray]:
    """Every output array of a UNet fixture (float32 NCHW images, NCL xf_out, int64 maps).

    `runtime`: UNetConfig runtime switches that must not change the outputs, e.g. scan_blocks=True.
    """
    fixture_dir = pathlib.Path(fixture_dir)
    hparams = json.loads((fixture_dir / "hparams.json").read_text())
    meta = json.loads((fixture_dir / "meta.json").read_text())
    wanted = {k: v["dtype"] for k, v in meta["arrays"].items() if v["role"] == "output"}
    with np.load(fixture_dir / "io.npz") as f:
        io = {k: f[k] for k in f.files}
    config = dataclasses.replace(UNetConfig.from_hparams(hparams), **runtime)
    model = Text2ImUNet(config)
    params = load_params(fixture_dir / "model.pt", model)

    @jax.jit
    def forward(params, x, t, kw):
        return model.apply({"params": params}, x, t, **kw, mutable=["intermediates"])

    out: dict[str, Any] = {}
    with jax.default_matmul_precision("highest"):
        y, state = forward(params, _nhwc(io["x_t"]), jnp.asarray(io["timesteps"], jnp.int32),
                           _model_kwargs(io, "", config))
        inter = intermediates(state)
        out["output"] = _nchw(y)
        for name in ("model_input", "low_res_upsampled"):
            if name in inter:
                out[name] = _nchw(inter[name])
        out["xf_out"] = np.swapaxes(inter["xf_out"], 1, 2)  # NLC -> NCL
        for name, v in inter.items():
            if name in ("t_sinusoid", "xf_proj", "emb") or name.startswith("trace."):
                out[name] = v

        if "cfg_output" in wanted:
            kw = _model_kwargs(io, "cfg_", config)
            fn = guidance.classifier_free(lambda x, t: forward(params, x, t, kw)[0],
                                          float(meta["settings"]["cfg_guidance_scale"]))
            out["cfg_output"] = _nchw(fn(_nhwc(io["cfg_x_t"]), jnp.asarray(io["cfg_timesteps"], jnp.int32)))

        if "loop_samples" in wanted:
            out["loop_timestep_map"], out["loop_samples"] = _loop(
                model, params, config, hparams, meta["settings"]["loop"], io)
    return {k: np.asarray(v).astype(wanted[k]) for k, v in out.items() if k in wanted}
