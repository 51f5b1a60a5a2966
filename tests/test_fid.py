"""glide_jax.fid and the FID Inception: statistics against direct float64 numpy, the network's
names/shapes/param count against torchvision's definition, and its blocks against a numpy
reference with weights in the PyTorch layout (the real weights cannot be downloaded here)."""
import numpy as np
import pytest

from glide_jax import fid
from glide_jax.convert import ConversionError
from glide_jax.models import inception
from pt_writer import write_pt

# ----------------------------------------------------------------------------- statistics


def _spd(rng, d, n=None):
    a = rng.standard_normal((d, n or 2 * d))
    return a @ a.T / a.shape[1] + 0.1 * np.eye(d)


def _fid_reference(mu1, s1, mu2, s2):
    # sqrt(S1 S2) from the eigen-decomposition of the non-symmetric product itself.
    w, v = np.linalg.eig(s1 @ s2)
    covmean = (v * np.sqrt(w.astype(np.complex128))) @ np.linalg.inv(v)
    np.testing.assert_allclose(covmean @ covmean, s1 @ s2, rtol=1e-8, atol=1e-10)
    assert np.abs(covmean.imag).max() < 1e-8
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)


def test_frechet_distance_matches_direct_float64():
    rng = np.random.default_rng(0)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d), _spd(rng, d)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(got, _fid_reference(mu1, s1, mu2, s2), rtol=1e-6)
    try:  # pytorch-fid's exact route, where scipy is installed
        from scipy import linalg
    except ImportError:
        return
    covmean = linalg.sqrtm(s1 @ s2).real
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_shift_gives_mean_distance():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32))
    mu, sigma = fid.feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (32, 32)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False))
    scale = np.trace(sigma)
    assert abs(fid.fid_from_features(feats, feats)) < 1e-9 * scale
    delta = rng.standard_normal(32)
    shifted = fid.frechet_distance(mu, sigma, mu + delta, sigma)
    np.testing.assert_allclose(shifted, delta @ delta, rtol=1e-6, atol=1e-9 * scale)
    # Fewer samples than dimensions: singular covariances stay finite and non-negative.
    few = fid.fid_from_features(feats[:10], feats[10:20])
    assert np.isfinite(few) and few > 0


def _mmd_reference(x, y):
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    off = lambda a: (a.sum() - np.trace(a)) / (m * (m - 1))
    return off(k(x, x)) + off(k(y, y)) - 2 * k(x, y).mean()


