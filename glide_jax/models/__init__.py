"""glide_jax networks: build one from a GLIDE-style hparams dict, or from a named preset.

    model = from_hparams(PRESETS["base"])                 # released filtered base 64x64
    params = model.init(rng, **model.init_inputs())["params"]

`hparams["kind"]` picks the network: "base", "upsample", "base-inpaint", "upsample-inpaint"
-> `Text2ImUNet`; "classifier" -> `EncoderUNet`; "clip" -> `ClipModel`.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from glide_jax.models.unet import EncoderUNet, EncoderUNetConfig, Text2ImUNet, UNetConfig

UNET_KINDS = ("base", "upsample", "base-inpaint", "upsample-inpaint")
KINDS = UNET_KINDS + ("classifier", "clip")

# glide_text2im.model_creation.model_and_diffusion_defaults() (use_fp16 is a runtime choice
# here: pass dtype instead).
_GLIDE_DEFAULTS: dict[str, Any] = dict(
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
_UPSAMPLER_CHANGES: dict[str, Any] = dict(
    image_size=256, num_res_blocks=2, noise_schedule="linear", super_res=True
)
# guided-diffusion's EncoderUNetModel keyword arguments as create_classifier() fills them from
# classifier_defaults() (64 px, width 128, depth 2, attention at 32,16,8 px = ds 2,4,8).
_CLASSIFIER_DEFAULTS: dict[str, Any] = dict(
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


def hparams_with_defaults(kind: str, d: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """GLIDE's (or guided-diffusion's) defaults for `kind`, overridden by `d`; includes "kind".

    The inpaint / super_res flags follow from `kind` unless `d` sets them.
    """
    d = dict(d or {})
    d.pop("kind", None)
    if kind in UNET_KINDS:
        base = dict(_GLIDE_DEFAULTS)
        if kind.startswith("upsample"):
            base.update(_UPSAMPLER_CHANGES)
        base["inpaint"] = kind.endswith("inpaint")
    elif kind == "classifier":
        base = dict(_CLASSIFIER_DEFAULTS)
    elif kind == "clip":
        base = {}
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    base.update(d)
    return {"kind": kind, **base}


def from_hparams(hparams: Mapping[str, Any], dtype=jnp.float32) -> nn.Module:
    """The network for `hparams["kind"]`, missing keys filled by `hparams_with_defaults`."""
    if "kind" not in hparams:
        raise ValueError(f"hparams need a 'kind' (one of {KINDS})")
    kind = hparams["kind"]
    full = hparams_with_defaults(kind, hparams)
    if kind in UNET_KINDS:
        return Text2ImUNet(UNetConfig.from_hparams(full), dtype=dtype)
    if kind == "classifier":
        return EncoderUNet(EncoderUNetConfig.from_hparams(full), dtype=dtype)
    from glide_jax.models.clip import ClipConfig, ClipModel  # written alongside; imported lazily

    return ClipModel(ClipConfig.from_hparams(full), dtype=dtype)


def build(hparams: Mapping[str, Any], dtype=jnp.float32, *, remat: bool = False,
          conv_algorithm: str = "auto") -> nn.Module:
    """`from_hparams` plus the runtime switches of `config.model`.

    remat: rematerialise blocks in the backward pass (the UNets' `remat`, the classifier's
    `use_checkpoint`; CLIP has none). conv_algorithm: how 3x3 convolutions are computed
    ("auto" | "xla" | "winograd", see `layers.conv_algorithm_for`; UNets and classifier only).
    Neither changes the parameters.
    """
    hparams = dict(hparams)
    kind = hparams.get("kind")
    if kind in UNET_KINDS or kind == "classifier":
        hparams["conv_algorithm"] = conv_algorithm
        if remat:
            hparams["remat" if kind in UNET_KINDS else "use_checkpoint"] = True
    return from_hparams(hparams, dtype)


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
    "classifier-imagenet64": hparams_with_defaults("classifier", dict(num_res_blocks=4)),
    "paper-base-3.5b": hparams_with_defaults(
        "base", dict(num_channels=512, xf_width=2048, xf_layers=24, xf_heads=32)
    ),
    "paper-upsample-1.5b": hparams_with_defaults(
        "upsample", dict(num_channels=384, xf_width=1024, xf_layers=16, xf_heads=16)
    ),
}

__all__ = [
    "EncoderUNet", "EncoderUNetConfig", "KINDS", "PRESETS", "Text2ImUNet", "UNetConfig",
    "UNET_KINDS", "from_hparams", "hparams_with_defaults",
]
