"""Inpainting fine-tune of the 64x64 base model: 4 extra zero-initialised input channels.

    python -m glide_jax.train --config configs/inpaint64.py --workdir gs://BUCKET/runs/inpaint64 \
        --config.init_from=converted/base   # a converted or trained base checkpoint

Input channels [x_t, image*mask, mask] (3+3+1); the weights of the first convolution for the
extra channels start at zero, so the fine-tune starts as the base model. Random rectangle and
brush masks. Hardware: TPU v4-8. Runtime/loss: not measured here.
"""
from glide_jax.config import default_config


def get_config():
    c = default_config("base-inpaint")
    c.data.mask = "mixed"
    c.data.batch_size = 256
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.optim.lr = 3e-5
    return c
