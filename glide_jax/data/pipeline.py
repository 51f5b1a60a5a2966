"""The TF-free input pipeline: tfds array_record files -> grain -> per-host numpy batches.

    data = make_dataset(config.data, "train", tokenizer=tok, process_index=jax.process_index(),
                        process_count=jax.process_count(), seed=config.data.seed)
    batch = make_global_batch(next(data), mesh)       # dict of batch-sharded jax.Arrays
    state = data.get_state()                          # JSON-able; data.set_state(state) resumes

Order: the split's records are shuffled globally with `seed` (a new permutation every epoch),
repeated forever, and process p takes every `process_count`-th record of that stream starting at
p, so hosts read disjoint records and together consume the global stream in order. Every random
augmentation draws from a generator seeded by (seed, stream position), so batches depend only on
(seed, split, process_index, process_count), never on timing or worker count, and restoring the
iterator state resumes at the same example.

A local batch holds (B = batch_size // process_count):
    image          float32 [B, S, S, 3] in [-1, 1]
    caption        object  [B] str (not sent to devices by `make_global_batch`)
    tokens, mask   int32 / bool [B, text_ctx]           when a tokenizer is given
    low_res        float32 [B, s, s, 3]                 when low_res_size > 0 (area downsample
                                                        of `image`, plus N(0, noise_aug_std))
    inpaint_mask   float32 [B, S, S, 1] (1 = known)     when mask != "none"
    inpaint_image  float32 [B, S, S, 3] = image * inpaint_mask

Config fields (`config.data`): name ("synthetic_shapes[/<config>]" | "folder:<path>" |
"prepared:<dataset dir>" (a tfds dataset version directory, e.g. one `glide_jax.data.prepare`
printed) | a tfds name with `image_<S>` or `image` and `caption` features, prepared as
array_record in data_dir, e.g. "webdataset_captions/<config>"), data_dir
("" = tfds' default), image_size, low_res_size (0 = none), text_ctx, batch_size (global), seed,
num_workers (grain worker processes; 0 = in-process threads), random_flip (mirrors the image and
swaps "left"/"right" in its caption, so shapes captions stay true), random_crop (a square of
0.8-1x the side of the largest stored image, resized), noise_aug_std, mask ("none" | "rect" |
"brush" | "mixed"), train_examples (synthetic_shapes only; 0 = builder default),
skip_damaged_shards (see below).

Damaged files: before the first batch every ArrayRecord shard of the split is checked
(`open_split`): it must exist, open, and hold the record count that dataset_info.json gives it
(a truncated shard loses its footer and reads as 0 records), and its first and last records
must read back, which checks those chunks' hashes. Splits of up to FULL_CHECK_BYTES are read
whole, so a flipped bit in any record is found too. In bigger splits a flipped bit in a middle
chunk is found when that record is read (ArrayRecord/Riegeli store a 64-bit hash per chunk
header and per chunk of data), and stops training with `DamagedDatasetError` naming the shard:
damaged records are never decoded into batches. A damaged shard stops training at start with one
`DamagedDatasetError` naming it, or with `data.skip_damaged_shards=True` is left out (logged, and
counted on the iterator: `DataIterator.damaged`). Not detected: a shard swapped for another
valid shard with the same record count, and flips in a shard's block padding (never read).
A `prepared:<dir>` directory must be a finished preparation (dataset_info.json, which tfds
writes last, and not tfds' temporary `incomplete.*` directory).
"""
from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import itertools
import logging
import os
import pathlib
import re
import sys
import time
from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from array_record.python import array_record_data_source, array_record_module
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw

from glide_jax import sharding
from glide_jax.data import folder as folder_lib
from glide_jax.data import shapes

MASKS = ("none", "rect", "brush", "mixed")
CROP_MIN_SCALE = 0.8  # random_crop: square side drawn from [0.8, 1] x the source side
FOLDER_PREFIX = "folder:"
PREPARED_PREFIX = "prepared:"
READ_THREADS = 4  # per process (the main one, or each grain worker)
PREFETCH_BATCHES = 8
# Splits whose records total at most this many bytes are read whole at start (every chunk hash
# checked); bigger ones have each shard's first and last record read (a few reads per shard).
FULL_CHECK_BYTES = 256 << 20
CHECK_THREADS = 16  # shards checked in parallel (remote storage: the latency, not the bytes)


