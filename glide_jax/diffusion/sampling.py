"""One `lax.scan` sampling loop; the per-step update is picked by name.

Samplers: "ddpm" (ancestral, learned variance; guided-diffusion p_sample), "ddim" (with eta) and
"dpm++" (DPM-Solver++(2M), data-prediction multistep solver on the respaced discrete schedule;
uses only the model's ε, the variance channels are ignored). Step k of the loop runs at respaced
index i = N−1−k, so step 0 starts from x_T at the noisiest kept timestep and the last step
(i = 0) adds no noise.

The whole loop is meant to be jitted by the caller with `sampler` (and the callables) static;
x_T, noise, rng, eta and the Schedule arrays may all be traced.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from glide_jax.diffusion import gaussian as G
from glide_jax.diffusion.schedules import Schedule

Array = jax.Array
# model_fn(x [B,H,W,C], t_model [B] int32 original timesteps) -> [B,H,W,2C] (ε then v)
ModelFn = Callable[[Array, Array], Array]

SAMPLERS = ("ddpm", "ddim", "dpm++")


def _dpmpp_2m_step(sched: Schedule, model_output: Array, x: Array, t: Array, x0_prev: Array, *,
                   clip_denoised: bool, denoised_fn, cond_fn) -> tuple[Array, Array]:
    """DPM-Solver++(2M) from respaced index i = t to i−1 (to x̂_0 itself at i = 0).

    With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ), h = λ_{i−1} − λ_i, r = h_{i+1}/h:
    D = (1 + 1/(2r))·x̂_0 − x̂_0_prev/(2r) (first order D = x̂_0 at the first step);
    x_{i−1} = (σ_{i−1}/σ_i)·x − α_{i−1}·expm1(−h)·D.
    Returns (x_{i−1}, x̂_0) [B,H,W,C] each.
    """
    out = G.p_mean_variance(sched, model_output, x, t, clip_denoised, denoised_fn)
    if cond_fn is not None:
        out = G.condition_score(sched, out, x, t, cond_fn(x, sched.timestep_map[t]))
    x0 = out["pred_xstart"]
    n = sched.num_timesteps
    lam = jnp.log(sched.sqrt_alphas_cumprod) - 0.5 * sched.log_one_minus_alphas_cumprod
    i = t[0]  # every row of a sampling batch is at the same step
    prev, nxt = jnp.maximum(i - 1, 0), jnp.minimum(i + 1, n - 1)
    h = lam[prev] - lam[i]
    h_last = lam[i] - lam[nxt]
    first = i == n - 1
    half_inv_r = jnp.where(first, 0.0, 0.5 * h / jnp.where(first, 1.0, h_last))
    d = (1 + half_inv_r) * x0 - half_inv_r * x0_prev
    sigma_ratio = sched.sqrt_one_minus_alphas_cumprod[prev] / sched.sqrt_one_minus_alphas_cumprod[i]
    x_next = sigma_ratio * x - sched.sqrt_alphas_cumprod[prev] * jnp.expm1(-h) * d
    return jnp.where(i == 0, x0, x_next), x0


def sample_loop(model_fn: ModelFn, sched: Schedule, x_T: Array, *, sampler: str = "ddpm",
                eta: float | Array = 0.0, rng: Optional[Array] = None,
                noise: Optional[Array] = None,
                clip_denoised: bool = True, denoised_fn: Optional[Callable[[Array], Array]] = None,
                cond_fn: Optional[Callable[[Array, Array], Array]] = None,
                return_all: bool = False) -> Array | tuple[Array, Array]:
    """Run the reverse process from x_T through all N respaced steps.

    Args:
        model_fn: (x [B,H,W,C], t_model [B] int32) -> [B,H,W,2C]; t_model = sched.timestep_map[i].
        sched: respaced Schedule (N = sched.num_timesteps steps).
        x_T: [B,H,W,C] starting sample (already multiplied by any temperature).
        sampler: "ddpm", "ddim" or "dpm++" (static).
        eta: DDIM noise scale (0 = deterministic); may be traced.
        rng: PRNG key; step k uses normal(fold_in(rng, k)). Unused when `noise` is given.
        noise: optional [N,B,H,W,C] per-step standard-normal noise (step k at index N−1−k).
        clip_denoised: clip x̂_0 to [−1, 1] (after denoised_fn).
        denoised_fn: x̂_0 -> x̂_0 applied before clipping (e.g. inpainting).
        cond_fn: (x, t_model) -> ∇_x log p(y|x); mean shift for ddpm, score shift for ddim / dpm++.
        return_all: also return every step's sample.

    Returns:
        the final sample [B,H,W,C], or (final, samples [N,B,H,W,C]) with return_all.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    n = sched.num_timesteps
    deterministic_ddim = sampler == "ddim" and isinstance(eta, (int, float)) and eta == 0
    stochastic = sampler == "ddpm" or (sampler == "ddim" and not deterministic_ddim)
    if noise is None and rng is None and stochastic:
        raise ValueError(f"sampler {sampler!r} with eta={eta!r} needs `rng` or explicit `noise`")
    if noise is not None and noise.shape != (n,) + x_T.shape:
        raise ValueError(f"noise must have shape {(n,) + x_T.shape}, got {noise.shape}")
    batch = x_T.shape[0]
    kw = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn)

    def step(carry, xs):
        x, aux = carry
        k, step_noise = xs
        i = n - 1 - k
        t = jnp.full((batch,), i, jnp.int32)
        model_output = model_fn(x, sched.timestep_map[t])
        if step_noise is None and stochastic:
            step_noise = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
        if sampler == "ddpm":
            x = G.ddpm_step(sched, model_output, x, t, step_noise, **kw)["sample"]
        elif sampler == "ddim":
            x = G.ddim_step(sched, model_output, x, t, step_noise, eta=eta, **kw)["sample"]
        else:
            x, aux = _dpmpp_2m_step(sched, model_output, x, t, aux, **kw)
        return (x, aux), x

    xs = (jnp.arange(n, dtype=jnp.int32), noise)
    aux = jnp.zeros_like(x_T) if sampler == "dpm++" else None  # dpm++ carries the previous x̂_0
    (x, _), all_samples = jax.lax.scan(step, (x_T, aux), xs)
    return (x, all_samples) if return_all else x
