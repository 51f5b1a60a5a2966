"""Winograd F(2x2,3x3) and F(4x4,3x3) convolutions: same values and gradients as a direct convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.models import layers, winograd


def _direct(x, g):
    return jax.lax.conv_general_dilated(
        x, g, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST)


def _direct_f64(x, g):
    """Cross-correlation with zero padding 1, in float64 numpy."""
    x = np.asarray(x, np.float64)
    g = np.asarray(g, np.float64)
    b, h, w, _ = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.zeros((b, h, w, g.shape[3]))
    for i in range(3):
        for j in range(3):
            y += xp[:, i:i + h, j:j + w] @ g[i, j]
    return y


# float32 error relative to the output's largest magnitude, and how many times XLA's own float32
# convolution error it may be: F(2,3)'s coefficients are 0, +-1, +-1/2; F(4,3)'s reach 8 and 1/24
TOLERANCE = {2: (1e-5, 10), 4: (5e-5, 60)}
CASES = [((2, 8, 8, 16), 24, 2), ((2, 8, 8, 16), 24, 4), ((1, 4, 6, 3), 5, 2), ((3, 2, 2, 8), 8, 2),
         ((2, 16, 10, 32), 32, 2), ((2, 12, 16, 32), 40, 4), ((1, 4, 4, 3), 5, 4)]


@pytest.mark.parametrize("shape,cout,tile", CASES)
def test_forward_matches_float64(shape, cout, tile):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    g = (rng.standard_normal((3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1])).astype(np.float32)
    want = _direct_f64(x, g)
    got = np.asarray(jax.jit(lambda x, g: winograd.conv3x3(x, g, tile))(x, g))
    rel, vs_direct = TOLERANCE[tile]
    np.testing.assert_allclose(got, want, atol=rel * np.abs(want).max(), rtol=0)
    # and about as close as XLA's own float32 convolution is
    direct_err = np.abs(np.asarray(_direct(x, g)) - want).max()
    assert np.abs(got - want).max() <= vs_direct * max(direct_err, 1e-7)


@pytest.mark.parametrize("shape,cout,tile", [((2, 8, 8, 16), 24, 2), ((2, 8, 8, 16), 24, 4),
                                             ((1, 4, 6, 3), 5, 2), ((1, 4, 8, 3), 5, 4)])
def test_gradients_match_direct_convolution(shape, cout, tile):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1]), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape[:3] + (cout,)), jnp.float32)

    def loss(conv):
        return lambda x, g: jnp.sum(jnp.tanh(conv(x, g)) * ct)

    want = jax.grad(loss(_direct), argnums=(0, 1))(x, g)
    got = jax.jit(jax.grad(loss(lambda x, g: winograd.conv3x3(x, g, tile)), argnums=(0, 1)))(x, g)
    for w, gt in zip(want, got):
        np.testing.assert_allclose(gt, w, atol=2 * TOLERANCE[tile][0] * float(jnp.abs(w).max()), rtol=0)


@pytest.mark.parametrize("shape,tile", [((2, 6, 4, 5), 2), ((2, 8, 4, 5), 4)])
def test_gradient_is_the_vjp_of_the_forward(shape, tile):
    """<dy, J dx> == <J^T dy, dx> with the hand-written backward (checks dx and dg directly)."""
    rng = np.random.default_rng(2)
    x, dx = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    g, dg = (jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32) for _ in range(2))
    dy = jnp.asarray(rng.standard_normal(shape[:3] + (7,)), jnp.float32)
    _, vjp = jax.vjp(lambda x, g: winograd.conv3x3(x, g, tile), x, g)
    gx, gg = vjp(dy)
    # the convolution is bilinear: J(x,g)[dx,dg] = conv(dx, g) + conv(x, dg)
    lhs = jnp.vdot(dy, _direct(dx, g) + _direct(x, dg))
    rhs = jnp.vdot(gx, dx) + jnp.vdot(gg, dg)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_supported_shapes():
    assert winograd.supported((2, 8, 8, 4), (3, 3, 4, 4))
    assert not winograd.supported((2, 7, 8, 4), (3, 3, 4, 4))  # odd height
    assert not winograd.supported((2, 8, 8, 4), (1, 1, 4, 4))  # 1x1
    assert not winograd.supported((2, 8, 8, 4), (3, 3, 4, 4), stride=2)
    assert winograd.tile_for((2, 16, 8, 4)) == 4
    assert winograd.tile_for((2, 16, 6, 4)) == 2  # 6 is even, not a multiple of 4
    assert winograd.tile_for((2, 16, 7, 4)) is None
    assert winograd.tile_for((2, 16, 8, 4), jnp.bfloat16) == 2  # F(4,3) only at float32 and above
    x, g = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 2))
    with pytest.raises(ValueError, match="tile 4 cannot cover"):
        winograd.conv3x3(x, g, 4)
    with pytest.raises(ValueError, match="tile 3 cannot cover"):
        winograd.conv3x3(x, g, 3)


def test_conv_algorithm_choice():
    pick = layers.conv_algorithm_for
    wide, narrow = (3, 3, 64, 128), (3, 3, 3, 128)
    x = (2, 16, 16, 64)
    assert pick("xla", x, wide, 1, jnp.float32) == "xla"
    assert pick("winograd", x, narrow, 1, jnp.float32) == "winograd"
    assert pick("winograd", (2, 17, 16, 64), wide, 1, jnp.float32) == "xla"  # cannot apply: falls back
    assert pick("winograd", x, wide, 2, jnp.float32) == "xla"
    assert jax.default_backend() == "cpu"
    assert pick("auto", x, wide, 1, jnp.float32) == "winograd"
    assert pick("auto", x, narrow, 1, jnp.float32) == "xla"
    assert pick("auto", x, (3, 3, 64, 64), 1, jnp.float32) == "winograd"
    assert pick("auto", x, (3, 3, 64, 32), 1, jnp.float32) == "xla"  # too few output channels
    assert pick("auto", (2, 8, 8, 64), wide, 1, jnp.float32) == "xla"  # too small an image
    assert pick("auto", x, wide, 1, jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="conv_algorithm 'fast'"):
        pick("fast", x, wide, 1, jnp.float32)


def test_kernels_pick_the_conv_algorithm_per_backend():
    """Which backend gets which kernels is decided once, by the experiment layer: "auto" is the
    CPU kernels (Winograd by the shape rule) on CPU and XLA's own ops on accelerators."""
    from glide_jax import experiment

    assert experiment.resolve_kernels("auto", backend="cpu") == "cpu"
    assert experiment.resolve_kernels("auto", backend="tpu") == "xla"
    assert experiment.resolve_kernels("auto", backend="gpu") == "xla"
    assert experiment.resolve_kernels("xla", backend="cpu") == "xla"
    assert [layers.conv_algorithm_of(k) for k in ("xla", "cpu", "winograd")] == ["xla", "auto", "winograd"]
    with pytest.raises(experiment.SetupError, match="model.kernels='fast'"):
        experiment.resolve_kernels("fast")


