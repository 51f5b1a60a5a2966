"""Filter-gradient (dW) of a 3x3 NHWC convolution on the bench shapes: XLA's convolution vs the
two matmul formulations (im2col, 9 shifted matmuls). Prints ms and GFLOP/s per shape.

    .venv/bin/python benchmarks/filter_grad.py
"""
import jax
import jax.numpy as jnp
import numpy as np

from glide_jax import bench  # importing glide_jax sets its XLA:CPU flags, as the package runs

SHAPES = [(8, 64, 64, 64), (8, 64, 128, 64), (8, 32, 128, 128), (8, 16, 192, 192), (8, 8, 256, 256)]


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def xla_dw(x, g):
    w = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
    return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


def shifted_dw(x, g):
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.stack([jnp.einsum("bhwc,bhwo->co", xp[:, i:i + h, j:j + w], g) for j in range(3)])
                      for i in range(3)])


def im2col_dw(x, g):
    h, w, c = x.shape[1:]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1).reshape(-1, 9 * c)
    return (cols.T @ g.reshape(-1, g.shape[-1])).reshape(3, 3, c, g.shape[-1])


def median_ms(f, *args, n=9):
    f = jax.jit(f)
    bench._timed(lambda: f(*args), 1)  # compile + warm-up
    return float(np.median(bench._timed(lambda: f(*args), n))) * 1e3


def main():
    for b, h, c, o in SHAPES:
        kx, kg = jax.random.split(jax.random.PRNGKey(0))
        x, g = jax.random.normal(kx, (b, h, h, c)), jax.random.normal(kg, (b, h, h, o))
        ref = xla_dw(x, g)
        gflop = 2 * b * h * h * c * o * 9 / 1e9
        for name, f in (("xla", xla_dw), ("im2col", im2col_dw), ("shifted", shifted_dw)):
            err = float(jnp.abs(f(x, g) - ref).max() / jnp.abs(ref).max())
            ms = median_ms(f, x, g)
            print(f"[{b},{h},{h},{c}]->{o} {name:8s} {ms:7.1f} ms {gflop / ms * 1e3:6.0f} GFLOP/s  rel err {err:.0e}")


if __name__ == "__main__":
    main()
