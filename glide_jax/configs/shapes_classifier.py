"""ADM noisy classifier at the demo's size (16 px): the 18 (colour, shape) objects of the shapes.

    python -m glide_jax.train --config shapes_classifier --workdir runs/miniature/classifier

Classes: y = 3 * colour + shape, the 18 single objects (`shapes.COLORS` x `shapes.SHAPES`), the
label the pipeline gives every synthetic-shapes record (`data.pipeline.class_label`): the first
object named in the caption. A two-object image is captioned in either wording ("A left of B" /
"B right of A") with probability 1/2, so its label is either object, equally often: the
classifier learns p(y | x_t) ~ 1/2 for each of two objects and ~1 for a lone one, and
log p(y | x_t) rewards an image showing object y alone, which is what guiding a single-object
caption asks for. Cross-entropy on q(x_t | x_0), t uniform over the schedule (cosine, 1000, as
shapes_tiny). Down path of shapes_tiny's width (32 channels at 16 and 8 px, attention at 8 px),
attention pooling. Data and optimizer settings are shapes_tiny's, with a larger batch and its
own step count. Hardware: 2 CPU cores, 0.15 s/step at batch 64 (3000 steps ~8 min); cross-
entropy 2.9 (ln 18) at the start, ~1.9 and 31-39% accuracy over all noise levels by step 800.
"""
from glide_jax.config import default_config
from glide_jax.configs import shapes_tiny
from glide_jax.data import shapes


def get_config():
    base = shapes_tiny.get_config()
    b = base.model.hparams
    c = default_config("classifier")
    h = c.model.hparams
    h.image_size = b.image_size
    h.model_channels = b.num_channels
    h.num_head_channels = b.num_head_channels
    h.out_channels = shapes.NUM_OBJECTS
    h.num_res_blocks = 1
    h.channel_mult = "1,2"
    h.attention_resolutions = [2]  # downsampling factor: 8 px
    h.pool = "attention"
    c.data = base.data.copy_and_resolve_references()
    c.data.batch_size = 64
    c.optim = base.optim.copy_and_resolve_references()
    c.train = base.train.copy_and_resolve_references()
    c.train.cond_drop = 0.0
    c.train.mse_weighting = "uniform"  # a cross-entropy loss: no ε-MSE to weight
    c.train.num_steps = 3000
    c.sample = base.sample.copy_and_resolve_references()
    return c
