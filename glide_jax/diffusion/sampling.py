"""One `lax.scan` sampling loop; the per-evaluation update is picked by name.

Samplers (each scan iteration makes exactly one model evaluation; `evaluations` counts them):

- "ddpm": ancestral, learned variance (guided-diffusion p_sample). N evaluations.
- "ddim": DDIM with eta (Song et al. 2021). N evaluations.
- "dpm++": DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep ODE solver. N evaluations.
- "sde-dpm++": SDE-DPM-Solver++(2M) (Lu et al. 2022, the stochastic variant; k-diffusion
  `sample_dpmpp_2m_sde` with eta = 1, solver_type="midpoint"). N evaluations.
- "unipc": UniPC (Zhao et al. 2023), order 2, bh2 variant, data prediction (UniP-2 predictor,
  UniC corrector reusing the next evaluation); ODE. N evaluations.
- "restart": Restart sampling (Xu et al. 2023) on the respaced grid: second-order Heun ODE steps
  (2 evaluations per step; Heun's rule in λ for the data-prediction exponential integrator, see
  `_restart_update`), one evaluation for the final x̂_0, and K times: re-noise from i_lo to i_hi
  with q(x_hi | x_lo), then descend i_hi -> i_lo again. 2(N−1) + 1 + 2·K·(i_hi − i_lo)
  evaluations; K = 0 is a deterministic Heun ODE sampler.

All samplers run on a respaced discrete schedule (`schedules.make_schedule`): every evaluation is
at a kept respaced index i (model time `sched.timestep_map[i]`), with α_i = √ᾱ_i, σ_i = √(1−ᾱ_i),
λ_i = log(α_i/σ_i). The multistep samplers take step k at i = N−1−k from x_T at the noisiest kept
timestep; the last evaluation (i = 0) returns x̂_0 for "dpm++", "sde-dpm++", "unipc" and
"restart", and the ddpm/ddim update with no noise for "ddpm" / "ddim". x̂_0 is always
`gaussian.p_mean_variance`'s pred_xstart (so denoised_fn, clipping / thresholding and, through
`condition_score`, cond_fn apply to every sampler); only ddpm uses the variance channels.

`--steps N` (a budget of N model evaluations; one batched CFG call is one evaluation) maps to a
respacing with `timesteps_for`; which spacing suits which sampler is in `SPACINGS`.

The whole loop is meant to be jitted by the caller with `sampler`, `threshold`, `restart` (and the
callables) static; x_T, noise, rng, eta and the Schedule arrays may all be traced.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.diffusion import gaussian as G
from glide_jax.diffusion import schedules
from glide_jax.diffusion.schedules import Schedule

Array = jax.Array
# model_fn(x [B,H,W,C], t_model [B] int32 original timesteps) -> [B,H,W,2C] (ε then v)
ModelFn = Callable[[Array, Array], Array]
DenoisedFn = Optional[Callable[[Array], Array]]

SAMPLERS = ("ddpm", "ddim", "dpm++", "sde-dpm++", "unipc", "restart")
THRESHOLDS = ("none", "clip", "dynamic")

# Time-step selection for `timesteps_for`:
#   "time":   uniform in t, both ends kept (GLIDE's respacing "N"; its kept steps are the same).
#   "lambda": uniform in λ = log(α/σ) from t = T−1 to t = 0 where the integer grid allows
#             (`lambda_uniform_timesteps`).
#   "ddim":   integer stride from t = 0 (respacing "ddimN"; what DDIM used).
#   "auto":   RECOMMENDED_SPACING[sampler].
SPACINGS = ("time", "lambda", "ddim", "auto")
# DPM-Solver's guidance: logSNR-uniform steps for low-resolution pixel-space models (GLIDE's
# 64x64 base), time-uniform for high resolution (pass spacing="time" for the 256x256 upsampler).
# ddpm keeps GLIDE's respacing; ddim its integer stride; restart's default window
# (`default_restart`) is placed for time-uniform steps.
RECOMMENDED_SPACING = {"ddpm": "time", "ddim": "ddim", "dpm++": "lambda", "sde-dpm++": "lambda",
                       "unipc": "lambda", "restart": "time"}


# ---------------------------------------------------------------------------- thresholding


def dynamic_threshold(percentile: float = 0.995) -> Callable[[Array], Array]:
    """Imagen's dynamic thresholding as a denoised_fn: x̂_0 [B,...] -> clip(x̂_0, −s, s)/s per row,
    s = max(quantile_p(|x̂_0|), 1) over each row's elements; the result lies in [−1, 1]."""

    def denoised_fn(x0: Array) -> Array:
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
        return jnp.clip(x0, -s, s) / s

    return denoised_fn


