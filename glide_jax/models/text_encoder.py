"""GLIDE's caption encoder: a pre-LN transformer over BPE tokens (glide_text2im/xf.py).

`TextEncoder` owns the parameters GLIDE's `Text2ImUNet` holds directly (`token_embedding`,
`positional_embedding`, `padding_embedding`, `transformer/resblocks_<j>/...`, `final_ln`,
`transformer_proj`). The UNet attaches it with `nn.share_scope`, so these names sit at the top
level of the UNet's parameter tree exactly as in the PyTorch state_dict.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from glide_jax.models.layers import Dense, Dtype, Embed, LayerNorm, attention, repeated_blocks, table_param


class MultiheadAttention(nn.Module):
    """Unmasked self-attention; `c_qkv` outputs are grouped per head [q0,k0,v0,q1,...].

    x: [B, L, W] -> [B, L, W].
    """

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, w = x.shape
        qkv = Dense(3 * w, dtype=self.dtype, name="c_qkv")(x)
        q, k, v = jnp.split(qkv.reshape(b, n, self.heads, 3 * w // self.heads), 3, axis=-1)
        a = attention(q, k, v).reshape(b, n, w)
        return Dense(w, dtype=self.dtype, name="c_proj")(a)


class MLP(nn.Module):
    """c_fc (W -> 4W), exact (erf) GELU, c_proj (4W -> W)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = x.shape[-1]
        h = Dense(4 * w, dtype=self.dtype, name="c_fc")(x)
        return Dense(w, dtype=self.dtype, name="c_proj")(nn.gelu(h, approximate=False))


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)). [B, L, W] -> [B, L, W]."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + MultiheadAttention(self.heads, self.dtype, name="attn")(LayerNorm(name="ln_1")(x))
        x = x + MLP(self.dtype, name="mlp")(LayerNorm(name="ln_2")(x))
        return x.astype(self.dtype)


class Transformer(nn.Module):
    """`layers` pre-LN blocks named resblocks_<j>. [B, L, W] -> [B, L, W].

    `scan` runs the blocks as one `jax.lax.scan` (see `layers.repeated_blocks`); like `remat`, it
    leaves the parameters as they are.
    """

    layers: int
    heads: int
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        names = [f"resblocks_{j}" for j in range(self.layers)]
        x, _ = repeated_blocks(self, ResidualAttentionBlock, (self.heads, self.dtype), names, x,
                               remat=self.remat, scan=self.scan)
        return x


class TextEncoder(nn.Module):
    """Token + position embedding (padding embedding where mask is False), transformer,
    optional final LayerNorm, and `transformer_proj` of the LAST position (index text_ctx-1).

    tokens: [B, text_ctx] int, mask: [B, text_ctx] bool (True = real token) ->
    dict(xf_proj=[B, proj_features] float32, xf_out=[B, text_ctx, width] in `dtype`).
    """

    text_ctx: int
    width: int
    layers: int
    heads: int
    proj_features: int
    final_ln: bool = True
    padding: bool = True
    n_vocab: int = 50257
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False  # one lax.scan over the transformer's blocks (Transformer.scan)

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array | None) -> dict[str, jax.Array]:
        if tokens.shape[-1] != self.text_ctx:
            raise ValueError(f"tokens have length {tokens.shape[-1]}, expected text_ctx={self.text_ctx}")
        if self.width % self.heads:
            raise ValueError(f"xf_width {self.width} not divisible by xf_heads {self.heads}")
        x = Embed(self.n_vocab, self.width, name="token_embedding")(tokens)
        x = x + table_param(self, "positional_embedding", (self.text_ctx, self.width))[None]
        if self.padding:
            if mask is None:
                raise ValueError("xf_padding needs the token mask")
            pad = table_param(self, "padding_embedding", (self.text_ctx, self.width))
            x = jnp.where(mask[..., None], x, pad[None])
        x = Transformer(self.layers, self.heads, self.dtype, self.remat, self.scan, name="transformer")(
            x.astype(self.dtype)
        )
        if self.final_ln:
            x = LayerNorm(name="final_ln")(x).astype(self.dtype)
        xf_proj = Dense(self.proj_features, dtype=self.dtype, name="transformer_proj")(x[:, -1])
        return dict(xf_proj=xf_proj.astype(jnp.float32), xf_out=x)