def test_kid():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    # One subset holding every row: exactly the unbiased MMD^2 (row order does not matter).
    whole = fid.kid(a, b + 0.5, subsets=1, subset_size=400)
    np.testing.assert_allclose(whole, _mmd_reference(a, b + 0.5), rtol=1e-10)
    same = fid.kid(a, b, subsets=20, subset_size=200)
    shifted = fid.kid(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 0.02 * shifted
    assert shifted > 0
    assert fid.kid(a, b, subsets=5, seed=3) == fid.kid(a, b, subsets=5, seed=3)


def test_stats_files_and_cache(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.standard_normal(5), _spd(rng, 5)
    path = tmp_path / "sub" / "ref.npz"
    fid.save_stats(path, mu, sigma)
    with np.load(path) as f:  # pytorch-fid's keys
        assert sorted(f.files) == ["mu", "sigma"]
    mu2, sigma2 = fid.load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)

    calls = []
    feats = rng.standard_normal((50, 5))
    compute = lambda: calls.append(1) or feats
    cache = tmp_path / "cache.npz"
    first = fid.cached_stats(cache, compute)
    second = fid.cached_stats(cache, compute)
    assert len(calls) == 1
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(first[0], feats.mean(0))


# ----------------------------------------------------------------------------- resize


def _torch_bilinear(x, out):
    """F.interpolate(mode='bilinear', align_corners=False) on [H, W, C], written from its formula."""

    def axis_weights(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        w = np.zeros((n_out, n_in))
        np.add.at(w, (np.arange(n_out), i0), 1 - lam)
        np.add.at(w, (np.arange(n_out), i1), lam)
        return w

    wh, ww = axis_weights(x.shape[0], out), axis_weights(x.shape[1], out)
    return np.einsum("oh,hwc,pw->opc", wh, x, ww, optimize=True)


@pytest.mark.parametrize("size_in,size_out", [(32, 75), (64, 299), (120, 75)])
def test_resize_is_pytorch_fid_bilinear(size_in, size_out):
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (1, size_in, size_in, 3), dtype=np.uint8)
    got = np.asarray(inception.preprocess(img, size_out))[0]
    ref = _torch_bilinear(img[0] / 255.0, size_out) * 2 - 1  # pytorch-fid: resize, then 2x - 1
    # float32 round-off is ~1e-5 here; jax's default antialiased resize is off by up to ~0.8.
    np.testing.assert_allclose(got, ref, atol=3e-5)


# ----------------------------------------------------------------------------- the network


def _torchvision_spec(num_classes=1008, aux=False):
    """{state-dict key: shape} of torchvision's Inception3 as pytorch-fid builds it, written from
    torchvision/models/inception.py (BasicConv2d = conv without bias + BatchNorm2d)."""
    spec = {}

    def conv(name, cin, cout, k=1):
        kh, kw = (k, k) if isinstance(k, int) else k
        spec[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            spec[f"{name}.bn.{leaf}"] = (cout,)
        spec[f"{name}.bn.num_batches_tracked"] = ()

    def block_a(n, cin, pool):
        conv(f"{n}.branch1x1", cin, 64)
        conv(f"{n}.branch5x5_1", cin, 48), conv(f"{n}.branch5x5_2", 48, 64, 5)
        conv(f"{n}.branch3x3dbl_1", cin, 64), conv(f"{n}.branch3x3dbl_2", 64, 96, 3)
        conv(f"{n}.branch3x3dbl_3", 96, 96, 3), conv(f"{n}.branch_pool", cin, pool)

    def block_c(n, c7):
        conv(f"{n}.branch1x1", 768, 192)
        conv(f"{n}.branch7x7_1", 768, c7), conv(f"{n}.branch7x7_2", c7, c7, (1, 7))
        conv(f"{n}.branch7x7_3", c7, 192, (7, 1))
        conv(f"{n}.branch7x7dbl_1", 768, c7), conv(f"{n}.branch7x7dbl_2", c7, c7, (7, 1))
        conv(f"{n}.branch7x7dbl_3", c7, c7, (1, 7)), conv(f"{n}.branch7x7dbl_4", c7, c7, (7, 1))
        conv(f"{n}.branch7x7dbl_5", c7, 192, (1, 7)), conv(f"{n}.branch_pool", 768, 192)

    def block_e(n, cin):
        conv(f"{n}.branch1x1", cin, 320)
        conv(f"{n}.branch3x3_1", cin, 384), conv(f"{n}.branch3x3_2a", 384, 384, (1, 3))
        conv(f"{n}.branch3x3_2b", 384, 384, (3, 1))
        conv(f"{n}.branch3x3dbl_1", cin, 448), conv(f"{n}.branch3x3dbl_2", 448, 384, 3)
        conv(f"{n}.branch3x3dbl_3a", 384, 384, (1, 3)), conv(f"{n}.branch3x3dbl_3b", 384, 384, (3, 1))
        conv(f"{n}.branch_pool", cin, 192)

    conv("Conv2d_1a_3x3", 3, 32, 3), conv("Conv2d_2a_3x3", 32, 32, 3), conv("Conv2d_2b_3x3", 32, 64, 3)
    conv("Conv2d_3b_1x1", 64, 80), conv("Conv2d_4a_3x3", 80, 192, 3)
    block_a("Mixed_5b", 192, 32), block_a("Mixed_5c", 256, 64), block_a("Mixed_5d", 288, 64)
    conv("Mixed_6a.branch3x3", 288, 384, 3)
    conv("Mixed_6a.branch3x3dbl_1", 288, 64), conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3)
    conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for n, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block_c(n, c7)
    if aux:
        conv("AuxLogits.conv0", 768, 128), conv("AuxLogits.conv1", 128, 768, 5)
        spec["AuxLogits.fc.weight"], spec["AuxLogits.fc.bias"] = (num_classes, 768), (num_classes,)
    conv("Mixed_7a.branch3x3_1", 768, 192), conv("Mixed_7a.branch3x3_2", 192, 320, 3)
    conv("Mixed_7a.branch7x7x3_1", 768, 192), conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7))
    conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1)), conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    block_e("Mixed_7b", 1280), block_e("Mixed_7c", 2048)
    spec["fc.weight"], spec["fc.bias"] = (num_classes, 2048), (num_classes,)
    return spec


def _numel(spec, keep=lambda k: True):
    return sum(int(np.prod(s)) for k, s in spec.items() if keep(k))


def _trainable(k):
    return not k.endswith(("running_mean", "running_var", "num_batches_tracked"))


