"""glide_jax.convert: the PyTorch -> Flax weight table, checked numerically on a tiny module."""
import json
import os
import pathlib
import pickle
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import convert, experiment
from glide_jax.convert import ConversionError, flax_to_torch, torch_to_flax
from glide_jax.pt_reader import load_state_dict, to_float32
from pt_writer import write_pt, write_raw_pt

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"
REPO = pathlib.Path(__file__).parent.parent
B, H, C_IN, C, T, P = 2, 4, 3, 6, 5, 2  # batch, image size, in channels, width, tokens, patch
boxed = nn.with_logical_partitioning


class Block(nn.Module):
    """CLIP-style names: LayerNorm `ln` (g, b), `f_q` (w, b), `f_k` (w only)."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(epsilon=1e-5, name="ln")(x)
        return nn.Dense(C, name="f_q")(h) + nn.Dense(C, use_bias=False, name="f_k")(h)


class Blocks(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(name="block_0")(x)


class TinyNet(nn.Module):
    """One of each naming / layout case in docs/DESIGN.md's table."""

    @nn.compact
    def __call__(self, x, t_feat, tokens):
        conv = nn.Conv(C, (3, 3), padding=1, name="input_blocks_0_0",
                       kernel_init=boxed(nn.initializers.lecun_normal(), (None, None, "in", "out")))(x)
        h = nn.GroupNorm(num_groups=2, epsilon=1e-5, name="norm")(conv)
        emb = nn.Dense(8, name="time_embed_0", kernel_init=boxed(nn.initializers.lecun_normal(), ("in", "out")))(t_feat)
        tok = nn.Embed(10, C, name="token_embedding")(tokens)
        pos = self.param("positional_embedding", boxed(nn.initializers.normal(1.0), ("position", "embed")), (T, C))
        qkv = nn.Dense(3 * C, name="qkv")(tok + pos)  # a PyTorch Conv1d with kernel size 1
        patch_proj = self.param("patch_proj", nn.initializers.normal(1.0), (P, P, C_IN, C))
        patches = jax.lax.conv_general_dilated(x, patch_proj, (P, P), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        blk = Blocks(name="blocks")(patches.reshape(B, -1, C))
        return dict(norm=h, emb=emb, qkv=qkv, blk=blk)

    def init_inputs(self, batch=B):
        return tiny_inputs(batch)


def tiny_inputs(batch=B):
    return dict(x=jnp.zeros((batch, H, H, C_IN)), t_feat=jnp.zeros((batch, 4)), tokens=jnp.zeros((batch, T), jnp.int32))


def torch_state(seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    n = lambda *s: r.standard_normal(s).astype(dtype)  # noqa: E731
    return {
        "input_blocks.0.0.weight": n(C, C_IN, 3, 3), "input_blocks.0.0.bias": n(C),
        "norm.weight": n(C), "norm.bias": n(C),
        "time_embed.0.weight": n(8, 4), "time_embed.0.bias": n(8),
        "token_embedding.weight": n(10, C),
        "positional_embedding": n(T, C),
        "qkv.weight": n(3 * C, C, 1), "qkv.bias": n(3 * C),
        "patch_proj": n(C, C_IN, P, P),
        "blocks.block_0.ln.g": n(C), "blocks.block_0.ln.b": n(C),
        "blocks.block_0.f_q.w": n(C, C), "blocks.block_0.f_q.b": n(C),
        "blocks.block_0.f_k.w": n(C, C),
    }


def reference(sd, x_nchw, t_feat, tokens):
    """The same network computed in PyTorch layout with plain numpy (float64)."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    xp = np.pad(x_nchw, ((0, 0), (0, 0), (1, 1), (1, 1)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # [B, C, H, W, 3, 3]
    conv = np.einsum("bchwuv,ocuv->bohw", win, sd["input_blocks.0.0.weight"]) + sd["input_blocks.0.0.bias"][:, None, None]
    g = conv.reshape(B, 2, C // 2, H, H)
    g = (g - g.mean((2, 3, 4), keepdims=True)) / np.sqrt(g.var((2, 3, 4), keepdims=True) + 1e-5)
    norm = g.reshape(conv.shape) * sd["norm.weight"][:, None, None] + sd["norm.bias"][:, None, None]
    emb = t_feat @ sd["time_embed.0.weight"].T + sd["time_embed.0.bias"]
    seq = (sd["token_embedding.weight"][tokens] + sd["positional_embedding"]).transpose(0, 2, 1)  # [B, C, T]
    qkv = np.einsum("oc,bct->bot", sd["qkv.weight"][:, :, 0], seq) + sd["qkv.bias"][:, None]  # Conv1d
    xs = x_nchw.reshape(B, C_IN, H // P, P, H // P, P)
    patches = np.einsum("bchpwq,ocpq->bhwo", xs, sd["patch_proj"]).reshape(B, -1, C)
    ln = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, keepdims=True) + 1e-5)
    ln = ln * sd["blocks.block_0.ln.g"] + sd["blocks.block_0.ln.b"]
    blk = ln @ sd["blocks.block_0.f_q.w"].T + sd["blocks.block_0.f_q.b"] + ln @ sd["blocks.block_0.f_k.w"].T
    return dict(norm=norm.transpose(0, 2, 3, 1), emb=emb, qkv=qkv.transpose(0, 2, 1), blk=blk)


def abstract_params(module):
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **module.init_inputs()))
    return variables["params"]


def test_numeric_parity_through_pt_file(tmp_path):
    sd = torch_state()
    write_pt(tmp_path / "tiny.pt", sd)
    loaded = to_float32(load_state_dict(tmp_path / "tiny.pt"))
    abstract = abstract_params(TinyNet())
    assert isinstance(abstract["input_blocks_0_0"]["kernel"], nn.LogicallyPartitioned)  # boxes are handled
    params = torch_to_flax(loaded, abstract)
    assert params["input_blocks_0_0"]["kernel"].shape == (3, 3, C_IN, C)
    assert params["blocks"]["block_0"]["ln"]["scale"].shape == (C,)
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
    r = np.random.default_rng(1)
    x = r.standard_normal((B, C_IN, H, H)).astype(np.float32)
    t_feat = r.standard_normal((B, 4)).astype(np.float32)
    tokens = r.integers(0, 10, (B, T))
    with jax.default_matmul_precision("highest"):
        got = TinyNet().apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t_feat), jnp.asarray(tokens))
    want = reference(sd, x.astype(np.float64), t_feat.astype(np.float64), tokens)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_round_trip_exact():
    sd = torch_state()
    params = torch_to_flax(sd, abstract_params(TinyNet()))
    back = flax_to_torch(params, like=sd)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # Without `like`, GLIDE UNet conventions: numeric suffixes become components, leaves `weight`.
    default = flax_to_torch(params)
    for k in ["input_blocks.0.0.weight", "time_embed.0.weight", "norm.weight", "token_embedding.weight", "positional_embedding"]:
        np.testing.assert_array_equal(default[k], sd[k], err_msg=k)


def test_float16_checkpoint(tmp_path):
    sd16 = torch_state(dtype=np.float16)
    write_pt(tmp_path / "half.pt", sd16)
    params = torch_to_flax(to_float32(load_state_dict(tmp_path / "half.pt")), abstract_params(TinyNet()))
    assert all(v.dtype == np.float32 for v in jax.tree.leaves(params))
    np.testing.assert_array_equal(params["norm"]["scale"], sd16["norm.weight"].astype(np.float32))


def test_all_problems_listed():
    sd = torch_state()
    del sd["norm.bias"], sd["blocks.block_0.f_k.w"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["out.2.qkv_proj.bias"] = np.zeros(3, np.float32)
    sd["time_embed.0.weight"] = np.zeros((9, 4), np.float32)
    sd["input_blocks.0.0.weight"] = np.zeros((C, C_IN, 1, 1), np.float32)
    with pytest.raises(ConversionError) as info:
        torch_to_flax(sd, abstract_params(TinyNet()))
    e = info.value
    assert sorted(e.missing) == ["blocks/block_0/f_k/kernel", "norm/bias"]
    assert sorted(e.unexpected) == ["extra.weight", "out.2.qkv_proj.bias"]
    assert sorted(m[0] for m in e.mismatched) == ["input_blocks.0.0.weight", "time_embed.0.weight"]
    assert ("time_embed.0.weight", "time_embed_0/kernel", (4, 9), (4, 8)) in e.mismatched
    text = str(e)
    for s in ["2 missing", "2 unexpected", "2 mis-shaped", "norm/bias", "extra.weight", "(1, 1, 3, 6) vs (3, 3, 3, 6)"]:
        assert s in text


class Wrapper(nn.Module):
    """Two sub-networks whose state dicts come from two files (as CLIP's image / text encoders)."""

    @nn.compact
    def __call__(self, x, t_feat, tokens):
        return TinyNet(name="image_enc")(x, t_feat, tokens), TinyNet(name="text_enc")(x, t_feat, tokens)

    def init_inputs(self, batch=B):
        return tiny_inputs(batch)


def test_prefix_merges():
    abstract = abstract_params(Wrapper())
    a = torch_to_flax(torch_state(0), abstract, prefix=("image_enc",))
    b = torch_to_flax(torch_state(1), abstract, prefix=("text_enc",))
    assert set(a) == {"image_enc"} and set(b) == {"text_enc"}
    params = {**a, **b}
    assert jax.tree.structure(params) == jax.tree.structure(nn.meta.unbox(abstract))
    with pytest.raises(ConversionError, match="image_enc"):
        torch_to_flax({"norm.weight": np.zeros(C, np.float32)}, abstract, prefix=("image_enc",))


def test_default_hparams():
    up = convert.default_hparams("upsample-inpaint")
    assert (up["image_size"], up["num_res_blocks"], up["noise_schedule"], up["super_res"], up["inpaint"]) == (256, 2, "linear", True, True)
    assert convert.default_hparams("base")["xf_width"] == 512
    assert convert.default_hparams("clip")["n_vocab"] == 65536
    assert convert.default_hparams("classifier")["attention_resolutions"] == [2, 4, 8]


# ----------------------------------------------------------------------------- command line


class ClipInput(nn.Module):
    which: str  # "w_t" (image encoder) or "w_voc" (text encoder), as in the real files

    @nn.compact
    def __call__(self, x):
        return x + self.param(self.which, nn.initializers.normal(1.0), (3, C)).sum(0)


class ClipEncoder(nn.Module):
    which: str

    @nn.compact
    def __call__(self, x):
        return _Blocks(self.which, name="blocks")(x)


class _Blocks(nn.Module):
    which: str

    @nn.compact
    def __call__(self, x):
        return ClipInput(self.which, name="input")(x)


class ClipPair(nn.Module):
    """Stands in for the CLIP model: `image_enc` / `text_enc`, keyed like the real files."""

    @nn.compact
    def __call__(self, x):
        return ClipEncoder("w_t", name="image_enc")(x), ClipEncoder("w_voc", name="text_enc")(x)

    def init_inputs(self, batch=1):
        return dict(x=jnp.zeros((batch, C)))


@pytest.fixture
def fake_models(monkeypatch):
    built = []

    def from_hparams(hparams):
        built.append(dict(hparams))
        return ClipPair() if hparams["kind"] == "clip" else TinyNet()

    monkeypatch.setattr(experiment, "from_hparams", from_hparams)
    return built


def _files(tmp_path, kind="base", sd=None):
    hp = tmp_path / "hparams.json"
    hp.write_text(json.dumps({"kind": kind, "image_size": 32}))
    pt = tmp_path / "model.pt"
    write_pt(pt, torch_state() if sd is None else sd)
    return str(hp), str(pt)


def test_cli_convert_and_reload(tmp_path, fake_models, capsys):
    hp, pt = _files(tmp_path)
    out = str(tmp_path / "out")
    assert convert.main(["--kind", "base", "--hparams", hp, pt, "--out", out]) == 0
    assert "converted base" in capsys.readouterr().out
    assert fake_models[0]["image_size"] == 32 and fake_models[0]["num_channels"] == 192  # defaults merged
    hparams, params = convert.load_converted(out)
    assert hparams["kind"] == "base" and hparams["image_size"] == 32
    want = torch_to_flax(torch_state(), abstract_params(TinyNet()))
    assert jax.tree.structure(jax.tree.map(np.asarray, params)) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)
    # An existing checkpoint is refused unless --force.
    assert convert.main(["--kind", "base", "--hparams", hp, pt, "--out", out]) == 2
    assert "--force" in capsys.readouterr().err
    assert convert.main(["--kind", "base", "--hparams", hp, pt, "--out", out, "--force"]) == 0


def test_cli_clip_two_files(tmp_path, fake_models):
    hp = tmp_path / "clip.json"
    hp.write_text("{}")
    r = np.random.default_rng(0)
    write_pt(tmp_path / "text.pt", {"blocks.input.w_voc": r.standard_normal((3, C)).astype(np.float32)})
    write_pt(tmp_path / "image.pt", {"blocks.input.w_t": r.standard_normal((3, C)).astype(np.float32)})
    out = str(tmp_path / "clip")
    # file order does not matter: each file is recognised by its keys
    assert convert.main(["--kind", "clip", "--hparams", str(hp), str(tmp_path / "text.pt"), str(tmp_path / "image.pt"), "--out", out]) == 0
    hparams, params = convert.load_converted(out)
    assert hparams["kind"] == "clip" and hparams["n_embd"] == 512
    assert set(params) == {"image_enc", "text_enc"}
    assert convert.main(["--kind", "clip", "--hparams", str(hp), str(tmp_path / "text.pt"), "--out", str(tmp_path / "c2")]) == 2


def test_cli_errors(tmp_path, fake_models, capsys):
    hp, pt = _files(tmp_path)
    out = str(tmp_path / "out")
    # wrong file for the kind: a ConversionError summary, exit 2, no traceback
    other = tmp_path / "other.pt"
    write_pt(other, {"transformer.resblocks.0.attn.c_qkv.weight": np.zeros((3, 2), np.float32)})
    assert convert.main(["--kind", "base", "--hparams", hp, str(other), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "16 missing" in err and "transformer.resblocks.0.attn.c_qkv.weight" in err and "Traceback" not in err
    # a hostile pickle is refused and never run
    marker = tmp_path / "marker"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    write_raw_pt(tmp_path / "evil.pt", pickle.dumps(Exploit(), protocol=2))
    assert convert.main(["--kind", "base", "--hparams", hp, str(tmp_path / "evil.pt"), "--out", out]) == 2
    assert "refused to load global" in capsys.readouterr().err
    assert not marker.exists()
    # hparams of another kind
    assert convert.main(["--kind", "upsample", "--hparams", hp, pt, "--out", out]) == 2
    assert "is for kind 'base'" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_missing_file_subprocess(tmp_path):
    """Real process: the __main__ guard works and a missing input is exit 2 without a traceback."""
    hp = tmp_path / "h.json"
    hp.write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "glide_jax.convert", "--kind", "base", "--hparams", str(hp),
         str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- real models


FIXTURE_KINDS = [("base", ["model.pt"]), ("upsample", ["model.pt"]), ("base-inpaint", ["model.pt"]),
                 ("upsample-inpaint", ["model.pt"]), ("classifier", ["model.pt"]),
                 ("clip", ["clip_image_enc.pt", "clip_text_enc.pt"])]


@pytest.mark.parametrize("kind, files", FIXTURE_KINDS)
def test_fixture_converts_with_real_models(kind, files):
    """End to end against the networks the experiment layer builds for each kind."""
    folder = FIXTURES / kind
    raw = json.loads((folder / "hparams.json").read_text())
    hparams = convert._with_defaults(kind, raw)
    params = convert.convert_files(kind, hparams, [str(folder / f) for f in files])
    meta = json.loads((folder / "meta.json").read_text())["settings"]
    n = sum(x.size for x in jax.tree.leaves(params))
    assert n == meta.get("n_params", meta.get("n_params_image", 0) + meta.get("n_params_text", 0))


def test_flax_to_torch_lists_unknown_keys():
    params = torch_to_flax(torch_state(), abstract_params(TinyNet()))
    with pytest.raises(ConversionError) as info:
        flax_to_torch(params, like={"nope.weight": (3,), "also.nope": (1,), "norm.weight": (C,)})
    assert info.value.unexpected == ["nope.weight", "also.nope"]
