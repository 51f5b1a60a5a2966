"""The Beam side of dataset preparation (`python -m glide_jax.data.prepare`): the per-example
code path every format shares (decode, filter, crop, resize, dedup, stats), the `Source` a format
implements, and the tfds Beam builder that writes ArrayRecord datasets; plus the folder format.
The formats' own sources live in webdataset.py and coco.py; the command line in prepare.py.
apache-beam is an optional extra; this module imports it only while preparing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator, NamedTuple

import tensorflow_datasets as tfds
from etils import epath

from glide_jax.data import folder as folder_lib

STATS_FILE = "prepare_stats.json"
COUNTER_NAMESPACE = "glide_prepare"
KEPT = "kept"
DUPLICATE = "duplicate"
NOTE = "note:"  # counted, but not a drop (e.g. "note:missing_caption": stored as "")
DEDUP_MODES = ("image", "pair", "none")
BEAM_MISSING = ("apache_beam is not installed; dataset preparation needs it:\n"
                "    pip install 'glide_jax[beam]'   (or: pip install apache-beam)")


class Item(NamedTuple):
    """One source image and its captions, as a reader yields it.

    key: unique, stable id of the image in the source; data: encoded image bytes (None when
    `drop` is set); captions: ((example key, raw caption or None), ...), one example each;
    drop: a reason that drops all of its examples before decoding ("" = none).
    """

    key: str
    data: bytes | None
    captions: tuple[tuple[str, Any], ...]
    drop: str = ""


@dataclasses.dataclass(eq=False, kw_only=True)
class PrepareConfig(tfds.core.BuilderConfig):
    """input: the source (per format); sizes: stored square resolutions.

    min_side: drop images whose shorter side is below this (0 = keep all); max_aspect: drop images
    whose long/short side ratio exceeds this (0 = keep all); min/max_caption_chars: drop examples
    whose normalised caption is shorter / longer (max 0 = no limit); dedup: "image" (same
    decoded pixels), "pair" (same pixels and caption) or "none".
    """

    input: str = ""
    sizes: tuple[int, ...] = (64,)
    min_side: int = 0
    max_aspect: float = 0.0
    min_caption_chars: int = 0
    max_caption_chars: int = 0
    dedup: str = "image"

    @classmethod
    def for_input(cls, input: str, name: str = "", **kwargs) -> "PrepareConfig":
        """A config named `name`, or after the input and a hash of it and the settings."""
        if "sizes" in kwargs:
            kwargs["sizes"] = tuple(sorted(int(s) for s in kwargs["sizes"]))
        if not name:
            key = json.dumps([input, sorted(kwargs.items())])
            digest = hashlib.sha1(key.encode()).hexdigest()[:8]
            # The last path component without wildcards: ".../cc3m/{00000..00331}.tar" -> cc3m.
            parts = [p for p in input.rstrip("/").split("/")
                     if p and not re.search(r"[*?\[{]", p)]
            stem = re.sub(r"[^a-zA-Z0-9]+", "_", parts[-1] if parts else "").strip("_")
            name = f"{stem[:40] or 'data'}_{digest}"
        return cls(name=name, input=input, **kwargs)


# ----------------------------------------------------------------------- per-example processing

def caption_reason(text: str, cfg: PrepareConfig) -> str:
    """Why a normalised caption is dropped ("" = kept)."""
    if len(text) < cfg.min_caption_chars:
        return "caption_too_short"
    if cfg.max_caption_chars and len(text) > cfg.max_caption_chars:
        return "caption_too_long"
    return ""


def image_reason(width: int, height: int, cfg: PrepareConfig) -> str:
    """Why an image of this stored size is dropped ("" = kept)."""
    short, long = min(width, height), max(width, height)
    if short < max(cfg.min_side, 1):
        return "too_small"
    if cfg.max_aspect and long > cfg.max_aspect * short:
        return "aspect"
    return ""


def process_item(item: Item, cfg: PrepareConfig) -> Iterator[tuple[str, Any]]:
    """Decodes, filters and resizes one source image.

    Yields per example either ("kept", (dedup hash, (key, example))) or (drop reason, None), and
    ("note:missing_caption", None) before a kept one without a caption (stored as "").
    """
    if item.drop:
        for _ in item.captions:
            yield item.drop, None
        return
    ok = []
    for key, raw in item.captions:
        text = folder_lib.normalize_caption(raw or "")
        reason = caption_reason(text, cfg)
        if reason:
            yield reason, None
        else:
            ok.append((key, text, raw is None))
    if not ok:
        return
    try:
        img, (w, h) = folder_lib.decode_rgb(io.BytesIO(item.data), draft_size=max(cfg.sizes))
    except folder_lib.DECODE_ERRORS as e:
        logging.debug("dropping undecodable image %s: %s", item.key, e)
        for _ in ok:
            yield "corrupt", None
        return
    reason = image_reason(w, h, cfg)
    if reason:
        for _ in ok:
            yield reason, None
        return
    images = {f"image_{s}": folder_lib.square_resize(img, s) for s in cfg.sizes}
    # Exact duplicates = identical stored images (hashing the largest is 2-10x less than the
    # decoded source, and identical sources always match).
    pixels = hashlib.sha1(images[f"image_{max(cfg.sizes)}"].tobytes()).digest()
    for key, text, missing in ok:
        if missing:
            yield NOTE + "missing_caption", None
        if cfg.dedup == "image":
            digest = pixels.hex()
        elif cfg.dedup == "pair":
            digest = hashlib.sha1(pixels + text.encode("utf-8")).hexdigest()
        else:
            digest = key
        yield KEPT, (digest, (key, {**images, "caption": text, "key": key}))


def _count(tagged: tuple[str, Any]) -> str:
    from apache_beam.metrics import Metrics

    Metrics.counter(COUNTER_NAMESPACE, tagged[0]).inc()
    return tagged[0]


def _first_by_key(group: tuple[str, Iterable[tuple[str, dict]]]) -> tuple[str, dict]:
    return min(group[1], key=lambda key_example: key_example[0])


def _duplicates(group: tuple[str, Iterable[Any]]) -> Iterator[str]:
    n = sum(1 for _ in group[1])
    for _ in range(n - 1):
        yield DUPLICATE


def _write_stats(counts: dict[str, int], path: str) -> None:
    epath.Path(path).write_text(json.dumps(summarize(counts), indent=1, sort_keys=True))


def summarize(counts: dict[str, int]) -> dict[str, Any]:
    """Raw per-tag counts -> {"seen", "kept", "dropped": {reason: n}, "notes": {...}}.
    `seen` = kept + all drops, in examples (an unreadable shard counts as one)."""
    counts = dict(counts)
    dup = counts.pop(DUPLICATE, 0)
    kept = counts.pop(KEPT, 0) - dup
    notes = {k[len(NOTE):]: v for k, v in counts.items() if k.startswith(NOTE)}
    dropped = {k: v for k, v in counts.items() if not k.startswith(NOTE)}
    if dup:
        dropped[DUPLICATE] = dup
    return {"seen": kept + sum(dropped.values()), "kept": kept, "dropped": dropped,
            "notes": notes}


def _prepare_split(pipeline, source: "Source", cfg: PrepareConfig, stats_path: str):
    """Beam: source units -> items -> processed -> deduplicated (key, example)."""
    import apache_beam as beam

    tagged = (
        pipeline
        | "Units" >> beam.Create(source.units())
        | "Expand" >> beam.FlatMap(source.expand)
        | "Spread" >> beam.Reshuffle()  # one unit (a JSON file, a folder) fans out to workers
        | "Read" >> beam.FlatMap(source.read)
        | "Process" >> beam.FlatMap(process_item, cfg)
    )
    tags = tagged | "Tags" >> beam.Map(_count)
    kept = (tagged
            | "Kept" >> beam.Filter(lambda t: t[0] == KEPT)
            | "Payload" >> beam.Map(lambda t: t[1]))
    if cfg.dedup == "none":
        examples, duplicates = kept | "Examples" >> beam.Values(), []
    else:
        groups = kept | "GroupByHash" >> beam.GroupByKey()
        examples = groups | "FirstByKey" >> beam.Map(_first_by_key)
        duplicates = [groups | "Duplicates" >> beam.FlatMap(_duplicates)]
    _ = (
        [tags, *duplicates]
        | "AllTags" >> beam.Flatten()
        | "CountTags" >> beam.combiners.Count.PerElement()
        | "ToDict" >> beam.combiners.ToDict()
        | "WriteStats" >> beam.Map(_write_stats, stats_path)
    )
    return examples


class Source:
    """How a format reads its input; instances are pickled to Beam workers.

    units() runs in the launching process and stays small (shards, annotation files, a folder);
    expand(unit) and read(task) run on workers: expand lists the tasks of a unit (e.g. the images
    of a COCO annotation file), read turns one task into `Item`s.
    """

    def splits(self) -> dict[str, "Source"]:
        """{split name: source of that split}."""
        return {"train": self}

    def units(self) -> list[Any]:
        raise NotImplementedError

    def expand(self, unit: Any) -> Iterable[Any]:
        return [unit]

    def read(self, task: Any) -> Iterable[Item]:
        raise NotImplementedError


class BeamImageText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the Beam-prepared image-text builders: subclasses define `source()` (their
    `Source` for the config's input) and may change DEDUP (the CLI's default dedup mode).

    Subclasses skip tfds' registry (`skip_registration=True`): their configs are made per input,
    so `tfds.builder(name/config)` reads a prepared one from its files, needing no code, and
    running this module as `__main__` (a second copy of it) cannot register a name twice.
    """

    DEDUP = "image"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksums file to find; tfds' lookup of one breaks for packaged builders.
        return None

    def source(self) -> Source:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if cfg is None or not cfg.input:
            raise ValueError(f"{type(self).__name__} needs config=PrepareConfig.for_input(...)")
        return folder_lib.caption_dataset_info(self, cfg.sizes, "key", f"Captioned images prepared from {cfg.input}")

    def _split_generators(self, dl_manager):
        del dl_manager
        import apache_beam as beam

        cfg = self.builder_config
        if cfg.dedup not in DEDUP_MODES:
            raise ValueError(f"dedup={cfg.dedup!r}; expected one of {DEDUP_MODES}")
        transform = beam.ptransform_fn(_prepare_split)
        return {
            split: transform(source, cfg, os.fspath(self.data_path / f"{split}-{STATS_FILE}"))
            for split, source in self.source().splits().items()
        }

    def _generate_examples(self, **kwargs):
        raise NotImplementedError("examples come from the Beam transforms of _split_generators")

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        # Runs after the Beam pipeline; the data dir is still tfds' temporary `incomplete.*` one.
        stats = {}
        for path in sorted(self.data_path.glob(f"*-{STATS_FILE}")):
            stats[path.name[:-len(STATS_FILE) - 1]] = json.loads(path.read_text())
            path.unlink()
        (self.data_path / STATS_FILE).write_text(json.dumps(stats, indent=1, sort_keys=True))
        self.info.metadata.update(stats)