def apply_threshold(threshold: Optional[str], denoised_fn: DenoisedFn, clip_denoised: bool,
                    percentile: float = 0.995) -> tuple[DenoisedFn, bool]:
    """(denoised_fn, clip_denoised) for `gaussian.p_mean_variance` under a threshold mode.

    None keeps (denoised_fn, clip_denoised) as given; "none" = no clipping, "clip" = clip x̂_0 to
    [−1, 1] (clip_denoised=True, the default behaviour), "dynamic" = `dynamic_threshold(percentile)`
    after denoised_fn (and no plain clip).
    """
    if threshold is None:
        return denoised_fn, clip_denoised
    if threshold not in THRESHOLDS:
        raise ValueError(f"unknown threshold {threshold!r}; expected one of {THRESHOLDS}")
    if threshold != "dynamic":
        return denoised_fn, threshold == "clip"
    dyn = dynamic_threshold(percentile)
    if denoised_fn is None:
        return dyn, False
    return (lambda x0: dyn(denoised_fn(x0))), False


# ---------------------------------------------------------------------------- schedules


def default_restart(n: int) -> tuple[int, int, int]:
    """Restart window (i_lo, i_hi, K) for an N-step respaced schedule: respaced indices
    i_lo = ⌊0.1(N−1)⌉, i_hi = ⌊0.3(N−1)⌉ clamped to 1 ≤ i_lo < i_hi ≤ N−1, one restart (K = 1);
    no restart (K = 0) below N = 4. With time-uniform steps that is t ≈ 100..300 of 1000
    (σ/α ≈ 0.17..0.52 on the cosine schedule, ≈ 0.34..1.24 on the linear one)."""
    if n < 4:
        return (0, 0, 0)
    lo = max(1, int(np.floor(0.1 * (n - 1) + 0.5)))
    hi = min(n - 1, max(lo + 1, int(np.floor(0.3 * (n - 1) + 0.5))))
    return (lo, hi, 1)


def restart_window(sched: Schedule, t_lo: int, t_hi: int, k: int = 1) -> tuple[int, int, int]:
    """`sample_loop`'s restart=(i_lo, i_hi, K) for a window given in ORIGINAL timesteps: the kept
    timesteps nearest t_lo and t_hi (i_hi > i_lo); host, needs a concrete schedule."""
    tmap = np.asarray(sched.timestep_map)
    lo = int(np.argmin(np.abs(tmap - t_lo)))
    hi = max(int(np.argmin(np.abs(tmap - t_hi))), lo + 1)
    return _check_restart((lo, hi, k), sched.num_timesteps)


def _check_restart(restart: Optional[Sequence[int]], n: int) -> tuple[int, int, int]:
    if restart is None:
        return default_restart(n)
    lo, hi, k = (int(v) for v in restart)
    if k < 0 or (k > 0 and not 0 <= lo < hi <= n - 1):
        raise ValueError(f"restart=(i_lo, i_hi, K) needs 0 <= i_lo < i_hi <= N-1 = {n - 1} and "
                         f"K >= 0, got {tuple(restart)}")
    return (lo, hi, k)


def _restart_plan(n: int, restart: tuple[int, int, int]) -> np.ndarray:
    """int32 [E, 3] rows (respaced index, stage, jump) for the restart sampler.

    stage 0: Euler (DDIM) predictor from i to i−1; stage 1: Heun corrector at i−1 (the point the
    predictor reached); stage 2: x̂_0 at i = 0. jump = 1 after a corrector that lands on i_lo and
    is followed by a restart: x is re-noised from i_lo to i_hi and the steps i_hi -> i_lo rerun.
    """
    lo, hi, k = restart
    rows: list[list[int]] = []

    def descend(start: int, stop: int) -> None:
        for i in range(start, stop, -1):
            rows.extend([[i, 0, 0], [i - 1, 1, 0]])

    if k:
        descend(n - 1, lo)
        for _ in range(k):
            rows[-1][2] = 1
            descend(hi, lo)
        descend(lo, 0)
    else:
        descend(n - 1, 0)
    rows.append([0, 2, 0])
    return np.asarray(rows, np.int32)


