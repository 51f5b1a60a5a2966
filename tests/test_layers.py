"""Building blocks whose fast paths differ from the textbook formula: GroupNorm, dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.models.layers import Dropout, GroupNorm, dropout, group_norm, hash_uniform_bits


def _group_norm_reference(x, scale, bias, groups, eps=1e-5):
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (3, 4, 4, 96), (2, 2048), (2, 5, 7, 32)])
def test_group_norm_matches_float64(shape):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, shape).astype(np.float32)  # an offset mean, as activations have
    c = shape[-1]
    scale, bias = rng.normal(1, 0.1, c), rng.normal(0, 0.1, c)
    params = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    got = GroupNorm().apply(params, jnp.asarray(x))
    np.testing.assert_allclose(got, _group_norm_reference(x, scale, bias, 32), atol=2e-5, rtol=1e-5)

    # FiLM modulation folded in == applied after the norm
    if len(shape) == 4:
        s = rng.normal(0, 0.3, (shape[0], 1, 1, c)).astype(np.float32)
        t = rng.normal(0, 0.3, (shape[0], 1, 1, c)).astype(np.float32)
        got = GroupNorm().apply(params, jnp.asarray(x), modulation=(s, t))
        want = _group_norm_reference(x, scale, bias, 32) * (1 + s) + t
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)


def test_group_norm_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm().init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 48)))


def test_dropout_rate_scale_and_independence():
    x = jnp.ones((8, 64, 64, 32))
    n = x.size
    for rate in (0.1, 0.5):
        y = np.asarray(dropout(x, rate, jax.random.PRNGKey(1)))
        dropped = float((y == 0).mean())
        assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n), (rate, dropped)
        np.testing.assert_allclose(np.unique(y), [0.0, 1.0 / (1 - rate)], rtol=1e-6)
        # neighbouring elements (along channels and along rows) are uncorrelated
        m = (y != 0).astype(np.float64)
        for a, b in [(m[..., 1:], m[..., :-1]), (m[:, 1:], m[:, :-1]), (m[1:], m[:-1])]:
            assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01
    a = dropout(x, 0.1, jax.random.PRNGKey(1))
    b = dropout(x, 0.1, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, dropout(x, 0.1, jax.random.PRNGKey(1)))  # deterministic
    overlap = float(((a == 0) & (b == 0)).mean())  # different keys: independent masks
    assert abs(overlap - 0.01) < 0.002


def test_hash_bits_are_uniform():
    bits = np.asarray(hash_uniform_bits(jnp.uint32(7), (1 << 20,)))
    counts = np.bincount(bits >> 28, minlength=16)  # top 4 bits: 16 equally likely bins
    expected = bits.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40, chi2  # 15 degrees of freedom: p < 1e-3 above ~37.7
    assert len(np.unique(bits)) == bits.size  # a bijection of the index


def test_dropout_module_uses_the_dropout_stream():
    x = jnp.ones((2, 4, 4, 8))
    m = Dropout(0.5)
    assert (m.apply({}, x, deterministic=True) == x).all()
    y1 = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
    y2 = m.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)})
    assert (y1 == 0).any() and not np.array_equal(y1, y2)


def _group_norm_textbook(x, scale, bias, groups, mod_scale, mod_shift, silu, eps=1e-5):
    """The textbook formula, differentiated by JAX's autodiff: the reference for the custom VJP."""
    b, c = x.shape[0], x.shape[-1]
    g = x.reshape(b, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias
    y = y * (1 + mod_scale) + mod_shift
    return jax.nn.silu(y) if silu else y


@pytest.mark.parametrize("shape,silu,modulated", [
    ((2, 8, 8, 64), True, True), ((2, 8, 8, 64), False, False), ((3, 4, 4, 96), True, False),
    ((2, 2048), True, False), ((2, 5, 7, 32), False, True)])
def test_group_norm_gradients_match_autodiff(shape, silu, modulated):
    rng = np.random.default_rng(1)
    b, c = shape[0], shape[-1]
    mod_shape = (b,) + (1,) * (len(shape) - 2) + (c,)
    x = jnp.asarray(rng.normal(3.0, 2.0, shape), jnp.float32)
    scale = jnp.asarray(rng.normal(1, 0.3, c), jnp.float32)
    bias = jnp.asarray(rng.normal(0, 0.3, c), jnp.float32)
    ms = jnp.asarray(rng.normal(0, 0.3, mod_shape), jnp.float32) if modulated else jnp.zeros(mod_shape)
    mt = jnp.asarray(rng.normal(0, 0.3, mod_shape), jnp.float32) if modulated else jnp.zeros(mod_shape)
    dy = jnp.asarray(rng.normal(0, 1, shape), jnp.float32)

    def ours(x, scale, bias, ms, mt):
        return group_norm(x, scale, bias, 32, 1e-5, (ms, mt) if modulated else None, silu=silu)

    def textbook(x, scale, bias, ms, mt):
        return _group_norm_textbook(x, scale, bias, 32, ms, mt, silu)

    y, vjp = jax.vjp(ours, x, scale, bias, ms, mt)
    y_ref, vjp_ref = jax.vjp(textbook, x, scale, bias, ms, mt)
    np.testing.assert_allclose(y, y_ref, atol=5e-5, rtol=1e-5)
    names = ["x", "scale", "bias", "mod_scale", "mod_shift"]
    n_grads = 5 if modulated else 3
    for name, got, want in list(zip(names, vjp(dy), vjp_ref(dy)))[:n_grads]:
        tol = 2e-4 * float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, atol=tol, rtol=1e-4, err_msg=name)
    # a wrong backward would still pass a forward check: make sure the x gradient is non-trivial
    assert float(jnp.abs(vjp(dy)[0]).max()) > 1e-3


def test_group_norm_accepts_low_precision_input():
    x = jnp.asarray(np.random.default_rng(2).normal(0, 1, (2, 4, 4, 64)), jnp.bfloat16)
    out, vjp = jax.vjp(lambda x: group_norm(x, jnp.ones(64), jnp.zeros(64), 32, 1e-5, silu=True), x)
    assert out.dtype == jnp.float32 and vjp(jnp.ones_like(out))[0].dtype == jnp.bfloat16
