"""GLIDE's text-conditional UNet and guided-diffusion's noisy classifier, NHWC.

One `Text2ImUNet` covers GLIDE's base, super-resolution and inpainting variants: `super_res`
and `inpaint` only add input channels ([x, image*mask, mask, up(low_res)]). `EncoderUNet` (the
ADM classifier) is built from the same time-embedding / down-path / middle-block functions.
Module names mirror the PyTorch ones (`input_blocks.1.0` -> `input_blocks_1_0`) so that
`glide_jax.convert` ports released checkpoints by a table.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from glide_jax.models.layers import (
    AttentionBlock,
    AttentionPool2d,
    Conv,
    Dense,
    Downsample,
    Dtype,
    GroupNorm,
    ResBlock,
    Upsample,
    check_kernels,
    constrain_batch,
    conv_algorithm_of,
    timestep_embedding,
    zeros,
)
from glide_jax.models.text_encoder import TextEncoder

_DEFAULT_CHANNEL_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}
# Keys of GLIDE's hparams that configure the diffusion process or PyTorch runtime, not the net.
_NON_MODEL_KEYS = frozenset(
    {"kind", "diffusion_steps", "noise_schedule", "timestep_respacing", "use_fp16", "cache_text_emb"}
)


def parse_channel_mult(value: Any, image_size: int) -> tuple[int, ...]:
    """GLIDE's `channel_mult`: "" -> the default for 64/128/256; "1,2,3" or a sequence otherwise."""
    if isinstance(value, str):
        if value == "":
            if image_size not in _DEFAULT_CHANNEL_MULT:
                raise ValueError(f"no default channel_mult for image_size {image_size}; give one")
            return _DEFAULT_CHANNEL_MULT[image_size]
        mult = tuple(int(m) for m in value.split(","))
        if 2 ** (len(mult) + 2) != image_size:
            raise ValueError(f"channel_mult {value!r}: GLIDE needs 2**(len+2) == image_size ({image_size})")
        return mult
    return tuple(int(m) for m in value)


def parse_ints(value: Any) -> tuple[int, ...]:
    """"32,16,8" or a sequence -> tuple of ints."""
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _number(v: Any) -> int | float:
    f = float(v)
    return int(f) if f.is_integer() else f


# guided-diffusion's create_classifier defaults for classifier_channel_mult = "".
_CLASSIFIER_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)
}


