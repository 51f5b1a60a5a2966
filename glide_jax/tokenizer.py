"""Caption tokenizers: GLIDE's GPT-2 BPE, CLIP's BPE and SentencePiece, behind one interface.

Text tokenizers for the UNet (`GlideBPE` for the released weights, `SentencePieceTokenizer` for
models trained from scratch) share one interface:

    n_vocab: int                      rows of the token-embedding table
    pad_id: int                       id of the padding token
    text_ctx: int                     default context length
    encode(text) -> list[int]         no start/end tokens, no truncation
    encode_batch(texts, text_ctx=None) -> (tokens int32 [B, L], mask bool [B, L])
    decode(ids) -> str

`encode_batch` truncates each caption to L = text_ctx tokens and right-pads it with `pad_id`;
`mask` is True on real tokens. The empty caption (all padding) is the unconditional input for
classifier-free guidance. `ClipBPE` (the noised-CLIP text encoder's tokenizer) instead returns
`(tokens int32 [B, 77], lens int32 [B])` with start/end tokens and zero padding.

Command line:
    python -m glide_jax.tokenizer train --captions captions.txt --vocab-size 16384 --out DIR
    python -m glide_jax.tokenizer encode --tokenizer glide_bpe "an oil painting of a corgi"
"""
from __future__ import annotations

import argparse
import functools
import gzip
import html
import json
import os
import pathlib
import sys
from typing import Iterable, Protocol, Sequence

import ftfy
import numpy as np
import regex
import sentencepiece as spm
import tiktoken

ASSETS = pathlib.Path(__file__).parent / "assets"

# GLIDE's GPT-2 pre-tokenizer, verbatim (glide_text2im/tokenizer/bpe.py).
GLIDE_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GLIDE_END = "<|endoftext|>"
GLIDE_N_VOCAB = 50257

# CLIP's pre-tokenizer (glide_text2im/tokenizer/simple_tokenizer.py), applied with IGNORECASE.
CLIP_PAT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
CLIP_START, CLIP_END = "<|startoftext|>", "<|endoftext|>"
CLIP_N_MERGES = 49152 - 256 - 2  # the released vocabulary uses the first 48894 merges
CLIP_MAX_LEN = 77


