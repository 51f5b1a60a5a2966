"""The GLIDE paper's 1.5B 64->256 upsampler: the released upsampler widened to 384 channels,
text width 1024.

    python -m glide_jax.train --config configs/glide_upsample256_1p5b.py --workdir gs://BUCKET/runs/up1p5b

Hardware: a TPU pod slice with FSDP (`python -m glide_jax.plan` tells what fits).
Runtime/loss: not measured here (no TPU).
"""
from glide_jax.configs import glide_filtered_upsample256


def get_config():
    c = glide_filtered_upsample256.get_config()
    h = c.model.hparams
    h.num_channels = 384
    h.xf_width = 1024
    h.xf_heads = 16
    c.data.batch_size = 512
    c.model.remat = True
    return c
