"""Gaussian-diffusion parity against OpenAI's reference (tests/fixtures/parity/diffusion-*)."""
import json
import pathlib

import numpy as np
import pytest

from glide_jax.diffusion import schedules
from glide_jax.parity import check, diffusion

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
DIFFUSION_DIRS = sorted(FIXTURES.glob("diffusion-*"))


def test_all_diffusion_fixtures_present():
    assert len(DIFFUSION_DIRS) == 12


@pytest.mark.parametrize("fixture_dir", DIFFUSION_DIRS, ids=lambda p: p.name)
def test_diffusion_parity(fixture_dir):
    meta = json.loads((fixture_dir / "meta.json").read_text())
    kind = json.loads((fixture_dir / "hparams.json").read_text())["kind"]
    io = np.load(fixture_dir / "io.npz")
    got = diffusion.compute(fixture_dir)
    want_names = {k for k, v in meta["arrays"].items() if v["role"] == "output"}
    assert set(got) == want_names
    failures = []
    for name in sorted(want_names):
        ok, worst, rule = check.check_array(name, got[name], io[name], kind=kind, inputs=io)
        if not ok:
            failures.append(f"{name}: worst {worst:.3g} ({rule})")
    assert not failures, "\n".join(failures)


def test_schedule_identities():
    a = schedules.schedule_arrays("cosine", 1000, "100")
    assert a["timestep_map"][0] == 0 and a["timestep_map"][-1] == 999 and a["num_timesteps"] == 100
    np.testing.assert_allclose(np.cumprod(1 - a["betas"]), a["alphas_cumprod"], rtol=1e-12)
    # The posterior mean of a noiseless x_t = √ᾱ_t·x_0 is √ᾱ_{t−1}·x_0.
    c1, c2 = a["posterior_mean_coef1"], a["posterior_mean_coef2"]
    np.testing.assert_allclose(c1 + c2 * a["sqrt_alphas_cumprod"], np.sqrt(a["alphas_cumprod_prev"]),
                               rtol=1e-12)
    sched = schedules.make_schedule("linear", 1000, "fast27")
    assert sched.num_timesteps == 27 and sched.betas.dtype == np.float32
    assert sched.timestep_map.dtype == np.int32


def test_space_timesteps():
    assert schedules.space_timesteps(10, "") == list(range(10))
    assert schedules.space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    fast = schedules.space_timesteps(1000, "fast27")
    assert len(fast) == 27 and 997 in fast and 999 not in fast
    assert len(schedules.space_timesteps(300, "10,15,20")) == 45


@pytest.mark.parametrize("respacing", ["2000", "ddim999", "abc", "0", "10,,3", "-5"])
def test_bad_respacing(respacing):
    with pytest.raises(ValueError):
        schedules.space_timesteps(1000, respacing)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown noise schedule"):
        schedules.get_named_beta_schedule("quadratic", 1000)


def test_check_array_rules():
    b = np.ones((2, 3), np.float32)
    assert check.check_array("output", b + 5e-5, b, kind="base")[0]
    assert not check.check_array("output", b + 3e-4, b, kind="base")[0]
    assert check.check_array("loop_samples", b + 1.5e-3, b, kind="base")[0]
    assert check.check_array("cond_grad", b * (1 + 5e-5), b, kind="clip")[0]
    assert not check.check_array("glide_tokens", np.array([1, 2]), np.array([1, 3]), kind="tokenizer")[0]
    assert not check.check_array("output", b.astype(np.float64), b, kind="base")[0]
    assert not check.check_array("output", b[:1], b, kind="base")[0]
    vb = np.array([1.0, 2.0], np.float32)
    inputs = {"train_t": np.array([0, 5])}
    off_t0, off_t5 = vb * np.float32([1.04, 1.0]), vb * np.float32([1.0, 1.04])
    assert check.check_array("train.vb", off_t0, vb, kind="diffusion", inputs=inputs)[0]
    assert not check.check_array("train.vb", off_t5, vb, kind="diffusion", inputs=inputs)[0]


def test_mse_weightings_follow_their_formulas():
    import jax.numpy as jnp
    from glide_jax.diffusion import gaussian
    from glide_jax.experiment import schedule_for
    sched = schedule_for({"noise_schedule": "cosine", "diffusion_steps": 1000})
    t = jnp.arange(0, 1000, 37)
    snr = np.asarray(gaussian.snr(sched, t))
    a = np.asarray(sched.alphas_cumprod)[np.asarray(t)]
    np.testing.assert_allclose(snr, a / (1 - a), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(gaussian.mse_weights(sched, t, "uniform")), 1.0)
    w = np.asarray(gaussian.mse_weights(sched, t, "min_snr", gamma=5.0))
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-5)
    assert np.all(w[snr <= 5.0] == 1.0) and np.all(w[snr > 5.0] < 1.0) and w[0] < 0.01
    p2 = np.asarray(gaussian.mse_weights(sched, t, "p2", gamma=1.0))
    np.testing.assert_allclose(p2, 1.0 / (1.0 + snr), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown MSE weighting"):
        gaussian.mse_weights(sched, t, "snr+")


def test_weighted_hybrid_loss_reweights_only_the_eps_term():
    import jax
    import jax.numpy as jnp
    from glide_jax.diffusion import gaussian
    from glide_jax.experiment import schedule_for
    sched = schedule_for({"noise_schedule": "cosine", "diffusion_steps": 1000})
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = jax.random.uniform(k[0], (4, 8, 8, 3), minval=-1, maxval=1)
    noise = jax.random.normal(k[1], x0.shape)
    out = jax.random.normal(k[2], (4, 8, 8, 6)) * 0.5
    t = jnp.array([0, 10, 500, 999])
    plain = gaussian.training_losses(sched, out, x0, noise, t)
    w = gaussian.mse_weights(sched, t, "min_snr")
    weighted = gaussian.training_losses(sched, out, x0, noise, t, w)
    np.testing.assert_allclose(weighted["vb"], plain["vb"])
    np.testing.assert_allclose(weighted["mse"], plain["mse"])
    np.testing.assert_allclose(weighted["loss"], plain["mse"] * w + plain["vb"], rtol=1e-6)
