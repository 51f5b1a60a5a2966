"""Sampling API and CLI on a tiny random-weight model: CFG identities, determinism, one trace."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import experiment
from glide_jax.diffusion import schedules
from glide_jax.sample import _generate, generate, respacing_for, sample_images, text_inputs
from glide_jax.tokenizer import GlideBPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(kind="base", image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2",
            num_head_channels=32, attention_resolutions="8", dropout=0.0, text_ctx=8, xf_width=32,
            xf_layers=1, xf_heads=2)


@pytest.fixture(scope="module")
def tiny():
    model = experiment.from_hparams(TINY)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **model.init_inputs(1))["params"])
    # zero-initialised output convs would make every sample identical: perturb all params
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return model, params, GlideBPE(text_ctx=8)


def _inputs(tok, prompts, cfg):
    return text_inputs(tok, prompts, 8, cfg=cfg)


def test_cfg_scale_one_equals_conditional_sampling(tiny):
    model, params, tok = tiny
    sched = schedules.make_schedule("squaredcos_cap_v2", 1000, "6")
    x_T = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 3))
    noise = jax.random.normal(jax.random.PRNGKey(3), (6, 2, 16, 16, 3))
    prompts = ["a red circle", "a blue square"]
    plain = generate(model, params, _inputs(tok, prompts, False), sched=sched, sampler="ddpm", x_T=x_T,
                     noise=noise)
    guided = generate(model, params, _inputs(tok, prompts, True), sched=sched, sampler="ddpm", guidance="cfg",
                      scale=1.0, x_T=jnp.concatenate([x_T, x_T]), noise=jnp.concatenate([noise, noise], axis=1))
    np.testing.assert_allclose(np.asarray(guided[:2]), np.asarray(plain), atol=2e-5)
    other = generate(model, params, _inputs(tok, prompts, True), sched=sched, sampler="ddpm", guidance="cfg",
                     scale=3.0, x_T=jnp.concatenate([x_T, x_T]), noise=jnp.concatenate([noise, noise], axis=1))
    assert np.max(np.abs(np.asarray(other[:2]) - np.asarray(plain))) > 1e-3  # guidance does something


def test_cfg_interval_on_the_text_model(tiny):
    """The guidance interval through `generate` on the real text-conditional UNet: covering every
    step it is plain CFG; restricted, the conditional rows alone run outside it (the samples
    differ, and the scale no longer matters where no step is guided)."""
    from glide_jax.diffusion import sampling

    model, params, tok = tiny
    prompts = ["a red circle", "a blue square"]
    inputs = _inputs(tok, prompts, True)
    x_T = jax.random.normal(jax.random.PRNGKey(7), (4, 16, 16, 3))
    for sampler in ("unipc",):
        sched = schedules.make_schedule("squaredcos_cap_v2", 1000, respacing_for(sampler, 4, TINY))
        kw = dict(sched=sched, sampler=sampler, guidance="cfg", x_T=x_T, rng=jax.random.PRNGKey(8))
        full = generate(model, params, inputs, scale=3.0, **kw)
        everywhere = generate(model, params, inputs, scale=3.0, cfg_interval=(0, 999), **kw)
        # the same math; the guided branch of lax.cond fuses differently (float32 rounding)
        np.testing.assert_allclose(np.asarray(everywhere), np.asarray(full), atol=5e-4)
        assert sampling.evaluations(sampler, sched) == 4
        never = [generate(model, params, inputs, scale=s, cfg_interval=(1000, 1000), **kw) for s in (3.0, 7.0)]
        np.testing.assert_allclose(np.asarray(never[0][:2]), np.asarray(never[1][:2]), atol=1e-6)
        assert np.max(np.abs(np.asarray(never[0][:2]) - np.asarray(full[:2]))) > 1e-3, sampler


def test_ddim_eta0_is_deterministic(tiny):
    model, params, tok = tiny
    sched = schedules.make_schedule("squaredcos_cap_v2", 1000, "ddim5")
    x_T = jax.random.normal(jax.random.PRNGKey(4), (1, 16, 16, 3))
    inputs = _inputs(tok, ["a green triangle"], False)
    a = generate(model, params, inputs, sched=sched, sampler="ddim", eta=0.0, x_T=x_T, rng=jax.random.PRNGKey(5))
    b = generate(model, params, inputs, sched=sched, sampler="ddim", eta=0.0, x_T=x_T, rng=jax.random.PRNGKey(6))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = generate(model, params, inputs, sched=sched, sampler="ddim", eta=1.0, x_T=x_T, rng=jax.random.PRNGKey(6))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_sampler_traces_once_across_prompts_seeds_and_scales(tiny):
    model, params, tok = tiny
    kw = dict(respacing="4", sampler="ddpm", hparams=TINY)
    sample_images(model, params, tok, ["a red circle", "a blue square"], guidance_scale=3.0, seed=0, **kw)
    before = _generate._cache_size()
    x = sample_images(model, params, tok, ["a purple triangle", "an orange square"], guidance_scale=5.0,
                      seed=7, **kw)
    assert _generate._cache_size() == before
    assert x.shape == (2, 16, 16, 3) and np.isfinite(x).all()


def test_sample_cli_writes_grid_from_converted_checkpoint(tiny, tmp_path):
    from glide_jax.convert import save_converted

    model, params, tok = tiny
    ckpt = tmp_path / "ckpt"
    save_converted(str(ckpt), experiment.hparams_with_defaults("base", TINY), jax.device_get(params))
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, "-m", "glide_jax.sample", "--checkpoint", str(ckpt), "--prompt", "a red circle",
                        "--prompt", "a blue square", "--steps", "3", "--sampler", "ddim", "--out", str(out),
                        "--individual"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    assert Image.open(out).size[0] > 32
    assert (tmp_path / "grid_0.png").exists() and (tmp_path / "grid_1.png").exists()


@pytest.mark.slow
def test_cli_clip_guidance_with_upsampler_and_classifier_guidance(tmp_path):
    from helpers import random_checkpoint

    from glide_jax.sample import classifier_guided_images, load_for_sampling

    for kind in ("base", "clip", "upsample", "classifier"):
        random_checkpoint(kind, tmp_path / kind)
    out = tmp_path / "clip.png"
    r = subprocess.run([sys.executable, "-m", "glide_jax.sample", "--checkpoint", str(tmp_path / "base"),
                        "--prompt", "a red circle", "--guidance", "clip", "--clip", str(tmp_path / "clip"),
                        "--scale", "2", "--steps", "3", "--upsample", str(tmp_path / "upsample"),
                        "--out", str(out), "--individual"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    assert Image.open(tmp_path / "clip_0.png").size == (32, 32)  # upsampled 16 -> 32
    assert "sampling" in r.stderr  # the progress bar
    base, cls = load_for_sampling(str(tmp_path / "base")), load_for_sampling(str(tmp_path / "classifier"))
    a = classifier_guided_images(base, cls, ["a red circle"], [3], scale=0.0, respacing="3", seed=0)
    b = classifier_guided_images(base, cls, ["a red circle"], [3], scale=50.0, respacing="3", seed=0)
    assert a.shape == (1, 16, 16, 3) and np.isfinite(b).all()
    assert np.max(np.abs(a - b)) > 1e-4  # the classifier gradient moves the samples


def test_cli_guidance_needs_its_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "glide_jax.sample", "--checkpoint", str(tmp_path), "--prompt", "x",
                        "--guidance", "clip"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "--clip" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sampling_is_data_parallel_over_devices_and_matches_one_device(tmp_path):
    """8 fake devices (a subprocess): CFG rows are sharded over all devices; the samples equal
    the ones of this 1-device process."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "scripts"))
    from sample_sharded import samples

    out = tmp_path / "x8.npy"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scripts", "sample_sharded.py"), "8", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert jax.device_count() == 1
    np.testing.assert_allclose(samples(), np.load(out), atol=1e-4)
