"""GLIDE's noised CLIP (64x64 image encoder with a timestep token, text encoder), released sizes.

    python -m glide_jax.train --config configs/clip_noised64.py --workdir gs://BUCKET/runs/clip64

Trained with the symmetric contrastive loss on noised images q(x_t|x_0), t uniform.
Hardware: TPU v4-8. Runtime/loss: not measured here.
"""
import ml_collections

from glide_jax.config import default_config


def get_config():
    c = default_config()
    c.model.hparams = ml_collections.ConfigDict(dict(
        kind="clip", logit_scale=100.0, beta_schedule="squaredcos_cap_v2", n_timesteps=1000,
        image_size=64, patch_size=4, n_vocab=49408, max_text_len=77, n_embd=512,
        n_head_state_text=64, n_head_text=8, n_xf_blocks_text=12,
        n_head_state_image=64, n_head_image=12, n_xf_blocks_image=12,
    ))
    c.tokenizer.name = "clip_bpe"
    c.train.cond_drop = 0.0
    c.data.image_size = 64
    c.data.text_ctx = 77
    c.data.batch_size = 512
    c.model.dtype = "bfloat16"
    c.optim.lr = 3e-4
    c.train.sample_every = 0
    return c
