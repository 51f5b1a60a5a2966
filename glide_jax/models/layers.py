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

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.models import winograd

Dtype = Any
Initializer = Callable[..., jax.Array]

# Logical axis names. The rules (`config.mesh.rules`, `glide_jax.sharding.DEFAULT_RULES`) map
# them to mesh axes.
IN = "in_features"        # input dimension of a Dense / Conv kernel
OUT = "out_features"      # output dimension of a Dense / Conv kernel, biases
VOCAB = "vocab"           # rows of a token table
EMBED = "embed"           # width of an embedding table / positional table
POSITION = "position"     # rows of a positional table
NORM = "norm"             # norm scale / bias
BATCH = "batch"           # leading axis of activations and batches
KERNEL_SPATIAL = None     # conv spatial dims are never sharded


def entry_axes(entry: Any) -> tuple[str, ...]:
    """A PartitionSpec entry (None, an axis name or a tuple of them) as a tuple of axis names."""
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pins an activation's leading axis to the mesh axes the `batch` rule names.

    A no-op outside `glide_jax.sharding.activation_rules` (no mesh or no rules in context: parity
    tests, single-device sampling) and where those axes do not divide the batch.
    """
    rules = nn.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    entry = nn.logical_to_mesh_axes((BATCH,), rules)[0]
    axes = entry_axes(entry)
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % int(np.prod([mesh.shape[a] for a in axes])):
        return x
    spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0], *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


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


CONV_ALGORITHMS = ("auto", "xla", "winograd")
# The kernel sets a model is built with (`experiment.resolve_kernels` picks one per backend):
# "xla" = XLA's own ops (convolutions, autodiff'd GroupNorm, threefry dropout masks), what an
# accelerator compiler fuses best; "cpu" = the kernels written for XLA:CPU (Winograd where
# `conv_algorithm_for` says so, GroupNorm's hand-written VJP, counter-hash dropout masks);
# "winograd" = "cpu" with Winograd forced on every 3x3 convolution it supports (benchmarks, tests).
KERNELS = ("xla", "cpu", "winograd")
_CONV_ALGORITHM_OF = {"xla": "xla", "cpu": "auto", "winograd": "winograd"}
# Where "auto" uses Winograd (per-shape timings: docs/benchmarks.md "Winograd convolutions"):
# >= 64 output channels at 16x16 and above; slower at 8x8 and for the 3-channel input and
# 6-channel output convolutions.
WINOGRAD_MIN_IN_CHANNELS = 32
WINOGRAD_MIN_OUT_CHANNELS = 64
WINOGRAD_MIN_SIZE = 16


def check_kernels(kernels: str) -> None:
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r}: expected one of {KERNELS}")


def conv_algorithm_of(kernels: str) -> str:
    check_kernels(kernels)
    return _CONV_ALGORITHM_OF[kernels]


def check_conv_algorithm(algorithm: str) -> None:
    if algorithm not in CONV_ALGORITHMS:
        raise ValueError(f"conv_algorithm {algorithm!r}: expected one of {CONV_ALGORITHMS}")


def conv_algorithm_for(algorithm: str, x_shape, kernel_shape, stride: int, dtype) -> str:
    """Which implementation `Conv` uses: "xla" (lax.conv_general_dilated) or "winograd".

    "xla" and "winograd" force one ("winograd" falls back to "xla" where it cannot apply: not
    3x3, strided, or odd H/W); "auto" picks Winograd for supported float32 convolutions with
    >= WINOGRAD_MIN_IN_CHANNELS / _OUT_CHANNELS channels and H, W >= WINOGRAD_MIN_SIZE, XLA's
    convolution otherwise. Which backend it suits is decided by the kernels, not here.
    """
    check_conv_algorithm(algorithm)
    if algorithm == "xla" or not winograd.supported(x_shape, kernel_shape, stride):
        return "xla"
    if algorithm == "winograd":
        return "winograd"
    suits = (kernel_shape[2] >= WINOGRAD_MIN_IN_CHANNELS and kernel_shape[3] >= WINOGRAD_MIN_OUT_CHANNELS
             and min(x_shape[1], x_shape[2]) >= WINOGRAD_MIN_SIZE)
    if jnp.dtype(dtype) != jnp.float32 or not suits:
        return "xla"
    return "winograd"


class Conv(nn.Module):
    """2-D convolution, NHWC, 'SAME'-style symmetric padding k//2.

    x: [B, H, W, Cin] -> [B, H/stride, W/stride, features]. `algorithm` (see
    `conv_algorithm_for`) only changes how it is computed, never the parameters.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    algorithm: str = "auto"
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
        if conv_algorithm_for(self.algorithm, x.shape, kernel.shape, self.stride, self.dtype) == "winograd":
            y = winograd.conv3x3(x.astype(self.dtype), kernel.astype(self.dtype))
        else:
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
    fused_vjp: bool = False  # the hand-written backward ("cpu" kernels); autodiff otherwise

    @nn.compact
    def __call__(self, x: jax.Array, modulation: tuple[jax.Array, jax.Array] | None = None,
                 silu: bool = False) -> jax.Array:
        """x: [B, ..., C]; modulation: optional FiLM (scale, shift), each broadcastable to
        [B, 1, ..., 1, C]: returns GroupNorm(x) * (1 + scale) + shift (GLIDE's scale-shift norm).
        silu: apply SiLU to the result inside the same fused op (GLIDE's norm -> SiLU pairs)."""
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm({self.num_groups}) needs channels divisible by it, got {c}")
        scale = self.param("scale", _param(ones, (NORM,)), (c,), jnp.float32)
        bias = self.param("bias", _param(zeros, (NORM,)), (c,), jnp.float32)
        return group_norm(x, scale, bias, self.num_groups, self.eps, modulation, silu=silu,
                          fused_vjp=self.fused_vjp)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float,
               modulation: tuple[jax.Array, jax.Array] | None = None, silu: bool = False,
               fused_vjp: bool = True) -> jax.Array:
    """[SiLU of] GroupNorm of x [B, ..., C] over (spatial, channels-in-group), in float32,
    with the affine (scale, bias [C]) and the optional FiLM modulation (each broadcastable to
    [B, 1, ..., 1, C]) folded into one per-(batch, channel) multiplier M and offset O:
    z = (x - mean) * M + O, out = silu(z) if `silu` else z. Returns float32, x's shape.

    Written for XLA:CPU speed, where this op costs as much as a convolution if left to autodiff:
    - every full-size op broadcasts [B, C] vectors along the contiguous channel axis and every
      reduction is over the spatial axis to [B, C] (group sums then act on [B, C] only); the
      textbook reshape to [..., G, C/G] makes loop fusions iterate inner axes of 2..8 elements;
    - a hand-written VJP (`_group_norm_core`) recomputes z from x in the backward pass and
      needs two reductions (sum dz, sum dz * (x - mean)) plus one elementwise pass for dx,
      where autodiff of the forward emits ~3x as many full-size passes (`fused_vjp`; without
      it the same forward is left to autodiff, which accelerator compilers fuse on their own).
    Statistics are two-pass (mean, then the variance of x - mean), as accurate as the textbook.
    """
    b, c = x.shape[0], x.shape[-1]
    x3 = x.astype(jnp.float32).reshape(b, -1, c)
    if modulation is None:
        mod_scale = mod_shift = jnp.zeros((b, c), jnp.float32)
    else:
        mod_scale, mod_shift = (
            jnp.broadcast_to(m.astype(jnp.float32), (b,) + (1,) * (x.ndim - 2) + (c,)).reshape(b, c)
            for m in modulation)
    core = _group_norm_core if fused_vjp else _group_norm_value
    y = core(x3, scale.astype(jnp.float32), bias.astype(jnp.float32), mod_scale, mod_shift, num_groups, eps, silu)
    return y.reshape(x.shape)


