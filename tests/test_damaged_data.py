"""Damaged and unfinished prepared datasets (issue 20): a truncated, bit-flipped or missing
ArrayRecord shard is named at training start (or left out with data.skip_damaged_shards=True),
a record that fails its checksum later is named when it is read, and a half-written dataset
directory is never read as a complete one. The datasets are tiny folder datasets written by tfds
in three shards (no Beam); the preparation-killed test runs the Beam CLI."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from glide_jax.data import folder as folder_lib
from glide_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parent.parent
N_IMAGES, N_SHARDS = 12, 3
needs_beam = pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                                reason="apache_beam is not installed (pip install glide_jax[beam])")


def write_images(folder: pathlib.Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
        (folder / f"im{i:02d}.txt").write_text(f"caption {i}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> pathlib.Path:
    """The version directory of a 12-image dataset in 3 shards of 4 records."""
    root = tmp_path_factory.mktemp("prepared")
    write_images(root / "imgs", N_IMAGES)
    cfg = folder_lib.FolderConfig.for_folder(str(root / "imgs"), sizes=[32])
    builder = folder_lib.ImageCaptionFolder(config=cfg, data_dir=str(root / "tfds"), file_format="array_record")
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(num_shards=N_SHARDS))
    assert builder.info.splits["train"].shard_lengths == [4, 4, 4]
    return pathlib.Path(builder.data_dir)


@pytest.fixture
def dataset(prepared, tmp_path) -> pathlib.Path:
    """A fresh copy of the prepared dataset (a version directory) to damage."""
    return pathlib.Path(shutil.copytree(prepared, tmp_path / "copy" / prepared.name))


def shard(dataset: pathlib.Path, i: int) -> pathlib.Path:
    return next(dataset.glob(f"*-train.array_record-{i:05d}-of-{N_SHARDS:05d}"))


def data_cfg(path, **kw) -> dict:
    return dict(name=f"prepared:{path}", image_size=32, batch_size=4, seed=0, **kw)


def one_epoch(path, **kw) -> list[str]:
    """The captions of one pass over the dataset (repeat=False)."""
    it = pipeline.make_dataset(dict(data_cfg(path, **kw), batch_size=1), repeat=False)
    captions = [str(c) for batch in it for c in batch["caption"]]
    it.close()
    return captions


def flip_bit(path: pathlib.Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 0x04]))


def middle_record_offset(path: pathlib.Path, tmp: pathlib.Path) -> int:
    """A byte offset whose flip damages a record other than the shard's first and last (found by
    trying flips on a copy: the first and last records still read, reading all fails)."""
    for offset in range(64, 64 * 1024, 97):
        probe = tmp / "probe.array_record"
        shutil.copy(path, probe)
        flip_bit(probe, offset)
        reader = array_record_module.ArrayRecordReader(str(probe))
        try:
            n = reader.num_records()
            reader.read([0, n - 1])
        except RuntimeError:
            continue
        try:
            reader.read_all()
        except RuntimeError:
            return offset
    raise AssertionError("no offset inside a middle record found")


# ------------------------------------------------------------------------------------- at start

def test_intact_dataset_is_read_whole(prepared):
    captions = one_epoch(prepared)
    assert sorted(captions) == sorted(f"caption {i}" for i in range(N_IMAGES))


def test_truncated_shard_is_named_at_start(dataset):
    bad = shard(dataset, 1)
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size // 2)
    with pytest.raises(pipeline.DamagedDatasetError) as e:
        pipeline.make_dataset(data_cfg(dataset))
    msg = str(e.value)
    assert "\n" not in msg
    assert f"1 of {N_SHARDS} shards damaged: {bad}: holds 0 records where the dataset info says 4" in msg
    assert "skip_damaged_shards=True" in msg


def test_bit_flip_is_named_at_start(dataset, tmp_path):
    bad = shard(dataset, 2)
    flip_bit(bad, middle_record_offset(bad, tmp_path))
    with pytest.raises(pipeline.DamagedDatasetError, match=r"1 of 3 shards damaged: .*-00002-of-00003: does not "
                                                           r"read back \(Corrupted Riegeli.*hash mismatch"):
        pipeline.make_dataset(data_cfg(dataset))


def test_missing_shard_is_named_at_start(dataset):
    bad = shard(dataset, 0)
    bad.unlink()
    with pytest.raises(pipeline.DamagedDatasetError, match=f"{bad}: is missing"):
        pipeline.make_dataset(data_cfg(dataset))


def test_bit_flip_in_a_big_split_is_named_when_read(dataset, tmp_path, monkeypatch):
    """Above FULL_CHECK_BYTES only each shard's first and last records are read at start; a
    record that fails its chunk hash later stops with the shard's name, never a wrong batch."""
    monkeypatch.setattr(pipeline, "FULL_CHECK_BYTES", 0)
    bad = shard(dataset, 1)
    flip_bit(bad, middle_record_offset(bad, tmp_path))
    it = pipeline.make_dataset(dict(data_cfg(dataset), batch_size=1), repeat=False)  # the cheap check passes
    captions = []
    with pytest.raises(pipeline.DamagedDatasetError, match=f"of shard {bad} does not read back .*hash mismatch"):
        for batch in it:
            captions.extend(batch["caption"])
    it.close()
    assert len(captions) < N_IMAGES


