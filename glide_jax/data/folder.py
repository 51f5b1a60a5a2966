"""`ImageCaptionFolder`: a tfds builder over a user folder of captioned images.

Layout (searched recursively, files sorted by relative path):
    folder/a.jpg + folder/a.txt            caption in a same-stem .txt file, or
    folder/captions.json                   {"a.jpg": "caption", "sub/b.png": ...}
Images (.jpg .jpeg .png .webp) are centre-cropped to a square and area-resized to every
configured size, stored like the shapes builder (`image_<size>` uint8 Tensor features) with
`caption` text. Captions: a missing or empty caption is stored as "" (the unconditional
caption); undecodable bytes become U+FFFD (errors="replace"); captions longer than
`max_caption_bytes` UTF-8 bytes are truncated. Unreadable image files and files with other
extensions are skipped and counted; the counts are logged and saved as the dataset's
metadata (`metadata.json`) and as `skipped.json` next to it. A prepared folder dataset is not
rebuilt when files change: delete its directory under data_dir to re-read the folder.

    builder = ImageCaptionFolder(config=FolderConfig.for_folder("/data/pets", sizes=(64,)),
                                 data_dir=..., file_format="array_record")
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
CAPTIONS_FILE = "captions.json"
SKIPPED_FILE = "skipped.json"


class NoImagesError(ValueError):
    """The folder holds no image files."""


@dataclasses.dataclass(eq=False, kw_only=True)
class FolderConfig(tfds.core.BuilderConfig):
    """folder: the image folder; sizes: stored square resolutions.

    validation_fraction: share of files (chosen by a hash of the relative path, so stable as
    files are added) that go to a `validation` split instead of `train`.
    """

    folder: str = ""
    sizes: tuple[int, ...] = (64,)
    max_caption_bytes: int = 1024
    validation_fraction: float = 0.0

    @classmethod
    def for_folder(cls, folder: str, sizes=(64,), **kwargs) -> "FolderConfig":
        """A config named after the folder (and a hash of its absolute path and settings)."""
        folder = os.path.abspath(os.path.expanduser(folder))
        sizes = tuple(int(s) for s in sizes)
        key = json.dumps([folder, sizes, sorted(kwargs.items())])
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        stem = re.sub(r"[^a-zA-Z0-9_]+", "_", os.path.basename(folder)) or "root"
        return cls(name=f"{stem}_{digest}", folder=folder, sizes=sizes, **kwargs)


def square_resize(img: Image.Image, size: int) -> np.ndarray:
    """Centre-crops to a square and resizes to [size, size, 3] uint8 (box = area filter when
    shrinking, bicubic when enlarging)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BOX if side > size else Image.BICUBIC)
    return np.asarray(img, np.uint8)


def decode_rgb(src, draft_size: int = 0) -> tuple[Image.Image, tuple[int, int]]:
    """Decodes an image (a path or a binary file object) to RGB: EXIF orientation applied, alpha
    composited on white. Returns (image, (width, height) as stored in the file).

    draft_size > 0 lets the JPEG decoder shrink by 2/4/8 while both sides stay >= draft_size,
    several times faster for large photos that are resized to draft_size anyway.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(src) as img:
            size = img.size
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(canvas, img)
    return img.convert("RGB"), size


def load_rgb(path: str) -> Image.Image:
    """Decodes an image file to RGB (see `decode_rgb`)."""
    return decode_rgb(path)[0]


# What a corrupt, truncated or hostile image file raises while decoding.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning,
                 Image.DecompressionBombError)


def normalize_caption(raw: bytes | str) -> str:
    """Decodes (invalid UTF-8 -> U+FFFD), drops NULs, collapses whitespace runs and strips."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)
    return " ".join(text.replace("\x00", " ").split())


def clean_caption(raw: bytes | str, max_bytes: int) -> tuple[str, bool]:
    """Decodes (invalid UTF-8 -> U+FFFD), collapses whitespace and truncates to `max_bytes`
    UTF-8 bytes. Returns (caption, whether it was truncated)."""
    text = normalize_caption(raw)
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text, False
    return data[:max_bytes].decode("utf-8", errors="ignore"), True  # never split a character


def scan_folder(folder: str) -> tuple[list[str], list[str]]:
    """Sorted relative paths of (image files, other files) under `folder`; caption files and
    hidden files are neither."""
    images, others = [], []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(root, name), folder)
            ext = os.path.splitext(name)[1].lower()
            if name.startswith(".") or ext == ".txt" or rel == CAPTIONS_FILE:
                continue
            (images if ext in IMAGE_EXTENSIONS else others).append(rel)
    return images, others


