"""How much of the bench training step is not 3x3 convolution: times `bench train` as is, then
with every 3x3 stride-1 convolution routed to the Winograd path (`--kernels winograd`)
and that path replaced by a cheap elementwise stand-in of the same input and output shapes
(channel slice/tile times one kernel row), i.e. the floor left by everything else.

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 .venv/bin/python benchmarks/nonconv_floor.py [HPARAMS.json]

(the tunable is what `python -m glide_jax.<tool>` runs with; see glide_jax/host.py)

Prints both `per_step_s` and their difference (the time the 3x3 convolutions take). The stand-in
is only a measuring device: its results are meaningless.
"""
import sys

import jax.numpy as jnp

from glide_jax import bench
from glide_jax.models import winograd


def stand_in(x, kernel):
    """[B,H,W,Cin], [3,3,Cin,Cout] -> [B,H,W,Cout] in one cheap elementwise pass (differentiable)."""
    cin, cout = x.shape[-1], kernel.shape[-1]
    reps = -(-cout // cin)
    y = jnp.concatenate([x] * reps, axis=-1)[..., :cout] if reps > 1 else x[..., :cout]
    return y * kernel[1, 1, 0]


def main(hparams_path: str = "../shared/bench/bench_hparams.json") -> None:
    hparams = bench.load_hparams(hparams_path)
    full = bench.bench_train(hparams, batch=8, steps=5, kernels="cpu")["per_step_s"]
    winograd.conv3x3 = stand_in  # Conv looks the function up at trace time
    floor = bench.bench_train(hparams, batch=8, steps=5, kernels="winograd")["per_step_s"]
    print(f"training step: {full:.3f} s; with 3x3 convolutions stubbed: {floor:.3f} s; "
          f"3x3 convolutions: {full - floor:.3f} s ({(full - floor) / full:.0%})")


if __name__ == "__main__":
    main(*sys.argv[1:])
