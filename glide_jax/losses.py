"""Loss functions of every model kind, one signature so that one train step serves them all.

    loss_fn(params, batch, rng, *, model, sched) -> (loss scalar, metrics dict)

`batch` holds per-example arrays with a leading batch axis; the text fields (`tokens`, `mask`)
are already caption-dropped by the train step.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from glide_jax.diffusion import gaussian
from glide_jax.models.clip import clip_contrastive_loss

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def timestep_quartile_means(per_example: jax.Array, t: jax.Array, num_timesteps: int) -> dict[str, jax.Array]:
    """Mean of a [B] quantity in each quarter of the timestep range (NaN-free: empty -> 0, count kept)."""
    q = jnp.clip((t * 4) // num_timesteps, 0, 3)
    out = {}
    for i in range(4):
        sel = (q == i).astype(jnp.float32)
        out[f"loss_q{i}_sum"] = jnp.sum(per_example * sel)
        out[f"loss_q{i}_count"] = jnp.sum(sel)
    return out


def diffusion_loss(params, batch, rng, *, model, sched, mse_weighting: str = "uniform",
                   gamma: float = 5.0) -> tuple[jax.Array, dict]:
    """GLIDE's hybrid loss (ε-MSE + VB for the learned Σ) at uniform timesteps.

    `mse_weighting` / `gamma` weight the ε-MSE term per timestep (`gaussian.mse_weights`;
    "uniform" is GLIDE's loss); the VB term is never reweighted.
    """
    x0 = batch["image"]
    b = x0.shape[0]
    t_rng, n_rng, d_rng = jax.random.split(rng, 3)
    num_t = sched.betas.shape[0]
    t = jax.random.randint(t_rng, (b,), 0, num_t)
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
    x_t = gaussian.q_sample(sched, x0, t, noise)
    kwargs = {}
    for key in ("low_res", "inpaint_image", "inpaint_mask"):
        if key in batch:
            kwargs[key] = batch[key]
    out = model.apply(
        {"params": params}, x_t, sched.timestep_map[t], batch["tokens"], batch["mask"],
        train=True, rngs={"dropout": d_rng}, **kwargs,
    ).astype(jnp.float32)
    weight = None if mse_weighting == "uniform" else gaussian.mse_weights(sched, t, mse_weighting, gamma=gamma)
    terms = gaussian.training_losses(sched, out, x0, noise, t, weight)
    loss = jnp.mean(terms["loss"])
    metrics = {"loss": loss, "mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"])}
    metrics.update(timestep_quartile_means(terms["loss"], t, num_t))
    return loss, metrics


def noised_images(sched, x0: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_t = q_sample(x0, t, ε), t) with t uniform over the schedule; x0 [B,H,W,C], t [B]."""
    t_rng, n_rng = jax.random.split(rng)
    t = jax.random.randint(t_rng, (x0.shape[0],), 0, sched.betas.shape[0])
    return gaussian.q_sample(sched, x0, t, jax.random.normal(n_rng, x0.shape, jnp.float32)), t


def classifier_loss(params, batch, rng, *, model, sched) -> tuple[jax.Array, dict]:
    """Noisy-classifier cross-entropy on q_sample(x0, t), t uniform (ADM classifier training)."""
    x_t, t = noised_images(sched, batch["image"], rng)
    num_t = sched.betas.shape[0]
    logits = model.apply({"params": params}, x_t, sched.timestep_map[t]).astype(jnp.float32)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    loss = jnp.mean(per_example)
    acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    metrics = {"loss": loss, "accuracy": acc}
    metrics.update(timestep_quartile_means(per_example, t, num_t))
    return loss, metrics


def clip_loss(params, batch, rng, *, model, sched) -> tuple[jax.Array, dict]:
    """Noised-CLIP symmetric contrastive loss between noisy images and their captions."""
    x_t, t = noised_images(sched, batch["image"], rng)
    lens = jnp.sum(batch["mask"].astype(jnp.int32), axis=-1)
    variables = {"params": params}
    image_emb = model.apply(variables, x_t, sched.timestep_map[t], method="image_embeddings")
    text_emb = model.apply(variables, batch["tokens"], lens, method="text_embeddings")
    loss = clip_contrastive_loss(image_emb.astype(jnp.float32), text_emb.astype(jnp.float32),
                                 model.config.logit_scale)
    return loss, {"loss": loss}


LOSSES: dict[str, LossFn] = {
    "base": diffusion_loss,
    "upsample": diffusion_loss,
    "base-inpaint": diffusion_loss,
    "upsample-inpaint": diffusion_loss,
    "classifier": classifier_loss,
    "clip": clip_loss,
}


def loss_for_kind(kind: str) -> LossFn:
    if kind not in LOSSES:
        raise ValueError(f"no loss for model kind {kind!r}; known: {sorted(LOSSES)}")
    return LOSSES[kind]
