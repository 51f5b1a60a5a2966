"""The one pure training step: `train_step(state, batch, rng) -> (state, metrics)`.

Bound with `functools.partial` to the model, schedule, optimizer and config, then jitted with
in/out shardings and the state donated (see `glide_jax.train`). The same step serves every
model kind; only the loss function differs (`glide_jax.losses`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from glide_jax.train_state import TrainState, ema_update


def drop_captions(batch: dict, rng: jax.Array, p: float | jax.Array, pad_id: int) -> tuple[dict, jax.Array]:
    """Replaces each caption by the empty caption with probability p (classifier-free guidance).

    The empty caption is all `pad_id` tokens with an all-False mask, exactly what sampling feeds
    as the unconditional input. Returns the new batch and the [B] bool drop indicator.
    """
    if "tokens" not in batch:
        return batch, jnp.zeros((), bool)
    b = batch["tokens"].shape[0]
    drop = jax.random.bernoulli(rng, p, (b,))
    out = dict(batch)
    out["tokens"] = jnp.where(drop[:, None], jnp.asarray(pad_id, batch["tokens"].dtype), batch["tokens"])
    out["mask"] = jnp.logical_and(batch["mask"], ~drop[:, None])
    return out, drop


def ema_rate_at(step: jax.Array, ema_rate: float, warmup: bool) -> jax.Array:
    """The EMA rate used at `step`: `ema_rate`, or with warm-up min(ema_rate, (1+step)/(10+step))."""
    rate = jnp.asarray(ema_rate, jnp.float32)
    if not warmup:
        return rate
    s = step.astype(jnp.float32)
    return jnp.minimum(rate, (1.0 + s) / (10.0 + s))


def _split_micro(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...] taking strided rows, so each micro-batch spans every device."""

    def one(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"batch {b} is not divisible by micro_batches={n}")
        return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def train_step(
    state: TrainState,
    batch: dict,
    rng: jax.Array,
    *,
    loss_fn,
    model,
    sched,
    tx: optax.GradientTransformation,
    lr_fn,
    cond_drop: float,
    pad_id: int,
    ema_rate: float,
    micro_batches: int = 1,
    ema_warmup: bool = False,
    grad_shardings: Any = None,
) -> tuple[TrainState, dict]:
    """One optimizer step (forward + backward over micro-batches, AdamW, EMA).

    Args:
      state: current TrainState.
      batch: dict of global arrays, leading axis = global batch B (image [B,S,S,3] in [-1,1],
        tokens [B,L] int32, mask [B,L] bool, optional low_res / inpaint_* / label).
      rng: the run's base key; the step key is fold_in(rng, state.step).
      ema_warmup: use min(ema_rate, (1 + step) / (10 + step)) as the EMA rate.
      grad_shardings: the params' shardings, to pin the gradients to (None: left to the
        partitioner). Without it a ZeRO-1 update (optimizer state split over `data`) pulls its
        split layout back into the weight-gradient convolutions (more traffic, more collectives).
    Returns:
      (new state, metrics). A step whose loss or gradients are not finite is not applied:
      params, EMA and optimizer state stay as they were and `bad_steps` counts up.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    drop_rng, loss_rng = jax.random.split(step_rng)
    batch, dropped = drop_captions(batch, drop_rng, cond_drop, pad_id)

    def micro_grads(params, micro, r):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, micro, r, model=model, sched=sched
        )
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return grads, metrics

    if micro_batches == 1:
        grads, metrics = micro_grads(state.params, batch, loss_rng)
    else:
        micros = _split_micro(batch, micro_batches)
        rngs = jax.random.split(loss_rng, micro_batches)
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def body(acc, xs):
            micro, r = xs
            g, m = micro_grads(state.params, micro, r)
            return jax.tree.map(jnp.add, acc, g), m

        grads, metrics = jax.lax.scan(body, zeros, (micros, rngs))
        grads = jax.tree.map(lambda g: g / micro_batches, grads)
        metrics = jax.tree.map(lambda m: jnp.mean(m, 0), metrics)
        # quartile sums/counts add up across micro-batches rather than average
        metrics = {k: (v * micro_batches if k.endswith(("_sum", "_count")) else v) for k, v in metrics.items()}

    rate = ema_rate_at(state.step, ema_rate, ema_warmup)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(metrics["loss"])

    def apply(grads, params, opt_state, ema_params):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, ema_update(ema_params, params, rate)

    def skip(grads, params, opt_state, ema_params):
        return params, opt_state, ema_params

    # a conditional, not a select over the whole state: a skipped step costs nothing and an
    # applied one updates the (donated) state buffers in place
    params, opt_state, ema_params = jax.lax.cond(
        finite, apply, skip, grads, state.params, state.opt_state, state.ema_params)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        ema_params=ema_params,
        opt_state=opt_state,
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
    )
    metrics = dict(metrics)
    metrics.update(
        grad_norm=grad_norm,
        lr=lr_fn(state.step),
        finite=finite.astype(jnp.float32),
        cond_drop_frac=jnp.mean(dropped.astype(jnp.float32)),
        ema_rate=rate,
    )
    return new_state, metrics
