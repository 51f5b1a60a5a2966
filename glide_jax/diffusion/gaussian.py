"""Gaussian diffusion math as pure jnp functions of a `Schedule` (guided-diffusion's names).

Conventions: tensors are NHWC [B, H, W, C]; `t` is an int [B] of RESPACED indices (0 = least
noise); the model is called with `sched.timestep_map[t]`; the model output is [B, H, W, 2C] =
ε (first C channels) then the variance interpolation v (last C). The model predicts ε and a
learned-range variance. Coefficients are float32 table look-ups (rounded once from float64);
all tensor arithmetic is float32, as in the reference.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.diffusion.schedules import Schedule

Array = jax.Array
DenoisedFn = Optional[Callable[[Array], Array]]
# cond_fn(x_t [B,H,W,C], t_model [B]) -> ∇_x log p(y | x_t) [B,H,W,C]
CondFn = Optional[Callable[[Array, Array], Array]]

_LN2 = float(np.log(2.0))  # python float: stays weakly typed (float32 math)


def _extract(table: Array, t: Array, ndim: int) -> Array:
    """table[t] reshaped to [B, 1, ..., 1] (ndim dims) for broadcasting against x."""
    return table[t].reshape((-1,) + (1,) * (ndim - 1))


def _nonzero_mask(t: Array, ndim: int) -> Array:
    """1.0 where t != 0 else 0.0, shaped [B, 1, ..., 1]: no noise is added at the last step."""
    return (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def mean_flat(x: Array) -> Array:
    """Mean over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def split_model_output(model_output: Array) -> tuple[Array, Array]:
    """[B,H,W,2C] -> (ε [B,H,W,C], v [B,H,W,C]) on the last axis."""
    c = model_output.shape[-1] // 2
    return model_output[..., :c], model_output[..., c:]


