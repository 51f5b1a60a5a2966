"""Hyper-parameter defaults of the reference codebases, as data (the kinds that use them:
`glide_jax.experiment.KINDS`)."""
from __future__ import annotations

from typing import Any

# glide_text2im.model_creation.model_and_diffusion_defaults() (use_fp16 is a runtime choice
# here: pass dtype instead).
GLIDE: dict[str, Any] = dict(
    image_size=64,
    num_channels=192,
    num_res_blocks=3,
    channel_mult="",
    num_heads=1,
    num_head_channels=64,
    num_heads_upsample=-1,
    attention_resolutions="32,16,8",
    dropout=0.1,
    text_ctx=128,
    xf_width=512,
    xf_layers=16,
    xf_heads=8,
    xf_final_ln=True,
    xf_padding=True,
    diffusion_steps=1000,
    noise_schedule="squaredcos_cap_v2",
    timestep_respacing="",
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_fp16=False,
    cache_text_emb=False,
    inpaint=False,
    super_res=False,
)
# model_and_diffusion_defaults_upsampler(): the base defaults with these changes.
GLIDE_UPSAMPLER_CHANGES: dict[str, Any] = dict(
    image_size=256, num_res_blocks=2, noise_schedule="linear", super_res=True
)
# guided-diffusion's EncoderUNetModel keyword arguments as create_classifier() fills them from
# classifier_defaults() (64 px, width 128, depth 2, attention at 32,16,8 px = ds 2,4,8).
ADM_CLASSIFIER: dict[str, Any] = dict(
    image_size=64,
    in_channels=3,
    model_channels=128,
    out_channels=1000,
    num_res_blocks=2,
    attention_resolutions=[2, 4, 8],
    dropout=0.0,
    channel_mult="",
    conv_resample=True,
    dims=2,
    use_checkpoint=False,
    use_fp16=False,
    num_heads=1,
    num_head_channels=64,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    resblock_updown=True,
    use_new_attention_order=False,
    pool="attention",
)
# guided-diffusion's released 64x64 ImageNet classifier (README flags: --classifier_depth 4).
ADM_CLASSIFIER_IMAGENET64_CHANGES: dict[str, Any] = dict(num_res_blocks=4)
# glide_text2im/clip/config.py: the released noised CLIP (64 px image encoder with a timestep
# token, 12-layer text encoder).
NOISED_CLIP: dict[str, Any] = dict(
    logit_scale=100.0, beta_schedule="squaredcos_cap_v2", n_timesteps=1000, image_size=64,
    patch_size=4, n_vocab=65536, max_text_len=77, n_embd=512, n_head_state_text=64, n_head_text=8,
    n_xf_blocks_text=12, n_head_state_image=64, n_head_image=12, n_xf_blocks_image=12,
)
