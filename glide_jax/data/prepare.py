"""Prepares image-text datasets with Apache Beam into tfds ArrayRecord datasets that training
reads without TensorFlow (`glide_jax.data.pipeline`).

    python -m glide_jax.data.prepare --format webdataset --input '/data/cc3m/{00000..00331}.tar' \\
        --data-dir /data/tfds --sizes 64,256 --min-side 128 --max-aspect 2 --direct-num-workers 8

Formats (one builder each, all on the same per-example code path):
    webdataset  img2dataset / WebDataset tar shards: KEY.jpg|png|webp + KEY.txt (+ KEY.json), a
                glob / {a..b} brace pattern / comma list of local or gs:// paths (webdataset.py)
    coco        a COCO root: annotations/captions_{train,val}<year>.json + <split><year>/ images;
                one example per (image, caption) pair (coco.py)
    folder      the plain folder format of `ImageCaptionFolder` (folder.py): images + same-stem
                .txt files or captions.json
Every example is decoded (EXIF orientation, alpha on white), filtered, centre-cropped and
area-resized to each of `sizes` (stored together as `image_<S>` uint8 features, so a base model
and its upsampler read one dataset), with its normalised `caption` (whitespace collapsed,
stripped) and source `key`. Filters, in order: unreadable input (non-image member, missing
file, unreadable shard), caption length, undecodable image, min side, aspect ratio (both on
the size stored in the file), exact duplicates (identical stored images; for COCO identical
images and caption), of which the one with the smallest key is kept, so the output depends
only on the input. Per-reason counts go to
`prepare_stats.json` in the dataset directory and to the dataset's metadata (`metadata.json`),
and live to Beam counters (namespace "glide_prepare") on runners that show them.

Training reads a prepared dataset by name with `config.data.data_dir` set to `--data-dir`
(`config.data.name = "webdataset_captions/<config>"`), or by path
(`config.data.name = "prepared:<data-dir>/webdataset_captions/<config>/1.0.0"`); the command
prints both. apache-beam is an optional extra (`pip install glide_jax[beam]`); this module
imports it only while preparing.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Sequence

import tensorflow_datasets as tfds
from etils import epath

from glide_jax.data import coco, webdataset
from glide_jax.data.beam_builder import (  # noqa: F401  (re-exported: the library's public names)
    BEAM_MISSING,
    COUNTER_NAMESPACE,
    DEDUP_MODES,
    STATS_FILE,
    BeamImageText,
    FolderCaptions,
    FolderSource,
    Item,
    PrepareConfig,
    Source,
    caption_reason,
    image_reason,
    process_item,
    read_stats,
    summarize,
)

# ---------------------------------------------------------------------------------------- CLI

FORMATS = ("webdataset", "coco", "folder")


def builder_class(fmt: str) -> type[BeamImageText]:
    builders = {"webdataset": webdataset.WebdatasetCaptions, "coco": coco.CocoCaptionPairs,
                "folder": FolderCaptions}
    if fmt not in builders:
        raise ValueError(f"format {fmt!r}; expected one of {FORMATS}")
    return builders[fmt]


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m glide_jax.data.prepare", description=__doc__.split("\n\n")[0],
        epilog="Other --flags are Apache Beam pipeline options (e.g. --runner=DataflowRunner "
               "--project=... --region=... --temp_location=gs://...); see docs/data.md.")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--input", required=True, help="shard glob / COCO root / image folder")
    p.add_argument("--data-dir", required=True, help="tfds data dir (local or gs://)")
    p.add_argument("--sizes", default="64,256", help="stored square sizes, comma-separated")
    p.add_argument("--name", default="", help="config name (default: input stem + hash)")
    p.add_argument("--min-side", type=int, default=0)
    p.add_argument("--max-aspect", type=float, default=0.0, help="long/short side; 0 = any")
    p.add_argument("--min-caption-chars", type=int, default=0)
    p.add_argument("--max-caption-chars", type=int, default=0, help="0 = no limit")
    p.add_argument("--dedup", choices=DEDUP_MODES, default=None,
                   help="default: pair for coco, image otherwise")
    p.add_argument("--eval-captions", type=int, default=0,
                   help="coco: also write N seeded random val captions to "
                        "DATA_DIR/coco_eval_captions.txt (zero-shot FID prompts)")
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")
    p.add_argument("--beam-runner", default="DirectRunner")
    p.add_argument("--direct-num-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--direct-running-mode", default="multi_processing",
                   choices=("in_memory", "multi_threading", "multi_processing"))
    return p.parse_known_args(argv)


def beam_flags(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Beam pipeline options: ours (for the DirectRunner) plus the passed-through ones."""
    if any(f.startswith("--runner") for f in extra):
        return list(extra)
    flags = [f"--runner={args.beam_runner}"]
    if args.beam_runner == "DirectRunner":
        flags += [f"--direct_num_workers={args.direct_num_workers}",
                  f"--direct_running_mode={args.direct_running_mode}",
                  # Worker processes: our per-shard progress lines, not the harness' chatter.
                  '--sdk_harness_log_level_overrides={"apache_beam": "WARNING", '
                  '"__main__": "WARNING", "absl": "WARNING"}']
    return flags + list(extra)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        print(BEAM_MISSING, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cls = builder_class(args.format)
    cfg = PrepareConfig.for_input(
        args.input, name=args.name, sizes=[int(s) for s in args.sizes.split(",")],
        min_side=args.min_side, max_aspect=args.max_aspect,
        min_caption_chars=args.min_caption_chars, max_caption_chars=args.max_caption_chars,
        dedup=args.dedup or cls.DEDUP)
    builder = cls(config=cfg, data_dir=args.data_dir, file_format="array_record")
    # tfds writes into a temporary `incomplete.*` directory and renames it when done, so the
    # dataset appears whole or not at all. --overwrite of an existing dataset: the new one is
    # built under DATA_DIR/.overwrite-<pid> while the old one stays in place, then swapped in
    # (old renamed aside, new renamed in, old deleted), so a kill before the swap leaves the old
    # dataset untouched, and one between the two renames leaves both whole.
    final, staging = epath.Path(builder.data_dir), None
    if args.overwrite and final.exists():
        staging = epath.Path(args.data_dir) / f".overwrite-{os.getpid()}"
        if staging.exists():  # left by a killed run that had this pid: never reuse it
            staging.rmtree()
        builder = cls(config=cfg, data_dir=os.fspath(staging), file_format="array_record")
    flags = beam_flags(args, extra)
    print(f"preparing {builder.name}/{cfg.name} from {args.input!r} with {' '.join(flags)}",
          flush=True)
    t0 = time.perf_counter()
    try:
        builder.download_and_prepare(  # file_format comes from the constructor (also when rebuilding)
            download_config=tfds.download.DownloadConfig(
                beam_options=PipelineOptions(flags), try_download_gcs=False,
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
        if staging is not None:
            aside = final.parent / f"{final.name}.replaced-{os.getpid()}"
            final.rename(aside)
            try:
                epath.Path(builder.data_dir).rename(final)
            except BaseException:
                aside.rename(final)
                raise
            aside.rmtree()
    finally:
        if staging is not None and staging.exists():
            staging.rmtree()
    seconds = time.perf_counter() - t0
    stats = read_stats(final)
    for split, s in stats.items():
        drops = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items())) or "none"
        notes = ", ".join(f"{k} {v}" for k, v in sorted(s["notes"].items()))
        print(f"{split}: kept {s['kept']} of {s['seen']}; dropped: {drops}"
              + (f"; notes: {notes}" if notes else ""))
    seen = sum(s["seen"] for s in stats.values())
    print(f"{seen} examples in {seconds:.1f}s ({seen / max(seconds, 1e-9):.1f} examples/s)")
    if args.eval_captions:
        if args.format != "coco":
            print("--eval-captions applies to --format coco only", file=sys.stderr)
            return 2
        path = coco.write_eval_captions(args.input, args.data_dir, args.eval_captions,
                                        args.eval_seed)
        print(f"wrote {args.eval_captions} evaluation captions to {path}")
    print("train on it with:\n"
          f"  --config.data.name={builder.name}/{cfg.name} --config.data.data_dir={args.data_dir}\n"
          f"or: --config.data.name=prepared:{final}")
    return 0


if __name__ == "__main__":
    # Run the imported module's main, so Beam pickles `glide_jax.data.prepare.*` functions by
    # reference (workers import them) rather than copies from `__main__`.
    from glide_jax.data import prepare as _prepare

    sys.exit(_prepare.main())