def test_skip_damaged_shards_leaves_them_out_and_counts_them(dataset, prepared, caplog):
    bad = shard(dataset, 1)
    with open(bad, "r+b") as fh:
        fh.truncate(1000)  # shorter than one 64 KiB block
    intact = tfds.builder_from_directory(str(prepared))
    only_bad = [fi for fi in intact.info.splits["train"].file_instructions if fi.filename.endswith(bad.name)]
    source = pipeline.ShardSource(intact.info.features, only_bad)
    in_bad = {source[i]["caption"].decode() for i in range(len(source))}
    assert len(in_bad) == 4
    it = pipeline.make_dataset(data_cfg(dataset, skip_damaged_shards=True))
    assert [(d.path, d.records) for d in it.damaged] == [(str(bad), 4)]
    it.close()
    assert "training on the other 2 shards without their 4 records" in caplog.text
    captions = one_epoch(dataset, skip_damaged_shards=True)
    assert sorted(captions) == sorted({f"caption {i}" for i in range(N_IMAGES)} - in_bad)


def test_every_shard_damaged_is_an_error_even_when_skipping(dataset):
    for i in range(N_SHARDS):
        shard(dataset, i).unlink()
    with pytest.raises(pipeline.DamagedDatasetError, match="3 of 3 shards damaged"):
        pipeline.make_dataset(data_cfg(dataset, skip_damaged_shards=True))


def test_train_cli_prints_one_error_line(dataset, tmp_path):
    bad = shard(dataset, 0)
    with open(bad, "r+b") as fh:
        fh.truncate(bad.stat().st_size - 10)
    proc = subprocess.run([sys.executable, "-m", "glide_jax.train", "--config", "configs/test_tiny.py",
                           "--workdir", str(tmp_path / "run"), f"--config.data.name=prepared:{dataset}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{bad}: holds 0 records" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- unfinished datasets

def test_unfinished_dataset_directories_are_refused(dataset, tmp_path):
    incomplete = dataset.parent / f"incomplete.0123abcd_{dataset.name}"  # tfds' temporary name
    shutil.copytree(dataset, incomplete)
    with pytest.raises(pipeline.DamagedDatasetError, match="temporary directory of a preparation that did not"):
        pipeline.make_dataset(data_cfg(incomplete))
    (dataset / "dataset_info.json").unlink()  # tfds writes it last
    with pytest.raises(pipeline.DamagedDatasetError, match="has no dataset_info.json"):
        pipeline.make_dataset(data_cfg(dataset))
    with pytest.raises(pipeline.DamagedDatasetError, match="does not exist"):
        pipeline.make_dataset(data_cfg(tmp_path / "nothing" / "1.0.0"))


def run_prepare(folder, data_dir, *extra, **popen):
    cmd = [sys.executable, "-m", "glide_jax.data.prepare", "--format", "folder", "--input", str(folder),
           "--data-dir", str(data_dir), "--sizes", "32", "--direct-num-workers", "2",
           "--direct-running-mode", "multi_processing", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def kill_when(proc, predicate, timeout=120):
    """SIGKILL the preparation (its whole process group: Beam's worker processes too) as soon
    as `predicate()` holds; it must still be running then."""
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"finished before it could be killed: {proc.stdout.read()[-3000:]}"
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def prepared_records(path) -> list[str]:
    source = tfds.builder_from_directory(str(path)).as_data_source(split="train")
    return sorted(source[i]["key"].decode() for i in range(len(source)))


@needs_beam
@pytest.mark.slow
def test_preparation_killed_midway_is_never_read_then_rerun_completes(tmp_path):
    write_images(tmp_path / "imgs", 40)
    data_dir = tmp_path / "tfds"
    proc = run_prepare(tmp_path / "imgs", data_dir)
    kill_when(proc, lambda: any(data_dir.glob("folder_captions/*/incomplete.*")))
    assert not list(data_dir.glob("folder_captions/*/1.0.0")), "a killed preparation left a version directory"
    (incomplete,) = data_dir.glob("folder_captions/*/incomplete.*")
    with pytest.raises(pipeline.DamagedDatasetError, match="did not finish"):
        pipeline.make_dataset(data_cfg(incomplete))

    proc = run_prepare(tmp_path / "imgs", data_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    (final,) = data_dir.glob("folder_captions/*/1.0.0")
    assert prepared_records(final) == sorted(f"im{i:02d}.png" for i in range(40))
    assert sorted(one_epoch(final)) == sorted(f"caption {i}" for i in range(40))
