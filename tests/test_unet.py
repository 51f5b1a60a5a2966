"""Text2ImUNet: parity with OpenAI's GLIDE on the four UNet fixtures, released parameter
counts, bf16, config parsing, and the weight-name table for a variant the fixtures never use."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.convert import torch_to_flax
from glide_jax.experiment import PRESETS, from_hparams, hparams_with_defaults
from glide_jax.models.layers import AttentionBlock
from glide_jax.models.text_encoder import TextEncoder, Transformer
from glide_jax.models.unet import Text2ImUNet, UNetConfig
from glide_jax.parity import unet as unet_parity
from glide_jax.parity.__main__ import check_outputs

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
KINDS = ("base", "upsample", "base-inpaint", "upsample-inpaint")


def _abstract(model):
    return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), **model.init_inputs()))["params"]


def _n_params(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(_abstract(model)))


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_outputs_match_glide(kind):
    fixture = FIXTURES / kind
    with jax.default_matmul_precision("highest"):
        got = unet_parity.compute(fixture)
    rows = check_outputs(fixture, got)
    failed = [r for r in rows if not r[1]]
    assert not failed, failed
    assert {"output", "emb", "xf_out", "loop_samples"} <= {r[0] for r in rows}


def test_fixture_outputs_match_glide_with_scanned_blocks_and_text():
    """The runtime scans (UNet block runs, text transformer) leave GLIDE's outputs and the
    block-by-block traces within the fixture's tolerances."""
    fixture = FIXTURES / "base"
    with jax.default_matmul_precision("highest"):
        got = unet_parity.compute(fixture, scan_blocks=True, scan_layers=True)
    rows = check_outputs(fixture, got)
    assert not [r for r in rows if not r[1]]
    assert {"output", "xf_out"} <= {r[0] for r in rows}


@pytest.mark.parametrize("kind", KINDS + ("classifier",))
def test_fixture_n_params(kind):
    hparams = json.loads((FIXTURES / kind / "hparams.json").read_text())
    meta = json.loads((FIXTURES / kind / "meta.json").read_text())
    assert _n_params(from_hparams(hparams)) == meta["settings"]["n_params"]


def test_released_param_counts():
    assert _n_params(from_hparams(PRESETS["base"])) == 385_030_726
    assert _n_params(from_hparams(PRESETS["upsample"])) == 398_361_286


def test_bf16_forward_is_finite_and_close():
    fixture = FIXTURES / "base"
    hparams = json.loads((fixture / "hparams.json").read_text())
    with np.load(fixture / "io.npz") as f:
        io = {k: f[k] for k in f.files}
    model = from_hparams(hparams, dtype=jnp.bfloat16)
    params = unet_parity.load_params(fixture / "model.pt", model)
    x = jnp.asarray(io["x_t"].transpose(0, 2, 3, 1))
    out = jax.jit(model.apply)({"params": params}, x, jnp.asarray(io["timesteps"]),
                               jnp.asarray(io["tokens"], jnp.int32), jnp.asarray(io["mask"]))
    want = io["output"].transpose(0, 2, 3, 1)
    assert out.dtype == jnp.float32 and out.shape == want.shape
    assert bool(jnp.all(jnp.isfinite(out)))
    rel = float(jnp.linalg.norm(out - want) / np.linalg.norm(want))
    assert rel < 0.1, rel


def test_config_parsing():
    c = UNetConfig.from_hparams(hparams_with_defaults("upsample"))
    assert c.channel_mult == (1, 1, 2, 2, 4, 4) and c.attention_resolutions == (32, 16, 8)
    assert c.super_res and not c.inpaint and c.in_channels == 6
    assert UNetConfig(image_size=128, channel_mult="").channel_mult == (1, 1, 2, 3, 4)
    assert UNetConfig(image_size=32, channel_mult="1,2,2").channel_mult == (1, 2, 2)
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        UNetConfig.from_hparams({"image_size": 64, "num_chanels": 3})
    with pytest.raises(ValueError, match="2\\*\\*"):
        UNetConfig(image_size=64, channel_mult="1,2")
    with pytest.raises(ValueError, match="default channel_mult"):
        UNetConfig(image_size=48, channel_mult="")
    assert UNetConfig.from_hparams({"kind": "base", "diffusion_steps": 1000, "use_fp16": True})


