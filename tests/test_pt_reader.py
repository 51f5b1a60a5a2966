"""glide_jax.pt_reader: torch-free, code-free reading of torch.save files."""
import builtins
import collections
import json
import os
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from glide_jax.pt_reader import PtFormatError, UnsafePickleError, load_state_dict, to_float32
from pt_writer import View, write_legacy, write_pt, write_raw_pt

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "parity"


def _state():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal(24).astype(np.float32)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "half": rng.standard_normal((5, 2)).astype(np.float16),
        "bf16": rng.standard_normal(7).astype(ml_dtypes.bfloat16),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "flag": np.array([True, False]),
        "scalar": np.array(3.5, np.float64),
        "empty": np.zeros((0, 3), np.float32),
        # three views of one storage: full, transposed (non-contiguous), offset + strided
        "full": View(shared, 0, (4, 6), (6, 1)),
        "transposed": View(shared, 0, (6, 4), (1, 6)),
        "offset": View(shared, 5, (3, 2), (4, 2)),
    }


def _expected(state):
    return {k: v.numpy() if isinstance(v, View) else v for k, v in state.items()}


@pytest.mark.parametrize("writer", [write_pt, write_legacy])
def test_round_trip_dtypes_and_views(tmp_path, writer):
    state = _state()
    path = tmp_path / "m.pt"
    writer(path, state)
    sd = load_state_dict(path)
    want = _expected(state)
    assert list(sd) == list(want)
    for k, v in want.items():
        assert sd[k].dtype == v.dtype, k
        assert sd[k].shape == v.shape, k
        assert sd[k].flags.c_contiguous
        np.testing.assert_array_equal(sd[k], v, err_msg=k)
    f32 = to_float32(sd)
    assert f32["half"].dtype == f32["bf16"].dtype == f32["scalar"].dtype == np.float32
    assert f32["ids"].dtype == np.int64 and f32["flag"].dtype == np.bool_
    np.testing.assert_array_equal(f32["bf16"], want["bf16"].astype(np.float32))


@pytest.mark.parametrize(
    "folder, files, count_key",
    [
        ("base", ["model.pt"], "n_params"),
        ("upsample", ["model.pt"], "n_params"),
        ("base-inpaint", ["model.pt"], "n_params"),
        ("upsample-inpaint", ["model.pt"], "n_params"),
        ("classifier", ["model.pt"], "n_params"),
        ("clip", ["clip_image_enc.pt"], "n_params_image"),
        ("clip", ["clip_text_enc.pt"], "n_params_text"),
    ],
)
def test_fixture_param_counts(folder, files, count_key):
    meta = json.loads((FIXTURES / folder / "meta.json").read_text())
    sd = load_state_dict(FIXTURES / folder / files[0])
    assert all(v.dtype == np.float32 for v in sd.values())
    assert sum(v.size for v in sd.values()) == meta["settings"][count_key]


def test_fixture_known_shapes():
    sd = load_state_dict(FIXTURES / "clip" / "clip_image_enc.pt")
    assert sd["blocks.input.patch_proj"].shape == (24, 3, 4, 4)
    assert sd["blocks.input.w_pos"].shape == (65, 24)
    sd = load_state_dict(FIXTURES / "base" / "model.pt")
    assert sd["time_embed.0.weight"].shape == (128, 32)
    assert sd["input_blocks.0.0.weight"].shape == (32, 3, 3, 3)


class _Exploit:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def _payloads(marker):
    py = f"open({str(marker)!r}, 'w').write('pwned')"
    sh = f"touch {marker}"
    return {
        "os.system": pickle.dumps(_Exploit(os.system, sh), protocol=2),
        "builtins.exec": pickle.dumps(_Exploit(builtins.exec, py), protocol=2),
        "builtins.eval (protocol 4, STACK_GLOBAL)": pickle.dumps(_Exploit(builtins.eval, py), protocol=4),
        # hidden as a value inside an otherwise normal state dict
        "nested": pickle.dumps(collections.OrderedDict(a=[1, _Exploit(os.system, sh)]), protocol=2),
    }