def q_mean_variance(sched: Schedule, x_start: Array, t: Array) -> tuple[Array, Array, Array]:
    """q(x_t | x_0) = N(√ᾱ_t·x_0, (1−ᾱ_t)I): (mean, variance, log_variance), each x_start's shape."""
    mean = _extract(sched.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
    variance = 1.0 - _extract(sched.alphas_cumprod, t, x_start.ndim)
    log_variance = _extract(sched.log_one_minus_alphas_cumprod, t, x_start.ndim)
    shape = x_start.shape
    return mean, jnp.broadcast_to(variance, shape), jnp.broadcast_to(log_variance, shape)


def q_sample(sched: Schedule, x_start: Array, t: Array, noise: Array) -> Array:
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, [B,H,W,C]."""
    return (_extract(sched.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + _extract(sched.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise)


def q_posterior_mean_variance(sched: Schedule, x_start: Array, x_t: Array,
                              t: Array) -> tuple[Array, Array, Array]:
    """q(x_{t−1} | x_t, x_0) = N(c1_t·x_0 + c2_t·x_t, β̃_t): (mean, variance, log_variance_clipped)."""
    nd = x_t.ndim
    mean = (_extract(sched.posterior_mean_coef1, t, nd) * x_start
            + _extract(sched.posterior_mean_coef2, t, nd) * x_t)
    variance = jnp.broadcast_to(_extract(sched.posterior_variance, t, nd), x_t.shape)
    log_variance = _extract(sched.posterior_log_variance_clipped, t, nd)
    log_variance = jnp.broadcast_to(log_variance, x_t.shape)
    return mean, variance, log_variance


def predict_xstart_from_eps(sched: Schedule, x_t: Array, t: Array, eps: Array) -> Array:
    """x̂_0 = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε, [B,H,W,C]."""
    return (_extract(sched.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - _extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_xstart(sched: Schedule, x_t: Array, t: Array, pred_xstart: Array) -> Array:
    """ε = (√(1/ᾱ_t)·x_t − x̂_0) / √(1/ᾱ_t − 1), [B,H,W,C]."""
    return ((_extract(sched.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart)
            / _extract(sched.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def p_mean_variance(sched: Schedule, model_output: Array, x_t: Array, t: Array,
                    clip_denoised: bool = True, denoised_fn: DenoisedFn = None) -> dict[str, Array]:
    """p(x_{t−1} | x_t) from the model output [B,H,W,2C] at x_t [B,H,W,C].

    log σ² = f·log β_t + (1−f)·log β̃_t (clipped) with f = (v+1)/2; x̂_0 from ε, then
    denoised_fn, then clipped to [−1, 1] if clip_denoised; mean = posterior mean at (x̂_0, x_t).

    Returns:
        dict(mean, variance, log_variance, pred_xstart, eps), each [B,H,W,C]; eps is the model's.
    """
    eps, v = split_model_output(model_output)
    min_log = _extract(sched.posterior_log_variance_clipped, t, x_t.ndim)
    max_log = _extract(sched.log_betas, t, x_t.ndim)
    frac = (v + 1) / 2
    log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = predict_xstart_from_eps(sched, x_t, t, eps)
    if denoised_fn is not None:
        pred_xstart = denoised_fn(pred_xstart)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = q_posterior_mean_variance(sched, pred_xstart, x_t, t)
    return {"mean": mean, "variance": jnp.exp(log_variance), "log_variance": log_variance,
            "pred_xstart": pred_xstart, "eps": eps}


def condition_mean(out: dict[str, Array], grad: Array) -> Array:
    """Sohl-Dickstein guidance: mean' = mean + σ²·∇ log p(y | x_t), [B,H,W,C]."""
    return out["mean"] + out["variance"] * grad


def condition_score(sched: Schedule, out: dict[str, Array], x_t: Array, t: Array,
                    grad: Array) -> dict[str, Array]:
    """Song et al. score guidance: ε' = ε(x̂_0) − √(1−ᾱ_t)·g; x̂_0 from ε' (not re-clipped); new mean.

    Returns a copy of `out` with pred_xstart, mean and eps replaced.
    """
    alpha_bar = _extract(sched.alphas_cumprod, t, x_t.ndim)
    eps = predict_eps_from_xstart(sched, x_t, t, out["pred_xstart"])
    eps = eps - jnp.sqrt(1 - alpha_bar) * grad
    pred_xstart = predict_xstart_from_eps(sched, x_t, t, eps)
    mean, _, _ = q_posterior_mean_variance(sched, pred_xstart, x_t, t)
    return {**out, "pred_xstart": pred_xstart, "mean": mean, "eps": eps}


def ddpm_step(sched: Schedule, model_output: Array, x_t: Array, t: Array, noise: Array, *,
              clip_denoised: bool = True, denoised_fn: DenoisedFn = None,
              cond_fn: CondFn = None) -> dict[str, Array]:
    """Ancestral step (guided-diffusion p_sample): x_{t−1} = mean + σ_t·noise (no noise at t = 0).

    Returns dict(sample, pred_xstart), each [B,H,W,C].
    """
    out = p_mean_variance(sched, model_output, x_t, t, clip_denoised, denoised_fn)
    mean = out["mean"]
    if cond_fn is not None:
        mean = condition_mean(out, cond_fn(x_t, sched.timestep_map[t]))
    sample = mean + _nonzero_mask(t, x_t.ndim) * jnp.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_step(sched: Schedule, model_output: Array, x_t: Array, t: Array,
              noise: Optional[Array] = None, *,
              eta: float | Array = 0.0, clip_denoised: bool = True, denoised_fn: DenoisedFn = None,
              cond_fn: CondFn = None) -> dict[str, Array]:
    """DDIM step (Song et al. eq. 12) with ε re-derived from the processed x̂_0.

    σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev);
    x_{t−1} = x̂_0·√ᾱ_prev + √(1−ᾱ_prev−σ²)·ε + σ·noise (noise omitted at t = 0 or when None).
    Returns dict(sample, pred_xstart), each [B,H,W,C].
    """
    out = p_mean_variance(sched, model_output, x_t, t, clip_denoised, denoised_fn)
    if cond_fn is not None:
        out = condition_score(sched, out, x_t, t, cond_fn(x_t, sched.timestep_map[t]))
    eps = predict_eps_from_xstart(sched, x_t, t, out["pred_xstart"])
    alpha_bar = _extract(sched.alphas_cumprod, t, x_t.ndim)
    alpha_bar_prev = _extract(sched.alphas_cumprod_prev, t, x_t.ndim)
    ratio = (1 - alpha_bar_prev) / (1 - alpha_bar)
    sigma = eta * jnp.sqrt(ratio) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    # 1 − ᾱ_prev − σ² rewritten without cancellation (at η = 1 and small ᾱ_t the naive float32
    # difference loses most digits): (1−ᾱ_prev)/(1−ᾱ_t)·[(1−η²)(1−ᾱ_t) + η²ᾱ_t(1−ᾱ_prev)/ᾱ_prev].
    eta2 = jnp.square(eta)
    eps_var = ratio * ((1 - eta2) * (1 - alpha_bar)
                       + eta2 * alpha_bar * (1 - alpha_bar_prev) / alpha_bar_prev)
    sample = (out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
              + jnp.sqrt(jnp.maximum(eps_var, 0.0)) * eps)
    if noise is not None:
        sample = sample + _nonzero_mask(t, x_t.ndim) * sigma * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_reverse_step(sched: Schedule, model_output: Array, x_t: Array, t: Array, *,
                      clip_denoised: bool = True, denoised_fn: DenoisedFn = None) -> dict[str, Array]:
    """Deterministic reverse DDIM step to t+1: x_{t+1} = x̂_0·√ᾱ_next + √(1−ᾱ_next)·ε(x̂_0).

    Returns dict(sample, pred_xstart), each [B,H,W,C].
    """
    out = p_mean_variance(sched, model_output, x_t, t, clip_denoised, denoised_fn)
    eps = predict_eps_from_xstart(sched, x_t, t, out["pred_xstart"])
    alpha_bar_next = _extract(sched.alphas_cumprod_next, t, x_t.ndim)
    sample = out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * eps
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
    """KL(N(m1, e^lv1) ‖ N(m2, e^lv2)) = ½(−1 + lv2 − lv1 + e^(lv1−lv2) + (m1−m2)²·e^−lv2), nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: Array) -> Array:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)·(x + 0.044715·x³))), elementwise."""
    return 0.5 * (1.0 + jnp.tanh(float(np.sqrt(2.0 / np.pi)) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Array, *, means: Array, log_scales: Array) -> Array:
    """log P(bin of x) under N(means, e^{2·log_scales}) for 8-bit data in [−1, 1], elementwise, nats.

    Bins are [x − 1/255, x + 1/255], open-ended below −0.999 and above 0.999; probabilities are
    clamped below at 1e-12 before the log.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(sched: Schedule, model_output: Array, x_start: Array, x_t: Array, t: Array,
                 clip_denoised: bool = False) -> Array:
    """Variational-bound term in bits per dim, [B]: KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) for t > 0,
    the discretised decoder NLL of x_0 at t = 0."""
    true_mean, _, true_log_variance = q_posterior_mean_variance(sched, x_start, x_t, t)
    out = p_mean_variance(sched, model_output, x_t, t, clip_denoised)
    kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = mean_flat(kl) / _LN2
    nll = -discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    nll = mean_flat(nll) / _LN2
    return jnp.where(t == 0, nll, kl)


MSE_WEIGHTINGS = ("uniform", "min_snr", "p2")


def snr(sched: Schedule, t: Array) -> Array:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) at integer timesteps t [B] -> [B]."""
    a = sched.alphas_cumprod[t]
    return a / (1.0 - a)


def mse_weights(sched: Schedule, t: Array, weighting: str = "uniform", *, gamma: float = 5.0,
                p2_k: float = 1.0) -> Array:
    """Per-example weights [B] of the ε-MSE term at timesteps t [B].

    - "uniform": 1 (GLIDE, guided-diffusion).
    - "min_snr": min(SNR_t, γ) / SNR_t, Min-SNR-γ for ε prediction (Hang et al. 2023, γ = 5):
      low-noise steps, whose ε targets are nearly free to fit, stop dominating the gradient.
    - "p2": 1 / (k + SNR_t)^γ, perception-prioritised weighting (Choi et al. 2022, k = 1, γ = 1
      there; here `gamma` is P2's γ).
    """
    if weighting == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    s = snr(sched, t).astype(jnp.float32)
    if weighting == "min_snr":
        return jnp.minimum(s, gamma) / s
    if weighting == "p2":
        return (p2_k + s) ** (-gamma)
    raise ValueError(f"unknown MSE weighting {weighting!r}; known: {MSE_WEIGHTINGS}")


def training_losses(sched: Schedule, model_output: Array, x_start: Array, noise: Array,
                    t: Array, mse_weight: Array | None = None) -> dict[str, Array]:
    """guided-diffusion's hybrid loss (ε prediction, learned-range σ, RESCALED_MSE).

    The model output [B,H,W,2C] must have been computed at x_t = q_sample(sched, x_start, t, noise)
    (recomputed here). mse = mean (noise − ε)²; vb = vb_terms_bpd with ε held constant
    (stop_gradient, so only v learns from it) times N/1000; loss = w·mse + vb, with the optional
    per-example `mse_weight` w [B] (see `mse_weights`) on the ε term only: the VB term, which
    trains Σ, keeps its own weighting.

    Returns:
        dict(x_t [B,H,W,C], mse [B] (unweighted), vb [B], loss [B]).
    """
    x_t = q_sample(sched, x_start, t, noise)
    eps, v = split_model_output(model_output)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), v], axis=-1)
    vb = vb_terms_bpd(sched, frozen, x_start, x_t, t, clip_denoised=False)
    vb = vb * (sched.num_timesteps / 1000.0)
    mse = mean_flat((noise - eps) ** 2)
    weighted = mse if mse_weight is None else mse * mse_weight
    return {"x_t": x_t, "mse": mse, "vb": vb, "loss": weighted + vb}
