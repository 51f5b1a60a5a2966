"""Noised CLIP: parity with OpenAI's GLIDE CLIP on the `clip` fixture, param names, loss, bf16."""
from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from glide_jax.models.clip import ClipConfig, ClipModel, clip_contrastive_loss, normalize
from glide_jax.parity import clip as clip_parity
from glide_jax.pt_reader import load_state_dict

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "parity" / "clip"
HPARAMS = json.loads((FIXTURE / "hparams.json").read_text())
META = json.loads((FIXTURE / "meta.json").read_text())
OUTPUTS = sorted(k for k, v in META["arrays"].items() if v["role"] == "output")


@pytest.fixture(scope="module")
def config() -> ClipConfig:
    return ClipConfig.from_hparams(HPARAMS)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "io.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def got() -> dict[str, np.ndarray]:
    with jax.default_matmul_precision("highest"):
        return clip_parity.compute(FIXTURE)


@pytest.fixture(scope="module")
def params(config) -> dict:
    return clip_parity.load_params(FIXTURE, ClipModel(config))


def test_compute_returns_every_output(got):
    assert sorted(got) == OUTPUTS
    for name in OUTPUTS:
        assert list(got[name].shape) == META["arrays"][name]["shape"], name
        assert got[name].dtype == np.float32, name


@pytest.mark.parametrize("name", OUTPUTS)
def test_parity(got, ref, name):
    a, b = got[name].astype(np.float64), ref[name].astype(np.float64)
    if name == "cond_grad":
        err = np.max(np.abs(a - b))
        assert err <= 1e-4 * np.max(np.abs(b)), f"{name}: max err {err:.3g}, max |ref| {np.max(np.abs(b)):.3g}"
    else:
        excess = np.abs(a - b) - (1e-4 + 1e-4 * np.abs(b))
        assert np.all(excess <= 0), f"{name}: worst |a-b| {np.max(np.abs(a - b)):.3g}"


def test_param_names_follow_design_rule(config):
    """Every state-dict key maps to exactly one Flax leaf of the right shape, and nothing is left over."""
    model = ClipModel(config)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.init_inputs()))["params"]
    assert set(abstract) == {"image_enc", "text_enc"}
    leaf_names = {"w": "kernel", "b": "bias", "g": "scale"}
    for sub, fname in clip_parity.WEIGHT_FILES.items():
        flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(abstract[sub]).items()}
        expected = {}
        for key, value in load_state_dict(FIXTURE / fname).items():
            *path, leaf = key.split(".")
            shape = value.shape
            if leaf == "w":
                shape = shape[::-1]
            elif leaf == "patch_proj":
                shape = tuple(shape[i] for i in (2, 3, 1, 0))
            expected["/".join(path + [leaf_names.get(leaf, leaf)])] = shape
        assert flat == expected, sub
    n_image = sum(np.prod(v.shape) for v in jax.tree.leaves(abstract["image_enc"]))
    n_text = sum(np.prod(v.shape) for v in jax.tree.leaves(abstract["text_enc"]))
    assert (n_image, n_text) == (META["settings"]["n_params_image"], META["settings"]["n_params_text"])


def test_from_hparams_rejects_unknown_keys():
    with pytest.raises(ValueError, match="n_head_txt"):
        ClipConfig.from_hparams({**HPARAMS, "n_head_txt": 3})
    assert ClipConfig.from_hparams({"kind": "clip"}) == ClipConfig()