def read_stats(dataset_dir: epath.PathLike) -> dict[str, Any]:
    """{split: {"seen", "kept", "dropped", "notes"}} of a prepared dataset directory."""
    return json.loads((epath.Path(dataset_dir) / STATS_FILE).read_text())


# ---------------------------------------------------------------------------- the folder format

@dataclasses.dataclass(frozen=True)
class FolderSource(Source):
    """`ImageCaptionFolder`'s layout: images + same-stem .txt files or captions.json; files
    with other extensions are dropped as "non_image"."""

    folder: str

    def units(self) -> list[str]:
        if not os.path.isdir(self.folder):
            raise folder_lib.NoImagesError(f"image folder {self.folder!r} does not exist")
        return [self.folder]

    def expand(self, unit: str) -> Iterator[tuple[str, Any]]:
        images, others = folder_lib.scan_folder(unit)
        captions = folder_lib.read_captions_json(unit)
        for rel in images:
            yield rel, folder_lib.read_caption(unit, rel, captions)
        for rel in others:
            yield rel, ""

    def read(self, task: tuple[str, Any]) -> Iterator[Item]:
        rel, raw = task
        if os.path.splitext(rel)[1].lower() not in folder_lib.IMAGE_EXTENSIONS:
            yield Item(rel, None, ((rel, raw),), drop="non_image")
            return
        try:
            with open(os.path.join(self.folder, rel), "rb") as f:
                data = f.read()
        except OSError:
            yield Item(rel, None, ((rel, raw),), drop="missing_file")
            return
        yield Item(rel, data, ((rel, raw),))


class FolderCaptions(BeamImageText, skip_registration=True):
    """A folder of captioned images (`ImageCaptionFolder`'s layout), prepared with Beam."""

    def source(self) -> Source:
        return FolderSource(os.path.abspath(os.path.expanduser(self.builder_config.input)))
