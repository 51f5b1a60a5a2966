"""The experiment layer: every model kind in one place, and the one way to set up its state.

A model kind is one of GLIDE's networks:

    base, base-inpaint, upsample, upsample-inpaint   Text2ImUNet; role "generator" (sampled)
    clip                                             the noised CLIP; role "guide"
    classifier                                       the ADM noisy classifier; role "guide"

`KINDS[name]` holds, for each, its hyper-parameter defaults, how its network is built, its
loss, its tokenizer, the fields of one training batch and, for guides, the score whose gradient
steers a generator's samples. Nothing outside this module branches on a kind's name.

`setup_state(config, mesh, ...)` is the one path config -> network -> abstract TrainState ->
shardings -> fresh or restored state, used by train, sample, bench, plan and evaluate.
`finalize(config)` makes a loaded config tell the truth (a kind's derived fields, sizes that
must agree, the kernels that will run) and is applied by every loader.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glide_jax import checkpoint, compile_cache, losses, sharding, tokenizer
from glide_jax.diffusion import gaussian, schedules
from glide_jax.models import defaults, layers
from glide_jax.models.clip import ClipConfig, ClipModel
from glide_jax.models.unet import EncoderUNet, EncoderUNetConfig, Text2ImUNet, UNetConfig
from glide_jax.train_state import TrainState, make_optimizer

KERNELS = ("auto", "xla", "cpu")


class SetupError(ValueError):
    """A config or workdir that cannot be set up; the message is for the user (no traceback)."""


# ---------------------------------------------------------------------------- kinds


def _unet_defaults(upsample: bool, inpaint: bool) -> Callable[[], dict]:
    def make():
        d = dict(defaults.GLIDE)
        if upsample:
            d.update(defaults.GLIDE_UPSAMPLER_CHANGES)
        d["inpaint"] = inpaint
        return d
    return make


def _clip_score(model, params, x, t, guide_inputs):
    """logit_scale·⟨image_emb(x_t, t), text_emb⟩ [B] (GLIDE's CLIP guidance)."""
    image_emb = model.apply({"params": params}, x, t, method="image_embeddings")
    return model.config.logit_scale * jnp.sum(image_emb * guide_inputs["text_emb"], axis=-1)


def _clip_guide_inputs(model, params, tok, prompts, labels):
    tokens, mask = tok.encode_batch(list(prompts))
    lens = np.sum(mask, axis=-1).astype(np.int32)
    return {"text_emb": model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(lens),
                                    method="text_embeddings")}


def _classifier_score(model, params, x, t, guide_inputs):
    """log p(y | x_t, t) [B] of the noisy classifier (ADM classifier guidance)."""
    logits = model.apply({"params": params}, x, t).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, guide_inputs["y"][:, None], axis=-1)[:, 0]


def _classifier_guide_inputs(model, params, tok, prompts, labels):
    n_classes = int(model.config.out_channels)
    labels = list(labels) if len(labels) != 1 else list(labels) * len(prompts)
    if len(labels) != len(prompts) or any(not 0 <= y < n_classes for y in labels):
        raise SetupError(f"give one --label in [0, {n_classes}) (or one per prompt)")
    return {"y": jnp.asarray(labels, jnp.int32)}


@dataclasses.dataclass(frozen=True)
class Kind:
    """What glide_jax knows about one model kind.

    Attributes:
      name: the `hparams["kind"]` string.
      role: "generator" (a Text2ImUNet that is sampled) or "guide" (its score guides one).
      defaults: () -> the kind's hyper-parameters as its reference code's defaults give them.
      network: (full hparams, dtype) -> flax module.
      loss: `losses.LossFn` the train step optimises.
      text: which tokenizer feeds it: "caption" (config.tokenizer: GLIDE BPE or sentencepiece),
        "clip_bpe" (CLIP's BPE, fixed by the model), or "none".
      remat_key: the hparams switch that turns on rematerialisation (None: the kind has none).
      scan_key: the hparams switch that runs its repeated transformer blocks as one lax.scan
        (None: the kind has none).
      scan_blocks_key: the hparams switch that runs its UNet's runs of same-shape blocks as
        lax.scans (None: the kind has none).
      labels: training batches carry a class `label` [B] int32.
      has_kernels: the network takes `kernels` (the noised CLIP has no backend-specific kernels).
      release_files: the PyTorch files a released checkpoint of the kind comes in (the noised
        CLIP: an image and a text encoder), for the converter.
      guide_score: guides only: (model, params, x_t, t, guide_inputs) -> score [B].
      guide_inputs: guides only: (model, params, tokenizer, prompts, labels) -> guide_inputs.
    """

    name: str
    role: str
    defaults: Callable[[], dict]
    network: Callable[[dict, Any], nn.Module]
    loss: losses.LossFn
    text: str
    remat_key: str | None
    scan_key: str | None = None
    scan_blocks_key: str | None = None
    labels: bool = False
    has_kernels: bool = True
    release_files: tuple[str, ...] = ("model",)
    guide_score: Callable | None = None
    guide_inputs: Callable | None = None

    @property
    def is_generator(self) -> bool:
        return self.role == "generator"


