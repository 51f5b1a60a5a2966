"""GLIDE (filtered) 64->256 upsampler, the released architecture (398,361,286 parameters).

    python -m glide_jax.train --config configs/glide_filtered_upsample256.py --workdir gs://BUCKET/runs/up256 \
        --config.data.name=prepared:/path/to/tfds/<name>/<config>/<version>

Hardware: TPU v4-8 or larger. Noise schedule linear; low-res input made by area downsampling
of the 256 px image (optionally noise-augmented). Runtime/loss: not measured here.
"""
from glide_jax.config import default_config


def get_config():
    c = default_config("upsample")  # the released upsampler hyper-parameters
    c.data.low_res_size = 64
    c.data.batch_size = 64
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.sample.respacing = "fast27"
    c.sample.sampler = "ddpm"
    c.sample.guidance_scale = 0.0
    return c
