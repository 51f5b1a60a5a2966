"""The GLIDE paper's 1.5B 64->256 upsampler: 384 channels, text width 1024.

    python -m glide_jax.train --config configs/glide_upsample256_1p5b.py --workdir gs://BUCKET/runs/up1p5b

Hardware: a TPU pod slice with FSDP. Runtime/loss: not measured here.
"""
from glide_jax.config import default_config


def get_config():
    c = default_config()
    h = c.model.hparams
    h.kind = "upsample"
    h.image_size = 256
    h.num_channels = 384
    h.num_res_blocks = 2
    h.xf_width = 1024
    h.xf_layers = 16
    h.xf_heads = 16
    h.noise_schedule = "linear"
    h.super_res = True
    c.data.image_size = 256
    c.data.low_res_size = 64
    c.data.batch_size = 512
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.sample.respacing = "fast27"
    c.sample.guidance_scale = 0.0
    return c