def _unet(h, dtype):
    return Text2ImUNet(UNetConfig.from_hparams(h), dtype=dtype)


def _unet_kind(name: str, upsample: bool, inpaint: bool) -> Kind:
    return Kind(name, "generator", _unet_defaults(upsample, inpaint), _unet, losses.diffusion_loss,
                text="caption", remat_key="remat", scan_key="scan_layers",
                scan_blocks_key="scan_blocks")


KINDS: dict[str, Kind] = {
    k.name: k for k in (
        _unet_kind("base", upsample=False, inpaint=False),
        _unet_kind("base-inpaint", upsample=False, inpaint=True),
        _unet_kind("upsample", upsample=True, inpaint=False),
        _unet_kind("upsample-inpaint", upsample=True, inpaint=True),
        Kind("clip", "guide", lambda: dict(defaults.NOISED_CLIP),
             lambda h, dtype: ClipModel(ClipConfig.from_hparams(h), dtype=dtype), losses.clip_loss,
             text="clip_bpe", remat_key=None, scan_key="scan_layers", has_kernels=False,
             release_files=("CLIP image encoder", "CLIP text encoder"), guide_score=_clip_score, guide_inputs=_clip_guide_inputs),
        Kind("classifier", "guide", lambda: dict(defaults.ADM_CLASSIFIER),
             lambda h, dtype: EncoderUNet(EncoderUNetConfig.from_hparams(h), dtype=dtype),
             losses.classifier_loss, text="none", remat_key="use_checkpoint", labels=True,
             guide_score=_classifier_score, guide_inputs=_classifier_guide_inputs),
    )
}
GENERATORS = tuple(k for k, v in KINDS.items() if v.is_generator)
GUIDES = tuple(k for k, v in KINDS.items() if not v.is_generator)


def get_kind(name_or_hparams: str | Mapping[str, Any]) -> Kind:
    name = name_or_hparams if isinstance(name_or_hparams, str) else name_or_hparams.get("kind")
    if name not in KINDS:
        raise SetupError(f"unknown model kind {name!r}; expected one of {', '.join(KINDS)}")
    return KINDS[name]


