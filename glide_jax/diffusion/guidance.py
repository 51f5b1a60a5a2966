"""Guidance as composable wrappers around `model_fn(x, t_model) -> [B,H,W,2C]` and helpers for
`cond_fn` / `denoised_fn`; no networks here (text, CLIP and classifier models are closed over by
the caller).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]


def classifier_free(model_fn: ModelFn, scale: float | Array) -> ModelFn:
    """GLIDE classifier-free guidance on a batch of 2n rows (rows :n conditional, n: unconditional).

    The wrapped model runs on [x[:n], x[:n]] (the second half of x is ignored); with ε_c, ε_u its
    two halves, ε_g = ε_u + s·(ε_c − ε_u) goes to channels :C of both halves and channels C: keep
    each half's own v. `scale` may be traced (no retrace per scale).
    """

    def guided(x: Array, t: Array) -> Array:
        n = x.shape[0] // 2
        half = x[:n]
        out = model_fn(jnp.concatenate([half, half], axis=0), t)
        c = out.shape[-1] // 2
        eps, rest = out[..., :c], out[..., c:]
        cond_eps, uncond_eps = eps[:n], eps[n:]
        half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=-1)

    return guided


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
