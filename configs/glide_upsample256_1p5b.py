"""The GLIDE paper's 1.5B 64->256 upsampler: the released upsampler widened to 384 channels,
text width 1024.

    python -m glide_jax.train --config configs/glide_upsample256_1p5b.py --workdir gs://BUCKET/runs/up1p5b

Hardware: a TPU pod slice with FSDP (`python -m glide_jax.plan` tells what fits).
Runtime/loss: not measured here (no TPU).
"""
from glide_jax.configs_loader import load


def get_config():
    c = load("glide_filtered_upsample256", lock=False)
    h = c.model.hparams
    h.num_channels = 384
    h.xf_width = 1024
    h.xf_heads = 16
    c.data.batch_size = 512
    c.model.remat = True
    return c