def hparams_with_defaults(kind: str, d: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The kind's defaults overridden by `d`; includes "kind". A UNet kind's `inpaint` and
    `super_res` follow from its name unless `d` sets them."""
    d = dict(d or {})
    d.pop("kind", None)
    full = get_kind(kind).defaults()
    full.update(d)
    return {"kind": kind, **full}


def from_hparams(hparams: Mapping[str, Any], dtype=jnp.float32) -> nn.Module:
    """The network for `hparams["kind"]`, missing keys filled by `hparams_with_defaults`."""
    if "kind" not in hparams:
        raise SetupError(f"hparams need a 'kind' (one of {', '.join(KINDS)})")
    kind = get_kind(hparams)
    return kind.network(hparams_with_defaults(kind.name, hparams), dtype)


def resolve_kernels(kernels: str, backend: str | None = None) -> str:
    """"auto" -> "cpu" on the CPU backend, "xla" elsewhere; "xla" / "cpu" stay.

    "cpu": Winograd 3x3 convolutions where they are faster on XLA:CPU, GroupNorm's fused
    hand-written VJP and counter-hash dropout masks. "xla": XLA's own ops throughout (what an
    accelerator compiler fuses best). The parameters are the same either way.
    """
    if kernels not in KERNELS and kernels not in layers.KERNELS:
        raise SetupError(f"model.kernels={kernels!r}: expected one of {', '.join(KERNELS)}")
    if kernels != "auto":
        return kernels
    return "cpu" if (backend or jax.default_backend()) == "cpu" else "xla"


def build(hparams: Mapping[str, Any], dtype=jnp.float32, *, remat: bool = False,
          scan_layers: bool = False, scan_blocks: bool = False, kernels: str = "xla") -> nn.Module:
    """`from_hparams` plus the runtime switches of `config.model`, none of which changes the
    parameters.

    Args:
      remat: rematerialise blocks in the backward pass (the kind's own switch; CLIP has none).
      scan_layers: run the identical blocks of the kind's transformers (a UNet's text encoder, the
        CLIP's two encoders) as one lax.scan each: a smaller program for the compiler (the
        classifier has none and ignores it).
      scan_blocks: run a UNet's runs of same-shape blocks (ResBlock + attention) as one lax.scan
        each (the generators; the others ignore it).
      kernels: "auto" | one of `layers.KERNELS` ("xla", "cpu", or "winograd": the CPU kernels with
        Winograd forced on every 3x3 convolution it supports, for benchmarks and tests).
    """
    hparams = dict(hparams)
    kind = get_kind(hparams)
    if kind.has_kernels:
        hparams["kernels"] = resolve_kernels(kernels)
    if remat and kind.remat_key:
        hparams[kind.remat_key] = True
    if scan_layers and kind.scan_key:
        hparams[kind.scan_key] = True
    if scan_blocks and kind.scan_blocks_key:
        hparams[kind.scan_blocks_key] = True
    return from_hparams(hparams, dtype)


def model_from_config(config, *, kernels: str | None = None) -> nn.Module:
    m = config.model
    return build(m.hparams.to_dict(), jnp.dtype(m.dtype), remat=bool(m.remat),
                 scan_layers=bool(m.get("scan_layers", False)), scan_blocks=bool(m.get("scan_blocks", False)),
                 kernels=kernels or m.kernels)


def tokenizer_for(hparams: Mapping[str, Any], tokenizer_config=None):
    """The tokenizer a model of these hparams reads, or None for a kind without text.

    The noised CLIP always reads CLIP's BPE (max_text_len); the generators read GLIDE's BPE or,
    when `tokenizer_config.name` says so, a sentencepiece model, at the model's `text_ctx`.
    """
    kind = get_kind(hparams)
    if kind.text == "none":
        return None
    if kind.text == "clip_bpe":
        return tokenizer.ClipTokens(max_len=int(hparams.get("max_text_len", tokenizer.CLIP_MAX_LEN)))
    name = tokenizer_config.name if tokenizer_config is not None else "glide_bpe"
    text_ctx = int(hparams.get("text_ctx", 128))
    if name == "glide_bpe":
        return tokenizer.GlideBPE(text_ctx=text_ctx)
    if name == "sentencepiece":
        return tokenizer.SentencePieceTokenizer(tokenizer_config.model_file, text_ctx=text_ctx)
    raise SetupError(f"tokenizer.name={name!r} does not feed a {kind.name} model; use glide_bpe or sentencepiece"
                     + (" (the noised CLIP always reads CLIP's BPE)" if name == "clip_bpe" else ""))


def text_ctx_of(hparams: Mapping[str, Any]) -> int:
    """Caption length in tokens the model reads (0: no text)."""
    kind = get_kind(hparams)
    if kind.text == "none":
        return 0
    return int(hparams.get("max_text_len" if kind.text == "clip_bpe" else "text_ctx"))


def diffusion_of(hparams: Mapping[str, Any]) -> tuple[str, int]:
    """(noise schedule name, number of training steps) of a model's hyper-parameters.

    UNets carry GLIDE's `noise_schedule` / `diffusion_steps`; the noised CLIP its
    `beta_schedule` / `n_timesteps`; the classifier neither (cosine, 1000 as in ADM-G).
    """
    get = hparams.get
    name = get("noise_schedule") or get("beta_schedule") or "squaredcos_cap_v2"
    steps = int(get("diffusion_steps") or get("n_timesteps") or 1000)
    return name, steps


def schedule_for(hparams: Mapping[str, Any], respacing: str = "") -> schedules.Schedule:
    """The model's schedule; "" keeps every training timestep (what training uses)."""
    name, steps = diffusion_of(hparams)
    return schedules.make_schedule(name, steps, str(respacing))


