"""3x3, stride-1, 'same'-padded convolutions by Winograd's minimal filtering F(m x m, 3x3).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015). Each m x m output
tile is computed from an (m+2) x (m+2) input tile:

    Y = A^T [ (G g G^T) * (B^T d B) ] A

so a convolution becomes three cheap elementwise transforms plus (m+2)^2 batched matmuls
[T, Cin] x [Cin, Cout] (T = number of output tiles). Two tile sizes:

- F(4x4, 3x3) (m=4, the default where H and W are multiples of 4): 36 multiplies per 16 outputs,
  4x fewer than a direct convolution; transformed tensors are 2.25x the activation's size.
  Points 0, +-1, +-2, inf: float32 results are within ~1e-5 (relative to the output's largest
  magnitude) of a float64 convolution (tested).
- F(2x2, 3x3) (m=2, for H, W that are even but not multiples of 4): 16 multiplies per 4
  outputs (2.25x fewer); coefficients 0, +-1, +-1/2, ~1e-6 relative.

The backward pass is Winograd too: the input gradient is the same algorithm applied to dy with
the 180-degree-rotated, transposed filter, and the filter gradient is (m+2)^2 matmuls
[Cin, T] x [T, Cout] followed by the filter transform's transpose (`G^T dU G`). The forward pass
saves the transformed input V for the filter gradient rather than recomputing it.

Why: on XLA:CPU a 3x3 convolution runs at about the machine's matmul rate, and its filter
gradient needs layout transposes of the activations; Winograd does 2.25-4x fewer multiplies and
its gradients are plain batched matmuls (see README "Benchmarks" for the measured effect).
On TPU/GPU the native convolutions are faster; `glide_jax.models.layers.Conv` only picks this
path where it measured faster (XLA:CPU, float32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# output tile m -> (B^T [m+2, m+2], G [m+2, 3], A^T [m, m+2])
_TRANSFORMS = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
                 np.float64)),
}
TILES = tuple(sorted(_TRANSFORMS))


def tile_for(x_shape, dtype=jnp.float32) -> int | None:
    """The output tile `conv3x3` uses for x [B, H, W, C] of `dtype`: 4 if H and W are multiples
    of 4 and the dtype is at least float32 (F(4,3)'s larger coefficients cost ~20x F(2,3)'s
    rounding error: fine in float32, not in bfloat16/float16), else 2 if they are even, else
    None (not supported)."""
    tiles = TILES if jnp.finfo(dtype).bits >= 32 else (2,)
    for m in sorted(tiles, reverse=True):
        if x_shape[1] % m == 0 and x_shape[2] % m == 0:
            return m
    return None


def supported(x_shape, kernel_shape, stride: int = 1) -> bool:
    """Whether `conv3x3` can compute this convolution: 3x3 kernel, stride 1, even H and W."""
    return (
        len(x_shape) == 4
        and tuple(kernel_shape[:2]) == (3, 3)
        and stride == 1
        and tile_for(x_shape) is not None
    )


def _combine(coefs, parts):
    """sum_k coefs[k] * parts[k], skipping zero coefficients (stays elementwise for XLA to fuse)."""
    out = None
    for c, p in zip(coefs, parts):
        c = float(c)
        if c == 0:
            continue
        term = p if c == 1 else (-p if c == -1 else p * jnp.asarray(c, p.dtype))
        out = term if out is None else out + term
    return out


def _input_transform(x: jax.Array, m: int) -> jax.Array:
    """[B, H, W, C] -> V [(m+2)^2, B*H/m*W/m, C]: B^T d B for every (m+2)^2 tile (stride m, pad 1).

    Separable, rows then columns: m+2 row combinations stacked ([m+2, B, H/m, W+2, C]), then
    m+2 column combinations of that stack. Each stage is m+2 loop fusions and one concatenate;
    the direct form ((m+2)^2 fusions, each recomputing whatever elementwise producer XLA fuses
    into it) measured 1.4-2.2x slower on XLA:CPU for m=2.
    """
    bt = _TRANSFORMS[m][0]
    a = m + 2
    b, h, w, c = x.shape
    nh, nw = h // m, w // m
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = [xp[:, k::m][:, :nh] for k in range(a)]  # each [B, nh, W+2, C]
    r = jnp.stack([_combine(bt[i], rows) for i in range(a)])  # [a(i), B, nh, W+2, C]
    cols = [r[:, :, :, k::m][:, :, :, :nw] for k in range(a)]  # each [a(i), B, nh, nw, C]
    v = jnp.stack([_combine(bt[j], cols) for j in range(a)], axis=1)  # [a(i), a(j), B, nh, nw, C]
    return v.reshape(a * a, b * nh * nw, c)


def _filter_transform(g: jax.Array, m: int) -> jax.Array:
    """[3, 3, Cin, Cout] -> U [(m+2)^2, Cin, Cout] = G g G^T."""
    gm = jnp.asarray(_TRANSFORMS[m][1], g.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", gm, g, gm)
    return u.reshape((m + 2) ** 2, g.shape[2], g.shape[3])


def _filter_transform_t(du: jax.Array, m: int) -> jax.Array:
    """Transpose of `_filter_transform`: dU [(m+2)^2, Cin, Cout] -> dg [3, 3, Cin, Cout] = G^T dU G."""
    gm = jnp.asarray(_TRANSFORMS[m][1], du.dtype)
    du = du.reshape(m + 2, m + 2, du.shape[1], du.shape[2])
    return jnp.einsum("ai,abco,bj->ijco", gm, du, gm)


def _output_transform(mm: jax.Array, out_shape, m: int) -> jax.Array:
    """M [(m+2)^2, T, Cout] -> y [B, H, W, Cout] = A^T M A per tile, tiles written back in place.

    Separable: rows (over the first tile index), then columns."""
    at = _TRANSFORMS[m][2]
    a = m + 2
    b, h, w, co = out_shape
    nh, nw = h // m, w // m
    mm = mm.reshape(a, a, b, nh, nw, co)
    r = jnp.stack([_combine(at[s], [mm[i] for i in range(a)]) for s in range(m)])  # [m(r), a(j), B, nh, nw, Cout]
    y = jnp.stack([_combine(at[s], [r[:, j] for j in range(a)]) for s in range(m)])  # [m(s), m(r), B, nh, nw, Cout]
    return y.transpose(2, 3, 1, 4, 0, 5).reshape(b, h, w, co)


def _output_transform_t(dy: jax.Array, m: int) -> jax.Array:
    """Transpose of `_output_transform`: dy [B, H, W, Cout] -> dM [(m+2)^2, T, Cout] = A dy A^T.

    Separable like `_input_transform`: row-phase combinations first ([m+2, B, H/m, W/m, m, Cout]),
    then column-phase combinations of that stack."""
    at = _TRANSFORMS[m][2]
    a = m + 2
    b, h, w, co = dy.shape
    nh, nw = h // m, w // m
    phases = dy.reshape(b, nh, m, nw, m, co)
    rows = [phases[:, :, r] for r in range(m)]  # each [B, nh, nw, m(s), Cout]
    c = jnp.stack([_combine(at[:, i], rows) for i in range(a)])  # [a(i), B, nh, nw, m(s), Cout]
    cols = [c[:, :, :, :, s] for s in range(m)]  # each [a(i), B, nh, nw, Cout]
    dm = jnp.stack([_combine(at[:, j], cols) for j in range(a)], axis=1)  # [a(i), a(j), ...]
    return dm.reshape(a * a, b * nh * nw, co)


def _winograd(v: jax.Array, g: jax.Array, out_shape, m: int) -> jax.Array:
    """Transformed input V [(m+2)^2, T, Cin] and filter g [3, 3, Cin, Cout] -> y [out_shape]."""
    mm = jnp.einsum("ktc,kco->kto", v, _filter_transform(g, m))
    return _output_transform(mm, out_shape, m)


def _conv(x: jax.Array, g: jax.Array, m: int) -> jax.Array:
    return _winograd(_input_transform(x, m), g, x.shape[:3] + (g.shape[3],), m)


def conv3x3(x: jax.Array, kernel: jax.Array, tile: int | None = None) -> jax.Array:
    """Cross-correlation of x [B, H, W, Cin] with kernel [3, 3, Cin, Cout], stride 1, padding 1.

    Same result as `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`. Requires even H and W (`supported`).
    tile: output tile m (2 or 4; H and W must be multiples of it); default
    `tile_for(x.shape, x.dtype)`.
    """
    m = tile_for(x.shape, x.dtype) if tile is None else tile
    if m not in TILES or x.shape[1] % m or x.shape[2] % m:
        raise ValueError(f"Winograd tile {tile} cannot cover an input of shape {x.shape}: "
                         f"tiles are {TILES} and H, W must be multiples of the tile")
    return _conv3x3(x, kernel, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x: jax.Array, kernel: jax.Array, m: int) -> jax.Array:
    return _conv(x, kernel, m)


def _fwd(x, kernel, m):
    v = _input_transform(x, m)
    return _winograd(v, kernel, x.shape[:3] + (kernel.shape[3],), m), (v, kernel)


def _bwd(m, res, dy):
    v, g = res
    dm = _output_transform_t(dy, m)
    du = jnp.einsum("ktc,kto->kco", v, dm)
    dg = _filter_transform_t(du, m)
    g_rot = jnp.flip(g, (0, 1)).transpose(0, 1, 3, 2)  # [3, 3, Cout, Cin]
    dx = _conv(dy, g_rot, m)
    return dx, dg


_conv3x3.defvjp(_fwd, _bwd)
