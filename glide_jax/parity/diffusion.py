"""Reproduce a `diffusion-*` parity fixture: schedule tables and one-step Gaussian-diffusion math.

Fixture arrays are NCHW; they are transposed to NHWC on the way in and back on the way out.
"""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.diffusion import gaussian as G
from glide_jax.diffusion import schedules


def _nhwc(a: np.ndarray) -> jax.Array:
    return jnp.asarray(np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a)


def _nchw(a: jax.Array) -> np.ndarray:
    a = np.asarray(a)
    return np.transpose(a, (0, 3, 1, 2)) if a.ndim == 4 else a


def compute(fixture_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every `output` array of the fixture's meta.json (same names, shapes, NCHW, dtypes)."""
    fixture_dir = pathlib.Path(fixture_dir)
    hp = json.loads((fixture_dir / "hparams.json").read_text())
    meta = json.loads((fixture_dir / "meta.json").read_text())
    io = np.load(fixture_dir / "io.npz")
    args = (hp["noise_schedule"], hp["steps"], hp["timestep_respacing"])

    res: dict[str, object] = {}
    arrays = schedules.schedule_arrays(*args)
    for k, v in arrays.items():
        res[k if k in ("timestep_map", "num_timesteps") else f"sched.{k}"] = v
    sched = schedules.make_schedule(*args)

    x_start, x_t, noise = (_nhwc(io[k]) for k in ("x_start", "x_t", "noise"))
    model_output, step_noise, cond_grad = (
        _nhwc(io[k]) for k in ("model_output", "step_noise", "cond_grad"))
    t = jnp.asarray(io["t"], jnp.int32)

    res["model_t"] = sched.timestep_map[t]
    res["q_sample"] = G.q_sample(sched, x_start, t, noise)
    res["q_mean"], res["q_variance"], res["q_log_variance"] = G.q_mean_variance(sched, x_start, t)
    (res["q_posterior_mean"], res["q_posterior_variance"],
     res["q_posterior_log_variance_clipped"]) = G.q_posterior_mean_variance(sched, x_start, x_t, t)
    for prefix, clip in (("pmv", True), ("pmv_noclip", False)):
        out = G.p_mean_variance(sched, model_output, x_t, t, clip_denoised=clip)
        for k in ("mean", "variance", "log_variance", "pred_xstart"):
            res[f"{prefix}.{k}"] = out[k]

    def add(prefix, out):
        for k, v in out.items():
            res[f"{prefix}.{k}"] = v

    add("p_sample", G.ddpm_step(sched, model_output, x_t, t, step_noise))
    add("ddim_eta0", G.ddim_step(sched, model_output, x_t, t, step_noise, eta=0.0))
    add("ddim_eta1", G.ddim_step(sched, model_output, x_t, t, step_noise, eta=1.0))
    add("ddim_reverse", G.ddim_reverse_step(sched, model_output, x_t, t))

    cond_calls = []

    def cond_fn(x, t_model):
        cond_calls.append(t_model)
        return cond_grad

    add("p_sample_cond", G.ddpm_step(sched, model_output, x_t, t, step_noise, cond_fn=cond_fn))
    res["cond_t"] = cond_calls[0]
    add("ddim_eta0_cond",
        G.ddim_step(sched, model_output, x_t, t, step_noise, eta=0.0, cond_fn=cond_fn))

    if "train_model_output" in io:
        tr_x, tr_noise, tr_out = (
            _nhwc(io[k]) for k in ("train_x_start", "train_noise", "train_model_output"))
        tr_t = jnp.asarray(io["train_t"], jnp.int32)
        losses = G.training_losses(sched, tr_out, tr_x, tr_noise, tr_t)
        add("train", losses)
        res["train.grad_model_output"] = jax.grad(
            lambda o: jnp.mean(G.training_losses(sched, o, tr_x, tr_noise, tr_t)["loss"]))(tr_out)

    outputs = {}
    for name, spec in meta["arrays"].items():
        if spec["role"] != "output":
            continue
        if name not in res:
            raise KeyError(f"{fixture_dir.name}: no computation for output {name!r}")
        outputs[name] = _nchw(res[name]).astype(spec["dtype"])
    return outputs
