"""Training state (step, params, EMA params, optimizer state) and the optimizer factory."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree, sharded like its params.

    `bad_steps` counts consecutive non-finite steps (they are skipped, not applied).
    """

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    bad_steps: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            bad_steps=jnp.zeros((), jnp.int32),
        )


def learning_rate_schedule(optim: Any) -> optax.Schedule:
    """Linear warm-up to `optim.lr` over `optim.warmup_steps`, then constant or cosine decay."""
    warmup = optax.linear_schedule(0.0, optim.lr, max(int(optim.warmup_steps), 1))
    decay_steps = int(optim.get("decay_steps", 0) or 0)
    if decay_steps:
        after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.get("final_lr_frac", 0.0))
    else:
        after = optax.constant_schedule(optim.lr)
    return optax.join_schedules([warmup, after], [max(int(optim.warmup_steps), 1)])


def make_optimizer(optim: Any) -> optax.GradientTransformation:
    """AdamW with warm-up and global-norm clipping (GLIDE/ADM train with AdamW, no decay)."""
    chain = []
    if optim.get("grad_clip", 0.0):
        chain.append(optax.clip_by_global_norm(optim.grad_clip))
    chain.append(
        optax.adamw(
            learning_rate=learning_rate_schedule(optim),
            b1=optim.get("b1", 0.9),
            b2=optim.get("b2", 0.999),
            eps=optim.get("eps", 1e-8),
            weight_decay=optim.get("weight_decay", 0.0),
        )
    )
    return optax.chain(*chain)


def ema_update(ema: Any, params: Any, rate: float | jax.Array) -> Any:
    """ema <- rate * ema + (1 - rate) * params."""
    return jax.tree.map(lambda e, p: e * rate + p.astype(e.dtype) * (1.0 - rate), ema, params)
