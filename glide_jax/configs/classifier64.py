"""ADM noisy classifier at 64x64 (guided-diffusion's released ImageNet-64 classifier shape).

    python -m glide_jax.train --config configs/classifier64.py --workdir gs://BUCKET/runs/cls64 \
        --config.model.hparams.out_channels=1000

Cross-entropy on q(x_t|x_0), t uniform. On synthetic_shapes the label is colour x shape of the
first shape (18 classes). Hardware: TPU v4-8. Runtime/loss: not measured here.
"""
from glide_jax.config import default_config


def get_config():
    c = default_config("classifier")
    h = c.model.hparams
    h.num_res_blocks = 4  # the released ImageNet-64 classifier's depth (channel_mult "" = 1,2,3,4 at 64 px)
    h.out_channels = 18
    c.train.cond_drop = 0.0
    c.data.batch_size = 256
    c.model.dtype = "bfloat16"
    c.optim.lr = 3e-4
    c.train.sample_every = 0
    return c
