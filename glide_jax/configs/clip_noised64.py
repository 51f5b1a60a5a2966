"""GLIDE's noised CLIP (64x64 image encoder with a timestep token, text encoder), released sizes.

    python -m glide_jax.train --config configs/clip_noised64.py --workdir gs://BUCKET/runs/clip64

Trained with the symmetric contrastive loss on noised images q(x_t|x_0), t uniform.
Hardware: TPU v4-8. Runtime/loss: not measured here.
"""
from glide_jax.config import default_config


def get_config():
    c = default_config("clip")  # the released noised CLIP's sizes
    c.model.hparams.n_vocab = 49408  # CLIP's BPE vocabulary (the released table has spare rows)
    c.train.cond_drop = 0.0
    c.data.batch_size = 512
    c.model.dtype = "bfloat16"
    c.optim.lr = 3e-4
    c.train.sample_every = 0
    return c