@pytest.mark.parametrize("algorithm", ["xla", "winograd", "auto"])
def test_conv_module_same_params_and_values(algorithm):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 32))
    ref = layers.Conv(32, 3, algorithm="xla")
    params = ref.init(jax.random.PRNGKey(1), x)
    conv = layers.Conv(32, 3, algorithm=algorithm)
    assert jax.tree.structure(conv.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
    np.testing.assert_allclose(conv.apply(params, x), ref.apply(params, x), atol=2e-5)


def test_unet_config_rejects_unknown_kernels():
    from glide_jax.models.unet import UNetConfig

    with pytest.raises(ValueError, match="kernels 'fast'"):
        UNetConfig(num_channels=32, kernels="fast")


def test_unet_same_outputs_and_gradients_with_either_algorithm():
    """The whole text-conditional UNet (tiny) with Winograd everywhere it applies vs XLA's convs."""
    from glide_jax import experiment
    from tests.helpers import TINY

    hp = TINY["base"]
    # "cpu" runs XLA's convolutions at these small shapes; both share the CPU GroupNorm and dropout
    nets = {a: experiment.build(hp, kernels=k) for a, k in (("xla", "cpu"), ("winograd", "winograd"))}
    inputs = nets["xla"].init_inputs(2)
    params = nets["xla"].init(jax.random.PRNGKey(0), **inputs)["params"]
    # zero-initialised output convs would hide the convolutions: give every weight some size
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    inputs["x"] = jax.random.normal(jax.random.PRNGKey(2), inputs["x"].shape)
    inputs["t"] = jnp.array([10, 900])
    inputs["tokens"] = jnp.arange(inputs["tokens"].size).reshape(inputs["tokens"].shape) % 50

    def out_and_grads(net):
        def loss(p):
            out = net.apply({"params": p}, **inputs)
            return jnp.mean(jnp.square(out)), out
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    runs = {a: out_and_grads(net) for a, net in nets.items()}
    (gx, ox), (gw, ow) = runs["xla"], runs["winograd"]
    scale = float(jnp.abs(ox).max())
    assert scale > 0.1
    np.testing.assert_allclose(ow, ox, atol=1e-4 * scale)
    # biases followed by a GroupNorm have a gradient that is zero up to rounding (~1e-9): their
    # floor is a millionth of the largest gradient, not of their own
    floor = 1e-6 * max(float(jnp.abs(b).max()) for b in jax.tree.leaves(gx))
    for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gx)):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()) + floor)