def glide_state_dict_shapes(c: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The PyTorch state-dict keys and shapes of a GLIDE Text2ImUNet, from the fixture README's
    rules (written independently of glide_jax.models)."""
    sd: dict[str, tuple[int, ...]] = {}
    mc, emb = c.num_channels, 4 * c.num_channels

    def lin(k, i, o):
        sd[k + ".weight"], sd[k + ".bias"] = (o, i), (o,)

    def conv(k, i, o, ks=3):
        sd[k + ".weight"], sd[k + ".bias"] = (o, i, ks, ks), (o,)

    def conv1d(k, i, o):
        sd[k + ".weight"], sd[k + ".bias"] = (o, i, 1), (o,)

    def norm(k, ch):
        sd[k + ".weight"], sd[k + ".bias"] = (ch,), (ch,)

    def res(k, i, o):
        norm(k + ".in_layers.0", i)
        conv(k + ".in_layers.2", i, o)
        lin(k + ".emb_layers.1", emb, 2 * o if c.use_scale_shift_norm else o)
        norm(k + ".out_layers.0", o)
        conv(k + ".out_layers.3", o, o)
        if i != o:
            conv(k + ".skip_connection", i, o, 1)

    def attn(k, ch):
        norm(k + ".norm", ch)
        conv1d(k + ".qkv", ch, 3 * ch)
        conv1d(k + ".encoder_kv", c.xf_width, 2 * ch)
        conv1d(k + ".proj_out", ch, ch)

    lin("time_embed.0", mc, emb)
    lin("time_embed.2", emb, emb)
    attn_ds = {c.image_size // r for r in c.attention_resolutions}
    ch = mc * c.channel_mult[0]
    conv("input_blocks.0.0", c.in_channels, ch)
    chans, i, ds = [ch], 1, 1
    for level, mult in enumerate(c.channel_mult):
        for _ in range(c.num_res_blocks):
            res(f"input_blocks.{i}.0", ch, mult * mc)
            ch = mult * mc
            if ds in attn_ds:
                attn(f"input_blocks.{i}.1", ch)
            chans.append(ch)
            i += 1
        if level != len(c.channel_mult) - 1:
            if c.resblock_updown:
                res(f"input_blocks.{i}.0", ch, ch)
            else:
                conv(f"input_blocks.{i}.0.op", ch, ch)
            chans.append(ch)
            i += 1
            ds *= 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    i = 0
    for level, mult in reversed(list(enumerate(c.channel_mult))):
        for r in range(c.num_res_blocks + 1):
            res(f"output_blocks.{i}.0", ch + chans.pop(), mult * mc)
            ch = mult * mc
            j = 1
            if ds in attn_ds:
                attn(f"output_blocks.{i}.1", ch)
                j = 2
            if level and r == c.num_res_blocks:
                if c.resblock_updown:
                    res(f"output_blocks.{i}.{j}", ch, ch)
                else:
                    conv(f"output_blocks.{i}.{j}.conv", ch, ch)
                ds //= 2
            i += 1
    norm("out.0", ch)
    conv("out.2", ch, c.out_channels)
    w = c.xf_width
    sd["token_embedding.weight"] = (c.n_vocab, w)
    sd["positional_embedding"] = (c.text_ctx, w)
    if c.xf_padding:
        sd["padding_embedding"] = (c.text_ctx, w)
    for j in range(c.xf_layers):
        k = f"transformer.resblocks.{j}"
        norm(k + ".ln_1", w)
        lin(k + ".attn.c_qkv", w, 3 * w)
        lin(k + ".attn.c_proj", w, w)
        norm(k + ".ln_2", w)
        lin(k + ".mlp.c_fc", w, 4 * w)
        lin(k + ".mlp.c_proj", 4 * w, w)
    if c.xf_final_ln:
        norm("final_ln", w)
    lin("transformer_proj", w, emb)
    return sd


VARIANT = UNetConfig(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2), num_heads=2,
    num_head_channels=-1, num_heads_upsample=4, attention_resolutions=(16, 8), dropout=0.1,
    text_ctx=4, xf_width=32, xf_layers=1, xf_heads=2, xf_final_ln=False, xf_padding=False,
    use_scale_shift_norm=False, resblock_updown=False, inpaint=True, n_vocab=64,
)


@pytest.mark.parametrize("config", [
    VARIANT,
    UNetConfig.from_hparams(json.loads((FIXTURES / "upsample-inpaint" / "hparams.json").read_text())),
])
def test_weight_names_follow_glide(config):
    """A state dict with GLIDE's key names converts onto the Flax tree with nothing left over."""
    model = Text2ImUNet(config)
    sd = {k: np.zeros(s, np.float32) for k, s in glide_state_dict_shapes(config).items()}
    params = torch_to_flax(sd, _abstract(model))  # raises on missing / unexpected / mis-shaped keys
    assert sum(v.size for v in jax.tree_util.tree_leaves(params)) == sum(v.size for v in sd.values())


def test_variant_heads_runs_and_text_reuse():
    model = Text2ImUNet(VARIANT)
    heads = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, AttentionBlock) and context.method_name == "__call__":
            x = args[0]
            heads[context.module.name] = (context.module.num_heads, x.shape[-1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        _abstract(model)
    assert heads == {
        "input_blocks_1_1": (2, 32), "input_blocks_3_1": (2, 64), "middle_block_1": (2, 64),
        "output_blocks_0_1": (4, 64), "output_blocks_1_1": (4, 64),
        "output_blocks_2_1": (4, 32), "output_blocks_3_1": (4, 32),
    }

    kw = model.init_inputs(batch=2)
    kw["tokens"] = jnp.array([[1, 2, 3, 63], [5, 5, 0, 0]], jnp.int32)
    params = _random_params(model)

    @jax.jit
    def run(params, kw):
        text = model.apply({"params": params}, kw["tokens"], kw["mask"], method=model.encode_text)
        out, state = model.apply({"params": params}, **kw, mutable=["intermediates"])
        return text, out, state["intermediates"]

    text, out, inter = run(params, kw)
    assert out.shape == (2, 16, 16, 6) and bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.abs(out).max()) > 0
    np.testing.assert_array_equal(text["xf_proj"], inter["xf_proj"][0])
    np.testing.assert_array_equal(text["xf_out"], inter["xf_out"][0])
    # A precomputed `text` dict replaces tokens; with dropout > 0 training needs a dropout rng.
    shape = jax.eval_shape(lambda p: model.apply({"params": p}, **{**kw, "tokens": None}, text=text), params)
    assert shape.shape == out.shape
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda p: model.apply({"params": p}, **kw, train=True), params)
    jax.eval_shape(lambda p: model.apply({"params": p}, **kw, train=True,
                                         rngs={"dropout": jax.random.PRNGKey(0)}), params)


