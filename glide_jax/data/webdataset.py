"""`WebdatasetCaptions`: img2dataset / WebDataset tar shards, prepared with Beam (prepare.py).

A shard holds samples as consecutive members sharing a key (the member path up to the first
"." of its file name): KEY.jpg | KEY.jpeg | KEY.png | KEY.webp, KEY.txt (the caption) and
optionally KEY.json (img2dataset's metadata; its "caption" is used when there is no .txt).
`input` is a comma-separated list of paths, globs or brace patterns ("{00000..00099}.tar",
"{a,b}"), local or gs:// (read through etils epath). Example keys are "<shard path relative
to the common parent>/<KEY>". A sample without an image member is dropped as "no_image"; a
shard that cannot be read (truncated, not a tar) counts once as "unreadable_shard", after the
samples read before the error.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import posixpath
import re
import tarfile
from typing import Iterator

from etils import epath

from glide_jax.data import beam_builder as prepare

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """"a{1..3}b" -> a1b a2b a3b (zero padding kept: {008..010}); "{x,y}" -> x y."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [p for o in options for p in expand_braces(head + o + tail)]


def split_top_level(spec: str) -> list[str]:
    """Splits on the commas outside braces: "a,{b,c}" -> ["a", "{b,c}"]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    return [p.strip() for p in parts + [spec[start:]] if p.strip()]


def list_shards(spec: str) -> list[str]:
    """Sorted, de-duplicated shard paths of a comma list of paths / globs / brace patterns."""
    paths = set()
    for part in split_top_level(spec):
        for pattern in expand_braces(os.path.expanduser(part)):
            if not _GLOB_CHARS.search(pattern):
                paths.add(pattern)
                continue
            # Glob below the last directory without wildcards (epath globs gs:// too).
            parts = pattern.split("/")
            i = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
            base = "/".join(parts[:i]) or "/"
            paths.update(os.fspath(p) for p in epath.Path(base).glob("/".join(parts[i:])))
    if not paths:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return sorted(paths)


def _sample_key(name: str) -> tuple[str, str]:
    """Member path -> (sample key, lower-case extension after the first dot)."""
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem), ext.lower()


def _item(prefix: str, key: str, members: dict[str, bytes]) -> prepare.Item:
    key = f"{prefix}/{key}"
    caption = members.get("txt")
    if caption is None and "json" in members:
        try:
            caption = json.loads(members["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        return prepare.Item(key, None, ((key, caption),), drop="no_image")
    return prepare.Item(key, image, ((key, caption),))


@dataclasses.dataclass(frozen=True)
class WebdatasetSource(prepare.Source):
    spec: str

    def units(self) -> list[tuple[str, str]]:
        """(shard path, key prefix = path relative to the shards' common parent, no suffix)."""
        shards = list_shards(self.spec)
        root = os.path.dirname(os.path.commonprefix(shards)) if len(shards) > 1 else (
            os.path.dirname(shards[0]))
        logging.info("%d shards under %s", len(shards), root)
        return [(p, re.sub(r"\.tar$", "", p[len(root):].lstrip("/"))) for p in shards]

    def read(self, task: tuple[str, str]) -> Iterator[prepare.Item]:
        path, prefix = task
        n = 0
        try:
            with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                members = itertools.groupby(
                    (m for m in tar if m.isfile() and not posixpath.basename(m.name)
                     .startswith(".")),
                    key=lambda m: _sample_key(m.name)[0])
                for key, group in members:
                    files = {_sample_key(m.name)[1]: tar.extractfile(m).read() for m in group}
                    n += 1
                    yield _item(prefix, key, files)
        except (tarfile.TarError, OSError, EOFError) as e:
            logging.warning("unreadable shard %s after %d samples: %s", path, n, e)
            yield prepare.Item(path, None, ((path, ""),), drop="unreadable_shard")
            return
        logging.info("read %s: %d samples", path, n)


class WebdatasetCaptions(prepare.BeamImageText, skip_registration=True):
    """WebDataset / img2dataset tar shards of captioned images (see the module docstring)."""

    DEDUP = "image"

    def source(self) -> prepare.Source:
        return WebdatasetSource(self.builder_config.input)