def test_model_call_and_causal_text(config, params, ref):
    """__call__ gives the normalised embeddings; text tokens after position len-1 do not matter."""
    model = ClipModel(config)
    tokens = jnp.asarray(ref["text_tokens"], jnp.int32)
    lens = jnp.asarray(ref["text_lens"], jnp.int32)
    images = jnp.asarray(ref["images"].transpose(0, 2, 3, 1))
    t = jnp.asarray(ref["image_timesteps"], jnp.int32)
    with jax.default_matmul_precision("highest"):
        out = jax.jit(model.apply)({"params": params}, images, t, tokens, lens)
        scrambled = jnp.where(jnp.arange(tokens.shape[1])[None] >= lens[:, None], 123, tokens)
        enc = jax.jit(lambda p, x, n: model.apply({"params": p}, x, n, method=ClipModel.encode_text))(
            params, scrambled, lens)
    np.testing.assert_allclose(out["image_emb"], ref["image_emb"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["text_emb"], ref["text_emb"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enc, ref["text_enc"], rtol=1e-4, atol=1e-4)


def _numpy_contrastive(img, txt, scale):
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T

    def ce(l):  # rows are predictions, the diagonal is the label
        l = l - l.max(axis=1, keepdims=True)
        return np.mean(np.log(np.exp(l).sum(axis=1)) - np.diag(l))

    return 0.5 * (ce(logits) + ce(logits.T))


def test_contrastive_loss_minimal_for_matched_pairs():
    rng = np.random.default_rng(0)
    img = normalize(jnp.asarray(rng.normal(size=(4, 16)), jnp.float32))
    txt = normalize(img + 0.3 * jnp.asarray(rng.normal(size=(4, 16)), jnp.float32))
    loss_fn = jax.jit(clip_contrastive_loss)
    matched = float(loss_fn(img, txt, 10.0))
    np.testing.assert_allclose(matched, _numpy_contrastive(np.asarray(img), np.asarray(txt), 10.0), rtol=1e-5)
    for perm in itertools.permutations(range(4)):
        if perm != (0, 1, 2, 3):
            assert matched < float(loss_fn(img, txt[jnp.asarray(perm)], 10.0)), perm
    # Symmetric in its two arguments, and the gradient pulls matched pairs together.
    np.testing.assert_allclose(float(loss_fn(txt, img, 10.0)), matched, rtol=1e-6)
    g = jax.grad(clip_contrastive_loss, argnums=1)(img, txt, 10.0)
    assert float(jnp.sum(g * img)) < 0


def test_bf16_forward_finite(config, params, ref):
    model = ClipModel(config, dtype=jnp.bfloat16)
    images = jnp.asarray(ref["images"].transpose(0, 2, 3, 1))
    t = jnp.asarray(ref["image_timesteps"], jnp.int32)
    tokens = jnp.asarray(ref["text_tokens"], jnp.int32)
    lens = jnp.asarray(ref["text_lens"], jnp.int32)
    out = jax.jit(model.apply)({"params": params}, images, t, tokens, lens)
    for name in ("image_emb", "text_emb"):
        assert out[name].dtype == jnp.float32
        assert np.all(np.isfinite(out[name])), name
        # Unit vectors that still point roughly where the float32 ones do.
        cos = np.sum(np.asarray(out[name]) * ref[name], axis=-1)
        assert np.all(cos > 0.99), (name, cos)


def test_scan_layers_matches_the_unrolled_encoders(config, params, ref):
    """Both encoders' blocks as one lax.scan each: the same traces, embeddings, guidance gradient and
    parameter gradients as unrolled (float32)."""
    images = jnp.asarray(ref["images"].transpose(0, 2, 3, 1))
    t = jnp.asarray(ref["image_timesteps"], jnp.int32)
    tokens = jnp.asarray(ref["text_tokens"], jnp.int32)
    lens = jnp.asarray(ref["text_lens"], jnp.int32)

    def run(model):
        def loss(p):
            out, state = model.apply({"params": p}, images, t, tokens, lens, mutable=["intermediates"])
            return clip_contrastive_loss(out["image_emb"], out["text_emb"], 10.0), (out, state["intermediates"])

        (_, (out, inter)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        cond = model.apply({"params": params}, images, t, out["text_emb"], 1.0, method=ClipModel.guidance_grad)
        return out, clip_parity._traces(inter), grads, cond

    with jax.default_matmul_precision("highest"):
        unrolled = jax.jit(lambda: run(ClipModel(config)))()
        lowered = jax.jit(lambda: run(ClipModel(dataclasses.replace(config, scan_layers=True)))).lower()
        scanned = lowered.compile()()
    assert "stablehlo.while" in lowered.as_text()
    assert set(scanned[1]) == set(unrolled[1]) and "trace.text.block_1" in unrolled[1]
    for a, b in zip(jax.tree.leaves(unrolled), jax.tree.leaves(scanned)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(float(jnp.abs(a).max()), 1e-3))
