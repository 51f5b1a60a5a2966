"""GLIDE's noised CLIP: a timestep-conditioned ViT image encoder and a causal text encoder.

Mirrors `glide_text2im/clip/encoders.py` and `model_creation.py`. Flax paths follow the PyTorch
state-dict keys (`blocks.block_0.f_attn.f_q.w` -> `blocks/block_0/f_attn/f_q/kernel`), so
`clip_image_enc.pt` loads into the `image_enc` subtree and `clip_text_enc.pt` into `text_enc`.

Layout: images NHWC [B, S, S, 3] in [-1, 1]; sequences [B, T, W]. The residual stream stays
float32; matmuls run in `dtype`; LayerNorm and softmax in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.models import layers

Dtype = Any

# Per-channel pixel statistics of the original CLIP, on the 0..255 scale.
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)
NORM_EPS = 1e-12  # added to ‖x‖ when normalising embeddings


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """GLIDE's CLIP config (`glide_text2im/clip/config.yaml`); defaults are the released model."""

    logit_scale: float = 100.0
    beta_schedule: str = "squaredcos_cap_v2"
    n_timesteps: int = 1000
    image_size: int = 64
    patch_size: int = 4
    n_vocab: int = 65536
    max_text_len: int = 77
    n_embd: int = 512
    n_head_state_text: int = 64
    n_head_text: int = 8
    n_xf_blocks_text: int = 12
    n_head_state_image: int = 64
    n_head_image: int = 12
    n_xf_blocks_image: int = 12
    scan_layers: bool = False  # runtime, not a GLIDE key: each encoder's blocks as one lax.scan

    @classmethod
    def from_hparams(cls, d: Mapping[str, Any]) -> "ClipConfig":
        """From a parity `hparams.json` dict (`kind` is ignored); unknown keys are an error."""
        d = {k: v for k, v in d.items() if k != "kind"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"ClipConfig: unknown hyper-parameters {unknown}; known: {sorted(fields)}")
        return cls(**{k: type(fields[k].default)(v) for k, v in d.items()})

    @property
    def width_image(self) -> int:
        return self.n_head_image * self.n_head_state_image

    @property
    def width_text(self) -> int:
        return self.n_head_text * self.n_head_state_text

    @property
    def n_patches(self) -> int:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not a multiple of patch_size {self.patch_size}")
        return (self.image_size // self.patch_size) ** 2


def normalize(x: jax.Array) -> jax.Array:
    """x / (‖x‖₂ + 1e-12) over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + NORM_EPS)


def _normal(std: float) -> layers.Initializer:
    return nn.initializers.normal(stddev=float(std))


class AttentionResblock(nn.Module):
    """m + f_c(attention(f_q(ln m), f_k(ln m), f_v(ln m))); heads are contiguous channel groups."""

    n_head: int
    n_resblocks: int  # 2 × number of transformer blocks (scales the output init)
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, m: jax.Array) -> jax.Array:
        b, n, w = m.shape
        d = w // self.n_head
        r = layers.LayerNorm(name="ln")(m).astype(self.dtype)
        init = _normal(1 / np.sqrt(w))
        q = layers.Dense(w, dtype=self.dtype, kernel_init=init, name="f_q")(r)
        k = layers.Dense(w, use_bias=False, dtype=self.dtype, kernel_init=init, name="f_k")(r)
        v = layers.Dense(w, dtype=self.dtype, kernel_init=init, name="f_v")(r)
        def heads(x):  # [B, N, W] -> [B, N, H, D], head h = channels h·D … (h+1)·D−1
            return x.reshape(b, n, self.n_head, d)

        mask = jnp.tril(jnp.ones((n, n), bool))[None, None] if self.causal else None
        r = layers.attention(heads(q), heads(k), heads(v), mask).reshape(b, n, w)
        r = layers.Dense(w, dtype=self.dtype, kernel_init=_normal(1 / np.sqrt(w * self.n_resblocks**2)),
                         name="f_c")(r)
        return m + r


class MlpResblock(nn.Module):
    """m + f_2(gelu(f_1(ln m))), exact (erf) GELU as torch's F.gelu."""

    n_resblocks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, m: jax.Array) -> jax.Array:
        w = m.shape[-1]
        r = layers.LayerNorm(name="ln")(m).astype(self.dtype)
        r = layers.Dense(4 * w, dtype=self.dtype, kernel_init=_normal(np.sqrt(2 / (4 * w))), name="f_1")(r)
        r = jax.nn.gelu(r, approximate=False)
        r = layers.Dense(w, dtype=self.dtype, kernel_init=_normal(1 / np.sqrt(w * self.n_resblocks**2)),
                         name="f_2")(r)
        return m + r