def _random_params(model):
    """Random params of the abstract shapes (every parameter non-zero; no init compile)."""
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(
        lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), _abstract(model))


def test_remat_keeps_names():
    plain = jax.tree_util.tree_map(lambda s: s.shape, _abstract(Text2ImUNet(VARIANT)))
    remat = UNetConfig(**{**VARIANT.__dict__, "remat": True})
    assert jax.tree_util.tree_map(lambda s: s.shape, _abstract(Text2ImUNet(remat))) == plain


def _variant(**changes) -> UNetConfig:
    return UNetConfig(**{**VARIANT.__dict__, **changes})


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_keeps_names(remat):
    plain = jax.tree_util.tree_map(lambda s: s.shape, _abstract(Text2ImUNet(_variant(xf_layers=3))))
    scanned = Text2ImUNet(_variant(xf_layers=3, scan_layers=True, remat=remat))
    assert jax.tree_util.tree_map(lambda s: s.shape, _abstract(scanned)) == plain
    assert {f"resblocks_{j}" for j in range(3)} == set(plain["transformer"])


TINY_TEXT = dict(text_ctx=8, width=32, layers=3, heads=2, proj_features=16, n_vocab=64)


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_matches_the_unrolled_text_encoder(remat):
    """One lax.scan over the stacked resblocks gives the unrolled transformer's outputs and the
    same gradients on every per-block parameter (float32)."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 64, (2, 8)), jnp.int32)
    mask = jnp.arange(8)[None] < jnp.array([[5], [8]])
    unrolled = TextEncoder(**TINY_TEXT, remat=remat)
    scanned = TextEncoder(**TINY_TEXT, remat=remat, scan=True)
    abstract = nn.unbox(jax.eval_shape(unrolled.init, jax.random.PRNGKey(0), tokens, mask))["params"]
    params = jax.tree_util.tree_map(
        lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), abstract)

    def loss(p, model):
        out = model.apply({"params": p}, tokens, mask)
        return jnp.sum(out["xf_proj"] ** 2) + jnp.sum(jnp.sin(out["xf_out"])), out

    with jax.default_matmul_precision("highest"):
        (l0, out0), g0 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, unrolled)
        (l1, out1), g1 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, scanned)
    for k in out0:
        np.testing.assert_allclose(out1[k], out0[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert jax.tree_util.tree_structure(g1) == jax.tree_util.tree_structure(g0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
        assert float(jnp.abs(a).max()) > 0, path  # every block's parameters get a gradient
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(jnp.abs(a).max()), err_msg=str(path))


def test_scan_layers_needs_initialised_params():
    x = jnp.zeros((1, 4, 32))
    with pytest.raises(ValueError, match="no parameters for blocks"):
        jax.eval_shape(lambda: Transformer(3, 2, scan=True).apply({"params": {}}, x))


def test_scan_layers_shrinks_the_lowered_program():
    """The UNet's forward + backward with the text transformer scanned lowers to a while loop and a
    smaller program with fewer matmuls than with its 8 blocks unrolled."""
    def lowered(config):
        model = Text2ImUNet(config)
        kw = model.init_inputs(batch=2)
        params = _abstract(model)

        def loss(p):
            return jnp.sum(model.apply({"params": p}, **kw) ** 2)

        return jax.jit(jax.grad(loss)).lower(params).as_text()

    plain, scanned = lowered(_variant(xf_layers=8)), lowered(_variant(xf_layers=8, scan_layers=True))
    assert "stablehlo.while" not in plain and "stablehlo.while" in scanned
    # per text block 18 matmuls (4 dense + 2 attention einsums forward, twice that backward): the
    # scanned program has one block's, the unrolled one 8 blocks'
    assert scanned.count("stablehlo.dot_general") <= plain.count("stablehlo.dot_general") - 7 * 18
    # most of this program is the UNet trunk, which scan_layers leaves as it is
    assert len(scanned) < 0.9 * len(plain)


SCAN_VARIANT = UNetConfig(
    image_size=16, num_channels=32, num_res_blocks=2, channel_mult=(1, 2), num_heads=2,
    num_head_channels=-1, attention_resolutions=(8,), dropout=0.0, text_ctx=4, xf_width=32,
    xf_layers=1, xf_heads=2, n_vocab=64,
)
# runs this variant scans: input_blocks_1..2 (32 -> 32), output_blocks_0..1 (with attention, skips
# of 64 channels) and output_blocks_4..5 (32 + 32 -> 32); the other blocks change shape


def _unet_loss_and_traces(config, params, kw, train):
    model = Text2ImUNet(config)

    def loss(p):
        out, inter = model.apply({"params": p}, **kw, train=train, mutable=["intermediates"],
                                 rngs={"dropout": jax.random.PRNGKey(3)})
        traces = {k: v[0] for k, v in inter["intermediates"].items() if k.startswith("trace.")}
        return jnp.sum(out ** 2) + jnp.sum(jnp.sin(out)), (out, traces)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("train,remat", [(False, False), (True, True)])
def test_scan_blocks_matches_the_unrolled_unet(train, remat):
    """Runs of same-shape UNet blocks as lax.scans: same parameter tree, outputs, block traces and
    gradients on every per-block parameter as the unrolled UNet (float32)."""
    rng = np.random.default_rng(0)
    plain = dataclasses.replace(SCAN_VARIANT, remat=remat)
    scanned = dataclasses.replace(plain, scan_blocks=True)
    abstract = _abstract(Text2ImUNet(plain))
    assert jax.tree_util.tree_map(lambda s: s.shape, _abstract(Text2ImUNet(scanned))) == \
        jax.tree_util.tree_map(lambda s: s.shape, abstract)
    params = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), abstract)
    kw = Text2ImUNet(plain).init_inputs(batch=2)
    kw["x"] = jnp.asarray(rng.standard_normal(kw["x"].shape), jnp.float32)
    kw["t"] = jnp.array([3, 700])
    kw["tokens"] = jnp.asarray(rng.integers(0, 64, kw["tokens"].shape), jnp.int32)
    with jax.default_matmul_precision("highest"):
        (l0, (out0, tr0)), g0 = _unet_loss_and_traces(plain, params, kw, train)
        (l1, (out1, tr1)), g1 = _unet_loss_and_traces(scanned, params, kw, train)
    np.testing.assert_allclose(out1, out0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert set(tr1) == set(tr0) and {"trace.input_blocks.2", "trace.output_blocks.5"} <= set(tr0)
    for k in tr0:
        np.testing.assert_allclose(tr1[k], tr0[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert jax.tree_util.tree_structure(g1) == jax.tree_util.tree_structure(g0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves(g1)):
        # (a conv bias right before a GroupNorm of one channel per group has a zero gradient:
        # float noise ~1e-7 on both sides)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=max(1e-5 * float(jnp.abs(a).max()), 2e-6),
                                   err_msg=jax.tree_util.keystr(path))
    # the scanned blocks' own parameters do get gradients
    assert float(jnp.abs(g1["output_blocks_1_1"]["qkv"]["kernel"]).max()) > 0


def test_scan_blocks_dropout_is_deterministic_per_key():
    config = dataclasses.replace(SCAN_VARIANT, dropout=0.3, scan_blocks=True)
    model = Text2ImUNet(config)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), **model.init_inputs(2)))["params"]
    # out_layers_3 is zero-initialised; non-zero weights let the dropout masks show
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    kw = model.init_inputs(batch=2)

    def run(key, train=True):
        return model.apply({"params": params}, **kw, train=train, rngs={"dropout": jax.random.PRNGKey(key)})

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-4
    assert float(jnp.abs(a - run(1, train=False)).max()) > 1e-4


def test_scan_blocks_shrinks_the_lowered_program():
    """Forward + backward of the scanned UNet lowers to while loops with fewer convolutions."""
    def lowered(config):
        model = Text2ImUNet(config)
        kw = model.init_inputs(batch=2)

        def loss(p):
            return jnp.sum(model.apply({"params": p}, **kw) ** 2)

        return jax.jit(jax.grad(loss)).lower(_abstract(model)).as_text()

    plain, scanned = lowered(SCAN_VARIANT), lowered(dataclasses.replace(SCAN_VARIANT, scan_blocks=True))
    assert "stablehlo.while" not in plain and "stablehlo.while" in scanned
    # three runs of two blocks, two 3x3 convolutions each, three convolutions per conv forward +
    # backward: one block's worth per run is gone
    assert scanned.count("stablehlo.convolution") <= plain.count("stablehlo.convolution") - 3 * 2 * 3


def _glide_attention_reference(x, p, heads, enc=None):
    """NumPy transcription of GLIDE's AttentionBlock (NCHW inside, legacy head-major qkv)."""
    b, h, w, c = x.shape
    xt = x.reshape(b, h * w, c)
    g = xt.reshape(b, h * w, 32, c // 32)
    mean, var = g.mean((1, 3), keepdims=True), g.var((1, 3), keepdims=True)
    xn = ((g - mean) / np.sqrt(var + 1e-5)).reshape(b, h * w, c) * p["norm"]["scale"] + p["norm"]["bias"]
    qkv = (xn @ p["qkv"]["kernel"] + p["qkv"]["bias"]).transpose(0, 2, 1)  # [B, 3C, T]
    d = c // heads
    q, k, v = np.split(qkv.reshape(b * heads, 3 * d, h * w), 3, axis=1)
    if enc is not None:
        ekv = (enc @ p["encoder_kv"]["kernel"] + p["encoder_kv"]["bias"]).transpose(0, 2, 1)
        ek, ev = np.split(ekv.reshape(b * heads, 2 * d, -1), 2, axis=1)
        k, v = np.concatenate([ek, k], -1), np.concatenate([ev, v], -1)
    s = 1 / np.sqrt(np.sqrt(d))
    wgt = np.einsum("bct,bcs->bts", q * s, k * s)
    wgt = np.exp(wgt - wgt.max(-1, keepdims=True))
    wgt /= wgt.sum(-1, keepdims=True)
    a = np.einsum("bts,bcs->bct", wgt, v).reshape(b, c, h * w).transpose(0, 2, 1)
    out = a @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    return x + out.reshape(b, h, w, c)


def test_attention_block_matches_glide_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 64)).astype(np.float32)
    enc = rng.normal(size=(2, 3, 8)).astype(np.float32)
    block = AttentionBlock(num_heads=4, num_head_channels=-1)
    params = nn.unbox(jax.eval_shape(block.init, jax.random.PRNGKey(0), x, enc))["params"]
    params = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.3, params)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(block.apply)({"params": params}, x, enc)
    np.testing.assert_allclose(got, _glide_attention_reference(x, params, 4, enc), rtol=1e-4, atol=1e-4)