def abstract_batch(model: nn.Module, kind: str, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one training batch for `model` (the fields its loss reads), no memory."""
    inputs = jax.eval_shape(lambda: model.init_inputs(batch))
    out = {}
    for name, a in inputs.items():
        if name in ("x", "images"):
            out["image"] = jax.ShapeDtypeStruct(a.shape[:-1] + (3,), jnp.float32)
        elif name == "lens":  # the CLIP text length: a [B, L] mask in the batch (eval_shape sorts the keys)
            out["mask"] = jax.ShapeDtypeStruct(inputs["tokens"].shape, jnp.bool_)
        elif name != "t":
            out[name] = a
    if get_kind(kind).labels:
        out["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return out


# ---------------------------------------------------------------------------- configs


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Makes a loaded config consistent, in place (also when locked); returns it.

    - `model.hparams.kind` must be a kind, and the hparams must be that kind's keys;
    - a UNet's `inpaint` / `super_res` follow from its kind;
    - `data.image_size` and `data.text_ctx` are the model's (0 = take the model's; any other
      value must agree);
    - `model.kernels` is resolved ("auto" -> what this backend runs), so the saved config names
      the program that ran;
    - `train.compiler_effort` is a number in [-1, 1];
    - the network's constructor accepts the hparams (e.g. GLIDE's `channel_mult` rule).
    Raises SetupError with a one-line message.
    """
    h = config.model.hparams
    kind = get_kind(h.get("kind"))
    known = set(kind.defaults()) | {"kind"}
    extra = sorted(set(h.keys()) - known)
    if extra:
        raise SetupError(f"model.hparams has keys {extra} that a {kind.name} model does not take; start from a "
                         f"{kind.name} config (default_config(kind={kind.name!r})) rather than changing the kind")
    with config.ignore_type():
        if kind.is_generator:
            h.inpaint = kind.name.endswith("inpaint")
            h.super_res = kind.name.startswith("upsample")
        for field, want in (("image_size", int(h.image_size)), ("text_ctx", text_ctx_of(h))):
            have = int(config.data.get(field, 0) or 0)
            if have and have != want:
                raise SetupError(f"data.{field}={have} disagrees with the model's {want}; leave data.{field} at 0 "
                                 "(it follows the model)")
            config.data[field] = want
        config.model.kernels = resolve_kernels(config.model.get("kernels", "auto"))
        weighting = config.train.get("mse_weighting", "uniform")
        if weighting not in gaussian.MSE_WEIGHTINGS:
            raise SetupError(f"train.mse_weighting={weighting!r} is not one of {list(gaussian.MSE_WEIGHTINGS)}")
        if weighting != "uniform" and kind.loss is not losses.diffusion_loss:
            raise SetupError(f"train.mse_weighting={weighting!r} weights a diffusion loss; a {kind.name} model "
                             "trains with its own loss (leave it 'uniform')")
        try:
            effort = compile_cache.config_effort(config)
        except ValueError as e:
            raise SetupError(str(e)) from None
        if "compiler_effort" in config.train:  # a config saved before the field existed stays as it was
            config.train.compiler_effort = effort
        if config.data.get("low_res_size", 0) and not kind.name.startswith("upsample"):
            raise SetupError(f"data.low_res_size={config.data.low_res_size} is for upsamplers; a {kind.name} "
                             "model takes no low-resolution input")
    try:  # the network's own checks (shapes, channel multipliers): no parameters are made
        from_hparams(h.to_dict())
    except (ValueError, TypeError) as e:
        raise SetupError(f"model.hparams: {e}") from None
    sharding.check_rules(config.mesh.rules)
    return config


def loss_for(config) -> losses.LossFn:
    """The kind's loss with the config's ε-MSE weighting (`train.mse_weighting`) bound."""
    kind = get_kind(config.model.hparams)
    weighting = str(config.train.get("mse_weighting", "uniform"))
    if weighting == "uniform":
        return kind.loss
    gamma = float(config.train.min_snr_gamma if weighting == "min_snr" else config.train.p2_gamma)
    return functools.partial(kind.loss, mse_weighting=weighting, gamma=gamma)


def config_fingerprint(config) -> dict:
    """What must match between a workdir's checkpoint and the current config to resume."""
    return {"kind": config.model.hparams.kind, "hparams": config.model.hparams.to_dict()}


# ---------------------------------------------------------------------------- state


@dataclasses.dataclass
class Setup:
    """Everything `setup_state` builds.

    Attributes:
      model, tx: the network and the optimizer.
      abstract: TrainState of ShapeDtypeStructs carrying their shardings (no memory).
      shardings: the same tree of NamedShardings (None without a mesh).
      init_fn: rng -> boxed TrainState (what a fresh state is made from).
      state: the concrete TrainState (None when only the abstract state was asked for).
      step: the step `state` is at (0 when fresh).
      data_state: the data position saved with the restored checkpoint (None when fresh).
      restored: whether `state` came from a checkpoint.
    """

    model: nn.Module
    tx: Any
    abstract: Any
    shardings: Any
    init_fn: Callable
    state: TrainState | None = None
    step: int = 0
    data_state: dict | None = None
    restored: bool = False


def _abstract_state(model, tx, rng):
    example = model.init_inputs(batch=1)

    def init_fn(r):
        variables = model.init({"params": r, "dropout": r}, **example)
        return TrainState.create(variables["params"], tx)

    return jax.eval_shape(init_fn, rng), init_fn


def setup_state(config, mesh=None, *, manager=None, fresh: bool = False, abstract_only: bool = False,
                model: nn.Module | None = None, init_params: Callable | None = None,
                log=None) -> Setup:
    """config -> network -> abstract state -> shardings -> the state to run with.

    Args:
      config: a finalized experiment config.
      mesh: where the state lives (FSDP rules from `config.mesh.rules`); None = the default
        device, unsharded.
      manager: a checkpoint manager; its newest readable checkpoint is restored (a checkpoint of
        another model raises SetupError, so does a workdir whose checkpoints are all unreadable).
      fresh: initialise even if `manager` holds checkpoints.
      abstract_only: stop after the abstract state (planning, compile-only).
      model: use this network instead of building one from the config.
      init_params: params -> params, applied to a fresh state's params (fine-tuning from a
        converted release); the EMA starts from the result.
    """
    model = model or model_from_config(config)
    tx = make_optimizer(config.optim)
    rng = jax.random.PRNGKey(config.seed)
    boxed, init_fn = _abstract_state(model, tx, rng)
    if mesh is not None:
        shardings = sharding.logical_shardings(boxed, mesh, config.mesh.rules)
        shapes = nn.meta.unbox(boxed)
        if config.mesh.get("shard_update_over_data", False):
            shardings = shardings.replace(
                opt_state=sharding.split_over_data(shapes.opt_state, shardings.opt_state),
                ema_params=sharding.split_over_data(shapes.ema_params, shardings.ema_params))
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                shapes, shardings)
    else:
        shardings, abstract = None, nn.meta.unbox(boxed)
    setup = Setup(model, tx, abstract, shardings, init_fn)
    if abstract_only:
        return setup
    if manager is not None and not fresh:
        try:
            restored = checkpoint.restore_latest(manager, abstract, fingerprint=config_fingerprint(config),
                                                 set_aside_unreadable=True)
        except checkpoint.CheckpointMismatchError as e:
            raise SetupError(f"{e}; nothing was changed. Use a new --workdir, or pass --force_new to start over "
                             "there (the old checkpoints are moved aside, not deleted)") from None
        except checkpoint.UnreadableCheckpointsError as e:
            raise SetupError(f"{e}\nnothing was changed; pass --force_new to start over (the unreadable "
                             "checkpoints are moved aside, not deleted)") from None
        if restored is not None:
            setup.step, setup.state, setup.data_state, _ = restored
            setup.restored = True
            if log is not None:
                log.info("resumed from step %d", setup.step)
            return setup
    t0 = time.perf_counter()
    state = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)
    if init_params is not None:
        params = init_params(state.params)
        if shardings is not None:
            params = jax.device_put(params, shardings.params)
        state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
    setup.state = state
    if log is not None:
        log.info("initialised in %.1fs", time.perf_counter() - t0)
    return setup


