"""The FID Inception-v3 (TensorFlow's 2015 graph, as ported by pytorch-fid) in Flax, NHWC.

This is the network behind every published FID number: torchvision's `Inception3` with
`num_classes=1008`, no aux head, and pytorch-fid's patched blocks (`FIDInceptionA/C/E_1/E_2`).
Its weights are `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release); they cannot be
fetched from here, so a user supplies the file and `load_inception_params(path)` ports it.

Quirks kept from the TF graph (they change the numbers, so they matter):
  * BasicConv2d = conv (no bias) + BatchNorm(eps=1e-3, inference statistics) + ReLU.
  * Mixed_5b-d (A), Mixed_6b-e (C), Mixed_7b (E_1): the pool branch is a 3x3/1 average pool
    with padding 1 that does NOT count the padded zeros (`count_include_pad=False`).
  * Mixed_7c (E_2): the pool branch is a 3x3/1 MAX pool with padding 1.
  * Mixed_6a (B) and Mixed_7a (D) are torchvision's: an unpadded 3x3/2 max pool.

Input preprocessing reproduces pytorch-fid's `InceptionV3.forward` (resize_input and
normalize_input on): images in [0, 1] are resized to 299x299 with
`F.interpolate(mode="bilinear", align_corners=False)` (no antialiasing, also when shrinking),
then mapped to [-1, 1] by 2x - 1. Here the equivalent resize is
`jax.image.resize(method="bilinear", antialias=False)` (half-pixel centres, edge-clamped
weights); bilinear weights sum to one, so resizing after the affine map to [-1, 1] is the same.

Parameter names follow the state-dict keys by the DESIGN.md rule:
`Mixed_5b.branch1x1.conv.weight -> Mixed_5b/branch1x1/conv/kernel`, and a BatchNorm's
`weight, bias, running_mean, running_var -> bn/scale, bias, mean, var` (all four live in the
`params` collection: the network is frozen, there is no `batch_stats`).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from glide_jax.convert import torch_to_flax
from glide_jax import pt_reader

__all__ = [
    "BN_EPS",
    "FEATURE_DIM",
    "INPUT_SIZE",
    "MIN_SIZE",
    "NUM_CLASSES",
    "FrozenBatchNorm",
    "BasicConv2d",
    "InceptionA",
    "InceptionB",
    "InceptionC",
    "InceptionD",
    "InceptionE",
    "InceptionV3",
    "preprocess",
    "abstract_params",
    "inception_params_from_state_dict",
    "load_inception_params",
]

BN_EPS = 1e-3
INPUT_SIZE = 299  # pytorch-fid resizes every input to this
MIN_SIZE = 75  # the smallest input the stem and the stride-2 blocks accept
FEATURE_DIM = 2048  # pool3
NUM_CLASSES = 1008  # the TF graph's classifier (1000 ImageNet classes + 8 unused)

Pair = tuple[int, int]


def _pair(v: int | Pair) -> Pair:
    return (v, v) if isinstance(v, int) else tuple(v)


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode from its four buffers: (x - mean) / sqrt(var + eps) * scale + bias."""

    features: int
    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.features,)
        scale = self.param("scale", nn.initializers.ones, shape)
        bias = self.param("bias", nn.initializers.zeros, shape)
        mean = self.param("mean", nn.initializers.zeros, shape)
        var = self.param("var", nn.initializers.ones, shape)
        mult = scale * jax.lax.rsqrt(var + self.eps)
        return x * mult + (bias - mean * mult)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BN(eps=1e-3) -> ReLU. [B,H,W,C] -> [B,H',W',features]."""

    features: int
    kernel_size: int | Pair = 1
    stride: int = 1
    padding: int | Pair = 0
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = _pair(self.padding)
        x = nn.Conv(
            self.features,
            _pair(self.kernel_size),
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's average pool ignores the padded zeros (pytorch-fid's count_include_pad=False patch).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    """Shared helper: `self.conv(name, features, kernel, stride, padding)` builds a named BasicConv2d."""

    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, name: str, features: int, kernel: int | Pair = 1, stride: int = 1, padding: int | Pair = 0):
        return BasicConv2d(features, kernel, stride, padding, precision=self.precision, name=name)


class InceptionA(_Block):
    """FIDInceptionA (Mixed_5b-d): out channels 64 + 64 + 96 + pool_features."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_1", 48)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """torchvision InceptionB (Mixed_6a), a stride-2 reduction: out 384 + 96 + in channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
    """FIDInceptionC (Mixed_6b-e), factorised 7x7 convs: out 4 x 192 = 768."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192)(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """torchvision InceptionD (Mixed_7a), a stride-2 reduction: out 320 + 192 + in channels."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.conv("branch3x3_1", 192)(x)
        b3 = self.conv("branch3x3_2", 320, 3, stride=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
    """FIDInceptionE_1 (pool="avg", Mixed_7b) / FIDInceptionE_2 (pool="max", Mixed_7c): out 2048."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.conv("branch1x1", 320)(x)
        b3 = self.conv("branch3x3_1", 384)(x)
        b3 = jnp.concatenate(
            [
                self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3),
            ],
            axis=-1,
        )
        bd = self.conv("branch3x3dbl_1", 448)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate(
            [
                self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        elif self.pool == "max":  # the TF graph's (likely accidental) max pool in the last block
            pooled = _max_pool_3x3_same(x)
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3: images -> pool3 features [B, 2048] (and the 1008-way logits).

    Attributes:
      resize_to: side the input is bilinearly resized to (pytorch-fid: 299); None = no resize
        (then the input must be at least MIN_SIZE).
      with_logits: also build the `fc` layer and return (features, logits [B, 1008]).
      precision: conv/matmul precision; HIGHEST keeps float32 convs exact on TPU, where the
        default would round the operands to bfloat16.
    """

    resize_to: int | None = INPUT_SIZE
    with_logits: bool = False
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Args:
          images: [B, H, W, 3]; uint8 in [0, 255], or floating point in [-1, 1].
        Returns:
          features [B, 2048] float32, or (features, logits [B, 1008]) with `with_logits`.
        """
        x = preprocess(images, self.resize_to)
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"Inception needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape}")
        p = dict(precision=self.precision)
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3", **p)(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3", **p)(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3", **p)(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1", **p)(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3", **p)(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(pool_features=32, name="Mixed_5b", **p)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **p)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **p)(x)
        x = InceptionB(name="Mixed_6a", **p)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7=c7, name=name, **p)(x)
        x = InceptionD(name="Mixed_7a", **p)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **p)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **p)(x)
        features = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1): pool3
        if not self.with_logits:
            return features
        logits = nn.Dense(NUM_CLASSES, precision=self.precision, name="fc")(features)
        return features, logits


def preprocess(images: jax.Array, resize_to: int | None = INPUT_SIZE) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] images [B, H, W, 3] -> float32 [-1, 1] at resize_to^2.

    Matches pytorch-fid: `F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)`
    on [0, 1] images, then 2x - 1 (see the module docstring for why the order is immaterial).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [B, H, W, 3], got {images.shape}")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    else:
        x = images.astype(jnp.float32)
    if resize_to is not None and x.shape[1:3] != (resize_to, resize_to):
        x = jax.image.resize(x, (x.shape[0], resize_to, resize_to, 3), method="bilinear", antialias=False)
    return x


# ----------------------------------------------------------------------------- weight port


def abstract_params(with_logits: bool = False) -> Any:
    """The params tree of `InceptionV3(with_logits)` as `jax.ShapeDtypeStruct`s (nothing computed)."""
    model = InceptionV3(resize_to=None, with_logits=with_logits)
    x = jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


_BN_BUFFERS = {"running_mean": "mean", "running_var": "var"}


def inception_params_from_state_dict(state_dict: Mapping[str, np.ndarray], with_logits: bool = False) -> dict:
    """pytorch-fid's FID Inception state dict (PyTorch layout) -> `InceptionV3` params.

    The generic DESIGN.md table (`glide_jax.convert.torch_to_flax`) does the work; BatchNorm
    buffers are renamed first (`bn.running_mean/var -> bn.mean/var`), `num_batches_tracked`
    is dropped, and `fc.*` is dropped unless `with_logits`.

    Raises:
      glide_jax.convert.ConversionError: listing every missing / unexpected / mis-shaped key.
    """
    renamed = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked" or (not with_logits and module == "fc"):
            continue
        leaf = _BN_BUFFERS.get(leaf, leaf)
        renamed[f"{module}.{leaf}" if module else leaf] = np.asarray(value, dtype=np.float32)
    return torch_to_flax(renamed, abstract_params(with_logits))


def load_inception_params(path: str | os.PathLike, with_logits: bool = False) -> dict:
    """Read `pt_inception-2015-12-05-6726825d.pth` (without torch) and port it to Flax params."""
    state_dict = pt_reader.to_float32(pt_reader.load_state_dict(path))
    return inception_params_from_state_dict(state_dict, with_logits=with_logits)
