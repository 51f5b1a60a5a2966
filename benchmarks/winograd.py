"""3x3 convolutions of the bench config (batch 8): XLA's convolution vs Winograd (F(4x4,3x3) where
H and W are multiples of 4, else F(2x2,3x3))
(`glide_jax.models.winograd`). Prints, per shape, the median ms of the forward pass and of the
backward pass (input and filter gradients), timed alternately in one process, and the ratios.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/winograd.py [repeats]

(the tunable is what `python -m glide_jax.<tool>` runs with; see glide_jax/host.py)
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from glide_jax.models import winograd  # importing glide_jax sets its XLA:CPU flags

# (H, W, Cin) -> Cout: every distinct 3x3 stride-1 shape of the bench config's UNet
SHAPES = [((8, 8, 256), 256), ((8, 8, 512), 256), ((16, 16, 192), 192), ((16, 16, 256), 256),
          ((16, 16, 448), 192), ((32, 32, 64), 128), ((32, 32, 128), 128), ((32, 32, 192), 192),
          ((32, 32, 320), 128), ((64, 64, 3), 64), ((64, 64, 64), 6), ((64, 64, 64), 64),
          ((64, 64, 128), 64), ((64, 64, 128), 128), ((64, 64, 192), 64)]


def direct(x, g):
    return jax.lax.conv_general_dilated(x, g, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main(repeats: int = 7) -> None:
    rng = np.random.default_rng(0)
    print(f"{'shape':>22} {'GFLOP':>6} {'xla fwd':>8} {'wino fwd':>8} {'xla bwd':>8} {'wino bwd':>8}  fwd w/x  bwd w/x")
    for (h, w, cin), cout in SHAPES:
        x = jnp.asarray(rng.standard_normal((8, h, w, cin)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
        ct = jnp.asarray(rng.standard_normal((8, h, w, cout)), jnp.float32)
        fns = {}
        for name, conv in (("x", direct), ("w", winograd.conv3x3)):
            fns[name + "f"] = jax.jit(conv)
            # the gradient of a linear function of the output: the backward pass alone
            fns[name + "b"] = jax.jit(jax.grad(lambda x, g, conv=conv: jnp.vdot(conv(x, g), ct), argnums=(0, 1)))
        for f in fns.values():
            jax.block_until_ready(f(x, g))
        times = {k: [] for k in fns}
        for _ in range(repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, g))
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        gflop = 2 * 8 * h * w * cin * cout * 9 / 1e9
        print(f"{str((8, h, w, cin)) + '->' + str(cout):>22} {gflop:6.2f} {ms['xf']:8.1f} {ms['wf']:8.1f} "
              f"{ms['xb']:8.1f} {ms['wb']:8.1f}  {ms['wf'] / ms['xf']:7.2f}  {ms['wb'] / ms['xb']:7.2f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 7)
