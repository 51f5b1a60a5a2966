"""ADM noisy classifier at 64x64 (guided-diffusion's released ImageNet-64 classifier shape).

    python -m glide_jax.train --config configs/classifier64.py --workdir gs://BUCKET/runs/cls64 \
        --config.model.hparams.out_channels=1000

Cross-entropy on q(x_t|x_0), t uniform. On synthetic_shapes the label is colour x shape of the
first shape (18 classes). Hardware: TPU v4-8. Runtime/loss: not measured here.
"""
import ml_collections

from glide_jax.config import default_config


def get_config():
    c = default_config()
    c.model.hparams = ml_collections.ConfigDict(dict(
        kind="classifier", image_size=64, in_channels=3, model_channels=128, out_channels=18,
        num_res_blocks=4, attention_resolutions=[2, 4, 8], dropout=0.0, channel_mult=[1, 2, 3, 4],
        conv_resample=True, dims=2, use_checkpoint=False, use_fp16=False, num_heads=1,
        num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True,
        use_new_attention_order=False, pool="attention",
    ))
    c.train.cond_drop = 0.0
    c.data.image_size = 64
    c.data.batch_size = 256
    c.model.dtype = "bfloat16"
    c.optim.lr = 3e-4
    c.train.sample_every = 0
    return c
