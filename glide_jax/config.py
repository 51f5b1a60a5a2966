"""The default experiment config; every file in configs/ starts from `default_config(kind)`.

Sections: model (the kind's hyper-parameters as `model.hparams`, with that kind's defaults;
compute dtype, remat, scan_layers, kernels; the diffusion schedule is `hparams.noise_schedule` /
`diffusion_steps`, as in GLIDE), tokenizer, data, optim, train, mesh (axis sizes and the
logical-axis sharding rules), sample. Configs are data: no code path is selected by anything
but these fields. Loaders apply `glide_jax.experiment.finalize`, which fills the fields that
follow from others (data.image_size / text_ctx from the model) and checks the rest.
"""
from __future__ import annotations

import ml_collections

from glide_jax import sharding
from glide_jax.experiment import hparams_with_defaults


def default_config(kind: str = "base") -> ml_collections.ConfigDict:
    """Defaults of every section, with `kind`'s hyper-parameters (the released model's)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a converted/exported params dir to fine-tune from

    c.model = ml_collections.ConfigDict()
    c.model.hparams = ml_collections.ConfigDict(hparams_with_defaults(kind))
    c.model.dtype = "float32"  # compute dtype; params stay float32
    c.model.remat = False
    # Transformers' identical blocks (a UNet's text encoder, the CLIP's encoders) as one lax.scan:
    # the compiler sees one block instead of n copies (smaller program, faster compile). Same
    # parameters either way.
    c.model.scan_layers = False
    # A UNet's runs of same-shape blocks (a level's ResBlock + attention pairs) as one lax.scan
    # each: a smaller program for the compiler, parameters gathered block by block under FSDP.
    # Same parameters and outputs; dropout masks come from other keys.
    c.model.scan_blocks = False
    # "auto" = "cpu" on the CPU backend (Winograd convolutions, fused GroupNorm backward, hash
    # dropout masks), "xla" elsewhere (XLA's own ops); resolved when the config is loaded.
    c.model.kernels = "auto"

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.name = "glide_bpe"  # glide_bpe | clip_bpe | sentencepiece
    c.tokenizer.model_file = ""  # sentencepiece model

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_shapes"
    c.data.data_dir = ""  # "" = WORKDIR/../data or ~/tensorflow_datasets
    c.data.image_size = 0  # 0 = the model's (finalize fills it); any other value must agree
    c.data.low_res_size = 0
    c.data.text_ctx = 0  # 0 = the model's caption length
    c.data.batch_size = 8  # global
    c.data.seed = 0
    c.data.num_workers = 0
    c.data.random_flip = False
    c.data.random_crop = False
    c.data.noise_aug_std = 0.0
    c.data.mask = "none"
    c.data.train_examples = 0  # synthetic_shapes: 0 = builder default
    # A damaged ArrayRecord shard (missing, truncated, failing its checksums) stops training at
    # start with an error naming it; True leaves such shards out instead (logged and counted).
    c.data.skip_damaged_shards = False

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
    # EMA warm-up: rate min(ema_rate, (1 + step) / (10 + step)), so that a short run's EMA is not
    # dominated by the random init (the released configs train long and keep it off)
    c.train.ema_warmup = False
    # Weighting of the ε-MSE term over timesteps (the VB term is never reweighted):
    # "uniform" (GLIDE) | "min_snr" (min(SNR, γ)/SNR, γ = min_snr_gamma) | "p2" (1/(1 + SNR)^p2_gamma)
    c.train.mse_weighting = "uniform"
    c.train.min_snr_gamma = 5.0
    c.train.p2_gamma = 1.0
    c.train.micro_batches = 1
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3
    c.train.sample_every = 5000
    c.train.max_bad_steps = 20
    c.train.async_checkpoint = True
    # Several processes: how often (in steps) they agree on whether any got SIGTERM; each agreement
    # is one small all-gather. All stop at the same step, at most this many steps after the signal.
    c.train.preempt_check_every = 10
    # jax's persistent compilation cache (glide_jax.compile_cache): "" = WORKDIR/compile_cache,
    # "none" = off, else a local or gs:// directory (a resumed or repeated run skips its compiles)
    c.train.compile_cache_dir = ""
    # XLA's exec_time_optimization_effort in [-1, 1] (glide_jax.compile_cache): 0 = XLA's default,
    # -1 = fastest compile (on TPU 1.7-7x faster, half the host memory) without the TPU compiler's
    # on-chip memory assignment, so each step moves 2-3x the HBM bytes: for planning, not training
    c.train.compiler_effort = 0.0

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    # logical axis -> mesh axes (None = replicated), see glide_jax.sharding; FSDP by default
    c.mesh.rules = [(name, list(t) if isinstance(t, tuple) else t) for name, t in sharding.DEFAULT_RULES]
    # ZeRO-1: the Adam moments and the EMA also split over `data` (sharding.split_over_data), so
    # each data-parallel replica updates 1/data of them; the parameters keep the rules' sharding.
    # Same numbers; less memory and update traffic per chip when data > 1.
    c.mesh.shard_update_over_data = False

    c.sample = ml_collections.ConfigDict()
    c.sample.prompts = ["a red circle", "a blue square"]
    c.sample.guidance_scale = 3.0
    c.sample.respacing = "50"
    c.sample.sampler = "ddpm"
    return c

