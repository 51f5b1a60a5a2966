"""The default experiment config; every file in configs/ starts from `default_config()`.

Sections: model (GLIDE constructor hyper-parameters as `model.hparams`, compute dtype, remat;
the diffusion schedule is `hparams.noise_schedule` / `diffusion_steps`, as in GLIDE), tokenizer, data, optim, train, mesh, sample. Configs are data: no code path is
selected by anything but these fields.
"""
from __future__ import annotations

import ml_collections

from glide_jax.models import hparams_with_defaults

def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a converted/exported params dir to fine-tune from

    c.model = ml_collections.ConfigDict()
    c.model.hparams = ml_collections.ConfigDict(hparams_with_defaults("base"))  # the released base
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.remat = False
    # 3x3 convolutions: "auto" = Winograd F(4x4,3x3) on the CPU backend in float32 (faster there,
    # README "Benchmarks"), XLA's convolution elsewhere; "xla" / "winograd" force one.
    c.model.conv_algorithm = "auto"

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.name = "glide_bpe"  # glide_bpe | clip_bpe | sentencepiece
    c.tokenizer.model_file = ""  # sentencepiece model

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_shapes"
    c.data.data_dir = ""  # "" = WORKDIR/../data or ~/tensorflow_datasets
    c.data.image_size = 64
    c.data.low_res_size = 0
    c.data.text_ctx = 128
    c.data.batch_size = 8  # global
    c.data.seed = 0
    c.data.num_workers = 0
    c.data.random_flip = False
    c.data.random_crop = False
    c.data.noise_aug_std = 0.0
    c.data.mask = "none"
    c.data.train_examples = 0  # synthetic_shapes: 0 = builder default

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 1000
    c.optim.decay_steps = 0
    c.optim.final_lr_frac = 0.0
    c.optim.grad_clip = 1.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 100_000
    c.train.cond_drop = 0.2
    c.train.ema_rate = 0.9999
    c.train.micro_batches = 1
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 5000
    c.train.max_bad_steps = 20
    c.train.async_checkpoint = True

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ["a red circle", "a blue square"]
    c.sample.guidance_scale = 3.0
    c.sample.respacing = "50"
    c.sample.sampler = "ddpm"
    return c


def diffusion_of(hparams) -> tuple[str, int]:
    """(noise schedule name, number of training steps) of a model's hyper-parameters.

    UNets carry GLIDE's `noise_schedule` / `diffusion_steps`; the noised CLIP its
    `beta_schedule` / `n_timesteps`; the classifier neither (cosine, 1000 as in ADM-G).
    """
    get = hparams.get
    name = get("noise_schedule") or get("beta_schedule") or "squaredcos_cap_v2"
    steps = int(get("diffusion_steps") or get("n_timesteps") or 1000)
    return name, steps
