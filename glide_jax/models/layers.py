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
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm({self.num_groups}) needs channels divisible by it, got {c}")
        scale = self.param("scale", _param(ones, (NORM,)), (c,), jnp.float32)
        bias = self.param("bias", _param(zeros, (NORM,)), (c,), jnp.float32)
        x = x.astype(jnp.float32)
        g = x.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
        reduce_axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        mean = jnp.mean(g, axis=reduce_axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=reduce_axes, keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.eps)
        return g.reshape(x.shape) * scale + bias


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
