"""The smallest useful text-to-image config, for tests and smoke runs (seconds per step on CPU).

    python -m glide_jax.train --config configs/test_tiny.py --workdir /tmp/tiny

shapes_tiny shrunk: a 32-wide single-layer text transformer over 8 tokens, batch 8, 8 steps,
synchronous checkpoints every 4 steps. Hardware: any CPU; ~20 s init + ~40 s compile here.
"""
from glide_jax.configs import shapes_tiny


def get_config():
    c = shapes_tiny.get_config()
    h = c.model.hparams
    h.text_ctx = 8
    h.xf_width = 32
    h.xf_layers = 1
    h.xf_heads = 2
    c.data.batch_size = 8
    c.data.train_examples = 256
    c.optim.warmup_steps = 10
    c.train.num_steps = 8
    c.train.ema_rate = 0.9
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.async_checkpoint = False
    c.sample.prompts = ["a red circle", "a blue square"]
    c.sample.respacing = "4"
    return c
