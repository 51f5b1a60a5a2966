"""3x3, stride-1, 'same'-padded convolutions by Winograd's minimal filtering F(2x2, 3x3).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015). Each 2x2 output tile
is computed from a 4x4 input tile with 16 multiplies per (Cin, Cout) pair instead of 36:

    Y = A^T [ (G g G^T) * (B^T d B) ] A

so a convolution becomes three cheap elementwise transforms plus 16 batched matmuls
[T, Cin] x [Cin, Cout] (T = number of 2x2 tiles). The backward pass is Winograd too: the input
gradient is the same algorithm applied to dy with the 180-degree-rotated, transposed filter, and
the filter gradient is 16 matmuls [Cin, T] x [T, Cout] followed by the filter transform's
transpose (`G^T dU G`). The forward pass saves the transformed input V (4x x's size) for the
filter gradient rather than recomputing it (measured ~4% of the bench training step on XLA:CPU).

Why: on XLA:CPU a 3x3 convolution runs at about the machine's matmul rate, and its filter
gradient needs layout transposes of the activations; Winograd does 2.25x fewer multiplies and
its gradients are plain batched matmuls (see README "Benchmarks" for the measured effect).
On TPU/GPU the native convolutions are faster; `glide_jax.models.layers.Conv` only picks this
path where it measured faster (XLA:CPU, float32).

F(2,3) uses the interpolation points 0, 1, -1, inf; all transform coefficients are 0, +-1 or
+-1/2, so float32 results differ from a direct convolution by ~1e-6 relative (tested).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

# B^T (4x4), G (4x3), A^T (2x4) for F(2, 3).
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
_M, _ALPHA = 2, 4  # output tile, input tile


def supported(x_shape, kernel_shape, stride: int = 1) -> bool:
    """Whether `conv3x3` can compute this convolution: 3x3 kernel, stride 1, even H and W."""
    return (
        len(x_shape) == 4
        and tuple(kernel_shape[:2]) == (3, 3)
        and stride == 1
        and x_shape[1] % _M == 0
        and x_shape[2] % _M == 0
    )


def _combine(coefs, parts):
    """sum_k coefs[k] * parts[k], skipping zero coefficients (stays elementwise for XLA to fuse)."""
    out = None
    for c, p in zip(coefs, parts):
        if c == 0:
            continue
        term = p if c == 1 else (-p if c == -1 else p * jnp.asarray(c, p.dtype))
        out = term if out is None else out + term
    return out


def _input_transform(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> V [16, B*H/2*W/2, C]: B^T d B for every 4x4 tile (stride 2, pad 1).

    Separable, rows then columns: 4 row combinations stacked ([4, B, H/2, W+2, C], 2x x's
    size), then 4 column combinations of that stack. Each stage is 4 loop fusions and one
    concatenate; the direct form (16 fusions, each recomputing whatever elementwise producer
    XLA fuses into it) measured 1.4-2.2x slower on XLA:CPU.
    """
    b, h, w, c = x.shape
    nh, nw = h // _M, w // _M
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = [xp[:, k::_M][:, :nh] for k in range(_ALPHA)]  # each [B, nh, W+2, C]
    r = jnp.stack([_combine(_BT[i], rows) for i in range(_ALPHA)])  # [4(i), B, nh, W+2, C]
    cols = [r[:, :, :, k::_M][:, :, :, :nw] for k in range(_ALPHA)]  # each [4(i), B, nh, nw, C]
    v = jnp.stack([_combine(_BT[j], cols) for j in range(_ALPHA)], axis=1)  # [4(i), 4(j), B, nh, nw, C]
    return v.reshape(_ALPHA * _ALPHA, b * nh * nw, c)


def _filter_transform(g: jax.Array) -> jax.Array:
    """[3, 3, Cin, Cout] -> U [16, Cin, Cout] = G g G^T."""
    gm = jnp.asarray(_G, g.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", gm, g, gm)
    return u.reshape(_ALPHA * _ALPHA, g.shape[2], g.shape[3])


def _filter_transform_t(du: jax.Array) -> jax.Array:
    """Transpose of `_filter_transform`: dU [16, Cin, Cout] -> dg [3, 3, Cin, Cout] = G^T dU G."""
    gm = jnp.asarray(_G, du.dtype)
    du = du.reshape(_ALPHA, _ALPHA, du.shape[1], du.shape[2])
    return jnp.einsum("ai,abco,bj->ijco", gm, du, gm)


def _output_transform(m: jax.Array, out_shape) -> jax.Array:
    """M [16, T, Cout] -> y [B, H, W, Cout] = A^T M A per tile, tiles written back in place."""
    b, h, w, co = out_shape
    nh, nw = h // _M, w // _M
    m = m.reshape(_ALPHA, _ALPHA, b, nh, nw, co)
    ys = []
    for r in range(_M):
        row = [_combine(_AT[r], [m[i, j] for i in range(_ALPHA)]) for j in range(_ALPHA)]
        ys.append(jnp.stack([_combine(_AT[s], row) for s in range(_M)]))
    y = jnp.stack(ys)  # [2(r), 2(s), B, nh, nw, Cout]
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, h, w, co)


def _output_transform_t(dy: jax.Array) -> jax.Array:
    """Transpose of `_output_transform`: dy [B, H, W, Cout] -> dM [16, T, Cout] = A dy A^T.

    Separable like `_input_transform`: row-phase combinations first ([4, B, H/2, W/2, 2, Cout]),
    then column-phase combinations of that stack."""
    b, h, w, co = dy.shape
    nh, nw = h // _M, w // _M
    phases = dy.reshape(b, nh, _M, nw, _M, co)
    rows = [phases[:, :, r] for r in range(_M)]  # each [B, nh, nw, 2(s), Cout]
    c = jnp.stack([_combine(_AT[:, i], rows) for i in range(_ALPHA)])  # [4(i), B, nh, nw, 2(s), Cout]
    cols = [c[:, :, :, :, s] for s in range(_M)]  # each [4(i), B, nh, nw, Cout]
    dm = jnp.stack([_combine(_AT[:, j], cols) for j in range(_ALPHA)], axis=1)  # [4(i), 4(j), ...]
    return dm.reshape(_ALPHA * _ALPHA, b * nh * nw, co)


def _winograd(v: jax.Array, g: jax.Array, out_shape) -> jax.Array:
    """Transformed input V [16, T, Cin] and filter g [3, 3, Cin, Cout] -> y [out_shape]."""
    m = jnp.einsum("ktc,kco->kto", v, _filter_transform(g))
    return _output_transform(m, out_shape)


def _conv(x: jax.Array, g: jax.Array) -> jax.Array:
    return _winograd(_input_transform(x), g, x.shape[:3] + (g.shape[3],))


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Cross-correlation of x [B, H, W, Cin] with kernel [3, 3, Cin, Cout], stride 1, padding 1.

    Same result as `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`. Requires even H and W (`supported`).
    """
    return _conv(x, kernel)


def _fwd(x, kernel):
    v = _input_transform(x)
    return _winograd(v, kernel, x.shape[:3] + (kernel.shape[3],)), (v, kernel)


def _bwd(res, dy):
    v, g = res
    dm = _output_transform_t(dy)
    du = jnp.einsum("ktc,kto->kco", v, dm)
    dg = _filter_transform_t(du)
    g_rot = jnp.flip(g, (0, 1)).transpose(0, 1, 3, 2)  # [3, 3, Cout, Cin]
    dx = _conv(dy, g_rot)
    return dx, dg


conv3x3.defvjp(_fwd, _bwd)
