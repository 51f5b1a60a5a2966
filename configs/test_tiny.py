"""The smallest useful text-to-image config, for tests and smoke runs (seconds per step on CPU).

    python -m glide_jax.train --config configs/test_tiny.py --workdir /tmp/tiny

16x16 synthetic shapes (area-downsampled from the 32 px images), 32 channels, one level of
attention, a 32-wide single-layer text transformer over 8 tokens, batch 8.
"""
from glide_jax.config import default_config


def get_config():
    c = default_config()
    h = c.model.hparams
    h.image_size = 16
    h.num_channels = 32
    h.num_res_blocks = 1
    h.channel_mult = "1,2"
    h.num_head_channels = 32
    h.attention_resolutions = "8"
    h.dropout = 0.0
    h.text_ctx = 8
    h.xf_width = 32
    h.xf_layers = 1
    h.xf_heads = 2
    c.data.name = "synthetic_shapes"
    c.data.image_size = 16
    c.data.text_ctx = 8
    c.data.batch_size = 8
    c.data.train_examples = 256
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.train.num_steps = 8
    c.train.ema_rate = 0.9
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.sample_every = 0
    c.train.async_checkpoint = False
    c.sample.prompts = ["a red circle", "a blue square"]
    c.sample.respacing = "4"
    return c
