"""Building blocks shared by every glide_jax network.

This is the ONLY module that attaches logical axis names to parameters (see
`glide_jax.sharding` for the rules that map them to mesh axes). Every network
(UNet, text transformer, CLIP, classifier) is assembled from these layers.

Layout: activations are NHWC ([B, H, W, C]) or [B, T, C]; parameters use Flax
layouts (Dense kernel [in, out], Conv kernel [kh, kw, in, out]). Parameters are
float32; `dtype` is the compute dtype. Normalisation and softmax always run in
float32, whatever the compute dtype (GLIDE does the same in fp16).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Initializer = Callable[..., jax.Array]

# Logical axis names. `glide_jax.sharding.DEFAULT_RULES` maps them to mesh axes.
IN = "in_features"        # input dimension of a Dense / Conv kernel
OUT = "out_features"      # output dimension of a Dense / Conv kernel, biases
VOCAB = "vocab"           # rows of a token table
EMBED = "embed"           # width of an embedding table / positional table
POSITION = "position"     # rows of a positional table
NORM = "norm"             # norm scale / bias
KERNEL_SPATIAL = None     # conv spatial dims are never sharded


def _param(init: Initializer, names: Sequence[str | None]) -> Initializer:
    return nn.with_logical_partitioning(init, tuple(names))


default_kernel_init = nn.initializers.lecun_normal()
zeros = nn.initializers.zeros_init()
ones = nn.initializers.ones_init()


class Dense(nn.Module):
    """y = x @ kernel + bias over the last axis. x: [..., in] -> [..., features]."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", _param(self.kernel_init, (IN, OUT)), (x.shape[-1], self.features), jnp.float32
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", _param(self.bias_init, (OUT,)), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class Conv(nn.Module):
    """2-D convolution, NHWC, 'SAME'-style symmetric padding k//2.

    x: [B, H, W, Cin] -> [B, H/stride, W/stride, features].
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            _param(self.kernel_init, (KERNEL_SPATIAL, KERNEL_SPATIAL, IN, OUT)),
            (k, k, x.shape[-1], self.features),
            jnp.float32,
        )
        pad = k // 2
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            bias = self.param("bias", _param(self.bias_init, (OUT,)), (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class GroupNorm(nn.Module):
    """GroupNorm(32) over the channel (last) axis, computed in float32.

    Returns float32 (callers cast to the compute dtype after the following
    activation), matching GLIDE's GroupNorm32 which normalises in float32.
    """

    num_groups: int = 32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, modulation: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """x: [B, ..., C]; modulation: optional FiLM (scale, shift), each broadcastable to
        [B, 1, ..., 1, C]: returns GroupNorm(x) * (1 + scale) + shift (GLIDE's scale-shift norm)."""
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm({self.num_groups}) needs channels divisible by it, got {c}")
        scale = self.param("scale", _param(ones, (NORM,)), (c,), jnp.float32)
        bias = self.param("bias", _param(zeros, (NORM,)), (c,), jnp.float32)
        return group_norm(x.astype(jnp.float32), scale, bias, self.num_groups, self.eps, modulation)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float,
               modulation: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """GroupNorm of x [B, ..., C] over (spatial, channels-in-group), two-pass statistics,
    then the affine (scale, bias [C]) and the optional FiLM modulation folded into one
    per-(batch, channel) multiplier and offset: out = (x - mean) * A + B.

    Statistics are per (batch, group) [B, G] and are expanded to per-channel [B, C] before
    touching the full-size tensor, so every full-size op broadcasts along the contiguous
    channel axis. (The textbook reshape to [..., G, C/G] makes XLA:CPU's loop fusions iterate
    an inner axis of C/G = 2..8 elements, and leaving the small per-channel algebra to the
    big fusion recomputes it per element: together 2-4x slower forward and backward.)
    """
    b, c = x.shape[0], x.shape[-1]
    per_group = c // num_groups
    n = x.size // (b * num_groups)

    def group_sum(y):  # [B, ..., C] -> [B, G]
        return y.reshape(b, -1, num_groups, per_group).sum(axis=(1, 3))

    def per_channel(s):  # [B, G] -> [B, 1, ..., 1, C]
        return jnp.repeat(s, per_group, axis=-1).reshape((b,) + (1,) * (x.ndim - 2) + (c,))

    d = x - per_channel(group_sum(x) / n)
    mult = per_channel(jax.lax.rsqrt(group_sum(jnp.square(d)) / n + eps)) * scale
    offset = jnp.broadcast_to(bias, mult.shape)
    if modulation is not None:
        mod_scale, mod_shift = modulation
        mult = mult * (1 + mod_scale)
        offset = offset * (1 + mod_scale) + mod_shift
    return d * mult + offset


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (eps 1e-5 as in GLIDE and CLIP)."""

    eps: float = 1e-5
    scale_name: str = "scale"
    bias_name: str = "bias"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param(self.scale_name, _param(ones, (NORM,)), (c,), jnp.float32)
        bias = self.param(self.bias_name, _param(zeros, (NORM,)), (c,), jnp.float32)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class Embed(nn.Module):
    """Token table lookup. ids: [...] int -> [..., features]."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
    param_name: str = "embedding"

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.param(
            self.param_name,
            _param(self.embedding_init, (VOCAB, EMBED)),
            (self.num_embeddings, self.features),
            jnp.float32,
        )
        return jnp.take(table, ids, axis=0).astype(self.dtype)


def hash_uniform_bits(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 [shape] pseudo-random bits: murmur3's 32-bit finaliser of (element index + seed).

    A counter-based generator of ~8 integer ops per element, for dropout masks: threefry
    (jax.random) costs ~10x more per element, which on XLA:CPU made dropout alone ~5% of the
    bench config's training step. Statistically fine for masks (fmix32 is a bijective
    avalanche mixer); not for anything cryptographic. seed: uint32 scalar.
    """
    x = jax.lax.iota(jnp.uint32, int(np.prod(shape))).reshape(shape)
    x = x * jnp.uint32(0x9E3779B9) + seed  # spread consecutive indices before mixing
    x ^= x >> 16
    x *= jnp.uint32(0x85EBCA6B)
    x ^= x >> 13
    x *= jnp.uint32(0xC2B2AE35)
    x ^= x >> 16
    return x


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate` (quantised to 1/2^32),
    scale the rest by 1/(1-rate). rng: a jax PRNG key (one 32-bit draw seeds the mask)."""
    if rate <= 0:
        return x
    seed = jax.random.bits(rng, (), jnp.uint32)
    threshold = jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
    keep = hash_uniform_bits(seed, x.shape) >= threshold
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """Dropout with the cheap counter-based mask above; draws from the 'dropout' rng stream."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate <= 0:
            return x
        if self.rate >= 1:
            return jnp.zeros_like(x)
        return dropout(x, self.rate, self.make_rng("dropout"))


def table_param(
    module: nn.Module, name: str, shape: tuple[int, int], init: Initializer = nn.initializers.normal(0.01)
) -> jax.Array:
    """A free-standing [rows, width] float32 table (positional / padding embeddings)."""
    return module.param(name, _param(init, (POSITION, EMBED)), shape, jnp.float32)


def free_param(
    module: nn.Module, name: str, shape: tuple[int, ...], init: Initializer, names: Sequence[str | None]
) -> jax.Array:
    """Any other float32 parameter, with explicit logical axis names."""
    if len(names) != len(shape):
        raise ValueError(f"{name}: {len(names)} axis names for shape {shape}")
    return module.param(name, _param(init, names), shape, jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Multi-head dot-product attention, softmax in float32.

    Args:
      q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; mask: optional bool broadcastable
        to [B, H, Tq, Tk] (True = attend).
    Returns:
      [B, Tq, H, D] in q's dtype.
    """
    dtype = q.dtype
    scale = 1.0 / np.sqrt(np.sqrt(q.shape[-1]))  # GLIDE scales q and k each by d^-1/4
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k * scale).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features [cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k / half).

    t: [B] (any numeric dtype) -> [B, dim] float32. Frequencies in float32 as GLIDE.
    """
    half = dim // 2
    freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


# ----------------------------------------------------------------------------------------------
# UNet building blocks (GLIDE / guided-diffusion). Sub-module names mirror the PyTorch module
# names (`in_layers_0` = `in_layers.0`, ...) so that the weight port is a table.


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling. [B, H, W, C] -> [B, 2H, 2W, C]."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2 (odd trailing rows/columns dropped as in PyTorch)."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def resolve_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """GLIDE's head count: channels // num_head_channels unless that is -1, else num_heads."""
    if num_head_channels == -1:
        if channels % num_heads:
            raise ValueError(f"{channels} channels not divisible by {num_heads} heads")
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"{channels} channels not divisible by num_head_channels {num_head_channels}")
    return channels // num_head_channels


