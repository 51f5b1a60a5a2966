"""Training-system checks: caption dropout, FSDP and ZeRO-1 equivalence and memory split, every model kind
through one train step (two processes training together: test_multihost_faults.py)."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import configs_loader, sharding
from glide_jax.train_step import drop_captions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")


def test_caption_dropout_fraction_within_binomial_bound():
    n, p = 40_000, 0.2
    batch = {"tokens": jnp.ones((n, 4), jnp.int32), "mask": jnp.ones((n, 4), bool)}
    out, dropped = drop_captions(batch, jax.random.PRNGKey(3), p, pad_id=50256)
    frac = float(jnp.mean(dropped))
    bound = 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma
    assert abs(frac - p) < bound, (frac, bound)
    d = np.asarray(dropped)
    assert np.all(np.asarray(out["tokens"])[d] == 50256)
    assert not np.asarray(out["mask"])[d].any()
    assert np.asarray(out["mask"])[~d].all()


def test_mesh_shape_errors():
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(sharding.MeshError, match="does not divide"):
        sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(sharding.MeshError, match="at most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(sharding.MeshError, match="unknown mesh axes"):
        sharding.mesh_shape({"model": 2}, 8)


def test_all_configs_load_and_build_abstractly():
    """Every experiment config builds its model and state abstractly (no memory)."""
    from glide_jax import experiment

    names = configs_loader.known()
    assert {"shapes_tiny", "glide_filtered_base64", "glide_filtered_upsample256", "glide_base64_3p5b",
            "glide_upsample256_1p5b", "inpaint64", "clip_noised64", "classifier64"} <= set(names)
    for name in names:
        config = configs_loader.load(name)
        setup = experiment.setup_state(config, abstract_only=True)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract.params))
        assert n > 0, name
        if name == "glide_filtered_base64":
            assert n == 385_030_726


@pytest.mark.slow
def test_fsdp_step_matches_single_device_and_splits_memory():
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "fsdp_check.py")], capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["num_devices"] == 8
    assert abs(r["loss_single"] - r["loss_fsdp"]) <= 1e-5 * abs(r["loss_single"])
    assert r["max_rel_param_diff"] <= 1e-5
    for frac in r["param_fraction_per_device"] + r["opt_fraction_per_device"]:
        assert abs(frac - 1 / 8) <= 0.15 / 8, r
    # ZeRO-1 on data=8: the same step; params replicated, Adam moments and EMA split 8 ways
    assert abs(r["loss_single"] - r["loss_zero1"]) <= 1e-5 * abs(r["loss_single"])
    assert r["zero1_max_rel_param_diff"] <= 1e-5 and r["zero1_max_rel_ema_diff"] <= 1e-5
    assert all(abs(f - 1) <= 1e-9 for f in r["zero1_param_fraction_per_device"]), r
    for frac in r["zero1_opt_fraction_per_device"] + r["zero1_ema_fraction_per_device"]:
        assert abs(frac - 1 / 8) <= 0.15 / 8, r


TINY_UNET = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", num_head_channels=32,
                 attention_resolutions="8", dropout=0.0, text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2)
KIND_HPARAMS = {
    "upsample": dict(kind="upsample", super_res=True, **TINY_UNET),
    "base-inpaint": dict(kind="base-inpaint", inpaint=True, **TINY_UNET),
    "classifier": dict(kind="classifier", image_size=16, model_channels=32, out_channels=18, num_res_blocks=1,
                       attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=32, pool="attention"),
    "clip": dict(kind="clip", image_size=16, patch_size=4, n_embd=16, n_head_state_text=8, n_head_text=2,
                 n_xf_blocks_text=1, n_head_state_image=8, n_head_image=2, n_xf_blocks_image=1),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KIND_HPARAMS))
def test_same_train_step_serves_every_model_kind(kind):
    """Diffusion (upsample, inpaint), classifier CE and CLIP contrastive losses through one train_step."""
    import ml_collections

    from glide_jax import experiment
    from glide_jax.train import make_jitted_step

    config = configs_loader.load("test_tiny", lock=False)
    config.model.hparams = ml_collections.ConfigDict(experiment.hparams_with_defaults(kind, KIND_HPARAMS[kind]))
    config.data.image_size = config.data.text_ctx = 0
    if kind in ("classifier", "clip"):  # the base config's Min-SNR weighting is for diffusion losses
        config.train.mse_weighting = "uniform"
    experiment.finalize(config)
    config.train.cond_drop = 0.0 if kind in ("classifier", "clip") else 0.2
    rng = jax.random.PRNGKey(0)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    setup = experiment.setup_state(config, mesh)
    model, tx, shard, state = setup.model, setup.tx, setup.shardings, setup.state
    r = np.random.default_rng(0)
    b = 4
    batch = {"image": r.uniform(-1, 1, (b, 16, 16, 3)).astype(np.float32)}
    if kind == "classifier":
        batch["label"] = r.integers(0, 18, (b,)).astype(np.int32)
    else:
        ctx = 77 if kind == "clip" else 8
        batch["tokens"] = r.integers(1, 40000, (b, ctx)).astype(np.int32)
        batch["mask"] = np.arange(ctx)[None] < r.integers(2, ctx, (b, 1))
    if kind == "upsample":
        batch["low_res"] = r.uniform(-1, 1, (b, 4, 4, 3)).astype(np.float32)
    if kind == "base-inpaint":
        batch["inpaint_mask"] = (r.uniform(size=(b, 16, 16, 1)) < 0.5).astype(np.float32)
        batch["inpaint_image"] = batch["image"] * batch["inpaint_mask"]
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    before = jax.device_get(state.params)
    step = make_jitted_step(config, model, tx, shard, jax.tree.map(lambda x: x.sharding, batch), mesh, 50256)
    for _ in range(3):  # warm-up starts at lr 0, and zero-initialised output layers gate the rest
        state, metrics = step(state, batch, rng)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
    changed = [not np.array_equal(a, c) for a, c in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(jax.device_get(state.params)))]
    assert sum(changed) > 0.2 * len(changed), kind  # zero-init layers open up one step at a time


def test_ema_warmup_rate():
    import jax.numpy as jnp
    from glide_jax.train_step import ema_rate_at
    steps = jnp.array([0, 1, 10, 100, 10_000])
    np.testing.assert_allclose(ema_rate_at(steps, 0.995, False), 0.995)
    np.testing.assert_allclose(ema_rate_at(steps, 0.995, True), [0.1, 2 / 11, 11 / 20, 101 / 110, 0.995], rtol=1e-6)


def test_mse_weighting_is_checked_against_the_kind():
    from glide_jax import configs_loader, experiment
    config = configs_loader.load("classifier64")
    config.train.mse_weighting = "min_snr"
    with pytest.raises(experiment.SetupError, match="weights a diffusion loss"):
        experiment.finalize(config)
    config = configs_loader.load("shapes_tiny")
    config.train.mse_weighting = "minsnr"
    with pytest.raises(experiment.SetupError, match="not one of"):
        experiment.finalize(config)
    config.train.mse_weighting = "min_snr"
    assert experiment.loss_for(experiment.finalize(config)).keywords == {"mse_weighting": "min_snr", "gamma": 5.0}