def evaluation_indices(sampler: str, n: int, *, restart: Optional[Sequence[int]] = None) -> np.ndarray:
    """Respaced index of every model evaluation of an N-step run, in order, int32 [E]."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    if sampler == "restart":
        return _restart_plan(n, _check_restart(restart, n))[:, 0]
    return np.arange(n - 1, -1, -1, dtype=np.int32)


def evaluations(sampler: str, sched: Schedule | int, *,
                restart: Optional[Sequence[int]] = None) -> int:
    """Number of model evaluations E a `sample_loop` run on `sched` (or N steps) makes.

    N for ddpm / ddim / dpm++ / sde-dpm++ / unipc; 2(N−1) + 1 + 2·K·(i_hi − i_lo) for restart.
    """
    n = sched if isinstance(sched, int) else sched.num_timesteps
    return int(evaluation_indices(sampler, n, restart=restart).shape[0])


def model_timesteps(sampler: str, sched: Schedule, *,
                    restart: Optional[Sequence[int]] = None) -> np.ndarray:
    """Original timestep (0..T−1) the model is called with at every evaluation, int64 [E] (host;
    needs a concrete schedule)."""
    idx = evaluation_indices(sampler, sched.num_timesteps, restart=restart)
    return np.asarray(sched.timestep_map).astype(np.int64)[idx]


def steps_for(sampler: str, nfe: int) -> int:
    """Largest number of kept timesteps N whose run makes at most `nfe` evaluations (N = nfe for
    the one-evaluation-per-step samplers; restart with `default_restart(N)`)."""
    if nfe < 1:
        raise ValueError(f"need at least one model evaluation, got {nfe}")
    if sampler != "restart":
        evaluation_indices(sampler, 1)  # validates the name
        return int(nfe)
    n = 1
    while evaluations(sampler, n + 1) <= nfe:
        n += 1
    return n


def lambda_uniform_timesteps(noise_schedule: str, num_train_timesteps: int, n: int) -> list[int]:
    """N distinct original timesteps, ascending, from t = 0 to T−1, uniform in λ = ½·log(ᾱ/(1−ᾱ))
    where the integer grid allows (float64 on the host).

    Greedy from t = T−1: each next timestep is the one whose λ is nearest to
    λ_cur + (λ(0) − λ_cur)/m (m = timesteps still to place, the last being t = 0), kept below the
    current one with room for the rest. Where one integer step spans more λ than that (the first
    few steps below T−1 of the cosine schedule, whose β is capped at 0.999) consecutive timesteps
    are kept and the remaining λ range is split evenly over the remaining steps.
    """
    t_max = num_train_timesteps - 1
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"cannot keep {n} of {num_train_timesteps} timesteps")
    betas = schedules.get_named_beta_schedule(noise_schedule, num_train_timesteps)
    abar = np.cumprod(1.0 - betas)
    lam = 0.5 * (np.log(abar) - np.log1p(-abar))  # decreasing in t
    grid_t = np.arange(t_max, -1, -1, dtype=np.float64)  # t for ascending λ
    ts, cur = [t_max], t_max
    for k in range(1, n):
        remaining = n - k
        target = lam[cur] + (lam[0] - lam[cur]) / remaining
        t = int(np.rint(np.interp(target, lam[::-1], grid_t)))
        cur = int(np.clip(t, remaining - 1, cur - 1)) if remaining > 1 else 0
        ts.append(cur)
    return sorted(ts)


def respacing_from_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> str:
    """A `schedules.space_timesteps` string that keeps exactly `timesteps`: one section per
    original timestep, count 1 where kept and 0 elsewhere ("0,1,0,...", T entries)."""
    keep = set(int(t) for t in timesteps)
    if not keep or min(keep) < 0 or max(keep) >= num_train_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {sorted(keep)}")
    return ",".join("1" if t in keep else "0" for t in range(num_train_timesteps))


def timesteps_for(sampler: str, nfe: int, num_train_timesteps: int = 1000, spacing: str = "auto",
                  *, noise_schedule: str = "squaredcos_cap_v2") -> str:
    """`--steps nfe` -> a respacing string for `schedules.make_schedule(noise_schedule, T, ·)`.

    The schedule keeps N = `steps_for(sampler, nfe)` timesteps: N = nfe for ddpm / ddim / dpm++ /
    sde-dpm++ / unipc (exactly nfe evaluations), the largest N with at most nfe evaluations for
    restart (`evaluations` gives the exact count). spacing: one of SPACINGS ("time" -> "N",
    "ddim" -> "ddimN", "lambda" -> `respacing_from_timesteps(lambda_uniform_timesteps(...))`,
    "auto" -> RECOMMENDED_SPACING[sampler]); noise_schedule is only read for "lambda".
    """
    n = steps_for(sampler, nfe)
    if spacing == "auto":
        spacing = RECOMMENDED_SPACING[sampler]
    if spacing == "time":
        return str(n)
    if spacing == "ddim":
        respacing = f"ddim{n}"
        schedules.space_timesteps(num_train_timesteps, respacing)  # raises if no stride gives N
        return respacing
    if spacing == "lambda":
        ts = lambda_uniform_timesteps(noise_schedule, num_train_timesteps, n)
        return respacing_from_timesteps(ts, num_train_timesteps)
    raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")


# ---------------------------------------------------------------------------- steps


def _denoise(sched: Schedule, model_output: Array, x: Array, t: Array, *,
             clip_denoised: bool, denoised_fn, cond_fn) -> Array:
    """x̂_0 [B,H,W,C]: p_mean_variance's pred_xstart, score-shifted by cond_fn when given."""
    out = G.p_mean_variance(sched, model_output, x, t, clip_denoised, denoised_fn)
    if cond_fn is not None:
        out = G.condition_score(sched, out, x, t, cond_fn(x, sched.timestep_map[t]))
    return out["pred_xstart"]