def test_param_count_matches_torchvision():
    # torchvision documents inception_v3 (1000 classes, aux head) at 27,161,264 parameters;
    # pytorch-fid's network drops the aux head and has 1008 classes.
    assert _numel(_torchvision_spec(1000, aux=True), _trainable) == 27_161_264
    spec = _torchvision_spec()
    assert _numel(spec, _trainable) == 23_850_960
    buffers = _numel(spec, lambda k: k.endswith(("running_mean", "running_var")))
    assert buffers == 34_432
    import jax

    flax_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(inception.abstract_params(with_logits=True)))
    assert flax_count == 23_850_960 + buffers == 23_885_392
    feat_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(inception.abstract_params()))
    assert feat_count == flax_count - 2048 * 1008 - 1008


@pytest.fixture(scope="module")
def torch_sd():
    """A random state dict in PyTorch layout with He-scaled convs, so activations stay O(1)."""
    rng = np.random.default_rng(5)
    sd = {}
    for key, shape in _torchvision_spec().items():
        leaf = key.rsplit(".", 1)[1]
        if leaf == "num_batches_tracked":
            sd[key] = np.array(7, np.int64)
        elif len(shape) == 4 or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            sd[key] = (rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif leaf == "running_var":
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf == "weight":
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:  # bias, running_mean
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def flax_params(torch_sd, tmp_path_factory):
    """The random state dict through a .pt file, the torch-free reader and the generic port."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    write_pt(path, torch_sd)
    return inception.load_inception_params(path, with_logits=True)


def test_state_dict_port(torch_sd, flax_params):
    np.testing.assert_array_equal(
        flax_params["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"],
        torch_sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        flax_params["Mixed_7c"]["branch_pool"]["bn"]["var"], torch_sd["Mixed_7c.branch_pool.bn.running_var"]
    )
    np.testing.assert_array_equal(flax_params["fc"]["kernel"], torch_sd["fc.weight"].T)
    assert "fc" not in inception.inception_params_from_state_dict(torch_sd)
    broken = {k: v for k, v in torch_sd.items() if k != "Mixed_5b.branch_pool.bn.running_mean"}
    broken["Mixed_5b.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        inception.inception_params_from_state_dict(broken)
    assert err.value.missing == ["Mixed_5b/branch_pool/bn/mean"]
    assert err.value.unexpected == ["Mixed_5b.extra.weight"]


# numpy reference, NCHW float64, PyTorch semantics, reading the PyTorch-layout state dict


def _np_conv(x, w, stride=1, pad=(0, 0)):
    ph, pw = pad
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    kh, kw = w.shape[2:]
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = 0
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride]
            out = out + np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.float64))
    return out


def _np_basic(sd, name, x, stride=1, pad=(0, 0)):
    y = _np_conv(x, sd[f"{name}.conv.weight"], stride, pad)
    g, b, m, v = (
        sd[f"{name}.bn.{k}"].astype(np.float64)[None, :, None, None]
        for k in ("weight", "bias", "running_mean", "running_var")
    )
    return np.maximum((y - m) / np.sqrt(v + 1e-3) * g + b, 0)


def _np_pool3x3_same(x, kind, count_include_pad=False):
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=fill)
    ones = np.pad(np.ones_like(x), ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2:]
    win = lambda a: np.stack([a[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)])
    if kind == "max":
        return win(xp).max(0)
    return win(xp).sum(0) / (9.0 if count_include_pad else win(ones).sum(0))


def _np_inception_a(sd, n, x, count_include_pad=False):
    b1 = _np_basic(sd, f"{n}.branch1x1", x)
    b5 = _np_basic(sd, f"{n}.branch5x5_2", _np_basic(sd, f"{n}.branch5x5_1", x), pad=(2, 2))
    b3 = _np_basic(sd, f"{n}.branch3x3dbl_1", x)
    b3 = _np_basic(sd, f"{n}.branch3x3dbl_3", _np_basic(sd, f"{n}.branch3x3dbl_2", b3, pad=(1, 1)), pad=(1, 1))
    bp = _np_basic(sd, f"{n}.branch_pool", _np_pool3x3_same(x, "avg", count_include_pad))
    return np.concatenate([b1, b5, b3, bp], axis=1)


def _np_inception_e(sd, n, x, pool):
    b1 = _np_basic(sd, f"{n}.branch1x1", x)
    b3 = _np_basic(sd, f"{n}.branch3x3_1", x)
    b3 = np.concatenate(
        [_np_basic(sd, f"{n}.branch3x3_2a", b3, pad=(0, 1)), _np_basic(sd, f"{n}.branch3x3_2b", b3, pad=(1, 0))], 1
    )
    bd = _np_basic(sd, f"{n}.branch3x3dbl_2", _np_basic(sd, f"{n}.branch3x3dbl_1", x), pad=(1, 1))
    bd = np.concatenate(
        [_np_basic(sd, f"{n}.branch3x3dbl_3a", bd, pad=(0, 1)), _np_basic(sd, f"{n}.branch3x3dbl_3b", bd, pad=(1, 0))], 1
    )
    bp = _np_basic(sd, f"{n}.branch_pool", _np_pool3x3_same(x, pool))
    return np.concatenate([b1, b3, bd, bp], axis=1)


def _nchw(x):
    return np.asarray(x, np.float64).transpose(0, 3, 1, 2)


def _close(got_nhwc, ref_nchw):
    ref = ref_nchw.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got_nhwc), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_blocks_match_numpy_reference(torch_sd, flax_params):
    rng = np.random.default_rng(6)
    # Stem conv: 3x3 stride 2, no padding, BN eps 1e-3.
    x = rng.standard_normal((1, 11, 11, 3)).astype(np.float32)
    got = inception.BasicConv2d(32, 3, stride=2).apply({"params": flax_params["Conv2d_1a_3x3"]}, x)
    _close(got, _np_basic(torch_sd, "Conv2d_1a_3x3", _nchw(x), stride=2))

    # FIDInceptionA: average pool without the padded zeros. Positive inputs make the border
    # windows differ from count_include_pad=True, so the check can tell the two apart.
    x = np.abs(rng.standard_normal((1, 5, 5, 192))).astype(np.float32)
    got = inception.InceptionA(pool_features=32).apply({"params": flax_params["Mixed_5b"]}, x)
    assert got.shape == (1, 5, 5, 256)
    _close(got, _np_inception_a(torch_sd, "Mixed_5b", _nchw(x)))
    wrong = _np_inception_a(torch_sd, "Mixed_5b", _nchw(x), count_include_pad=True)
    assert not np.allclose(np.asarray(got), wrong.transpose(0, 2, 3, 1), rtol=1e-3)

    # FIDInceptionE_2: the last block's max pool.
    x = rng.standard_normal((1, 3, 3, 2048)).astype(np.float32)
    got = inception.InceptionE(pool="max").apply({"params": flax_params["Mixed_7c"]}, x)
    assert got.shape == (1, 3, 3, 2048)
    _close(got, _np_inception_e(torch_sd, "Mixed_7c", _nchw(x), "max"))


def test_forward_shapes_and_features_wrapper(flax_params):
    import jax

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    # Full pytorch-fid pipeline: resized internally to 299x299.
    feats, logits = jax.jit(inception.InceptionV3(with_logits=True).apply)({"params": flax_params}, images)
    assert feats.shape == (2, inception.FEATURE_DIM) and logits.shape == (2, inception.NUM_CLASSES)
    assert np.isfinite(feats).all() and np.isfinite(logits).all() and np.asarray(feats).std() > 0
    assert not np.allclose(feats[0], feats[1])

    # The batching wrapper at Inception's minimum size: 3 images in batches of 2 (one padded);
    # an iterable of uneven chunks and single images give the same rows (one compilation).
    small = rng.integers(0, 256, (3, 75, 75, 3), dtype=np.uint8)
    extract = fid.InceptionFeatures(flax_params, batch_size=2, resize_to=None, progress=False)
    got = extract(small)
    assert got.shape == (3, 2048) and got.dtype == np.float32 and np.isfinite(got).all()
    tol = dict(rtol=1e-5, atol=1e-6 * np.abs(got).max())
    np.testing.assert_allclose(extract(iter([small[:1], small[1:]])), got, **tol)
    np.testing.assert_allclose(extract(small[2:]), got[2:], **tol)
    assert extract(small[:0]).shape == (0, 2048)
    with pytest.raises(ValueError, match="at least 75"):
        inception.InceptionV3(resize_to=None).apply({"params": flax_params}, small[:, :64, :64])


def test_evaluate_fid_end_to_end_on_a_tiny_checkpoint(flax_params, tmp_path):
    """captions -> CFG samples -> Inception features -> FID/KID against a folder of reference images."""
    from helpers import random_checkpoint
    from PIL import Image

    from glide_jax import evaluate

    random_checkpoint("base", tmp_path / "base")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle\na blue square\n\na green triangle\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    out = evaluate.fid(str(tmp_path / "base"), captions_file=str(captions), reference=str(ref), inception=None,
                       n=4, scale=1.5, respacing="3", sampler="ddim", batch=4, inception_params=flax_params)
    assert out["n"] == 4 and np.isfinite(out["fid"]) and out["fid"] >= 0 and np.isfinite(out["kid"])