@pytest.mark.parametrize("which", ["os.system", "builtins.exec", "builtins.eval (protocol 4, STACK_GLOBAL)", "nested"])
def test_malicious_pickle_refused_and_not_run(tmp_path, which):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    write_raw_pt(path, _payloads(marker)[which])
    with pytest.raises(UnsafePickleError, match=r"refused to load global '(posix|os|builtins)\.(system|exec|eval)'"):
        load_state_dict(path)
    assert not marker.exists()


def test_malicious_legacy_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_Exploit(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafePickleError):
        load_state_dict(path)
    assert not marker.exists()


def test_build_on_other_objects_refused(tmp_path):
    # `OrderedDict` is allowed, but BUILD with a non-dict state must not reach __setstate__.
    data = b"\x80\x02ccollections\nOrderedDict\n)R]b."
    write_raw_pt(tmp_path / "b.pt", data)
    with pytest.raises(UnsafePickleError, match="BUILD"):
        load_state_dict(tmp_path / "b.pt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_state_dict(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_text("hello, not a checkpoint")
    with pytest.raises(PtFormatError, match="not a torch checkpoint"):
        load_state_dict(tmp_path / "x.pt")
    with zipfile.ZipFile(tmp_path / "z.pt", "w") as zf:
        zf.writestr("foo.txt", "bar")
    with pytest.raises(PtFormatError, match="without data.pkl"):
        load_state_dict(tmp_path / "z.pt")


def test_truncated_and_corrupt(tmp_path):
    path = tmp_path / "m.pt"
    write_pt(path, {"w": np.ones((64, 64), np.float32)})
    raw = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PtFormatError, match="truncated or corrupt"):
        load_state_dict(tmp_path / "cut.pt")
    flipped = bytearray(raw)
    i = raw.index(np.ones(4, np.float32).tobytes())  # inside the storage record
    flipped[i] ^= 0xFF
    (tmp_path / "crc.pt").write_bytes(bytes(flipped))
    with pytest.raises(PtFormatError):
        load_state_dict(tmp_path / "crc.pt")
    legacy = tmp_path / "legacy.pt"
    write_legacy(legacy, {"w": np.ones((64, 64), np.float32)})
    legacy.write_bytes(legacy.read_bytes()[:-100])
    with pytest.raises(PtFormatError, match="truncated"):
        load_state_dict(legacy)


def test_view_past_storage_refused(tmp_path):
    base = np.zeros(4, np.float32)
    write_pt(tmp_path / "v.pt", {"w": View(base, 2, (3,), (1,))})
    with pytest.raises(PtFormatError, match="runs past its storage"):
        load_state_dict(tmp_path / "v.pt")


def test_missing_storage_record(tmp_path):
    path = tmp_path / "m.pt"
    write_pt(path, {"w": np.ones(3, np.float32)})
    with zipfile.ZipFile(path) as zf:
        data_pkl = zf.read("archive/data.pkl")
    write_raw_pt(tmp_path / "n.pt", data_pkl)
    with pytest.raises(PtFormatError, match="missing"):
        load_state_dict(tmp_path / "n.pt")


def test_not_a_state_dict(tmp_path):
    write_raw_pt(tmp_path / "l.pt", pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(PtFormatError, match="expected a state_dict"):
        load_state_dict(tmp_path / "l.pt")
    write_raw_pt(tmp_path / "d.pt", pickle.dumps({"epoch": 3}, protocol=2))
    with pytest.raises(PtFormatError, match="'epoch'"):
        load_state_dict(tmp_path / "d.pt")


def test_ancient_tar_format_refused(tmp_path):
    import tarfile

    (tmp_path / "storages").write_bytes(b"x")
    with tarfile.open(tmp_path / "old.pt", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(tmp_path / "storages", arcname="storages")
    with pytest.raises(PtFormatError, match="tar checkpoint format is not supported"):
        load_state_dict(tmp_path / "old.pt")