def _per_channel(v: jax.Array, per_group: int) -> jax.Array:
    """[B, G] -> [B, C]: each group's value repeated over its channels."""
    return jnp.repeat(v, per_group, axis=-1)


def _per_group(v: jax.Array, num_groups: int) -> jax.Array:
    """[B, C] -> [B, G]: sum over each group's channels."""
    return v.reshape(v.shape[0], num_groups, -1).sum(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _group_norm_core(x3, scale, bias, mod_scale, mod_shift, num_groups, eps, silu):
    """x3 [B, N, C], scale/bias [C], mod_scale/mod_shift [B, C] -> [B, N, C] (see group_norm)."""
    return _group_norm_fwd(x3, scale, bias, mod_scale, mod_shift, num_groups, eps, silu)[0]


def _group_norm_value(x3, scale, bias, mod_scale, mod_shift, num_groups, eps, silu):
    return _group_norm_fwd(x3, scale, bias, mod_scale, mod_shift, num_groups, eps, silu)[0]


def _group_norm_fwd(x3, scale, bias, mod_scale, mod_shift, num_groups, eps, silu):
    per_group = x3.shape[-1] // num_groups
    count = x3.shape[1] * per_group
    mean = _per_channel(_per_group(x3.sum(axis=1), num_groups) / count, per_group)          # [B, C]
    var = _per_group(jnp.square(x3 - mean[:, None]).sum(axis=1), num_groups) / count       # [B, G]
    rstd = jax.lax.rsqrt(var + eps)                                                        # [B, G]
    gain = 1 + mod_scale
    mult = _per_channel(rstd, per_group) * scale * gain                                    # [B, C]
    offset = bias * gain + mod_shift                                                       # [B, C]
    z = (x3 - mean[:, None]) * mult[:, None] + offset[:, None]
    return (jax.nn.silu(z) if silu else z), (x3, scale, bias, gain, mean, rstd, mult, offset)


def _group_norm_bwd(num_groups, eps, silu, res, dy):
    del eps
    x3, scale, bias, gain, mean, rstd, mult, offset = res
    per_group = x3.shape[-1] // num_groups
    count = x3.shape[1] * per_group
    xc = x3 - mean[:, None]
    if silu:
        z = xc * mult[:, None] + offset[:, None]
        sig = jax.nn.sigmoid(z)
        dz = dy * sig * (1 + z * (1 - sig))
    else:
        dz = dy
    d_offset = dz.sum(axis=1)                       # [B, C]
    d_mult = (dz * xc).sum(axis=1)                  # [B, C]
    rstd_c = _per_channel(rstd, per_group)
    d_scale = (d_mult * rstd_c * gain).sum(0)
    d_bias = (d_offset * gain).sum(0)
    d_mod_scale = d_mult * rstd_c * scale + d_offset * bias
    d_rstd = _per_group(d_mult * scale * gain, num_groups)          # [B, G]
    d_var = -0.5 * d_rstd * rstd ** 3
    d_mean = -_per_group(mult * d_offset, num_groups)               # the variance term sums to 0
    k_x = _per_channel(2 * d_var / count, per_group)
    k_0 = _per_channel(d_mean / count, per_group)
    dx = dz * mult[:, None] + xc * k_x[:, None] + k_0[:, None]
    return dx, d_scale, d_bias, d_mod_scale, d_offset


_group_norm_core.defvjp(_group_norm_fwd, _group_norm_bwd)


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
    """Inverted dropout drawing from the 'dropout' rng stream: the cheap counter-based mask
    above with `hash_mask` ("cpu" kernels), jax.random's threefry bits otherwise."""

    rate: float
    hash_mask: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate <= 0:
            return x
        if self.rate >= 1:
            return jnp.zeros_like(x)
        rng = self.make_rng("dropout")
        if self.hash_mask:
            return dropout(x, self.rate, rng)
        keep = jax.random.bernoulli(rng, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


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


def repeated_blocks(
    parent: nn.Module,
    block: type[nn.Module],
    args: tuple,
    names: Sequence[str],
    x: jax.Array,
    *,
    remat: bool = False,
    scan: bool = False,
    keep_outputs: bool = False,
) -> tuple[jax.Array, list[jax.Array]]:
    """`parent`'s children `names`, all `block(*args)`, applied in order: x -> block_n(...block_1(x)).

    Must be called from inside a compact method of `parent`; the children's parameters sit under
    `names` either way. x: the carried activation, e.g. [B, L, W]; each block maps it to the same
    shape and dtype, and reads nothing but its "params" (no rngs, no other collections).

    Args:
      remat: rematerialise each block in the backward pass (`nn.remat` / `jax.checkpoint`).
      scan: outside `init`, run the blocks as ONE `jax.lax.scan` over their parameters stacked per
        leaf ([n, ...]), so the compiler sees a single block body instead of n copies (a smaller
        program to compile). The stack is a copy of the blocks' parameters made inside the step.
        `init` always runs them unrolled, which is what creates the per-block names; the
        parameters, their values and gradients are the same as without `scan`. A single block is
        never scanned.
      keep_outputs: also return every block's output (a scan then stacks them, [n, *x.shape]).
    Returns:
      (the last block's output, the n blocks' outputs in order if `keep_outputs`, else []).
    """
    if not scan or len(names) < 2 or parent.is_initializing():
        cls = nn.remat(block) if remat else block
        outs = []
        for name in names:
            x = cls(*args, name=name)(x)
            outs.append(x)
        return x, outs if keep_outputs else []

    params = nn.meta.unbox(parent.variables.get("params", {}))
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"{parent.name}: no parameters for blocks {missing} (scan needs initialised params)")
    per_block = [params[n] for n in names]
    structure = jax.tree.structure(per_block[0])
    if any(jax.tree.structure(p) != structure for p in per_block[1:]):
        raise ValueError(f"{parent.name}: blocks {list(names)} do not have identically structured parameters")
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_block)
    template = block(*args, parent=None)  # unbound: applied functionally, not a child of `parent`

    def body(h, p):
        h = template.apply({"params": p}, h)
        return h, (h if keep_outputs else None)

    if remat:
        # What nn.remat does per block (save nothing, recompute the block in the backward pass);
        # the scan already keeps XLA from CSE-ing the recomputation away, so no barrier is needed.
        body = jax.checkpoint(body, prevent_cse=False)
    x, ys = jax.lax.scan(body, x, stacked)
    return x, list(ys) if keep_outputs else []


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
    kernels: str = "xla"  # see KERNELS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest_2x(x)
        if self.use_conv:
            x = Conv(self.out_channels or x.shape[-1], 3, dtype=self.dtype,
                     algorithm=conv_algorithm_of(self.kernels), name="conv")(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (`op`) or, without conv, 2x2 average pooling. [B,H,W,C] -> [B,H/2,W/2,C']."""

    use_conv: bool = True
    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    kernels: str = "xla"  # a stride-2 conv always runs as XLA's (see conv_algorithm_for)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return Conv(self.out_channels or x.shape[-1], 3, stride=2, dtype=self.dtype,
                        algorithm=conv_algorithm_of(self.kernels), name="op")(x)
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
    kernels: str = "xla"  # see KERNELS

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        c_out = self.out_channels
        h = GroupNorm(fused_vjp=self.kernels != "xla", name="in_layers_0")(x, silu=True).astype(self.dtype)
        if self.up:
            h, x = upsample_nearest_2x(h), upsample_nearest_2x(x)
        elif self.down:
            h, x = avg_pool_2x(h), avg_pool_2x(x)
        h = Conv(c_out, 3, dtype=self.dtype, algorithm=conv_algorithm_of(self.kernels), name="in_layers_2")(h)

        n_emb = 2 * c_out if self.use_scale_shift_norm else c_out
        emb_out = Dense(n_emb, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))
        emb_out = emb_out.astype(jnp.float32)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm(fused_vjp=self.kernels != "xla", name="out_layers_0")(h, modulation=(scale, shift), silu=True)
        else:
            h = GroupNorm(fused_vjp=self.kernels != "xla", name="out_layers_0")(h + emb_out, silu=True)
        h = h.astype(self.dtype)
        if self.dropout > 0:
            h = Dropout(self.dropout, hash_mask=self.kernels != "xla", name="out_layers_2")(h, deterministic=not self.train)
        h = Conv(c_out, 3, dtype=self.dtype, kernel_init=zeros, algorithm=conv_algorithm_of(self.kernels),
                 name="out_layers_3")(h)

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
    kernels: str = "xla"  # see KERNELS

    @nn.compact
    def __call__(self, x: jax.Array, encoder_out: jax.Array | None = None) -> jax.Array:
        b, hh, ww, c = x.shape
        heads = resolve_heads(c, self.num_heads, self.num_head_channels)
        d = c // heads
        h = GroupNorm(fused_vjp=self.kernels != "xla", name="norm")(x).astype(self.dtype).reshape(b, hh * ww, c)
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