def _lambda(sched: Schedule) -> Array:
    """λ_i = log(α_i/σ_i) = log √ᾱ_i − ½·log(1−ᾱ_i), [N]."""
    return jnp.log(sched.sqrt_alphas_cumprod) - 0.5 * sched.log_one_minus_alphas_cumprod


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


def _sde_dpmpp_2m_step(sched: Schedule, model_output: Array, x: Array, t: Array, x0_prev: Array,
                       noise: Array, **kw) -> tuple[Array, Array]:
    """SDE-DPM-Solver++(2M), midpoint correction, from respaced index i = t to i−1 (x̂_0 at i = 0).

    h = λ_{i−1} − λ_i, r = h_{i+1}/h, D = x̂_0 + (x̂_0 − x̂_0_prev)/(2r) (D = x̂_0 at the first step):
    x_{i−1} = (σ_{i−1}/σ_i)·e^{−h}·x + α_{i−1}·(1 − e^{−2h})·D + σ_{i−1}·√(1 − e^{−2h})·noise.
    (First order this is the DDPM posterior mean with variance β̃.) noise [B,H,W,C].
    Returns (x_{i−1}, x̂_0) [B,H,W,C] each.
    """
    x0 = _denoise(sched, model_output, x, t, **kw)
    n = sched.num_timesteps
    lam = _lambda(sched)
    i = t[0]
    prev, nxt = jnp.maximum(i - 1, 0), jnp.minimum(i + 1, n - 1)
    h = lam[prev] - lam[i]
    h_last = lam[i] - lam[nxt]
    first = i == n - 1
    half_inv_r = jnp.where(first, 0.0, 0.5 * h / jnp.where(first, 1.0, h_last))
    d = x0 + half_inv_r * (x0 - x0_prev)
    one_minus = -jnp.expm1(-2.0 * h)  # 1 − e^{−2h}
    sigma_prev = sched.sqrt_one_minus_alphas_cumprod[prev]
    decay = sigma_prev / sched.sqrt_one_minus_alphas_cumprod[i] * jnp.exp(-h)
    x_next = (decay * x + sched.sqrt_alphas_cumprod[prev] * one_minus * d
              + sigma_prev * jnp.sqrt(one_minus) * noise)
    return jnp.where(i == 0, x0, x_next), x0


