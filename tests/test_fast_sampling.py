"""The fast samplers (sde-dpm++, unipc, restart), thresholding, step budgets and guidance schedules,
on toy and closed-form model functions."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.diffusion import gaussian as G
from glide_jax.diffusion import guidance, sampling, schedules

SHAPE = (2, 2, 2, 1)
NEW = ("sde-dpm++", "unipc", "restart")
MU, S2 = 0.3, 0.25  # closed-form data: x_0 ~ N(MU, S2) in every dimension


def toy_model(x, t_model):
    """A smooth, timestep-dependent fake model: ε and v in [B,H,W,2C]."""
    s = (t_model.astype(jnp.float32) / 1000.0)[:, None, None, None]
    return jnp.concatenate([jnp.tanh(0.7 * x + s), jnp.sin(x - s) * 0.9], axis=-1)


def gauss_model(sched):
    """The exact ε-predictor for x_0 ~ N(MU, S2): x_t ~ N(√ᾱ·MU, ᾱ·S2 + 1 − ᾱ), Cov(ε, x_t) = √(1−ᾱ),
    so E[ε | x_t] = √(1−ᾱ)·(x_t − √ᾱ·MU)/(ᾱ·S2 + 1 − ᾱ)."""

    def model_fn(x, t_model):
        i = jnp.searchsorted(sched.timestep_map, t_model)
        ab = sched.alphas_cumprod[i][:, None, None, None]
        eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * S2 + 1 - ab)
        return jnp.concatenate([eps, jnp.zeros_like(x)], axis=-1)

    return model_fn


def x0_exact(x, abar):
    """E[x_0 | x_t] for the closed-form data, float64."""
    return MU + np.sqrt(abar) * S2 * (x - np.sqrt(abar) * MU) / (abar * S2 + 1 - abar)


def cosine(respacing):
    return schedules.make_schedule("squaredcos_cap_v2", 1000, respacing)


def lambda_respacing(n):
    return sampling.respacing_from_timesteps(
        sampling.lambda_uniform_timesteps("squaredcos_cap_v2", 1000, n), 1000)


def run_gauss(sampler, sched, x_T, rng=None, **kw):
    fn = jax.jit(lambda x, r: sampling.sample_loop(gauss_model(sched), sched, x, sampler=sampler,
                                                   rng=r, threshold="none", **kw))
    return np.asarray(fn(x_T, jax.random.PRNGKey(0) if rng is None else rng))


# ---------------------------------------------------------------------------- compile / determinism


@pytest.mark.parametrize("sampler", NEW)
def test_traces_once_and_is_deterministic(sampler):
    sched = cosine("8")
    bodies = []

    def model_fn(x, t):
        bodies.append(1)
        return toy_model(x, t)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(x_T, rng, sched):
        return sampling.sample_loop(model_fn, sched, x_T, sampler=sampler, rng=rng)

    chex.clear_trace_counter()
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x1, x2 = jax.random.normal(k1, SHAPE), jax.random.normal(k2, SHAPE)
    a = run(x1, k3, sched)
    np.testing.assert_array_equal(a, run(x1, k3, sched))  # same inputs -> same output
    other_rng = run(x1, k1, sched)
    other_x = run(x2, k3, sched)
    other_sched = run(x1, k3, cosine("5,3"))  # same N, other tables: no retrace
    assert len(bodies) == 1 and a.shape == SHAPE and np.isfinite(a).all()
    assert not np.allclose(a, other_x) and not np.allclose(a, other_sched)
    if sampler == "unipc":  # an ODE solver ignores the rng
        np.testing.assert_array_equal(a, other_rng)
    else:
        assert not np.allclose(a, other_rng)


def test_stochastic_samplers_need_randomness():
    for sampler in ("sde-dpm++", "restart"):
        with pytest.raises(ValueError, match="rng"):
            sampling.sample_loop(toy_model, cosine("8"), jnp.zeros(SHAPE), sampler=sampler)
    # a restart count of 0 is the deterministic Heun sampler; unipc is an ODE solver
    sampling.sample_loop(toy_model, cosine("8"), jnp.zeros(SHAPE), sampler="restart", restart=(0, 0, 0))
    sampling.sample_loop(toy_model, cosine("8"), jnp.zeros(SHAPE), sampler="unipc")
    with pytest.raises(ValueError, match="noise must have shape"):
        sampling.sample_loop(toy_model, cosine("8"), jnp.zeros(SHAPE), sampler="restart",
                             noise=jnp.zeros((8,) + SHAPE))


def test_explicit_noise_matches_rng_noise():
    sched = cosine("8")
    x_T = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
    rng = jax.random.PRNGKey(2)
    for sampler in ("sde-dpm++", "restart"):
        e = sampling.evaluations(sampler, sched)
        noise = jnp.stack([jax.random.normal(jax.random.fold_in(rng, k), SHAPE) for k in range(e)])
        a = sampling.sample_loop(toy_model, sched, x_T, sampler=sampler, rng=rng)
        b = sampling.sample_loop(toy_model, sched, x_T, sampler=sampler, noise=noise)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- evaluation counts


@pytest.mark.parametrize("sampler,restart", [(s, None) for s in sampling.SAMPLERS]
                         + [("restart", (2, 5, 2)), ("restart", (0, 0, 0))])
def test_evaluations_equal_model_calls(sampler, restart):
    sched = cosine("8")
    calls = []

    def model_fn(x, t):
        jax.debug.callback(lambda t: calls.append(int(t[0])), t)
        return toy_model(x, t)

    out = jax.jit(lambda x, r: sampling.sample_loop(model_fn, sched, x, sampler=sampler, rng=r,
                                                    restart=restart, eta=0.5, return_all=True))(
        jnp.zeros(SHAPE), jax.random.PRNGKey(0))
    jax.effects_barrier()
    e = sampling.evaluations(sampler, sched, restart=restart)
    assert len(calls) == e == out[1].shape[0]
    assert calls == sampling.model_timesteps(sampler, sched, restart=restart).tolist()
    if sampler == "restart" and restart == (2, 5, 2):
        assert e == 2 * 7 + 1 + 2 * 2 * 3


def test_restart_window_from_original_timesteps():
    sched = cosine("20")
    tmap = np.asarray(sched.timestep_map)
    lo, hi, k = sampling.restart_window(sched, 100, 300, 2)
    assert k == 2 and abs(tmap[lo] - 100) <= 27 and abs(tmap[hi] - 300) <= 27
    assert sampling.restart_window(sched, 100, 101)[:2] == (lo, lo + 1)  # never an empty window
    with pytest.raises(ValueError, match="restart"):
        sampling.sample_loop(toy_model, sched, jnp.zeros(SHAPE), sampler="restart",
                             rng=jax.random.PRNGKey(0), restart=(5, 5, 1))


@pytest.mark.parametrize("sampler", sampling.SAMPLERS)
def test_timesteps_for_spends_the_budget(sampler):
    for nfe in (6, 12, 25):
        for spacing in ("time", "lambda", "auto"):
            sched = cosine(sampling.timesteps_for(sampler, nfe, 1000, spacing))
            got = sampling.evaluations(sampler, sched)
            if sampler == "restart":  # 2 evaluations per Heun step: an odd total
                assert nfe - 3 <= got <= nfe and sched.num_timesteps < nfe / 2 + 1
            else:
                assert got == sched.num_timesteps == nfe
            tmap = np.asarray(sched.timestep_map)
            assert tmap[0] == 0 and (tmap[-1] == 999 or sampler == "ddim" and spacing == "auto")
    assert sampling.timesteps_for("ddim", 25, 1000, "ddim") == "ddim25"
    assert sampling.timesteps_for("ddpm", 25, 1000, "auto") == "25"


def test_lambda_spacing_is_uniform_in_log_snr():
    for name in ("linear", "squaredcos_cap_v2"):
        a = schedules.schedule_arrays(name, 1000, "")
        lam = 0.5 * np.log(a["alphas_cumprod"] / (1 - a["alphas_cumprod"]))
        ts = sampling.lambda_uniform_timesteps(name, 1000, 20)
        sched = schedules.make_schedule(name, 1000, sampling.respacing_from_timesteps(ts, 1000))
        assert np.asarray(sched.timestep_map).tolist() == ts and len(set(ts)) == 20
        steps = -np.diff(lam[ts])
        if name == "linear":  # every step within 25% of the mean λ step
            assert np.all(np.abs(steps / steps.mean() - 1) < 0.25), steps
        else:  # cosine: the capped β at t = 999 forces one big step, the rest are even
            assert np.all(np.abs(steps[:-2] / np.median(steps) - 1) < 0.25), steps


# ---------------------------------------------------------------------------- against references


def unipc_reference(abar, x):
    """diffusers' UniPCMultistepScheduler (solver_order=2, predict_x0, bh2, lower_order_final)
    transcribed in float64; abar noisiest first; the final step returns x̂_0."""
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha) - np.log(sigma)
    n = len(abar)
    outs, last, this_order, lower = [None, None], None, None, 0
    for s in range(n):
        m = x0_exact(x, abar[s])
        if s > 0:  # UniC with the order of the previous predictor
            h = lam[s] - lam[s - 1]
            hh = -h
            rks, d1s = [], []
            for i in range(1, this_order):
                rk = (lam[s - (i + 1)] - lam[s - 1]) / h
                rks.append(rk)
                d1s.append((outs[-(i + 1)] - outs[-1]) / rk)
            rks = np.array(rks + [1.0])
            h_phi_1 = np.expm1(hh)
            h_phi_k, fact, b_h, big_r, b = h_phi_1 / hh - 1, 1, np.expm1(hh), [], []
            for i in range(1, this_order + 1):
                big_r.append(rks ** (i - 1))
                b.append(h_phi_k * fact / b_h)
                fact *= i + 1
                h_phi_k = h_phi_k / hh - 1 / fact
            rhos = np.array([0.5]) if this_order == 1 else np.linalg.solve(np.stack(big_r), np.array(b))
            x_ = sigma[s] / sigma[s - 1] * last - alpha[s] * h_phi_1 * outs[-1]
            corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0.0
            x = x_ - alpha[s] * b_h * (corr + rhos[-1] * (m - outs[-1]))
        outs = [outs[1], m]
        this_order = min(min(2, n - s), lower + 1)
        last = x
        if s == n - 1:
            return m
        h = lam[s + 1] - lam[s]
        x_ = sigma[s + 1] / sigma[s] * x - alpha[s + 1] * np.expm1(-h) * m
        if this_order == 2:
            rk = (lam[s - 1] - lam[s]) / h
            x_ = x_ - alpha[s + 1] * np.expm1(-h) * 0.5 * (outs[0] - m) / rk
        x = x_
        lower = min(lower + 1, 2)


def sde_dpmpp_reference(abar, x_vp, noise):
    """k-diffusion's sample_dpmpp_2m_sde (eta=1, midpoint) in float64 on the VE sigmas σ/α (then 0),
    x_ve = x_vp/α; its noise sigma_next·√(1 − e^{−2h})·z is ours over α."""
    sigmas = np.append(np.sqrt((1 - abar) / abar), 0.0)
    x, old, h_last = x_vp / np.sqrt(abar[0]), None, None
    for i in range(len(sigmas) - 1):
        den = x0_exact(x * np.sqrt(abar[i]), abar[i])
        if sigmas[i + 1] == 0:
            x = den
        else:
            h = np.log(sigmas[i]) - np.log(sigmas[i + 1])
            x = sigmas[i + 1] / sigmas[i] * np.exp(-h) * x - np.expm1(-2 * h) * den
            if old is not None:
                x = x - 0.5 * np.expm1(-2 * h) * (h / h_last) * (den - old)
            x = x + noise[i] * sigmas[i + 1] * np.sqrt(-np.expm1(-2 * h))
            h_last = h
        old = den
    return x


@pytest.mark.parametrize("respacing", ["10", "lambda12"])
def test_unipc_and_sde_dpmpp_match_reference_transcriptions(respacing):
    respacing = lambda_respacing(12) if respacing == "lambda12" else respacing
    sched = cosine(respacing)
    abar = schedules.schedule_arrays("squaredcos_cap_v2", 1000, respacing)["alphas_cumprod"][::-1]
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 2, 2, 1)), np.float64)
    got = sampling.sample_loop(gauss_model(sched), sched, jnp.float32(x_T), sampler="unipc",
                               threshold="none")
    np.testing.assert_allclose(got, unipc_reference(abar, x_T), atol=1e-4)
    z = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (sched.num_timesteps,) + x_T.shape))
    got = sampling.sample_loop(gauss_model(sched), sched, jnp.float32(x_T), sampler="sde-dpm++",
                               noise=jnp.float32(z), threshold="none")
    np.testing.assert_allclose(got, sde_dpmpp_reference(abar, x_T, z.astype(np.float64)), atol=1e-4)


def test_sde_dpmpp_first_step_is_ddpm_with_small_variance():
    """First order, SDE-DPM-Solver++ is DDPM's posterior mean with variance β̃ (v = −1)."""
    sched = cosine("10")
    x_T = jax.random.normal(jax.random.PRNGKey(3), SHAPE)
    noise = jax.random.normal(jax.random.PRNGKey(4), (10,) + SHAPE)

    def model_fn(x, t):
        return jnp.concatenate([toy_model(x, t)[..., :1], -jnp.ones_like(x)], axis=-1)

    _, sde = sampling.sample_loop(model_fn, sched, x_T, sampler="sde-dpm++", noise=noise, return_all=True)
    t = jnp.full((SHAPE[0],), 9, jnp.int32)
    ddpm = G.ddpm_step(sched, model_fn(x_T, sched.timestep_map[t]), x_T, t, noise[0])["sample"]
    np.testing.assert_allclose(sde[0], ddpm, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- convergence


@pytest.fixture(scope="module")
def gauss_x_T():
    return jax.random.normal(jax.random.PRNGKey(5), (8, 2, 2, 1))


def test_ode_samplers_converge_to_their_1000_step_endpoint(gauss_x_T):
    """Along the probability-flow ODE the standardised x_t is constant: the 1000-step endpoints sit on
    MU + s·(x_T − √ᾱ_T·MU)/√(ᾱ_T·S2 + 1 − ᾱ_T); 25 evaluations come close; UniPC-2 (corrector
    included) converges at third order, the restart sampler's Heun steps at second order."""
    ab_T = float(cosine("").alphas_cumprod[-1])
    exact = MU + np.sqrt(S2) * (np.asarray(gauss_x_T) - np.sqrt(ab_T) * MU) / np.sqrt(ab_T * S2 + 1 - ab_T)
    heun = dict(restart=(0, 0, 0))
    ref = {"unipc": run_gauss("unipc", cosine(""), gauss_x_T),
           "restart": run_gauss("restart", cosine(""), gauss_x_T, **heun)}
    for r in ref.values():
        np.testing.assert_allclose(r, exact, atol=1e-3)

    def err(sampler, n, **kw):
        return float(np.max(np.abs(run_gauss(sampler, cosine(lambda_respacing(n)), gauss_x_T, **kw)
                                   - ref[sampler])))

    e_unipc = {n: err("unipc", n) for n in (10, 25, 50)}
    assert e_unipc[10] < 0.15 and e_unipc[25] < 0.03 and e_unipc[50] < 4e-3, e_unipc
    assert e_unipc[25] / e_unipc[50] > 6, e_unipc  # 2^3 = 8 for third order
    assert sampling.evaluations("restart", 13, restart=(0, 0, 0)) == 25
    e_heun = {n: err("restart", n, **heun) for n in (13, 25, 50)}
    assert e_heun[13] < 0.15 and e_heun[25] < 0.04, e_heun
    assert 3.5 < e_heun[25] / e_heun[50] < 6, e_heun  # 2^2 = 4 for second order


@pytest.mark.parametrize("sampler,n,kw", [
    ("sde-dpm++", 100, {}),
    ("unipc", 50, {}),
    ("restart", 50, {}),
    ("restart", 50, {"restart": (10, 25, 2)}),
])
def test_samples_have_the_data_distribution(sampler, n, kw):
    """2000 samples of N(MU, S2) data: sample mean and std within ~4 standard errors."""
    x_T = jax.random.normal(jax.random.PRNGKey(6), (500, 2, 2, 1))
    out = run_gauss(sampler, cosine(str(n)), x_T, rng=jax.random.PRNGKey(7), **kw)
    assert abs(out.mean() - MU) < 0.04 and abs(out.std() - np.sqrt(S2)) < 0.03, (out.mean(), out.std())


def test_restart_renoising_restores_the_marginal():
    """The jump from i_lo to i_hi is q(x_hi | x_lo): x_hi = (α_hi/α_lo)·x_lo + √(1 − ᾱ_hi/ᾱ_lo)·z. The
    ODE brings x_lo onto the i_lo marginal, so after the jump x follows the i_hi marginal
    N(√ᾱ_hi·MU, ᾱ_hi·S2 + 1 − ᾱ_hi)."""
    sched = cosine("20")
    x_T = jax.random.normal(jax.random.PRNGKey(8), (1000, 2, 2, 1))
    plan = sampling.evaluation_indices("restart", 20, restart=(4, 9, 1))
    jump_at = int(np.nonzero((plan[:-1] == 4) & (plan[1:] == 9))[0][0])
    _, xs = sampling.sample_loop(gauss_model(sched), sched, x_T, sampler="restart",
                                 rng=jax.random.PRNGKey(9), restart=(4, 9, 1), return_all=True,
                                 threshold="none")
    jumped = np.asarray(xs[jump_at])
    a = np.asarray(sched.alphas_cumprod, np.float64)
    marg_std = np.sqrt(a[9] * S2 + 1 - a[9])
    assert abs(jumped.std() / marg_std - 1) < 0.05, (jumped.std(), marg_std)
    assert abs(jumped.mean() - np.sqrt(a[9]) * MU) < 0.05, jumped.mean()


# ---------------------------------------------------------------------------- thresholding


def test_dynamic_threshold():
    x0 = jnp.concatenate([3.0 * jax.random.normal(jax.random.PRNGKey(10), (2, 4, 4, 3)),
                          0.5 * jnp.tanh(jax.random.normal(jax.random.PRNGKey(11), (1, 4, 4, 3)))])
    out = sampling.dynamic_threshold(0.9)(x0)
    assert float(jnp.max(jnp.abs(out))) <= 1.0
    s = np.quantile(np.abs(np.asarray(x0[0])), 0.9)
    np.testing.assert_allclose(out[0], np.clip(x0[0], -s, s) / s, rtol=1e-5)
    assert np.sum(np.abs(np.asarray(out[0])) == 1.0) > 0.05 * out[0].size  # the top 10% saturate
    np.testing.assert_array_equal(out[2], x0[2])  # s = max(p-quantile, 1): in-range rows untouched


def test_threshold_modes_in_the_loop():
    sched = cosine("6")
    x_T = 2.0 * jax.random.normal(jax.random.PRNGKey(12), (2, 4, 4, 1))

    def wild(x, t):  # x̂_0 far outside [−1, 1]
        return jnp.concatenate([-4.0 * jnp.tanh(x), jnp.zeros_like(x)], axis=-1)

    def run(**kw):
        return np.asarray(sampling.sample_loop(wild, sched, x_T, sampler="dpm++", **kw))

    dyn = run(threshold="dynamic")  # dpm++ returns x̂_0 at the last step
    assert np.abs(dyn).max() <= 1.0 and np.mean(np.abs(dyn) < 0.999) > 0.5
    clip = run(threshold="clip")
    np.testing.assert_array_equal(clip, run())  # "clip" is the default clip_denoised=True
    np.testing.assert_array_equal(run(threshold="none"), run(clip_denoised=False))
    assert np.abs(run(threshold="none")).max() > 1.5
    assert not np.allclose(dyn, clip)
    with pytest.raises(ValueError, match="threshold"):
        run(threshold="static")


# ---------------------------------------------------------------------------- guidance schedules


def _cfg_models(rows):
    """A model over 2n rows [conditional; unconditional] (labels 1, 2 | 0, 0) and the same model over
    the n conditional rows; each records the number of rows it ran on."""
    labels = jnp.array([1.0, 2.0, 0.0, 0.0])

    def make(lab):
        def model_fn(x, t):
            jax.debug.callback(lambda: rows.append(x.shape[0]))
            l = lab[:, None, None, None]
            return jnp.concatenate([x * (1 + l) + 1e-3 * t[:, None, None, None], x - l], axis=-1)
        return model_fn

    return make(labels), make(labels[:2])


def test_guidance_interval_skips_the_unconditional_half():
    rows = []
    model_fn, cond_model_fn = _cfg_models(rows)
    x = jax.random.normal(jax.random.PRNGKey(13), (4, 2, 2, 1))
    plain = jax.jit(lambda x, t: guidance.classifier_free(model_fn, 3.0)(x, t))
    ranged = jax.jit(lambda x, t: guidance.classifier_free(
        model_fn, 3.0, interval=(100, 600), cond_model_fn=cond_model_fn)(x, t))
    for step, inside in ((100, True), (350, True), (600, True), (99, False), (601, False), (999, False)):
        t = jnp.full((4,), step, jnp.int32)
        rows.clear()
        got = ranged(x, t)
        jax.effects_barrier()
        if inside:
            assert rows == [4]
            np.testing.assert_allclose(got, plain(x, t), rtol=1e-6, atol=1e-6)
        else:
            assert rows == [2]  # the conditional half alone
            cond = cond_model_fn(x[:2], t[:2])
            np.testing.assert_allclose(got, jnp.concatenate([cond, cond]), rtol=1e-6, atol=1e-6)
            full = model_fn(jnp.concatenate([x[:2], x[:2]]), t)
            np.testing.assert_allclose(got[:2], full[:2], rtol=1e-6)  # = scale 1


def test_guidance_interval_in_a_sampling_run():
    rows = []
    model_fn, cond_model_fn = _cfg_models(rows)
    sched = cosine("12")
    x_T = jax.random.normal(jax.random.PRNGKey(14), (4, 2, 2, 1))

    def run(**kw):
        guided = guidance.classifier_free(model_fn, 3.0, cond_model_fn=cond_model_fn, **kw)
        rows.clear()
        out = jax.jit(lambda x: sampling.sample_loop(guided, sched, x, sampler="unipc"))(x_T)
        jax.effects_barrier()
        return np.asarray(out), sum(rows)

    plain, plain_rows = run()
    everywhere, all_rows = run(interval=(0, 999))
    np.testing.assert_allclose(everywhere, plain, rtol=1e-6, atol=1e-6)
    assert plain_rows == all_rows == 2 * 12 + guidance.unconditional_rows(sched, 2, None, sampler="unipc")
    interval = (200, 700)
    mid, mid_rows = run(interval=interval)
    ts = sampling.model_timesteps("unipc", sched)
    inside = int(np.sum((ts >= 200) & (ts <= 700)))
    assert 0 < inside < 12
    assert mid_rows == 2 * 12 + guidance.unconditional_rows(sched, 2, interval, sampler="unipc")
    assert guidance.unconditional_rows(sched, 2, interval, sampler="unipc") == 2 * inside
    assert guidance.unconditional_rows(sched, 2, None, sampler="restart") == 2 * sampling.evaluations("restart", sched)
    assert not np.allclose(mid, plain)


def test_guidance_scale_schedules():
    t = jnp.arange(1000)
    for name in ("linear", "cosine"):
        s = np.asarray(guidance.guidance_scale(4.0, t, name))
        assert s[999] == pytest.approx(1.0, abs=1e-6) and s[0] == pytest.approx(7.0, abs=1e-5)
        assert s.mean() == pytest.approx(4.0, abs=0.01) and np.all(np.diff(s) <= 1e-6)
    np.testing.assert_array_equal(guidance.guidance_scale(4.0, t, "constant"), np.full(1000, 4.0))
    rows = []
    model_fn, _ = _cfg_models(rows)
    x = jax.random.normal(jax.random.PRNGKey(15), (4, 2, 2, 1))
    t = jnp.full((4,), 999, jnp.int32)
    plain = guidance.classifier_free(model_fn, 3.0)
    np.testing.assert_array_equal(guidance.classifier_free(model_fn, 3.0, scale_schedule="constant")(x, t),
                                  plain(x, t))
    at_one = guidance.classifier_free(model_fn, 1.0)(x, t)  # linear at t = T−1: the conditional ε
    np.testing.assert_allclose(guidance.classifier_free(model_fn, 3.0, scale_schedule="linear")(x, t),
                               at_one, rtol=1e-6, atol=1e-6)
    t0 = jnp.zeros((4,), jnp.int32)
    np.testing.assert_allclose(guidance.classifier_free(model_fn, 3.0, scale_schedule="cosine")(x, t0),
                               guidance.classifier_free(model_fn, 5.0)(x, t0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        guidance.classifier_free(model_fn, 3.0, scale_schedule="quadratic")
    with pytest.raises(ValueError):
        guidance.classifier_free(model_fn, 3.0, interval=(700, 200))


def test_sampler_fast_names_the_recommended_setting():
    from glide_jax.sample import FAST, sampler_and_steps
    assert sampler_and_steps("fast", None) == (FAST[0], str(FAST[1]))
    assert sampler_and_steps("fast", "20") == (FAST[0], "20")
    assert sampler_and_steps("unipc", None) == ("unipc", "50")
    assert sampler_and_steps("ddpm", "fast27") == ("ddpm", "fast27")
