"""Inpainting GLIDE of the demo: shapes_tiny's network with GLIDE's 4 extra input channels.

    python -m glide_jax.train --config shapes_inpaint --workdir runs/miniature/inpaint \
        --config.init_from=runs/miniature/inpaint_init   # base params, extra channels zero

The model is shapes_tiny's (imported, so it follows that config) as kind "base-inpaint": input
[x_t, image * mask, mask] (3 + 3 + 1 channels), trained on the same renders with GLIDE's
random masks (`data.mask = "mixed"`: per example, one rectangle with sides of 1/4-3/4 of the
image, or 1-4 thick brush strokes; 1 = known). As in the paper it is fine-tuned from the base
model: `python -m glide_jax.miniature` exports the trained shapes_tiny EMA params with the
first convolution's 4 new input channels zero (`miniature.export_init`), so training
starts as the base model; without `init_from` it trains from scratch. Data, optimizer and
training settings are shapes_tiny's, with its own step count and no warm-up (a fine-tune).
Hardware: 2 CPU cores, 0.2 s/step at batch 32 (1500 steps ~5 min; ~1.5x beside another job).
"""
from glide_jax.config import default_config
from glide_jax.configs import shapes_tiny


def get_config():
    base = shapes_tiny.get_config()
    c = default_config("base-inpaint")
    h = c.model.hparams
    for key, value in base.model.hparams.items():
        if key not in ("kind", "inpaint", "super_res"):
            h[key] = value
    c.data = base.data.copy_and_resolve_references()
    c.data.mask = "mixed"
    c.optim = base.optim.copy_and_resolve_references()
    c.optim.warmup_steps = 0
    c.train = base.train.copy_and_resolve_references()
    c.train.num_steps = 1500
    c.sample = base.sample.copy_and_resolve_references()
    return c