def read_captions_json(folder: str) -> dict:
    """The folder's captions.json mapping ({} when absent)."""
    path = os.path.join(folder, CAPTIONS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        return json.loads(f.read().decode("utf-8", errors="replace"))


def read_caption(folder: str, rel: str, captions: dict, max_read: int = 1 << 20
                 ) -> bytes | str | None:
    """The raw caption of image `rel`: its same-stem .txt file (at most `max_read` bytes), else
    its entry (by relative path, then by file name) in `captions`; None when it has neither."""
    txt = os.path.join(folder, os.path.splitext(rel)[0] + ".txt")
    if os.path.exists(txt):
        with open(txt, "rb") as f:
            return f.read(max_read)
    raw = captions.get(rel, captions.get(os.path.basename(rel)))
    return None if raw is None else str(raw)


def caption_dataset_info(builder, sizes, id_field: str, description: str) -> tfds.core.DatasetInfo:
    """DatasetInfo of the image-caption builders: uint8 `image_<S>` per size (stored as raw
    bytes: no TensorFlow needed to write them), `caption` and a text id field."""
    features = {
        f"image_{s}": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8, encoding="bytes") for s in sizes
    }
    features.update({"caption": tfds.features.Text(), id_field: tfds.features.Text()})
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
    )


class ImageCaptionFolder(tfds.core.GeneratorBasedBuilder):
    """Images + captions from a local folder (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # No checksums file to find; tfds' lookup of one needs `importlib_resources`.
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        if cfg is None or not cfg.folder:
            raise ValueError("ImageCaptionFolder needs config=FolderConfig.for_folder(path)")
        return caption_dataset_info(self, cfg.sizes, "filename", f"Captioned images from {cfg.folder}")

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        if not os.path.isdir(cfg.folder):
            raise NoImagesError(f"image folder {cfg.folder!r} does not exist")
        images, others = scan_folder(cfg.folder)
        if not images:
            raise NoImagesError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {cfg.folder!r}"
                f" ({len(others)} other files)"
            )
        captions = read_captions_json(cfg.folder)
        self._counts = {"images": len(images), "non_image": len(others), "corrupt": 0,
                        "missing_caption": 0, "truncated_caption": 0}
        self._skipped = {"non_image": others, "corrupt": []}
        val = [p for p in images if _hash_fraction(p) < cfg.validation_fraction]
        val_set = set(val)
        splits = {"train": [p for p in images if p not in val_set]}
        if val:
            splits["validation"] = val
        return {name: self._generate_examples(paths, captions) for name, paths in splits.items()}

    def _caption(self, rel: str, captions: dict) -> str:
        cfg = self.builder_config
        # A huge .txt file is never read whole.
        raw = read_caption(cfg.folder, rel, captions, 4 * cfg.max_caption_bytes + 64)
        if raw is None:
            self._counts["missing_caption"] += 1
            return ""
        text, truncated = clean_caption(raw, cfg.max_caption_bytes)
        self._counts["truncated_caption"] += truncated
        return text

    def _generate_examples(self, paths, captions):
        cfg = self.builder_config
        for rel in paths:
            try:
                img = load_rgb(os.path.join(cfg.folder, rel))
            except DECODE_ERRORS as e:
                logging.warning("skipping unreadable image %s: %s", rel, e)
                self._counts["corrupt"] += 1
                self._skipped["corrupt"].append(rel)
                continue
            ex = {f"image_{s}": square_resize(img, s) for s in cfg.sizes}
            ex.update(caption=self._caption(rel, captions), filename=rel)
            yield rel, ex

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        counts = dict(self._counts)
        counts["written"] = counts["images"] - counts["corrupt"]
        logging.warning(
            "ImageCaptionFolder %s: %d examples written; skipped %d corrupt and %d non-image "
            "files; %d missing captions (-> \"\")",
            self.builder_config.folder, counts["written"], counts["corrupt"],
            counts["non_image"], counts["missing_caption"])
        self.info.metadata.update(counts)
        # The data dir is still the temporary `incomplete.*` one here; tfds renames it after.
        with open(os.path.join(self.data_path, SKIPPED_FILE), "w") as f:
            json.dump({"counts": counts, "files": self._skipped}, f, indent=1)


def _hash_fraction(rel: str) -> float:
    return int(hashlib.md5(rel.encode()).hexdigest()[:8], 16) / 2**32


def skipped_counts(builder: ImageCaptionFolder) -> dict:
    """The skip counts of a prepared folder dataset."""
    return dict(builder.info.metadata)