class TextTokenizer(Protocol):
    """What the UNet data pipeline and samplers need from a tokenizer."""

    n_vocab: int
    pad_id: int
    text_ctx: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(
        self, texts: Sequence[str], text_ctx: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def pad_batch(
    ids: Sequence[Sequence[int]], text_ctx: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Truncates to `text_ctx` and right-pads: (tokens int32 [B, L], mask bool [B, L])."""
    tokens = np.full((len(ids), text_ctx), pad_id, dtype=np.int32)
    mask = np.zeros((len(ids), text_ctx), dtype=bool)
    for i, row in enumerate(ids):
        n = min(len(row), text_ctx)
        tokens[i, :n] = row[:n]
        mask[i, :n] = True
    return tokens, mask


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table used in their vocab files."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    # Printable Latin-1 bytes map to themselves; the rest to chr(256), chr(257), ... in order.
    others = [b for b in range(256) if b not in bs]
    cs = bs + [256 + n for n in range(len(others))]
    return dict(zip(bs + others, map(chr, cs)))


# --------------------------------------------------------------------------------------------
# GLIDE: GPT-2 byte-level BPE (tiktoken)


@functools.lru_cache(maxsize=None)
def _glide_encoding():
    """Builds GLIDE's BPE as a tiktoken Encoding from the packaged vocab files (once per process).

    Same construction as `tiktoken.load.data_gym_to_mergeable_bpe_ranks`, reading the gzipped
    package data instead of URLs: token rank = 256 + merge index, which tiktoken requires and
    which equals the id in encoder.json (checked).
    """
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    decode = lambda s: bytes(byte_of[c] for c in s)  # noqa: E731
    with gzip.open(ASSETS / "encoder.json.gz", "rt", encoding="utf-8") as f:
        encoder = json.load(f)
    with gzip.open(ASSETS / "vocab.bpe.gz", "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
    # Single bytes rank in the table's order (printable ones first), not by byte value.
    ranks = {bytes([b]): i for i, b in enumerate(bytes_to_unicode())}
    for first, second in merges:
        ranks[decode(first) + decode(second)] = len(ranks)
    end_id = encoder.pop(GLIDE_END)
    if {decode(k): v for k, v in encoder.items()} != ranks or end_id != len(ranks):
        raise ValueError(f"{ASSETS}: encoder.json.gz and vocab.bpe.gz do not describe one BPE")
    return tiktoken.Encoding(
        name="glide_bpe",
        pat_str=GLIDE_PAT,
        mergeable_ranks=ranks,
        special_tokens={GLIDE_END: end_id},
        explicit_n_vocab=GLIDE_N_VOCAB,
    )


class GlideBPE:
    """GLIDE's caption tokenizer: lower-case, then GPT-2's byte-level BPE (vocab 50257).

    No other normalisation; special-token text such as "<|endoftext|>" is ordinary text.
    Padding uses the end-of-text id 50256, as GLIDE does.
    """

    def __init__(self, text_ctx: int = 128):
        self.text_ctx = text_ctx
        self._enc = _glide_encoding()
        self.n_vocab = self._enc.n_vocab
        self.pad_id = self.end_token = self._enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text.lower())

    def encode_batch(
        self, texts: Sequence[str], text_ctx: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = self._enc.encode_ordinary_batch([t.lower() for t in texts])
        return pad_batch(ids, self.text_ctx if text_ctx is None else text_ctx, self.pad_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])


# --------------------------------------------------------------------------------------------
# CLIP: lower-cased BPE with end-of-word markers (pure Python, as in CLIP's simple_tokenizer)


@functools.lru_cache(maxsize=None)
def _clip_vocab() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """CLIP's (encoder, merge ranks) from the packaged bpe_simple_vocab_16e6 (once per process)."""
    with gzip.open(ASSETS / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : CLIP_N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [CLIP_START, CLIP_END]
    encoder = {piece: i for i, piece in enumerate(vocab)}
    return encoder, {m: i for i, m in enumerate(merges)}


class ClipBPE:
    """The tokenizer of GLIDE's noised CLIP text encoder (CLIP's simple_tokenizer).

    Text is repaired with ftfy, HTML-unescaped twice, whitespace-collapsed, stripped and
    lower-cased. Literal "<|startoftext|>" / "<|endoftext|>" become the start / end ids.
    """

    def __init__(self, max_len: int = CLIP_MAX_LEN):
        self.max_len = max_len
        self._encoder, self._ranks = _clip_vocab()
        self._decoder = {i: piece for piece, i in self._encoder.items()}
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._pat = regex.compile(CLIP_PAT, regex.IGNORECASE)
        self._space = regex.compile(r"\s+")
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)
        self.n_vocab = len(self._encoder)
        self.start_token = self._encoder[CLIP_START]
        self.end_token = self._encoder[CLIP_END]

    def clean(self, text: str) -> str:
        """CLIP's text clean-up, in CLIP's order."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return self._space.sub(" ", text).strip().lower()

    def _bpe_uncached(self, piece: str) -> tuple[int, ...]:
        if piece in (CLIP_START, CLIP_END):
            return (self._encoder[piece],)
        chars = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
        word = [*chars[:-1], chars[-1] + "</w>"]
        while len(word) > 1:
            # Merge every occurrence (left to right) of the best-ranked adjacent pair.
            pair = min(zip(word, word[1:]), key=lambda p: self._ranks.get(p, len(self._ranks)))
            if pair not in self._ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(self._encoder[w] for w in word)

    def encode(self, text: str) -> list[int]:
        """CLIP ids of `text`, without start/end tokens."""
        return [i for piece in self._pat.findall(self.clean(text)) for i in self._bpe(piece)]

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [B, max_len], lens int32 [B]).

        Row = [start] + the first max_len-2 ids + [end] + zeros; lens counts start and end.
        """
        tokens = np.zeros((len(texts), self.max_len), dtype=np.int32)
        lens = np.zeros((len(texts),), dtype=np.int32)
        for b, text in enumerate(texts):
            row = [self.start_token, *self.encode(text)[: self.max_len - 2], self.end_token]
            tokens[b, : len(row)] = row
            lens[b] = len(row)
        return tokens, lens

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; every end-of-word marker becomes a space (so the text ends with one)."""
        text = "".join(self._decoder[int(i)] for i in ids)
        data = bytes(self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


# --------------------------------------------------------------------------------------------
# SentencePiece, for models trained from scratch

SPM_PAD, SPM_UNK = "<pad>", "<unk>"


class ClipTokens:
    """CLIP's BPE with the (tokens, mask) batch interface of the other tokenizers.

    What the noised CLIP reads, in training and in guidance alike: rows of [start] + ids + [end]
    right-padded with 0, mask True over start..end (`lens` = mask.sum(-1)).
    """

    pad_id = 0

    def __init__(self, max_len: int = CLIP_MAX_LEN):
        self.bpe = ClipBPE(max_len=max_len)
        self.text_ctx = max_len

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text)

    def encode_batch(self, texts: Sequence[str], text_ctx: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [B, max_len], mask bool [B, max_len]); `text_ctx` must be None or max_len."""
        if text_ctx is not None and text_ctx != self.text_ctx:
            raise ValueError(f"the CLIP tokenizer makes {self.text_ctx} tokens per caption, not {text_ctx}")
        tokens, lens = self.bpe.encode_batch(list(texts))
        return tokens, np.arange(tokens.shape[1])[None, :] < lens[:, None]

    def decode(self, ids: Iterable[int]) -> str:
        return self.bpe.decode(ids)


class SentencePieceTokenizer:
    """A SentencePiece model with a dedicated pad piece (see `train_sentencepiece`)."""

    def __init__(self, model_file: str | os.PathLike, text_ctx: int = 128):
        if not pathlib.Path(model_file).is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self.text_ctx = text_ctx
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.n_vocab = self._sp.get_piece_size()
        self.pad_id = self._sp.pad_id()
        if self.pad_id < 0:
            raise ValueError(f"{model_file}: model has no pad piece; train it with train_sentencepiece")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(
        self, texts: Sequence[str], text_ctx: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        ids = self._sp.encode(list(texts), out_type=int)
        return pad_batch(ids, self.text_ctx if text_ctx is None else text_ctx, self.pad_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def _has_caption(path: pathlib.Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(line.strip() for line in f)


def train_sentencepiece(
    captions_file: str | os.PathLike,
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    model_type: str = "unigram",
    byte_fallback: bool = True,
    max_sentences: int = 2_000_000,
    verbose: bool = False,
) -> pathlib.Path:
    """Trains a SentencePiece model on a captions file (UTF-8, one caption per line).

    Pieces: 0 = pad, 1 = unk, no start/end tokens (GLIDE uses none). Text is NFKC-normalised and
    case-folded (GLIDE's BPE lower-cases). `byte_fallback` spells unseen characters as bytes
    instead of unk; it adds 256 pieces, so it needs vocab_size > 258. At most `max_sentences`
    captions are sampled.

    Returns:
      The path of OUT_DIR/spm.model (OUT_DIR/spm.vocab is written next to it).
    """
    captions_file, out_dir = pathlib.Path(captions_file), pathlib.Path(out_dir)
    if not captions_file.is_file():
        raise FileNotFoundError(f"captions file not found: {captions_file}")
    if not _has_caption(captions_file):
        raise ValueError(f"captions file has no captions: {captions_file}")
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(captions_file),
        model_prefix=str(out_dir / "spm"),
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="nmt_nfkc_cf",
        byte_fallback=byte_fallback,
        character_coverage=0.9995 if byte_fallback else 1.0,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        pad_piece=SPM_PAD,
        unk_piece=SPM_UNK,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1,
        minloglevel=0 if verbose else 2,
    )
    return out_dir / "spm.model"


# --------------------------------------------------------------------------------------------

TOKENIZERS = {"glide_bpe": GlideBPE, "clip_bpe": ClipBPE, "sentencepiece": SentencePieceTokenizer}


def get_tokenizer(name: str, **kwargs) -> GlideBPE | ClipBPE | SentencePieceTokenizer:
    """`glide_bpe` (text_ctx), `clip_bpe` (max_len) or `sentencepiece` (model_file, text_ctx)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; expected one of {sorted(TOKENIZERS)}")
    return TOKENIZERS[name](**kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m glide_jax.tokenizer", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece model on a captions file")
    train.add_argument(
        "--captions", required=True, type=pathlib.Path, help="UTF-8, one caption per line"
    )
    train.add_argument("--vocab-size", required=True, type=int)
    train.add_argument(
        "--out", required=True, type=pathlib.Path, help="writes OUT/spm.model and spm.vocab"
    )
    train.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    train.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    enc = sub.add_parser("encode", help="print the token ids of each text, one line per text")
    enc.add_argument("--tokenizer", default="glide_bpe", choices=sorted(TOKENIZERS))
    enc.add_argument("--model-file", help="the .model file for --tokenizer sentencepiece")
    enc.add_argument("texts", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "train":
        if not args.captions.is_file():
            parser.error(f"captions file not found: {args.captions}")
        if not _has_caption(args.captions):
            parser.error(f"captions file has no captions: {args.captions}")
        print(
            f"training a {args.vocab_size}-piece {args.model_type} model on {args.captions}",
            file=sys.stderr,
        )
        try:
            path = train_sentencepiece(
                args.captions, args.vocab_size, args.out,
                model_type=args.model_type, byte_fallback=args.byte_fallback, verbose=True,
            )
        except (RuntimeError, ValueError, OSError) as e:
            print(f"error: training failed: {e}", file=sys.stderr)
            return 1
        print(f"wrote {path} and {path.with_suffix('.vocab')}", file=sys.stderr)
        return 0

    if args.tokenizer == "sentencepiece":
        if not args.model_file:
            parser.error("--tokenizer sentencepiece needs --model-file")
        if not pathlib.Path(args.model_file).is_file():
            parser.error(f"model file not found: {args.model_file}")
        tok = SentencePieceTokenizer(args.model_file)
    else:
        tok = get_tokenizer(args.tokenizer)
    for text in args.texts:
        print(" ".join(map(str, tok.encode(text))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
