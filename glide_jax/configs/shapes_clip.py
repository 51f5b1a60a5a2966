"""GLIDE's noised CLIP at the demo's size (16 px), trained contrastively on q(x_t | x_0).

    python -m glide_jax.train --config shapes_clip --workdir runs/miniature/clip

A ViT image encoder over 4x4 patches of x_t with a timestep token, and a causal text encoder
over CLIP's BPE (`experiment.tokenizer_for` picks it for kind "clip"), both 2 blocks of width
128 into a 128-d joint space; symmetric InfoNCE at GLIDE's fixed logit scale 100, t uniform
over shapes_tiny's schedule (imported: image size, noise schedule and caption length follow
that config). Its score logit_scale * <image_emb(x_t, t), text_emb> guides the base model
(`glide_jax.sample.clip_guided_images`). No caption dropout (it would teach the text encoder an
empty caption). Data and optimizer settings are shapes_tiny's, with a larger batch (more
negatives per step) and its own step count. Hardware: 2 CPU cores, 0.13 s/step at batch 64
(3000 steps ~7 min); contrastive loss 4.2 (ln 64) at the start, ~2.4 by step 800.
"""
from glide_jax.config import default_config
from glide_jax.configs import shapes_tiny


def get_config():
    base = shapes_tiny.get_config()
    b = base.model.hparams
    c = default_config("clip")
    h = c.model.hparams
    h.image_size = b.image_size
    h.patch_size = 4
    h.beta_schedule = b.noise_schedule
    h.n_timesteps = b.diffusion_steps
    h.n_vocab = 49408  # CLIP's BPE
    h.max_text_len = b.text_ctx
    h.n_embd = 128
    h.n_head_state_text = h.n_head_state_image = 32
    h.n_head_text = h.n_head_image = 4
    h.n_xf_blocks_text = h.n_xf_blocks_image = 2
    c.data = base.data.copy_and_resolve_references()
    c.data.batch_size = 64
    c.optim = base.optim.copy_and_resolve_references()
    c.train = base.train.copy_and_resolve_references()
    c.train.cond_drop = 0.0
    c.train.mse_weighting = "uniform"  # a contrastive loss: no ε-MSE to weight
    c.train.num_steps = 3000
    c.sample = base.sample.copy_and_resolve_references()
    return c
