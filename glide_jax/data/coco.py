"""`CocoCaptionPairs`: MS-COCO captions, one example per (image, caption) pair, prepared with
Beam (prepare.py); and the zero-shot FID caption set.

Layout of `input` (a COCO root, local or gs://), as the official zips unpack:
    ROOT/annotations/captions_train2014.json   ROOT/train2014/<file_name>
    ROOT/annotations/captions_val2014.json     ROOT/val2014/<file_name>
(2017 works the same; annotation files directly under ROOT too). Splits: "train" from
captions_train*, "validation" from captions_val*. Each image is decoded once and yields one
example per caption, keyed "<image_id:012d>/<annotation id>"; an image file that is missing
drops its examples as "missing_file". The default dedup mode is "pair" (an image repeats with
each of its captions by design).

Zero-shot FID (GLIDE / DALL-E protocol: captions of val2014, 30k samples):
`write_eval_captions(root, out_dir, 30_000, seed)` draws that many distinct val annotations with
a seeded generator (over annotations sorted by id, so it depends only on the file and the seed)
and writes their normalised captions to OUT_DIR/coco_eval_captions.txt, one per line, and the
matching image paths, line for line, to OUT_DIR/coco_eval_images.txt (for reference statistics).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any, Iterator

import numpy as np
from etils import epath

from glide_jax.data import folder as folder_lib
from glide_jax.data import beam_builder as prepare

EVAL_CAPTIONS_FILE = "coco_eval_captions.txt"
EVAL_IMAGES_FILE = "coco_eval_images.txt"
_ANNOTATIONS = re.compile(r"captions_(train|val)(\w*)\.json$")
_SPLITS = {"train": "train", "val": "validation"}


def find_annotations(root: str) -> dict[str, tuple[str, str]]:
    """{split: (captions json path, image folder)} of a COCO root (newest year per split)."""
    root_path = epath.Path(root)
    found = {}
    for folder in (root_path / "annotations", root_path):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            m = _ANNOTATIONS.match(path.name)
            if m:
                part, year = m.groups()
                found[_SPLITS[part]] = (os.fspath(path), os.fspath(root_path / f"{part}{year}"))
    if not found:
        raise FileNotFoundError(f"no annotations/captions_{{train,val}}*.json under {root!r}")
    return found


def load_captions(path: str) -> tuple[dict[int, str], list[dict[str, Any]]]:
    """({image id: file name}, annotations sorted by id) of a captions_*.json file."""
    data = json.loads(epath.Path(path).read_bytes().decode("utf-8", errors="replace"))
    files = {int(im["id"]): im["file_name"] for im in data["images"]}
    return files, sorted(data["annotations"], key=lambda a: int(a["id"]))


@dataclasses.dataclass(frozen=True)
class CocoSource(prepare.Source):
    root: str
    annotations: str = ""  # one split's captions json ("" = all splits of root)
    images: str = ""

    def splits(self) -> dict[str, prepare.Source]:
        return {split: CocoSource(self.root, ann, img)
                for split, (ann, img) in find_annotations(self.root).items()}

    def units(self) -> list[str]:
        return [self.annotations]

    def expand(self, unit: str) -> Iterator[tuple[int, str, list[tuple[int, str]]]]:
        """(image id, file name, [(annotation id, caption), ...]) per captioned image."""
        files, annotations = load_captions(unit)
        by_image = collections.defaultdict(list)
        for a in annotations:
            by_image[int(a["image_id"])].append((int(a["id"]), a["caption"]))
        for image_id in sorted(by_image):
            yield image_id, files.get(image_id, f"missing-{image_id}"), by_image[image_id]

    def read(self, task: tuple[int, str, list[tuple[int, str]]]) -> Iterator[prepare.Item]:
        image_id, file_name, captions = task
        key = f"{image_id:012d}"
        pairs = tuple((f"{key}/{ann_id}", text) for ann_id, text in captions)
        try:
            data = (epath.Path(self.images) / file_name).read_bytes()
        except OSError:
            yield prepare.Item(key, None, pairs, drop="missing_file")
            return
        yield prepare.Item(key, data, pairs)


class CocoCaptionPairs(prepare.BeamImageText, skip_registration=True):
    """MS-COCO (image, caption) pairs (see the module docstring)."""

    DEDUP = "pair"

    def source(self) -> prepare.Source:
        return CocoSource(self.builder_config.input)


def write_eval_captions(root: str, out_dir: str, num: int, seed: int) -> epath.Path:
    """Writes `num` seeded random val captions (+ their image paths); returns the captions file."""
    splits = find_annotations(root)
    if "validation" not in splits:
        raise FileNotFoundError(f"no captions_val*.json under {root!r}")
    ann_path, image_dir = splits["validation"]
    files, annotations = load_captions(ann_path)
    if num > len(annotations):
        raise ValueError(f"{num} evaluation captions requested; {ann_path} has "
                         f"{len(annotations)}")
    picks = np.random.default_rng(seed).choice(len(annotations), size=num, replace=False)
    chosen = [annotations[i] for i in picks]
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    captions = out / EVAL_CAPTIONS_FILE
    captions.write_text("".join(folder_lib.normalize_caption(a["caption"]) + "\n"
                                for a in chosen))
    (out / EVAL_IMAGES_FILE).write_text("".join(
        os.path.join(image_dir, files[int(a["image_id"])]) + "\n" for a in chosen))
    return captions