def _phi23(z: Array) -> tuple[Array, Array]:
    """φ₂(z) = (e^z − 1 − z)/z², φ₃(z) = (e^z − 1 − z − z²/2)/z³ (Taylor series for |z| < 1)."""
    small = jnp.abs(z) < 1.0
    zs = jnp.where(small, 1.0, z)
    e = jnp.expm1(zs)
    phi2_direct = (e - zs) / zs**2
    phi3_direct = (e - zs - 0.5 * zs**2) / zs**3
    phi2_series, phi3_series, term = jnp.zeros_like(z), jnp.zeros_like(z), jnp.ones_like(z)
    fact2, fact3 = 2.0, 6.0  # (k+2)!, (k+3)! at k = 0
    for k in range(12):
        phi2_series = phi2_series + term / fact2
        phi3_series = phi3_series + term / fact3
        term = term * z
        fact2 *= k + 3
        fact3 *= k + 4
    return jnp.where(small, phi2_series, phi2_direct), jnp.where(small, phi3_series, phi3_direct)


def _unipc_bh2_step(sched: Schedule, model_output: Array, x: Array, t: Array,
                    state: tuple[Array, Array, Array], **kw) -> tuple[Array, tuple[Array, Array, Array]]:
    """UniPC-2 (bh2, data prediction) at respaced index i = t: UniC then UniP to i−1 (x̂_0 at i = 0).

    x is UniP's prediction of x_i; state = (x^c_{i+1}, m_{i+1}, m_{i+2}) with m = x̂_0 and x^c the
    corrected points. With h = λ_i − λ_{i+1}, B(h) = e^{−h} − 1, r = (λ_{i+2} − λ_{i+1})/h:
    UniC: x^c_i = (σ_i/σ_{i+1})·x^c_{i+1} − α_i·B(h)·m_{i+1} − α_i·B(h)·(ρ₀·(m_{i+2} − m_{i+1})/r
          + ρ₁·(m_i − m_{i+1})), ρ solving [[1, 1], [r, 1]]·ρ = b, b_k = k!·(−h)·φ_{k+1}(−h)/B(h)
          (order 1, ρ₁ = ½, at the second evaluation; none at the first);
    UniP (ρ = ½, identical to DPM-Solver++(2M)) from x^c_i with m_i, m_{i+1}.
    Returns (x_{i−1}, new state), [B,H,W,C] each.
    """
    x_last, m1, m2 = state
    m = _denoise(sched, model_output, x, t, **kw)
    n = sched.num_timesteps
    lam = _lambda(sched)
    sa, ss = sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod
    i = t[0]
    k = n - 1 - i  # evaluations made before this one
    prev, ip1, ip2 = jnp.maximum(i - 1, 0), jnp.minimum(i + 1, n - 1), jnp.minimum(i + 2, n - 1)

    # UniC: correct x_i with m_i (from x^c_{i+1}, m_{i+1}, m_{i+2}).
    h_c = jnp.where(k >= 1, lam[i] - lam[ip1], 1.0)
    hh = -h_c
    b_h = jnp.expm1(hh)
    phi2, phi3 = _phi23(hh)
    b1 = hh * phi2 / b_h
    b2 = 2.0 * hh * phi3 / b_h
    r_c = jnp.where(k >= 2, (lam[ip2] - lam[ip1]) / h_c, -1.0)
    rho0 = jnp.where(k >= 2, (b1 - b2) / (1.0 - r_c), 0.0)
    rho1 = jnp.where(k >= 2, (b2 - r_c * b1) / (1.0 - r_c), 0.5)
    base = ss[i] / ss[ip1] * x_last - sa[i] * b_h * m1
    x_c = base - sa[i] * b_h * (rho0 * (m2 - m1) / r_c + rho1 * (m - m1))
    x_c = jnp.where(k >= 1, x_c, x)

    # UniP-2 (bh2): x_{i−1} from x^c_i.
    h = lam[prev] - lam[i]
    h_last = lam[i] - lam[ip1]
    half_inv_r = jnp.where(k >= 1, 0.5 * h / jnp.where(k >= 1, h_last, 1.0), 0.0)
    d = m + half_inv_r * (m - m1)
    x_next = ss[prev] / ss[i] * x_c - sa[prev] * jnp.expm1(-h) * d
    return jnp.where(i == 0, m, x_next), (x_c, m, m1)


