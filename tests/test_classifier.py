"""EncoderUNet (guided-diffusion's noisy classifier): fixture parity and the constructor options
the public fixture does not exercise."""
from __future__ import annotations

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from glide_jax.experiment import PRESETS, from_hparams
from glide_jax.models.layers import AttentionBlock
from glide_jax.models.unet import EncoderUNet, EncoderUNetConfig
from glide_jax.parity import classifier as classifier_parity
from glide_jax.parity.__main__ import check_outputs

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "parity" / "classifier"


def _abstract(model):
    return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.init_inputs()))["params"]


def test_fixture_outputs_match_guided_diffusion():
    with jax.default_matmul_precision("highest"):
        got = classifier_parity.compute(FIXTURE)
    rows = check_outputs(FIXTURE, got)
    failed = [r for r in rows if not r[1]]
    assert not failed, failed
    assert {"logits", "cond_grad", "trace.middle_block"} <= {r[0] for r in rows}


def test_config_from_hparams():
    hp = json.loads((FIXTURE / "hparams.json").read_text())
    c = EncoderUNetConfig.from_hparams(hp)
    assert c.attention_resolutions == (2, 4) and c.channel_mult == (1, 1, 2) and c.pool == "attention"
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        EncoderUNetConfig.from_hparams({**hp, "learn_sigma": True})
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNetConfig(pool="attention", num_head_channels=-1)
    assert EncoderUNetConfig(image_size=512, channel_mult="").channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    assert isinstance(from_hparams(PRESETS["classifier-imagenet64"]), EncoderUNet)


SMALL = dict(image_size=16, model_channels=32, out_channels=5, num_res_blocks=1,
             attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_pools_and_options_run(pool):
    options = dict(pool=pool, use_scale_shift_norm=pool != "spatial", use_new_attention_order=True,
                   resblock_updown=pool == "attention", conv_resample=pool != "spatial_v2")
    if pool == "adaptive":
        options.update(num_head_channels=-1, num_heads=4)
    model = EncoderUNet(EncoderUNetConfig(**{**SMALL, **options}))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), _abstract(model))
    paths = {"/".join(p) for p in traverse_util.flatten_dict(params)}
    head = {p.split("/")[0] for p in paths if p.startswith("out_")}
    assert head == {"adaptive": {"out_0", "out_3"}, "attention": {"out_0", "out_2"},
                    "spatial": {"out_0", "out_2"}, "spatial_v2": {"out_0", "out_1", "out_3"}}[pool]
    if pool == "attention":
        assert params["out_2"]["positional_embedding"].shape == (64, 8 * 8 + 1)
        assert "input_blocks_2_0/in_layers_2/kernel" in paths  # residual downsampling block
    elif pool == "spatial_v2":
        assert not any(p.startswith("input_blocks_2_0/") for p in paths)  # average pooling
    else:
        assert "input_blocks_2_0/op/kernel" in paths  # stride-2 conv
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    logits = jax.jit(model.apply)({"params": params}, x, jnp.array([3, 900]))
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))


def test_new_attention_order_is_a_permutation_of_legacy():
    """Permuting qkv's output channels from [q0,k0,v0,q1,...] to [q_all,k_all,v_all] makes the
    "new order" block compute exactly the legacy block."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 64)).astype(np.float32)
    heads, d = 4, 16
    legacy = AttentionBlock(num_heads=heads, num_head_channels=-1)
    new = AttentionBlock(num_heads=heads, num_head_channels=-1, use_new_attention_order=True)
    params = nn.unbox(jax.eval_shape(legacy.init, jax.random.PRNGKey(0), x))["params"]
    params = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.3, params)
    # legacy channel (h, j, c) at h*3d + j*d + c  ->  new channel j*heads*d + h*d + c
    perm = np.arange(3 * heads * d).reshape(heads, 3, d).transpose(1, 0, 2).reshape(-1)
    new_params = dict(params, qkv=dict(kernel=params["qkv"]["kernel"][:, perm], bias=params["qkv"]["bias"][perm]))
    with jax.default_matmul_precision("highest"):
        a = jax.jit(legacy.apply)({"params": params}, x)
        b = jax.jit(new.apply)({"params": new_params}, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