def _checked_kwargs(cls, d: Mapping[str, Any], ignore: frozenset[str]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - ignore)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown hyper-parameter(s) {unknown}; known: {sorted(names)}")
    return {k: v for k, v in d.items() if k in names}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """GLIDE's Text2ImUNet constructor keys (model_and_diffusion_defaults), parsed.

    `channel_mult` is a tuple; `attention_resolutions` a tuple of pixel resolutions. Strings in
    GLIDE's format are accepted and parsed. `xf_width = 0` builds a text-less UNet.
    """

    image_size: int = 64
    num_channels: int = 192
    num_res_blocks: int = 3
    channel_mult: tuple[int, ...] | str = ""
    num_heads: int = 1
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    attention_resolutions: tuple[int, ...] | str = (32, 16, 8)
    dropout: float = 0.1
    text_ctx: int = 128
    xf_width: int = 512
    xf_layers: int = 16
    xf_heads: int = 8
    xf_final_ln: bool = True
    xf_padding: bool = True
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    inpaint: bool = False
    super_res: bool = False
    n_vocab: int = 50257
    out_channels: int = 6
    remat: bool = False
    scan_layers: bool = False  # runtime, not a GLIDE key: the text transformer as one lax.scan
    scan_blocks: bool = False  # runtime, not a GLIDE key: runs of same-shape UNet blocks as lax.scans
    kernels: str = "xla"  # runtime, not a GLIDE key: layers.KERNELS

    def __post_init__(self):
        check_kernels(self.kernels)
        object.__setattr__(self, "channel_mult", parse_channel_mult(self.channel_mult, self.image_size))
        object.__setattr__(self, "attention_resolutions", parse_ints(self.attention_resolutions))

    @classmethod
    def from_hparams(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """From a GLIDE hparams dict; diffusion/runtime keys are ignored, unknown keys rejected."""
        return cls(**_checked_kwargs(cls, d, _NON_MODEL_KEYS))

    @property
    def in_channels(self) -> int:
        return 3 + (4 if self.inpaint else 0) + (3 if self.super_res else 0)

    @property
    def trunk(self) -> "TrunkSpec":
        return TrunkSpec(
            model_channels=self.num_channels,
            channel_mult=self.channel_mult,
            num_res_blocks=self.num_res_blocks,
            attention_ds=tuple(self.image_size // r for r in self.attention_resolutions),
            dropout=self.dropout,
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
            num_heads_upsample=self.num_heads_upsample,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            remat=self.remat,
            scan_blocks=self.scan_blocks,
            kernels=self.kernels,
        )


@dataclasses.dataclass(frozen=True)
class EncoderUNetConfig:
    """guided-diffusion's EncoderUNetModel constructor keys (the ADM noisy classifier).

    Unlike UNetConfig, `attention_resolutions` are downsampling factors (ds) and
    `model_channels` is the base width; `channel_mult` may hold fractions (0.5 at 512 px) and
    "" means guided-diffusion's create_classifier default. `use_checkpoint` turns on rematerialisation;
    `use_fp16` is accepted and ignored (pass `dtype` to the module instead).
    """

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int = 1000
    num_res_blocks: int = 4
    attention_resolutions: tuple[int, ...] | str = (2, 4, 8)
    dropout: float = 0.0
    channel_mult: tuple[int, ...] | str = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    pool: str = "adaptive"
    kernels: str = "xla"  # runtime, not a guided-diffusion key: layers.KERNELS

    def __post_init__(self):
        check_kernels(self.kernels)
        cm = self.channel_mult
        if isinstance(cm, str) and cm == "":
            if self.image_size not in _CLASSIFIER_CHANNEL_MULT:
                raise ValueError(f"no default channel_mult for image_size {self.image_size}")
            cm = _CLASSIFIER_CHANNEL_MULT[self.image_size]
        elif isinstance(cm, str):
            cm = cm.split(",")
        object.__setattr__(self, "channel_mult", tuple(_number(m) for m in cm))
        object.__setattr__(self, "attention_resolutions", parse_ints(self.attention_resolutions))
        if self.dims != 2:
            raise ValueError("only dims=2 is supported")
        if self.pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise ValueError(f"unexpected pool {self.pool!r}")
        if self.pool == "attention" and self.num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels != -1")

    @classmethod
    def from_hparams(cls, d: Mapping[str, Any]) -> "EncoderUNetConfig":
        return cls(**_checked_kwargs(cls, d, frozenset({"kind"})))

    @property
    def trunk(self) -> "TrunkSpec":
        return TrunkSpec(
            model_channels=self.model_channels,
            channel_mult=self.channel_mult,
            num_res_blocks=self.num_res_blocks,
            attention_ds=self.attention_resolutions,
            dropout=self.dropout,
            num_heads=self.num_heads,
            num_head_channels=self.num_head_channels,
            num_heads_upsample=self.num_heads_upsample,
            use_scale_shift_norm=self.use_scale_shift_norm,
            resblock_updown=self.resblock_updown,
            conv_resample=self.conv_resample,
            use_new_attention_order=self.use_new_attention_order,
            remat=self.use_checkpoint,
            kernels=self.kernels,
        )


@dataclasses.dataclass(frozen=True)
class TrunkSpec:
    """What the shared UNet trunk (time embedding, input/middle/output blocks) needs."""

    model_channels: int
    channel_mult: tuple[int | float, ...]
    num_res_blocks: int
    attention_ds: tuple[int, ...]
    dropout: float = 0.0
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    use_new_attention_order: bool = False
    remat: bool = False
    scan_blocks: bool = False  # see `_res_attn_run`
    kernels: str = "xla"


# The trunk functions below create sub-modules inline, so they must be called from inside a
# compact method of the owning module (passed as `m`); the sub-modules become its children
# under GLIDE's names.


def _blocks(spec: TrunkSpec):
    if spec.remat:
        return nn.remat(ResBlock), nn.remat(AttentionBlock)
    return ResBlock, AttentionBlock


def _block_boundary(m: nn.Module, name: str, h: jax.Array) -> jax.Array:
    """End of a UNet block: the activation stays batch-sharded, and its spatial mean is sown
    for the parity traces."""
    h = constrain_batch(h)
    m.sow("intermediates", name, h.astype(jnp.float32).mean(axis=(1, 2)))
    return h


def embed_timesteps(m: nn.Module, spec: TrunkSpec, t: jax.Array) -> jax.Array:
    """time_embed_2(SiLU(time_embed_0(sinusoid(t)))) in float32. t: [B] -> [B, 4C]."""
    t_sin = timestep_embedding(t, spec.model_channels)
    m.sow("intermediates", "t_sinusoid", t_sin)
    emb = Dense(4 * spec.model_channels, name="time_embed_0")(t_sin)
    return Dense(4 * spec.model_channels, name="time_embed_2")(nn.silu(emb))


def _res_attn(spec, prefix, h, emb, xf_out, out_ch, use_attn, heads, train, dtype):
    res_cls, attn_cls = _blocks(spec)
    h = res_cls(out_ch, spec.use_scale_shift_norm, spec.dropout, train=train, dtype=dtype,
                kernels=spec.kernels, name=f"{prefix}_0")(h, emb)
    if use_attn:
        h = attn_cls(heads, spec.num_head_channels, spec.use_new_attention_order, dtype, spec.kernels,
                     name=f"{prefix}_1")(h, xf_out)
    return h


def _res_attn_run(m, spec: TrunkSpec, prefixes, h, emb, xf_out, out_ch, use_attn, heads, train, dtype,
                  skips=None, keep_outputs=True):
    """Blocks `prefixes` in order, each a ResBlock `{p}_0` (+ attention `{p}_1`) on h, or on
    concat([h, skip_j]) when `skips` are given; every block's output stays batch-sharded.

    With `spec.scan_blocks` (and outside `init`, which creates the per-block names) a run of two or
    more blocks is ONE `jax.lax.scan` over their parameters stacked per leaf, so the compiler sees
    one block body instead of n copies; the caller must pass only blocks of one shape (same input
    and skip channels). Parameters, outputs and gradients are those of the unrolled blocks; only
    the dropout masks come from another split of the step's dropout key.

    h: [B, H, W, C_in] -> (h [B, H, W, out_ch], the n block outputs if `keep_outputs` else []).
    """
    n = len(prefixes)
    if not spec.scan_blocks or n < 2 or m.is_initializing():
        outs = []
        for j, p in enumerate(prefixes):
            if skips is not None:
                h = jnp.concatenate([h, skips[j].astype(h.dtype)], axis=-1)
            h = constrain_batch(_res_attn(spec, p, h, emb, xf_out, out_ch, use_attn, heads, train, dtype))
            outs.append(h)
        return h, outs if keep_outputs else []

    params = nn.meta.unbox(m.variables["params"])
    per_block = [{"res": params[f"{p}_0"], **({"attn": params[f"{p}_1"]} if use_attn else {})}
                 for p in prefixes]
    xs: dict[str, Any] = {"p": jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_block)}
    if skips is not None:
        xs["skip"] = jnp.stack([s.astype(h.dtype) for s in skips])
    if train and spec.dropout > 0:
        xs["rng"] = jax.random.split(m.make_rng("dropout"), n)
    # unbound templates, applied functionally with each block's parameters
    res = ResBlock(out_ch, spec.use_scale_shift_norm, spec.dropout, train=train, dtype=dtype,
                   kernels=spec.kernels, parent=None)
    attn = AttentionBlock(heads, spec.num_head_channels, spec.use_new_attention_order, dtype, spec.kernels,
                          parent=None)

    def body(h, x):
        if "skip" in x:
            h = jnp.concatenate([h, x["skip"]], axis=-1)
        rngs = {"dropout": x["rng"]} if "rng" in x else None
        h = res.apply({"params": x["p"]["res"]}, h, emb, rngs=rngs)
        if use_attn:
            h = attn.apply({"params": x["p"]["attn"]}, h, xf_out)
        h = constrain_batch(h)
        return h, (h if keep_outputs else None)

    if spec.remat:
        # nn.remat per block, as unrolled: keep each block's input, recompute its inside
        body = jax.checkpoint(body, prevent_cse=False)
    h, ys = jax.lax.scan(body, h, xs)
    return h, [ys[j] for j in range(n)] if keep_outputs else []


def _runs(keys):
    """Consecutive equal keys -> [[i, ...], ...] index groups."""
    groups: list[list[int]] = []
    for i, k in enumerate(keys):
        if groups and keys[groups[-1][-1]] == k:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def down_path(m, spec: TrunkSpec, h, emb, xf_out, train: bool, dtype: Dtype):
    """input_blocks. h: [B, S, S, C_in] -> (h [B, S/2^(L-1), ., C], skips list)."""
    res_cls, _ = _blocks(spec)
    mc = spec.model_channels
    h = Conv(int(spec.channel_mult[0] * mc), 3, dtype=dtype, algorithm=conv_algorithm_of(spec.kernels),
             name="input_blocks_0_0")(h)
    hs = [h]
    h = _block_boundary(m, "trace.input_blocks.0", h)
    ds = 1
    for level, mult in enumerate(spec.channel_mult):
        out_ch = int(mult * mc)
        # a level's first block may change the channel count; the others keep it
        in_chs = [h.shape[-1]] + [out_ch] * (spec.num_res_blocks - 1)
        for run in _runs(in_chs):
            first = len(hs)
            h, outs = _res_attn_run(m, spec, [f"input_blocks_{first + j}" for j in range(len(run))], h,
                                    emb, xf_out, out_ch, ds in spec.attention_ds, spec.num_heads, train, dtype)
            for j, out in enumerate(outs):
                hs.append(out)
                _block_boundary(m, f"trace.input_blocks.{first + j}", out)
        if level != len(spec.channel_mult) - 1:
            i = len(hs)
            name = f"input_blocks_{i}_0"
            if spec.resblock_updown:
                h = res_cls(h.shape[-1], spec.use_scale_shift_norm, spec.dropout, down=True,
                            train=train, dtype=dtype, kernels=spec.kernels, name=name)(h, emb)
            else:
                h = Downsample(spec.conv_resample, dtype=dtype, kernels=spec.kernels,
                               name=name)(h)
            hs.append(h)
            h = _block_boundary(m, f"trace.input_blocks.{i}", h)
            ds *= 2
    return h, hs


def middle_block(m, spec: TrunkSpec, h, emb, xf_out, train: bool, dtype: Dtype):
    """middle_block_0 ResBlock, middle_block_1 attention, middle_block_2 ResBlock."""
    res_cls, attn_cls = _blocks(spec)
    c = h.shape[-1]
    h = res_cls(c, spec.use_scale_shift_norm, spec.dropout, train=train, dtype=dtype,
                kernels=spec.kernels, name="middle_block_0")(h, emb)
    h = attn_cls(spec.num_heads, spec.num_head_channels, spec.use_new_attention_order, dtype, spec.kernels,
                 name="middle_block_1")(h, xf_out)
    h = res_cls(c, spec.use_scale_shift_norm, spec.dropout, train=train, dtype=dtype,
                kernels=spec.kernels, name="middle_block_2")(h, emb)
    h = _block_boundary(m, "trace.middle_block", h)
    return h


def up_path(m, spec: TrunkSpec, h, hs, emb, xf_out, train: bool, dtype: Dtype):
    """output_blocks: concat [h, skip] -> ResBlock (+ attention) (+ upsampler)."""
    res_cls, _ = _blocks(spec)
    heads_up = spec.num_heads if spec.num_heads_upsample == -1 else spec.num_heads_upsample
    hs = list(hs)
    ds = 2 ** (len(spec.channel_mult) - 1)
    i = 0
    traced = m.is_mutable_collection("intermediates")
    for level, mult in reversed(list(enumerate(spec.channel_mult))):
        out_ch = int(mult * spec.model_channels)
        use_attn = ds in spec.attention_ds
        n = spec.num_res_blocks + 1
        skips = [hs.pop() for _ in range(n)]
        # block r reads [h, skip_r]: h has the incoming channels at r = 0, out_ch after
        keys = [(h.shape[-1] if r == 0 else out_ch, s.shape[-1]) for r, s in enumerate(skips)]
        for run in _runs(keys):
            h, outs = _res_attn_run(m, spec, [f"output_blocks_{i + j}" for j in range(len(run))], h, emb,
                                    xf_out, out_ch, use_attn, heads_up, train, dtype,
                                    skips=[skips[r] for r in run], keep_outputs=traced)
            last = run[-1] == n - 1
            for j, out in enumerate(outs):
                if not (last and j == len(run) - 1):
                    _block_boundary(m, f"trace.output_blocks.{i + j}", out)
            i += len(run)
        if level:
            name = f"output_blocks_{i - 1}_{2 if use_attn else 1}"
            if spec.resblock_updown:
                h = res_cls(h.shape[-1], spec.use_scale_shift_norm, spec.dropout, up=True,
                            train=train, dtype=dtype, kernels=spec.kernels,
                            name=name)(h, emb)
            else:
                h = Upsample(spec.conv_resample, dtype=dtype, kernels=spec.kernels,
                             name=name)(h)
            ds //= 2
        h = _block_boundary(m, f"trace.output_blocks.{i - 1}", h)
    return h


def upsample_bilinear(low_res: jax.Array, size: int) -> jax.Array:
    """Bilinear resize with half-pixel centres, no antialiasing (PyTorch align_corners=False).

    [B, s, s, C] -> [B, size, size, C] float32.
    """
    b, _, _, c = low_res.shape
    return jax.image.resize(
        low_res.astype(jnp.float32), (b, size, size, c), method="linear", antialias=False
    )


class Text2ImUNet(nn.Module):
    """GLIDE's text-conditional UNet (base / super-res / inpaint by config flags). NHWC.

    The text-encoder parameters live at the top level of the parameter tree (as in GLIDE).
    Intermediates (`t_sinusoid`, `xf_proj`, `xf_out`, `emb`, `model_input`,
    `low_res_upsampled`, `trace.*`) are sown into the 'intermediates' collection.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        c = self.config
        if c.xf_width:
            self.text_encoder = TextEncoder(
                text_ctx=c.text_ctx,
                width=c.xf_width,
                layers=c.xf_layers,
                heads=c.xf_heads,
                proj_features=4 * c.num_channels,
                final_ln=c.xf_final_ln,
                padding=c.xf_padding,
                n_vocab=c.n_vocab,
                dtype=self.dtype,
                remat=c.remat,
                scan=c.scan_layers,
            )
            nn.share_scope(self, self.text_encoder)

    def encode_text(self, tokens: jax.Array, mask: jax.Array | None) -> dict[str, jax.Array]:
        """tokens [B, L] int, mask [B, L] bool -> dict(xf_proj [B, 4C], xf_out [B, L, W])."""
        if not self.config.xf_width:
            raise ValueError("this UNet has no text encoder (xf_width = 0)")
        return self.text_encoder(tokens, mask)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        tokens: jax.Array | None = None,
        mask: jax.Array | None = None,
        *,
        low_res: jax.Array | None = None,
        inpaint_image: jax.Array | None = None,
        inpaint_mask: jax.Array | None = None,
        text: Mapping[str, jax.Array] | None = None,
        train: bool = False,
    ) -> jax.Array:
        """x [B, S, S, 3], t [B] (original timesteps) -> [B, S, S, out_channels] float32."""
        c = self.config
        x = x.astype(jnp.float32)
        parts = [x]
        if c.inpaint:
            if inpaint_image is None:
                inpaint_image = jnp.zeros_like(x)
            if inpaint_mask is None:
                inpaint_mask = jnp.zeros_like(x[..., :1])
            inpaint_mask = inpaint_mask.astype(jnp.float32)
            parts += [inpaint_image.astype(jnp.float32) * inpaint_mask, inpaint_mask]
        if c.super_res:
            if low_res is None:
                raise ValueError("a super-resolution UNet needs low_res")
            up = upsample_bilinear(low_res, x.shape[1])
            self.sow("intermediates", "low_res_upsampled", up)
            parts.append(up)
        h = jnp.concatenate(parts, axis=-1)
        self.sow("intermediates", "model_input", h)

        spec = c.trunk
        emb = embed_timesteps(self, spec, t)
        xf_out = None
        if c.xf_width:
            if text is None:
                if tokens is None:
                    raise ValueError("a text-conditional UNet needs tokens (or text=encode_text(...))")
                text = self.encode_text(tokens, mask)
            self.sow("intermediates", "xf_proj", text["xf_proj"])
            self.sow("intermediates", "xf_out", text["xf_out"])
            emb = emb + text["xf_proj"].astype(jnp.float32)
            xf_out = text["xf_out"]
        self.sow("intermediates", "emb", emb)

        h, hs = down_path(self, spec, h.astype(self.dtype), emb, xf_out, train, self.dtype)
        h = middle_block(self, spec, h, emb, xf_out, train, self.dtype)
        h = up_path(self, spec, h, hs, emb, xf_out, train, self.dtype)
        h = GroupNorm(fused_vjp=c.kernels != "xla", name="out_0")(h, silu=True)
        return Conv(c.out_channels, 3, kernel_init=zeros, algorithm=conv_algorithm_of(c.kernels), name="out_2")(h)

    @nn.nowrap
    def init_inputs(self, batch: int = 1) -> dict[str, jax.Array]:
        """Example keyword arguments for `init` / `jax.eval_shape` (zeros)."""
        c = self.config
        s = c.image_size
        kw: dict[str, Any] = dict(
            x=jnp.zeros((batch, s, s, 3), jnp.float32), t=jnp.zeros((batch,), jnp.int32)
        )
        if c.xf_width:
            kw["tokens"] = jnp.zeros((batch, c.text_ctx), jnp.int32)
            kw["mask"] = jnp.ones((batch, c.text_ctx), bool)
        if c.super_res:
            kw["low_res"] = jnp.zeros((batch, max(s // 4, 1), max(s // 4, 1), 3), jnp.float32)
        if c.inpaint:
            kw["inpaint_image"] = jnp.zeros((batch, s, s, 3), jnp.float32)
            kw["inpaint_mask"] = jnp.ones((batch, s, s, 1), jnp.float32)
        return kw


class EncoderUNet(nn.Module):
    """guided-diffusion's EncoderUNetModel (the noisy ADM classifier): the UNet's time embedding,
    input blocks and middle block (shared code, no text), then a pooling head `out_*`.

    x [B, S, S, in_channels], t [B] -> logits [B, out_channels] float32.
    """

    config: EncoderUNetConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        c = self.config
        spec = c.trunk
        emb = embed_timesteps(self, spec, t)
        self.sow("intermediates", "emb", emb)
        h, hs = down_path(self, spec, x.astype(self.dtype), emb, None, train, self.dtype)
        h = middle_block(self, spec, h, emb, None, train, self.dtype)
        h = h.astype(jnp.float32)
        if c.pool == "adaptive":
            h = GroupNorm(fused_vjp=c.kernels != "xla", name="out_0")(h, silu=True).mean(axis=(1, 2), keepdims=True)
            return Conv(c.out_channels, 1, kernel_init=zeros, name="out_3")(h)[:, 0, 0]
        if c.pool == "attention":
            h = GroupNorm(fused_vjp=c.kernels != "xla", name="out_0")(h, silu=True)
            return AttentionPool2d(c.num_head_channels, c.out_channels, name="out_2")(h)
        feats = jnp.concatenate(
            [f.astype(jnp.float32).mean(axis=(1, 2)) for f in hs] + [h.mean(axis=(1, 2))], axis=-1
        )
        if c.pool == "spatial":
            h = nn.relu(Dense(2048, name="out_0")(feats))
            return Dense(c.out_channels, name="out_2")(h)
        h = GroupNorm(fused_vjp=c.kernels != "xla", name="out_1")(Dense(2048, name="out_0")(feats), silu=True)
        return Dense(c.out_channels, name="out_3")(h)

    @nn.nowrap
    def init_inputs(self, batch: int = 1) -> dict[str, jax.Array]:
        s = self.config.image_size
        return dict(
            x=jnp.zeros((batch, s, s, self.config.in_channels), jnp.float32),
            t=jnp.zeros((batch,), jnp.int32),
        )