def _restart_update(sched: Schedule, model_output: Array, x: Array, t: Array, plan: Array,
                    saved: tuple[Array, Array], noise: Optional[Array], restart: tuple[int, int, int],
                    **kw) -> tuple[Array, tuple[Array, Array]]:
    """One evaluation of the restart sampler at respaced index j = t (plan = (j, stage, jump)).

    ODE steps i -> i−1 use Heun's rule for the data-prediction exponential integrator
    x_{i−1} = (σ_{i−1}/σ_i)·x_i + σ_{i−1}·∫ e^λ x̂_0(λ) dλ, h = λ_{i−1} − λ_i:
    stage 0 at i (Euler = DDIM, x̂_0 held at m_i): x_{i−1} = (σ_{i−1}/σ_i)·x_i − α_{i−1}·expm1(−h)·m_i,
    saving (x_i, m_i); stage 1 at j = i−1 (x̂_0 linear in λ from m_i to m_j):
    x_j = (σ_j/σ_i)·x_i − α_j·expm1(−h)·m_i + α_j·h·φ₂(−h)·(m_j − m_i), then if jump (j = i_lo)
    re-noised by q(x_hi | x_lo): x ← (α_hi/α_lo)·x + √(1 − ᾱ_hi/ᾱ_lo)·noise; stage 2 at j = 0:
    x̂_0. (EDM's Heun step in s = σ/α, the paper's choice, is unstable on this grid: s at t = T−1 of
    the cosine schedule is ~2e4.) saved = (x_i, m_i) [B,H,W,C] each. Returns (new x, new saved).
    """
    x0 = _denoise(sched, model_output, x, t, **kw)
    n = sched.num_timesteps
    lam = _lambda(sched)
    sa, ss = sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod
    j, stage, jump = plan[0], plan[1], plan[2]
    below, above = jnp.maximum(j - 1, 0), jnp.minimum(j + 1, n - 1)
    h_pred = lam[below] - lam[j]
    euler = ss[below] / ss[j] * x - sa[below] * jnp.expm1(-h_pred) * x0
    x_i, m_i = saved
    h = jnp.where(stage == 1, lam[j] - lam[above], 1.0)
    phi2, _ = _phi23(-h)
    heun = (ss[j] / ss[above] * x_i - sa[j] * jnp.expm1(-h) * m_i
            + sa[j] * h * phi2 * (x0 - m_i))
    lo, hi, k = restart
    if k:
        log_ratio = jnp.log(sa[hi]) - jnp.log(sa[lo])
        renoised = jnp.exp(log_ratio) * heun + jnp.sqrt(-jnp.expm1(2.0 * log_ratio)) * noise
        heun = jnp.where(jump == 1, renoised, heun)
    x_new = jnp.where(stage == 0, euler, jnp.where(stage == 1, heun, x0))
    keep = stage == 0
    return x_new, (jnp.where(keep, x, x_i), jnp.where(keep, x0, m_i))