class DamagedDatasetError(ValueError):
    """A prepared dataset whose files do not read back as written (the message names them)."""


def _get(cfg: Mapping[str, Any], name: str, default: Any = None) -> Any:
    value = cfg.get(name, default)
    return default if value is None else value


# ------------------------------------------------------------------------------------ builders

def get_builder(cfg: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
    """The tfds builder named by `cfg.name` (not prepared yet), reading/writing array_record."""
    name = cfg["name"]
    data_dir = _get(cfg, "data_dir", "") or None
    sizes = sorted({int(cfg["image_size"]), int(_get(cfg, "low_res_size", 0))} - {0})
    kwargs = dict(data_dir=data_dir, file_format="array_record")
    if name.startswith(PREPARED_PREFIX):
        return prepared_builder(name[len(PREPARED_PREFIX):])
    if name.startswith(FOLDER_PREFIX):
        config = folder_lib.FolderConfig.for_folder(name[len(FOLDER_PREFIX):], sizes=sizes)
        return folder_lib.ImageCaptionFolder(config=config, **kwargs)
    if name.split("/")[0] == "synthetic_shapes":
        config_name = name.split("/")[1] if "/" in name else ("64" if max(sizes) <= 64 else "256")
        config = shapes.SyntheticShapes.builder_configs[config_name]
        n = int(_get(cfg, "train_examples", 0))
        if n and n != config.num_train:
            config = dataclasses.replace(config, name=f"{config.name}_n{n}", num_train=n)
        else:
            config = config_name  # by name: tfds rejects copies of a predefined config object
        return shapes.SyntheticShapes(config=config, **kwargs)
    return tfds.builder(name, **kwargs)


def prepared_builder(path: str) -> tfds.core.DatasetBuilder:
    """The builder of a finished prepared dataset directory; DamagedDatasetError otherwise."""
    path = os.fspath(path).rstrip("/")
    what = f"prepared dataset {path}"
    if os.path.basename(path).startswith("incomplete."):
        raise DamagedDatasetError(f"{what} is tfds' temporary directory of a preparation that did not finish "
                                  "(killed?); run the preparation again and use the directory it prints")
    if not epath.Path(path).is_dir():
        raise DamagedDatasetError(f"{what} does not exist")
    if not (epath.Path(path) / "dataset_info.json").exists():
        raise DamagedDatasetError(f"{what} has no dataset_info.json (written last, when a preparation finishes): "
                                  "not a prepared dataset, or its preparation did not finish; run it again")
    try:
        builder = tfds.builder_from_directory(path)
    except (OSError, ValueError) as e:
        raise DamagedDatasetError(f"{what} cannot be read: {e}") from None
    if not builder.is_prepared():
        raise DamagedDatasetError(f"{what} is not a finished tfds dataset version directory (one named after its "
                                  "version, e.g. .../1.0.0, holding dataset_info.json and features.json)")
    return builder


@contextlib.contextmanager
def _prepare_lock(data_dir: str):
    """An exclusive lock file beside a local dataset directory (none for remote paths)."""
    if "://" in data_dir:
        yield
        return
    lock_dir = pathlib.Path(data_dir).parent
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepare(cfg: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
    """Generates the embedded datasets (shapes, folders) when missing; other tfds datasets must
    already be prepared in array_record format. Call on one process first when several share
    `data_dir`; generation is deterministic, so per-host local copies are identical."""
    builder = get_builder(cfg)
    if not builder.is_prepared():
        if not isinstance(builder, (shapes.SyntheticShapes, folder_lib.ImageCaptionFolder)):
            raise FileNotFoundError(
                f"tfds dataset {cfg['name']!r} is not prepared in {builder.data_dir}; prepare "
                "it first (`python -m glide_jax.data.prepare`, or `tfds build "
                "--file_format=array_record` for a tfds catalog dataset)")
        # Two runs started together on one data dir would both generate and race on tfds' final
        # rename: the second waits on a lock file and then finds the dataset prepared.
        with _prepare_lock(str(builder.data_dir)):
            builder = get_builder(cfg)
            if not builder.is_prepared():
                t0 = time.perf_counter()
                # tfds prints its "Downloading and preparing" banner on stdout, which belongs to
                # the tools' results (`bench --json` prints one JSON line there)
                with contextlib.redirect_stdout(sys.stderr):
                    builder.download_and_prepare(file_format="array_record")
                logging.info("prepared %s in %.1fs", builder.data_dir, time.perf_counter() - t0)
    return builder


# -------------------------------------------------------------------------------- augmentation

def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 or float [H, H, C] -> float32 [size, size, C]: box mean when H is a multiple of size,
    else PIL's box (area) filter."""
    h = image.shape[0]
    if h == size:
        return image.astype(np.float32)
    if h % size == 0:
        f = h // size
        return image.reshape(size, f, size, f, -1).mean((1, 3), dtype=np.float32)
    img = Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(img.resize((size, size), Image.BOX), np.float32)


def rect_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [S, S, 1], 1 = known; one unknown rectangle with sides in [1/4, 3/4] of S."""
    h, w = (rng.uniform(0.25, 0.75, size=2) * size).astype(int)
    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    mask = np.ones((size, size, 1), np.float32)
    mask[y:y + h, x:x + w] = 0.0
    return mask


def brush_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """float32 [S, S, 1], 1 = known; 1-4 random thick polyline strokes are unknown."""
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        width = max(1, int(rng.uniform(0.06, 0.15) * size))
        pts = [tuple(rng.uniform(0, size, size=2))]
        for _ in range(int(rng.integers(3, 8))):
            angle, step = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.3) * size
            x, y = pts[-1]
            pts.append((float(np.clip(x + step * np.cos(angle), 0, size - 1)),
                        float(np.clip(y + step * np.sin(angle), 0, size - 1))))
        draw.line(pts, fill=0, width=width, joint="curve")
    return (np.asarray(img, np.float32) / 255.0)[..., None]


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """The caption of the mirrored image: "left" <-> "right" (keeps "to the left of" true)."""
    def swap(m: re.Match) -> str:
        word = {"left": "right", "right": "left"}[m.group(0).lower()]
        return word.capitalize() if m.group(0)[0].isupper() else word

    return _LEFT_RIGHT.sub(swap, text)


def class_label(record: Mapping[str, Any]) -> int | None:
    """The class for classifier training: a stored `label`, or for synthetic shapes
    colour x shape of the first object (`shapes.NUM_OBJECTS` = 18 classes)."""
    if "label" in record:
        return int(np.asarray(record["label"]))
    if "colors" in record and "shapes" in record:
        return int(np.asarray(record["colors"])[0]) * len(shapes.SHAPES) + int(np.asarray(record["shapes"])[0])
    return None


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """One record -> one example (see the module docstring); picklable for grain workers."""

    image_size: int
    low_res_size: int = 0
    random_flip: bool = False
    random_crop: bool = False
    noise_aug_std: float = 0.0
    mask: str = "none"

    def source_image(self, record: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
        """uint8 [S, S, 3]: the stored `image_<S>`, else (or with random_crop) a square crop of
        the largest stored `image_<size>` / `image` resized to S."""
        s = self.image_size
        stored = {int(k[6:]): k for k in record if k.startswith("image_") and k[6:].isdigit()}
        if s in stored and not self.random_crop:
            return np.asarray(record[stored[s]])
        src = np.asarray(record[stored[max(stored)]] if stored else record["image"])
        h, w = src.shape[:2]
        side = min(h, w)
        y, x = (h - side) // 2, (w - side) // 2
        if self.random_crop:
            side = int(round(side * rng.uniform(CROP_MIN_SCALE, 1.0)))
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(src[y:y + side, x:x + side].squeeze()).convert("RGB")
        return folder_lib.square_resize(crop, s)

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        img = self.source_image(record, rng)
        cap = record.get("caption", b"")
        cap = cap.decode("utf-8", "replace") if isinstance(cap, bytes) else str(cap)
        if self.random_flip and rng.uniform() < 0.5:
            img = img[:, ::-1]
            cap = swap_left_right(cap)
        x = img.astype(np.float32) / 127.5 - 1.0
        out = {"image": x, "caption": cap}
        label = class_label(record)
        if label is not None:
            out["label"] = np.int32(label)
        if self.low_res_size:
            low = area_resize(img, self.low_res_size) / 127.5 - 1.0
            if self.noise_aug_std > 0:
                low = low + rng.normal(0.0, self.noise_aug_std, low.shape).astype(np.float32)
            out["low_res"] = low.astype(np.float32)
        if self.mask != "none":
            kind = self.mask if self.mask != "mixed" else ("rect", "brush")[int(rng.integers(2))]
            m = (rect_mask if kind == "rect" else brush_mask)(self.image_size, rng)
            out["inpaint_mask"] = m
            out["inpaint_image"] = x * m
        return out


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Stacks arrays; strings become an object array."""
    out = {}
    for key in examples[0]:
        values = [ex[key] for ex in examples]
        out[key] = (np.array(values, dtype=object) if isinstance(values[0], str)
                    else np.stack(values))
    return out


@dataclasses.dataclass(frozen=True)
class Tokenize:
    """Adds tokens [B, L] int32 and mask [B, L] bool for the batch's captions."""

    tokenizer: Any
    text_ctx: int

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens, mask = self.tokenizer.encode_batch(list(batch["caption"]), self.text_ctx)
        return {**batch, "tokens": np.asarray(tokens, np.int32), "mask": np.asarray(mask, bool)}


# ------------------------------------------------------------------------------------ datasets

def make_dataset(
    config: Mapping[str, Any],
    split: str = "train",
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    tokenizer: Any = None,
    repeat: bool = True,
) -> "DataIterator":
    """A checkpointable iterator of per-host numpy batches (see the module docstring).

    Args:
      config: `config.data` (or a whole config with a `data` section).
      split: a split of the dataset ("train", "validation").
      process_index, process_count: this host and the number of hosts.
      seed: shuffle/augmentation seed (default `config.seed`).
      tokenizer: `encode_batch(list[str], text_ctx) -> (tokens [B, L], mask [B, L])`; None
        leaves only `caption`.
      repeat: False = one pass over this host's records (evaluation); the last partial batch is
        dropped.
    Returns:
      A `DataIterator`: `next(it)`, `it.get_state()` ({"step": batches read}),
      `it.set_state(state)`, `it.close()`.
    """
    cfg = config["data"] if "data" in config else config
    mask = _get(cfg, "mask", "none")
    if mask not in MASKS:
        raise ValueError(f"data.mask={mask!r}; expected one of {MASKS}")
    batch_size = int(cfg["batch_size"])
    if batch_size % process_count:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by {process_count} hosts")
    seed = int(_get(cfg, "seed", 0) if seed is None else seed)

    builder = prepare(cfg)
    source, damaged = open_split(builder, split, name=cfg["name"],
                                 skip_damaged=bool(_get(cfg, "skip_damaged_shards", False)))
    if len(source) < process_count:
        raise ValueError(
            f"{cfg['name']}[{split}] has {len(source)} records for {process_count} hosts")
    ds = grain.MapDataset.source(source).seed(seed).shuffle()
    if repeat:
        ds = ds.repeat()
    ds = ds[process_index::process_count]
    ds = ds.random_map(Preprocess(
        image_size=int(cfg["image_size"]),
        low_res_size=int(_get(cfg, "low_res_size", 0)),
        random_flip=bool(_get(cfg, "random_flip", False)),
        random_crop=bool(_get(cfg, "random_crop", False)),
        noise_aug_std=float(_get(cfg, "noise_aug_std", 0.0)),
        mask=mask,
    ))
    ds = ds.batch(batch_size // process_count, drop_remainder=True, batch_fn=collate)
    if tokenizer is not None:
        ds = ds.map(Tokenize(tokenizer, int(_get(cfg, "text_ctx", 128))))
    return DataIterator(ds, int(_get(cfg, "num_workers", 0)), damaged=damaged)


# ------------------------------------------------------------------------------ damaged files

@dataclasses.dataclass(frozen=True)
class DamagedShard:
    """A shard left out by `data.skip_damaged_shards`: its path, why, and its records (per the info)."""

    path: str
    reason: str
    records: int


def check_shard(path: str, records: int, *, full: bool) -> str:
    """Why the ArrayRecord shard at `path` does not hold `records` readable records ("" = it does).

    Reads the footer (record count), the first and last records, or with `full` every record;
    each read checks its chunk's hashes.
    """
    if not epath.Path(path).exists():
        return "is missing"
    try:
        reader = array_record_module.ArrayRecordReader(
            os.fspath(path), "" if full else "readahead_buffer_size:0,max_parallelism:0")
    except (RuntimeError, OSError, ValueError) as e:  # missing, unreadable, shorter than one block
        return f"cannot be opened ({e})"
    try:
        n = reader.num_records()
        if n != records:
            return (f"holds {n} records where the dataset info says {records} (truncated, or cut off while it "
                    "was written)")
        if n:
            got = reader.read_all() if full else reader.read(sorted({0, n - 1}))
            if any(not isinstance(r, bytes) for r in got):
                return "a record does not read back"
    except (RuntimeError, OSError, ValueError, TypeError) as e:
        return f"does not read back ({e})"
    finally:
        try:
            reader.close()
        except RuntimeError:  # a reader that failed reports its failure again on close
            pass
    return ""


def open_split(builder: tfds.core.DatasetBuilder, split: str, *, name: str = "",
               skip_damaged: bool = False) -> tuple[Any, list[DamagedShard]]:
    """(random-access source of `split`'s decoded records, the damaged shards left out).

    ArrayRecord datasets: every shard is checked first (`check_shard`; whole-split reads up to
    FULL_CHECK_BYTES). A damaged shard raises `DamagedDatasetError` naming it, or with
    `skip_damaged` is left out with a warning. Records that fail to read later (a flipped bit
    in a chunk not read here) raise `DamagedDatasetError` naming the shard. Other file formats
    are read by tfds unchecked.
    """
    info = builder.info
    if info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        return builder.as_data_source(split=split), []
    name = name or info.full_name
    instructions = list(info.splits[split].file_instructions)
    full = int(info.splits[split.split("[")[0]].num_bytes or 0) <= FULL_CHECK_BYTES  # "train[:10%]" -> train
    shards = {os.fspath(fi.filename): int(fi.examples_in_shard) for fi in instructions}
    with concurrent.futures.ThreadPoolExecutor(min(CHECK_THREADS, max(len(shards), 1))) as pool:
        reasons = dict(zip(shards, pool.map(lambda kv: check_shard(kv[0], kv[1], full=full), shards.items())))
    damaged = [DamagedShard(p, r, shards[p]) for p, r in reasons.items() if r]
    if damaged:
        listed = "; ".join(f"{d.path}: {d.reason}" for d in damaged[:3])
        more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        head = f"dataset {name}[{split}]: {len(damaged)} of {len(shards)} shards damaged: {listed}{more}"
        fix = "prepare the dataset again (python -m glide_jax.data.prepare ... --overwrite)"
        if len(damaged) == len(shards):
            raise DamagedDatasetError(f"{head}; {fix}")
        if not skip_damaged:
            raise DamagedDatasetError(f"{head}; {fix}, or pass --config.data.skip_damaged_shards=True to train "
                                      "on the other shards")
        logging.warning("%s. data.skip_damaged_shards: training on the other %d shards without their %d records",
                        head, len(shards) - len(damaged), sum(d.records for d in damaged))
        bad = {d.path for d in damaged}
        instructions = [fi for fi in instructions if os.fspath(fi.filename) not in bad]
    return ShardSource(info.features, instructions, name), damaged


class ShardSource:
    """Decoded records of some shards of a split, as tfds' ArrayRecord data source reads them, with
    a `DamagedDatasetError` naming the shard when a record does not read back. Picklable."""

    def __init__(self, features, instructions: Sequence[Any], name: str = ""):
        self._features = features
        self._instructions = list(instructions)
        self._name = name
        self._records = array_record_data_source.ArrayRecordDataSource(self._instructions)
        self._ends = list(itertools.accumulate(int(fi.take) for fi in self._instructions))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index) -> Any:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        try:
            record = self._records[index]
            problem = "" if isinstance(record, bytes) else f"read as {type(record).__name__}"
        except RuntimeError as e:  # Riegeli: a chunk hash mismatch, a cut-off chunk
            problem = str(e)
        if problem:
            i = bisect.bisect_right(self._ends, index)
            fi = self._instructions[i]
            position = fi.skip + index - (self._ends[i] - int(fi.take))
            raise DamagedDatasetError(f"dataset {self._name}: record {position} of shard {os.fspath(fi.filename)} "
                                      f"does not read back ({problem}); prepare the dataset again")
        return self._features.deserialize_example_np(record)

    def __repr__(self) -> str:
        return f"ShardSource({self._name!r}, {len(self._instructions)} shards, {len(self)} records)"


class DataIterator:
    """Iterator over a batched grain MapDataset whose state is the number of batches read.

    `{"step": n}` does not depend on the worker count, so a run may resume with other
    `num_workers`; restoring re-opens the dataset at batch n (grain's random access).
    `damaged`: the shards `data.skip_damaged_shards` left out (`DamagedShard`s).
    """

    def __init__(self, batches: grain.MapDataset, num_workers: int = 0, damaged: Sequence[DamagedShard] = ()):
        self._batches = batches
        self._num_workers = num_workers
        self.damaged = list(damaged)
        self._step = 0
        self._it = None

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._it = self._open(self._step)
        batch = next(self._it)
        self._step += 1
        if self._num_workers > 0:
            # Own copies: grain's shared-memory arrays are freed now, not at interpreter exit.
            batch = {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
        return batch

    def _open(self, start: int):
        # Elements are whole batches: a few threads and a short queue (grain's defaults of 16
        # threads and 500 elements would hold hundreds of batches).
        ds = self._batches[start:].to_iter_dataset(
            grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES))
        if self._num_workers > 0:
            if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app use defaults
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        return iter(ds)

    def get_state(self) -> dict[str, int]:
        return {"step": self._step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.close()
        self._step = int(state["step"])

    def close(self) -> None:
        """Stops worker processes (if any); iteration may continue afterwards."""
        if self._it is not None:
            self._it.close()
            self._it = None


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh, batch_spec=None) -> dict:
    """Per-host numpy batch -> global jax.Arrays, leading axis sharded over the data axes.

    Args:
      local_batch: this process's batch (numeric arrays; strings are left out).
      mesh: the device mesh.
      batch_spec: PartitionSpec entry for the batch axis; default the default rules' batch axes
        (`sharding.batch_axes`).
    """
    if batch_spec is None:
        batch_spec = sharding.batch_axes(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.dtype == object or value.dtype.kind in "SU":
            continue
        where = NamedSharding(mesh, P(batch_spec, *([None] * (value.ndim - 1))))
        out[key] = jax.make_array_from_process_local_data(where, value)
    return out


def benchmark(config: Mapping[str, Any], steps: int = 50, *, tokenizer: Any = None,
              warmup: int = 3) -> float:
    """Images per second that `make_dataset` delivers on this host (after `warmup` batches)."""
    cfg = config["data"] if "data" in config else config
    it = make_dataset(cfg, "train", tokenizer=tokenizer)
    for _ in range(warmup):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        n += len(next(it)["image"])
    rate = n / (time.perf_counter() - t0)
    it.close()
    return rate
