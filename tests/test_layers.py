"""Building blocks whose fast paths differ from the textbook formula: GroupNorm, dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.models.layers import Dropout, GroupNorm, dropout, hash_uniform_bits


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