class Upsample(nn.Module):
    """Nearest 2x upsampling, then an optional 3x3 conv (`conv`). [B,H,W,C] -> [B,2H,2W,C']."""

    use_conv: bool = True
    out_channels: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest_2x(x)
        if self.use_conv:
            x = Conv(self.out_channels or x.shape[-1], 3, dtype=self.dtype, name="conv")(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`) or, without conv, 2x2 average pooling. [B,H,W,C] -> [B,H/2,W/2,C']."""

    use_conv: bool = True
    out_channels: int | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return Conv(self.out_channels or x.shape[-1], 3, stride=2, dtype=self.dtype, name="op")(x)
        if self.out_channels not in (None, x.shape[-1]):
            raise ValueError("average-pool downsampling cannot change the channel count")
        return avg_pool_2x(x)


class ResBlock(nn.Module):
    """GLIDE residual block conditioned on the embedding `emb`.

    in_layers (GroupNorm, SiLU, [up/down], 3x3 conv) -> + emb_layers(emb) (or FiLM scale/shift
    around out_layers_0) -> out_layers (GroupNorm, SiLU, dropout, zero-init 3x3 conv), plus the
    skip path (x, [up/down], 1x1 conv when the channel count changes).

    x: [B, H, W, C_in], emb: [B, E] -> [B, H', W', out_channels] (H' = 2H / H/2 for up / down).
    """

    out_channels: int
    use_scale_shift_norm: bool = True
    dropout: float = 0.0
    up: bool = False
    down: bool = False
    train: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        c_out = self.out_channels
        h = nn.silu(GroupNorm(name="in_layers_0")(x)).astype(self.dtype)
        if self.up:
            h, x = upsample_nearest_2x(h), upsample_nearest_2x(x)
        elif self.down:
            h, x = avg_pool_2x(h), avg_pool_2x(x)
        h = Conv(c_out, 3, dtype=self.dtype, name="in_layers_2")(h)

        n_emb = 2 * c_out if self.use_scale_shift_norm else c_out
        emb_out = Dense(n_emb, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))
        emb_out = emb_out.astype(jnp.float32)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm(name="out_layers_0")(h, modulation=(scale, shift))
        else:
            h = GroupNorm(name="out_layers_0")(h + emb_out)
        h = nn.silu(h).astype(self.dtype)
        if self.dropout > 0:
            h = Dropout(self.dropout, name="out_layers_2")(h, deterministic=not self.train)
        h = Conv(c_out, 3, dtype=self.dtype, kernel_init=zeros, name="out_layers_3")(h)

        if x.shape[-1] != c_out:
            x = Conv(c_out, 1, dtype=self.dtype, name="skip_connection")(x)
        return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions (plus encoder tokens when `encoder_out` is given).

    `qkv` (a 1x1 conv as Dense C -> 3C) is split per head first ([q0,k0,v0,q1,...], GLIDE's
    legacy order) or, with `use_new_attention_order`, q/k/v first ([q_all, k_all, v_all]).
    `encoder_kv` (Dense W_enc -> 2C, per-head [k0,v0,k1,v1,...]) projects the text features,
    whose keys/values are PREPENDED to the spatial ones. `proj_out` is zero-initialised.

    x: [B, H, W, C], encoder_out: optional [B, L, W_enc] -> [B, H, W, C].
    """

    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, encoder_out: jax.Array | None = None) -> jax.Array:
        b, hh, ww, c = x.shape
        heads = resolve_heads(c, self.num_heads, self.num_head_channels)
        d = c // heads
        h = GroupNorm(name="norm")(x).astype(self.dtype).reshape(b, hh * ww, c)
        qkv = Dense(3 * c, dtype=self.dtype, name="qkv")(h)
        if self.use_new_attention_order:
            q, k, v = jnp.moveaxis(qkv.reshape(b, hh * ww, 3, heads, d), 2, 0)
        else:
            q, k, v = jnp.split(qkv.reshape(b, hh * ww, heads, 3 * d), 3, axis=-1)
        if encoder_out is not None:
            ekv = Dense(2 * c, dtype=self.dtype, name="encoder_kv")(encoder_out.astype(self.dtype))
            ek, ev = jnp.split(ekv.reshape(b, encoder_out.shape[1], heads, 2 * d), 2, axis=-1)
            k = jnp.concatenate([ek, k], axis=1)
            v = jnp.concatenate([ev, v], axis=1)
        a = attention(q, k, v).reshape(b, hh * ww, c)
        a = Dense(c, dtype=self.dtype, kernel_init=zeros, name="proj_out")(a)
        return x.astype(self.dtype) + a.reshape(b, hh, ww, c)


class AttentionPool2d(nn.Module):
    """guided-diffusion's attention pooling head (adapted from CLIP), read at position 0.

    The mean over positions is prepended to the H*W positions, `positional_embedding`
    [C, H*W+1] is added, then one attention with `qkv_proj` (Dense C -> 3C, split q/k/v first,
    heads second) and `c_proj` (Dense C -> output_dim).

    x: [B, H, W, C] -> [B, output_dim].
    """

    num_head_channels: int
    output_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        heads = resolve_heads(c, 1, self.num_head_channels)
        d = c // heads
        pos = free_param(
            self,
            "positional_embedding",
            (c, hh * ww + 1),
            lambda key, shape, dtype: jax.random.normal(key, shape, dtype) / np.sqrt(c),
            (EMBED, POSITION),
        )
        x = x.reshape(b, hh * ww, c)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        x = (x + pos.T[None].astype(x.dtype)).astype(self.dtype)
        qkv = Dense(3 * c, dtype=self.dtype, name="qkv_proj")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, hh * ww + 1, 3, heads, d), 2, 0)
        a = attention(q[:, :1], k, v).reshape(b, 1, c)
        return Dense(self.output_dim, dtype=self.dtype, name="c_proj")(a)[:, 0]