# Named hyper-parameter presets. The first five are the released checkpoints (glide-text2im
# README / notebooks, guided-diffusion README); the "paper-*" ones are the unreleased models of
# the GLIDE paper (Nichol et al. 2021, sec. 4): ADM widened to 512 channels with a 24-block,
# 2048-wide text transformer (~3.5B total), and a ~1.5B 64->256 upsampler with 384 base channels
# and a 1024-wide text encoder. The paper gives neither the text heads nor the upsampler's text
# depth: 64-channel heads are assumed, and 16 blocks (as the released upsampler), which gives
# 1.54B parameters (24 blocks would give 1.64B).
PRESETS: dict[str, dict[str, Any]] = {
    "base": hparams_with_defaults("base"),
    "upsample": hparams_with_defaults("upsample"),
    "base-inpaint": hparams_with_defaults("base-inpaint"),
    "upsample-inpaint": hparams_with_defaults("upsample-inpaint"),
    "classifier-imagenet64": hparams_with_defaults("classifier", defaults.ADM_CLASSIFIER_IMAGENET64_CHANGES),
    "clip-noised64": hparams_with_defaults("clip"),
    "paper-base-3.5b": hparams_with_defaults(
        "base", dict(num_channels=512, xf_width=2048, xf_layers=24, xf_heads=32)
    ),
    "paper-upsample-1.5b": hparams_with_defaults(
        "upsample", dict(num_channels=384, xf_width=1024, xf_layers=16, xf_heads=16)
    ),
}
# The released checkpoint each kind converts to by default (python -m glide_jax.convert).
RELEASED: dict[str, str] = {"base": "base", "upsample": "upsample", "base-inpaint": "base-inpaint",
                            "upsample-inpaint": "upsample-inpaint", "classifier": "classifier-imagenet64",
                            "clip": "clip-noised64"}
