"""Text-conditioned 4x upsampler of the demo (16 -> 64 px) on the same synthetic-shapes renders.

    python -m glide_jax.train --config shapes_upsample --workdir runs/miniature/upsample

GLIDE's second stage at miniature scale: the shapes_tiny text encoder (imported, so it follows
that config) conditions a 64 px UNet (32 channels at 64/32/16/8 px, attention at 8 px) on the
caption and on the 16 px image, which the pipeline makes by area-downsampling the 64 px render
and adding N(0, 0.05^2) in [-1, 1] units (`data.noise_aug_std`, GLIDE's low-resolution noise
augmentation: sampling feeds an 8-bit base sample with no noise, and the augmentation teaches
the model not to copy the low-resolution input's imperfections). Linear noise schedule, as
GLIDE's upsampler; sampled with fast27, temperature 0.997 (`glide_jax.sample.upsample_images`).
Data, optimizer and training settings are shapes_tiny's, with a smaller batch, its own step
count and GLIDE's uniform loss weighting. Hardware: 2 CPU cores, 0.32 s/step at batch 8 (3000
steps ~16 min; ~1.5x beside another job); loss ~0.003-0.01 by step 1500. After 1800 steps the
reverse process from pure noise still drifts in colour (the lowest signal-to-noise steps are
learned last), so the miniature also samples it from t = 500 (`sample.upsample_images(start_t=500)`).
"""
from glide_jax.config import default_config
from glide_jax.configs import shapes_tiny

FACTOR = 4
TEXT_KEYS = ("text_ctx", "xf_width", "xf_layers", "xf_heads", "num_channels", "num_head_channels", "dropout")


def get_config():
    base = shapes_tiny.get_config()
    c = default_config("upsample")
    h = c.model.hparams
    for key in TEXT_KEYS:
        h[key] = base.model.hparams[key]
    h.image_size = FACTOR * base.model.hparams.image_size
    h.num_res_blocks = 1
    h.channel_mult = "1,1,2,2"  # 64, 32, 16, 8 px
    h.attention_resolutions = "8"
    c.data = base.data.copy_and_resolve_references()
    c.data.low_res_size = base.model.hparams.image_size
    c.data.noise_aug_std = 0.05
    c.data.batch_size = 8
    c.optim = base.optim.copy_and_resolve_references()
    c.train = base.train.copy_and_resolve_references()
    c.train.num_steps = 3000
    # GLIDE's uniform ε-MSE: Min-SNR (shapes_tiny's) down-weights the low-noise steps that remove
    # the last faint noise, which an upsampler's flat backgrounds show (300 more steps with it off
    # took pixel-KID to real renders from 0.046 to 0.033, glide_jax/miniature.py)
    c.train.mse_weighting = "uniform"
    c.sample = base.sample.copy_and_resolve_references()
    c.sample.respacing = "fast27"
    c.sample.guidance_scale = 0.0
    return c
