"""The GLIDE paper's 3.5B base model: 64x64, 512 channels, text transformer 24 blocks x 2048.

    python -m glide_jax.train --config configs/glide_base64_3p5b.py --workdir gs://BUCKET/runs/base3p5b

Hardware: a TPU pod slice (params + EMA + Adam ~ 56 GB in float32: FSDP over >= 16 chips;
`python -m glide_jax.plan` tells what fits). Paper: batch 2048, 2.5M iterations.
Runtime/loss: not measured here.
"""
from glide_jax.config import default_config


def get_config():
    c = default_config("base")
    h = c.model.hparams
    h.num_channels = 512
    h.xf_width = 2048
    h.xf_layers = 24
    h.xf_heads = 32
    c.data.batch_size = 2048
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = True
    c.optim.lr = 1e-4
    c.sample.respacing = "100"
    c.sample.sampler = "ddpm"
    return c