class TransformerBlock(nn.Module):
    n_head: int
    n_resblocks: int
    causal: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = AttentionResblock(self.n_head, self.n_resblocks, self.causal, self.dtype, name="f_attn")(x)
        return MlpResblock(self.n_resblocks, self.dtype, name="f_mlp")(x)


class FeatureExtractor(nn.Module):
    """f(ln(x)) for one position x: [B, W] -> [B, n_embd] float32 (f has no bias)."""

    n_embd: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.LayerNorm(name="ln")(x).astype(self.dtype)
        init = _normal(np.sqrt(2 / (x.shape[-1] + self.n_embd)))
        return layers.Dense(self.n_embd, use_bias=False, dtype=self.dtype, kernel_init=init, name="f")(x)


class ImageEmbedding(nn.Module):
    """[w_t[t]; patch_proj(standardised pixels)] + w_pos, then LayerNorm -> [B, 1+P, W] float32."""

    config: ClipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, t: jax.Array) -> jax.Array:
        c = self.config
        w, p = c.width_image, c.patch_size
        if images.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"images must be [B, {c.image_size}, {c.image_size}, 3], got {images.shape}")
        w_t = layers.table_param(self, "w_t", (c.n_timesteps, w), _normal(1 / np.sqrt(w)))
        patch_proj = layers.free_param(
            self, "patch_proj", (p, p, 3, w), _normal(np.sqrt(2 / (w * p * p))),
            (layers.KERNEL_SPATIAL, layers.KERNEL_SPATIAL, layers.IN, layers.OUT),
        )
        w_pos = layers.table_param(self, "w_pos", (1 + c.n_patches, w), _normal(1 / np.sqrt(w)))

        pixels = (images.astype(jnp.float32) + 1) * 127.5  # what OpenAI's image_embeddings feeds in
        x = (pixels - jnp.asarray(IMAGE_CHANNEL_MEANS, jnp.float32)) / jnp.asarray(IMAGE_CHANNEL_STDS, jnp.float32)
        x = jax.lax.conv_general_dilated(
            x.astype(self.dtype), patch_proj.astype(self.dtype), window_strides=(p, p), padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        x = x.reshape(x.shape[0], -1, w)  # patches in row-major order
        sot = jnp.take(w_t, t, axis=0)[:, None]
        x = jnp.concatenate([sot, x.astype(jnp.float32)], axis=1) + w_pos[None]
        return layers.LayerNorm(name="ln")(x)


class TextEmbedding(nn.Module):
    """w_voc[tokens] + w_pos -> [B, T, W] float32 (no LayerNorm, as in GLIDE's CLIP)."""

    config: ClipConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        w = c.width_text
        w_voc = layers.free_param(self, "w_voc", (c.n_vocab, w), _normal(0.02), (layers.VOCAB, layers.EMBED))
        w_pos = layers.table_param(self, "w_pos", (c.max_text_len, w), _normal(0.01))
        return jnp.take(w_voc, tokens, axis=0) + w_pos[None, : tokens.shape[1]]


def _blocks(m: nn.Module, n: int, n_head: int, causal: bool, scan: bool, trace: str, h: jax.Array) -> jax.Array:
    """`m`'s children block_0 … block_<n-1> (TransformerBlocks) over h [B, T, W] -> [B, T, W]; each
    block's output is sown as `trace.<trace>.block_<i>` (kept per block only when collected)."""
    names = [f"block_{i}" for i in range(n)]
    h, outs = layers.repeated_blocks(m, TransformerBlock, (n_head, 2 * n, causal, m.dtype), names, h, scan=scan,
                                     keep_outputs=m.is_mutable_collection("intermediates"))
    for name, out in zip(names, outs):
        m.sow("intermediates", f"trace.{trace}.{name}", out)
    return h


class _ImageBlocks(nn.Module):
    """GLIDE's `blocks` ModuleDict of the image encoder: input, block_<i>, output."""

    config: ClipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, t: jax.Array) -> jax.Array:
        c = self.config
        h = ImageEmbedding(c, self.dtype, name="input")(images, t)
        self.sow("intermediates", "trace.image.input", h)
        h = _blocks(self, c.n_xf_blocks_image, c.n_head_image, False, c.scan_layers, "image", h)
        return FeatureExtractor(c.n_embd, self.dtype, name="output")(h[:, 0]).astype(jnp.float32)


