"""Guidance as composable wrappers around `model_fn(x, t_model) -> [B,H,W,2C]` and helpers for
`cond_fn` / `denoised_fn`; no networks here (text, CLIP and classifier models are closed over by
the caller).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.diffusion import sampling

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]

SCALE_SCHEDULES = ("constant", "linear", "cosine")


def guidance_scale(scale: float | Array, t: Array, schedule: Optional[str] = None,
                   num_train_timesteps: int = 1000) -> Array:
    """The CFG scale at original timesteps t (any shape, float32): s(t) = 1 + (s − 1)·w(u), u = t/(T−1).

    w = 1 ("constant" or None), 2(1 − u) ("linear": no extra guidance at t = T−1, rising linearly
    to twice s − 1 at t = 0) or 1 + cos(πu) ("cosine": the same ends, flat near both). Both ramps
    average 1 over t, so the mean extra guidance s − 1 matches the constant schedule's (the
    increasing schedules of Wang et al. 2024, "Analysis of Classifier-Free Guidance Weight
    Schedulers"). s(t) = 1 is the conditional model alone.
    """
    if schedule in (None, "constant"):
        return jnp.broadcast_to(jnp.asarray(scale, jnp.float32), jnp.shape(t))
    u = jnp.asarray(t).astype(jnp.float32) / float(num_train_timesteps - 1)
    if schedule == "linear":
        w = 2.0 * (1.0 - u)
    elif schedule == "cosine":
        w = 1.0 + jnp.cos(jnp.pi * u)
    else:
        raise ValueError(f"unknown scale_schedule {schedule!r}; expected one of {SCALE_SCHEDULES}")
    return 1.0 + (jnp.asarray(scale, jnp.float32) - 1.0) * w


def _check_interval(interval: Optional[Sequence[int]]) -> Optional[tuple[int, int]]:
    if interval is None:
        return None
    lo, hi = (int(v) for v in interval)
    if lo > hi:
        raise ValueError(f"guidance interval (t_lo, t_hi) needs t_lo <= t_hi, got {tuple(interval)}")
    return lo, hi


def classifier_free(model_fn: ModelFn, scale: float | Array, *,
                    interval: Optional[Sequence[int]] = None, scale_schedule: Optional[str] = None,
                    cond_model_fn: Optional[ModelFn] = None,
                    num_train_timesteps: int = 1000) -> ModelFn:
    """GLIDE classifier-free guidance on a batch of 2n rows (rows :n conditional, n: unconditional).

    The wrapped model runs on [x[:n], x[:n]] (the second half of x is ignored); with ε_c, ε_u its
    two halves, ε_g = ε_u + s·(ε_c − ε_u) goes to channels :C of both halves and channels C: keep
    each half's own v. `scale` may be traced (no retrace per scale).

    Args:
        model_fn: (x [2n,H,W,C], t [2n]) -> [2n,H,W,2C], conditional rows first.
        scale: guidance scale s (1 = conditional only); may be traced.
        interval: (t_lo, t_hi) ORIGINAL timesteps (0..T−1), static: guidance only where
            t_lo <= t <= t_hi (t = t[0]: every row of a sampling batch is at the same step).
            Elsewhere a `lax.cond` runs the model on the n conditional rows only and returns
            that output [n,H,W,2C] for both halves (ε and v), so the unconditional half costs
            nothing there. None: guidance at every t.
        scale_schedule: None / "constant", "linear" or "cosine": s(t) = `guidance_scale`.
        cond_model_fn: the model on the n conditional rows alone, (x [n,H,W,C], t [n]) ->
            [n,H,W,2C], used outside the interval. Default: model_fn itself on n rows, which
            only works when model_fn closes over no per-row inputs; a GLIDE model_fn closes over
            2n rows of text, so pass one that closes over their first n rows.
        num_train_timesteps: T of the scale schedules' u = t/(T−1).

    With interval and scale_schedule both None this is exactly the plain wrapper.
    """
    interval = _check_interval(interval)
    if scale_schedule not in (None,) + SCALE_SCHEDULES:
        raise ValueError(f"unknown scale_schedule {scale_schedule!r}; expected one of {SCALE_SCHEDULES}")
    constant = scale_schedule in (None, "constant")

    def guided_full(x: Array, t: Array) -> Array:
        n = x.shape[0] // 2
        half = x[:n]
        out = model_fn(jnp.concatenate([half, half], axis=0), t)
        c = out.shape[-1] // 2
        eps, rest = out[..., :c], out[..., c:]
        cond_eps, uncond_eps = eps[:n], eps[n:]
        s = scale if constant else guidance_scale(scale, t[0], scale_schedule, num_train_timesteps)
        half_eps = uncond_eps + s * (cond_eps - uncond_eps)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=-1)

    if interval is None:
        return guided_full
    lo, hi = interval
    conditional = model_fn if cond_model_fn is None else cond_model_fn

    def guided(x: Array, t: Array) -> Array:
        n = x.shape[0] // 2

        def cond_only(x, t):
            out = conditional(x[:n], t[:n])
            return jnp.concatenate([out, out], axis=0)

        inside = (t[0] >= lo) & (t[0] <= hi)
        return jax.lax.cond(inside, guided_full, cond_only, x, t)

    return guided


def unconditional_rows(sched, n_cond_rows: int, interval: Optional[Sequence[int]] = None, *,
                       sampler: str = "ddpm", restart: Optional[Sequence[int]] = None) -> int:
    """Unconditional model rows a CFG `sample_loop` run evaluates (host; concrete schedule).

    n_cond_rows·#{evaluations e : t_lo <= t_e <= t_hi} with t_e the original timestep of
    evaluation e (`sampling.model_timesteps`); interval=None counts full CFG
    (n_cond_rows·`sampling.evaluations`). The conditional rows are n_cond_rows·E either way.
    """
    ts = sampling.model_timesteps(sampler, sched, restart=restart)
    interval = _check_interval(interval)
    if interval is None:
        return int(n_cond_rows * ts.shape[0])
    lo, hi = interval
    return int(n_cond_rows * np.count_nonzero((ts >= lo) & (ts <= hi)))


def gradient_cond_fn(score_fn: Callable[[Array, Array], Array],
                     scale: float | Array) -> Callable[[Array, Array], Array]:
    """cond_fn(x, t) = scale·∇_x Σ_b score_fn(x, t)_b, [B,H,W,C].

    score_fn(x [B,H,W,C], t_model [B]) -> [B]: e.g. a classifier's log softmax at the wanted label,
    or CLIP's logit_scale·⟨image_emb(x, t), text_emb⟩ (GLIDE's CLIP guidance).
    """

    def cond_fn(x: Array, t: Array) -> Array:
        return scale * jax.grad(lambda y: jnp.sum(score_fn(y, t)))(x)

    return cond_fn


def inpaint_denoised_fn(image: Array, mask: Array) -> Callable[[Array], Array]:
    """denoised_fn(x̂_0) = x̂_0·(1−m) + image·m: keep the known pixels (m = 1), [B,H,W,C]."""

    def denoised_fn(x0: Array) -> Array:
        return x0 * (1 - mask) + image * mask

    return denoised_fn