def sample_loop(model_fn: ModelFn, sched: Schedule, x_T: Array, *, sampler: str = "ddpm",
                eta: float | Array = 0.0, rng: Optional[Array] = None,
                noise: Optional[Array] = None,
                clip_denoised: bool = True, denoised_fn: Optional[Callable[[Array], Array]] = None,
                cond_fn: Optional[Callable[[Array, Array], Array]] = None,
                return_all: bool = False, threshold: Optional[str] = None,
                threshold_percentile: float = 0.995,
                restart: Optional[Sequence[int]] = None) -> Array | tuple[Array, Array]:
    """Run the reverse process from x_T: E = `evaluations(sampler, sched)` model evaluations.

    Args:
        model_fn: (x [B,H,W,C], t_model [B] int32) -> [B,H,W,2C]; t_model = sched.timestep_map[i].
        sched: respaced Schedule (N = sched.num_timesteps kept timesteps).
        x_T: [B,H,W,C] starting sample (already multiplied by any temperature).
        sampler: one of SAMPLERS (static).
        eta: DDIM noise scale (0 = deterministic); may be traced.
        rng: PRNG key; evaluation e uses normal(fold_in(rng, e)). Unused when `noise` is given.
        noise: optional [E,B,H,W,C] per-evaluation standard-normal noise (E = N except for
            restart; for the multistep samplers entry k is used at index N−1−k; restart uses
            entry e only where it re-noises).
        clip_denoised: clip x̂_0 to [−1, 1] (after denoised_fn).
        denoised_fn: x̂_0 -> x̂_0 applied before clipping (e.g. inpainting).
        cond_fn: (x, t_model) -> ∇_x log p(y|x); mean shift for ddpm, score shift for the others.
        return_all: also return the sample after every evaluation.
        threshold: None (use clip_denoised) or one of THRESHOLDS, overriding clip_denoised
            ("clip" is clip_denoised=True, "dynamic" is `dynamic_threshold(threshold_percentile)`).
        threshold_percentile: p of dynamic thresholding (static).
        restart: (i_lo, i_hi, K) respaced indices and restart count for sampler="restart"
            (static; default `default_restart(N)`; K = 0 is EDM's deterministic Heun sampler).

    Returns:
        the final sample [B,H,W,C], or (final, samples [E,B,H,W,C]) with return_all.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    n = sched.num_timesteps
    denoised_fn, clip_denoised = apply_threshold(threshold, denoised_fn, clip_denoised,
                                                 threshold_percentile)
    plan = None
    if sampler == "restart":
        restart = _check_restart(restart, n)
        plan = jnp.asarray(_restart_plan(n, restart))
    num_evals = n if plan is None else int(plan.shape[0])
    deterministic_ddim = sampler == "ddim" and isinstance(eta, (int, float)) and eta == 0
    stochastic = (sampler in ("ddpm", "sde-dpm++") or (sampler == "ddim" and not deterministic_ddim)
                  or (sampler == "restart" and restart[2] > 0))
    if noise is None and rng is None and stochastic:
        raise ValueError(f"sampler {sampler!r} with eta={eta!r} needs `rng` or explicit `noise`")
    if noise is not None and noise.shape != (num_evals,) + x_T.shape:
        raise ValueError(f"noise must have shape {(num_evals,) + x_T.shape}, got {noise.shape}")
    batch = x_T.shape[0]
    kw = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn)

    def step(carry, xs):
        x, aux = carry
        k, step_plan, step_noise = xs
        i = n - 1 - k if step_plan is None else step_plan[0]
        t = jnp.full((batch,), i, jnp.int32)
        model_output = model_fn(x, sched.timestep_map[t])
        if step_noise is None and stochastic:
            step_noise = jax.random.normal(jax.random.fold_in(rng, k), x.shape, x.dtype)
        if sampler == "ddpm":
            x = G.ddpm_step(sched, model_output, x, t, step_noise, **kw)["sample"]
        elif sampler == "ddim":
            x = G.ddim_step(sched, model_output, x, t, step_noise, eta=eta, **kw)["sample"]
        elif sampler == "dpm++":
            x, aux = _dpmpp_2m_step(sched, model_output, x, t, aux, **kw)
        elif sampler == "sde-dpm++":
            x, aux = _sde_dpmpp_2m_step(sched, model_output, x, t, aux, step_noise, **kw)
        elif sampler == "unipc":
            x, aux = _unipc_bh2_step(sched, model_output, x, t, aux, **kw)
        else:
            x, aux = _restart_update(sched, model_output, x, t, step_plan, aux, step_noise,
                                     restart, **kw)
        return (x, aux), x

    xs = (jnp.arange(num_evals, dtype=jnp.int32), plan, noise)
    zeros = jnp.zeros_like(x_T)
    # carried state: previous x̂_0 (dpm++, sde-dpm++); (x^c_{i+1}, m_{i+1}, m_{i+2}) (unipc);
    # the Heun step's start (x_i, m_i) (restart).
    aux = {"dpm++": zeros, "sde-dpm++": zeros, "unipc": (zeros, zeros, zeros),
           "restart": (zeros, zeros)}.get(sampler)
    (x, _), all_samples = jax.lax.scan(step, (x_T, aux), xs)
    return (x, all_samples) if return_all else x
