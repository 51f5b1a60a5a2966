"""Tokenizer parity: GLIDE BPE and CLIP BPE ids of the strings in the fixture's cases.json."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from glide_jax.tokenizer import ClipBPE, GlideBPE


def compute(fixture_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every output array of the `tokenizer/` fixture (int64 ids, bool mask, int64 scalars)."""
    fixture_dir = pathlib.Path(fixture_dir)
    hparams = json.loads((fixture_dir / "hparams.json").read_text())
    texts = [case["text"] for case in json.loads((fixture_dir / "cases.json").read_text())]
    glide = GlideBPE(text_ctx=hparams["glide_text_ctx"])
    clip = ClipBPE(max_len=hparams["clip_text_ctx"])
    glide_tokens, glide_mask = glide.encode_batch(texts)
    clip_tokens, clip_lens = clip.encode_batch(texts)
    scalar = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return {
        "glide_tokens": glide_tokens.astype(np.int64),
        "glide_mask": glide_mask,
        "clip_tokens": clip_tokens.astype(np.int64),
        "clip_lens": clip_lens.astype(np.int64),
        "glide_n_vocab": scalar(glide.n_vocab),
        "glide_end_token": scalar(glide.end_token),
        "clip_start_token": scalar(clip.start_token),
        "clip_end_token": scalar(clip.end_token),
        "clip_n_vocab": scalar(clip.n_vocab),
    }
