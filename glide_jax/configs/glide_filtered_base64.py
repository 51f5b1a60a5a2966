"""GLIDE (filtered) base model, the released architecture: 64x64, 192 channels, text 512 x 16.

    python -m glide_jax.train --config configs/glide_filtered_base64.py --workdir gs://BUCKET/runs/base64 \
        --config.data.name=prepared:/path/to/tfds/<name>/<config>/<version>  # or fine-tune: --config.init_from=converted/base

Hardware: a TPU v4-8 or larger (FSDP over all chips). 385,030,726 parameters.
Runtime/loss: not measured here (no TPU on the development machine); GLIDE trained its 3.5B
sibling for 2.5M iterations at batch 2048.
"""
from glide_jax.config import default_config


def get_config():
    c = default_config("base")  # the released base hyper-parameters
    c.data.batch_size = 256
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.train.ema_rate = 0.9999
    c.sample.prompts = ["an oil painting of a corgi", "a red cube on top of a blue sphere"]
    c.sample.respacing = "100"
    c.sample.sampler = "ddpm"
    return c