class _TextBlocks(nn.Module):
    """GLIDE's `blocks` ModuleDict of the text encoder: input, block_<i>, output."""

    config: ClipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, lens: jax.Array) -> jax.Array:
        c = self.config
        h = TextEmbedding(c, name="input")(tokens)
        self.sow("intermediates", "trace.text.input", h)
        h = _blocks(self, c.n_xf_blocks_text, c.n_head_text, True, c.scan_layers, "text", h)
        last = jnp.take_along_axis(h, (lens.astype(jnp.int32) - 1)[:, None, None], axis=1)[:, 0]
        return FeatureExtractor(c.n_embd, self.dtype, name="output")(last).astype(jnp.float32)


class ClipImageEncoder(nn.Module):
    """images [B, S, S, 3] in [-1, 1], t [B] int (original timesteps) -> image_enc [B, n_embd]."""

    config: ClipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, t: jax.Array) -> jax.Array:
        return _ImageBlocks(self.config, self.dtype, name="blocks")(images, t)


class ClipTextEncoder(nn.Module):
    """tokens [B, max_text_len] int, lens [B] (incl. start/end tokens) -> text_enc [B, n_embd]."""

    config: ClipConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, lens: jax.Array) -> jax.Array:
        return _TextBlocks(self.config, self.dtype, name="blocks")(tokens, lens)


class ClipModel(nn.Module):
    """Both encoders; params `image_enc/...` (clip_image_enc.pt) and `text_enc/...` (clip_text_enc.pt)."""

    config: ClipConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        self.image_enc = ClipImageEncoder(self.config, self.dtype)
        self.text_enc = ClipTextEncoder(self.config, self.dtype)

    def __call__(self, images: jax.Array, t: jax.Array, tokens: jax.Array, lens: jax.Array) -> dict[str, jax.Array]:
        """Both normalised embeddings: dict(image_emb=[B, n_embd], text_emb=[B, n_embd])."""
        return dict(image_emb=self.image_embeddings(images, t), text_emb=self.text_embeddings(tokens, lens))

    def encode_image(self, images: jax.Array, t: jax.Array) -> jax.Array:
        """images [B, S, S, 3] in [-1, 1], t [B] -> image_enc [B, n_embd] (unnormalised)."""
        return self.image_enc(images, t)

    def encode_text(self, tokens: jax.Array, lens: jax.Array) -> jax.Array:
        """tokens [B, max_text_len], lens [B] -> text_enc [B, n_embd] (unnormalised)."""
        return self.text_enc(tokens, lens)

    def image_embeddings(self, images: jax.Array, t: jax.Array) -> jax.Array:
        return normalize(self.encode_image(images, t))

    def text_embeddings(self, tokens: jax.Array, lens: jax.Array) -> jax.Array:
        return normalize(self.encode_text(tokens, lens))

    def guidance_grad(self, images: jax.Array, t: jax.Array, text_emb: jax.Array, grad_scale: float) -> jax.Array:
        """grad_scale · ∂/∂images of logit_scale · Σ_b ⟨text_emb_b, image_emb_b(images, t)⟩ -> [B, S, S, 3].

        GLIDE's `CLIPModel.cond_fn` (logit_scale is the config value, e.g. 100, not its log).
        """

        def objective(mdl: ClipModel, x: jax.Array) -> jax.Array:
            z_i = mdl.image_embeddings(x, t)
            return self.config.logit_scale * jnp.sum(text_emb.astype(jnp.float32) * z_i)

        (grad,) = nn.grad(objective, self, images.astype(jnp.float32))
        return grad * grad_scale

    def init_inputs(self, batch: int = 1) -> dict[str, jax.Array]:
        """Example kwargs for `init`; they reach every parameter of both encoders."""
        c = self.config
        return dict(
            images=jnp.zeros((batch, c.image_size, c.image_size, 3), jnp.float32),
            t=jnp.zeros((batch,), jnp.int32),
            tokens=jnp.zeros((batch, c.max_text_len), jnp.int32),
            lens=jnp.ones((batch,), jnp.int32),
        )


def clip_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: float | jax.Array) -> jax.Array:
    """Symmetric CLIP cross-entropy; pair b is (image_emb[b], text_emb[b]). Scalar float32.

    logits = logit_scale · image_emb @ text_embᵀ; loss = ½(CE(rows, diag) + CE(columns, diag)).
    `logit_scale` is the multiplier itself (e.g. 100), not its log.
    """
    logits = logit_scale * jnp.einsum("id,jd->ij", image_emb.astype(jnp.float32), text_emb.astype(jnp.float32))
    labels = jnp.arange(logits.shape[0])
    per_image = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1)
    per_text = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=0), labels[None, :], axis=0)
    return 0.5 * (jnp.mean(per_image) + jnp.mean(per_text))
