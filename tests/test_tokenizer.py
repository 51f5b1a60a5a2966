"""Tokenizers: exact parity with GLIDE's own tokenizers, SentencePiece training, the CLI."""
from __future__ import annotations

import json
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from glide_jax import tokenizer as tok
from glide_jax.parity import tokenizer as parity_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "parity" / "tokenizer"
CASES = json.loads((FIXTURE / "cases.json").read_text())
IDS = [repr(c["text"][:24]) for c in CASES]


@pytest.fixture(scope="module")
def glide():
    return tok.GlideBPE(text_ctx=128)


@pytest.fixture(scope="module")
def clip():
    return tok.ClipBPE(max_len=77)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_glide_encode_matches_reference(glide, case):
    assert glide.encode(case["text"]) == case["glide_encode"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_clip_encode_matches_reference(clip, case):
    assert clip.encode(case["text"]) == case["clip_encode"]


def test_parity_compute_matches_io_npz():
    got = parity_tokenizer.compute(FIXTURE)
    meta = json.loads((FIXTURE / "meta.json").read_text())
    outputs = {k: v for k, v in meta["arrays"].items() if v["role"] == "output"}
    assert set(got) == set(outputs)
    with np.load(FIXTURE / "io.npz") as ref:
        for name, spec in outputs.items():
            assert got[name].dtype == np.dtype(spec["dtype"]), name
            assert list(got[name].shape) == spec["shape"], name
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


def test_glide_batch_pads_truncates_and_masks(glide):
    tokens, mask = glide.encode_batch(["a", "", "word " * 200], text_ctx=8)
    assert tokens.dtype == np.int32 and mask.dtype == bool and tokens.shape == (3, 8)
    assert tokens[0].tolist() == [64] + [50256] * 7
    assert mask.sum(1).tolist() == [1, 0, 8]
    assert (tokens[1] == glide.pad_id).all()
    assert glide.n_vocab == 50257 and glide.pad_id == 50256
    assert glide.encode_batch(["a"])[0].shape == (1, 128)


def test_decode_round_trips(glide, clip):
    assert glide.decode(glide.encode("an oil painting of a corgi")) == "an oil painting of a corgi"
    assert clip.decode(clip.encode("An oil painting!")) == "an oil painting ! "


def test_get_tokenizer(tmp_path):
    assert isinstance(tok.get_tokenizer("glide_bpe", text_ctx=16), tok.GlideBPE)
    assert tok.get_tokenizer("clip_bpe").n_vocab == 49408
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tok.get_tokenizer("wordpiece")
    with pytest.raises(FileNotFoundError):
        tok.get_tokenizer("sentencepiece", model_file=tmp_path / "missing.model", text_ctx=16)


def _write_captions(path: pathlib.Path, n: int = 400) -> list[str]:
    """Captions of made-up words (enough distinct substrings for a small vocabulary)."""
    rng = random.Random(0)
    syllables = "ka ri to mo na shi ru a e o un ten ba go lu pi".split()
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
    captions = [" ".join(rng.choices(words, k=rng.randint(2, 10))) for _ in range(n)]
    path.write_text("\n".join(captions) + "\n", encoding="utf-8")
    return captions


def test_sentencepiece_train_round_trip(tmp_path):
    captions = _write_captions(tmp_path / "captions.txt")
    model = tok.train_sentencepiece(tmp_path / "captions.txt", 128, tmp_path / "spm", byte_fallback=False)
    assert model == tmp_path / "spm" / "spm.model" and model.with_suffix(".vocab").is_file()
    sp = tok.get_tokenizer("sentencepiece", model_file=model, text_ctx=12)
    assert sp.n_vocab == 128 and sp.pad_id == 0
    for caption in captions[:50]:
        ids = sp.encode(caption)
        assert ids and sp.pad_id not in ids
        assert sp.decode(ids) == caption
    assert sp.encode("KARI Tomo") == sp.encode("kari tomo")  # case-folded like GLIDE's BPE
    tokens, mask = sp.encode_batch([captions[0], "", captions[1] * 20])
    assert tokens.shape == mask.shape == (3, 12) and tokens.dtype == np.int32
    assert (tokens[~mask] == sp.pad_id).all() and (tokens[mask] != sp.pad_id).all()
    assert not mask[1].any() and mask[2].all()
    np.testing.assert_array_equal(tokens[0, mask[0]], sp.encode(captions[0])[:12])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glide_jax.tokenizer", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_cli_train_and_encode(tmp_path):
    _write_captions(tmp_path / "captions.txt")
    out = tmp_path / "model"
    run = _cli("train", "--captions", str(tmp_path / "captions.txt"), "--vocab-size", "100",
               "--out", str(out), "--no-byte-fallback")
    assert run.returncode == 0, run.stderr
    assert (out / "spm.model").is_file() and (out / "spm.vocab").is_file()
    assert "wrote" in run.stderr
    run = _cli("encode", "--tokenizer", "sentencepiece", "--model-file", str(out / "spm.model"), "kari")
    assert run.returncode == 0, run.stderr
    assert [int(i) for i in run.stdout.split()] == tok.SentencePieceTokenizer(out / "spm.model").encode("kari")
    run = _cli("encode", "--tokenizer", "glide_bpe", CASES[0]["text"])
    assert run.returncode == 0 and [int(i) for i in run.stdout.split()] == CASES[0]["glide_encode"]


@pytest.mark.parametrize("content", [None, "", "\n  \n"], ids=["missing", "empty", "blank"])
def test_cli_rejects_bad_captions_file(tmp_path, content):
    captions = tmp_path / "captions.txt"
    if content is not None:
        captions.write_text(content)
    run = _cli("train", "--captions", str(captions), "--vocab-size", "100", "--out", str(tmp_path / "m"))
    assert run.returncode == 2
    assert "captions file" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "m").exists()
