"""Data: the synthetic shapes builder and detector, the folder builder, the grain pipeline."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from glide_jax.data import folder as folder_lib
from glide_jax.data import pipeline
from glide_jax.data import shapes

N_TRAIN, N_VALIDATION = 64, 32


class StubTokenizer:
    """Bytes as ids; the real tokenizers share this `encode_batch` interface."""

    def encode_batch(self, texts, text_ctx):
        tokens = np.zeros((len(texts), text_ctx), np.int32)
        mask = np.zeros((len(texts), text_ctx), bool)
        for i, t in enumerate(texts):
            ids = list(t.encode())[:text_ctx]
            tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
        return tokens, mask


def data_config(data_dir, **overrides):
    cfg = dict(name="synthetic_shapes", data_dir=str(data_dir), image_size=32, low_res_size=0,
               text_ctx=16, batch_size=8, seed=0, num_workers=0, random_flip=False,
               random_crop=False, noise_aug_std=0.0, mask="none", train_examples=N_TRAIN)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny synthetic_shapes (64 train / 32 validation) where the pipeline will look."""
    path = tmp_path_factory.mktemp("tfds")
    config = pipeline.get_builder(data_config(path)).builder_config
    builder = shapes.SyntheticShapes(
        config=dataclasses.replace(config, num_validation=N_VALIDATION),
        data_dir=str(path), file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    return path


def take(it, n):
    return [next(it) for _ in range(n)]


def digests(batches):
    return [hashlib.sha1(img.tobytes()).hexdigest() for b in batches for img in b["image"]]


# ------------------------------------------------------------------------------ shapes builder

def test_builder_records(data_dir):
    builder = pipeline.get_builder(data_config(data_dir))
    assert builder.is_prepared()
    source = builder.as_data_source()
    assert len(source["train"]) == N_TRAIN and len(source["validation"]) == N_VALIDATION
    ex = source["train"][0]
    assert ex["image_32"].shape == (32, 32, 3) and ex["image_32"].dtype == np.uint8
    assert ex["image_64"].shape == (64, 64, 3)
    spec = shapes.parse_caption(ex["caption"].decode())
    n = len(spec.colors)
    assert list(ex["colors"][:n]) == list(spec.colors) and (ex["colors"][n:] == -1).all()
    assert list(ex["shapes"][:n]) == list(spec.shapes) and int(ex["relation"]) == spec.relation


@pytest.mark.parametrize("name,image_size,train_examples,config", [
    ("synthetic_shapes", 64, 0, "64"), ("synthetic_shapes", 256, 0, "256"),
    ("synthetic_shapes/256", 64, 0, "256"), ("synthetic_shapes", 32, 64, "64_n64")])
def test_builder_selection_survives_pickling(tmp_path, name, image_size, train_examples, config):
    """grain workers unpickle the builder; tfds rejects copies of predefined config objects."""
    import pickle

    cfg = data_config(tmp_path, name=name, image_size=image_size, train_examples=train_examples)
    builder = pickle.loads(pickle.dumps(pipeline.get_builder(cfg)))
    assert builder.builder_config.name == config


def test_generation_is_deterministic():
    a = shapes.example(shapes.sample_spec("train", 5), (32, 64))
    b = shapes.example(shapes.sample_spec("train", 5), (32, 64))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_heldout_captions(data_dir):
    source = pipeline.get_builder(data_config(data_dir)).as_data_source()
    train = {source["train"][i]["caption"].decode() for i in range(N_TRAIN)}
    val = {source["validation"][i]["caption"].decode() for i in range(N_VALIDATION)}
    assert not train & val
    assert all(shapes.is_heldout_spec(shapes.parse_caption(c)) for c in val)
    specs = [shapes.sample_spec("train", i) for i in range(3000)]
    assert not any(shapes.is_heldout_spec(s) for s in specs)
    # Every object and every relation still occurs in train.
    assert {(c, s) for sp in specs for c, s in zip(sp.colors, sp.shapes)} == {
        (c, s) for c in range(len(shapes.COLORS)) for s in range(len(shapes.SHAPES))}
    assert {sp.relation for sp in specs} == set(range(len(shapes.RELATIONS)))
    assert 0.08 < len(shapes.HELDOUT_SCENES) / (2 * 18 * 17) < 0.15


def test_caption_round_trip():
    for i in range(200):
        spec = shapes.sample_spec("train" if i % 2 else "validation", i)
        parsed = shapes.parse_caption(shapes.caption(spec))
        assert parsed == spec._replace(boxes=())
    assert shapes.parse_caption("A Red circle.") == shapes.Spec((0,), (0,), shapes.NONE)
    assert shapes.parse_caption("a dog") is None


@pytest.mark.parametrize("size", [32, 64])
def test_detector_recovers_rendered_specs(size):
    specs = [shapes.sample_spec(split, i) for split in ("train", "validation") for i in range(100)]
    hits = sum(shapes.matches(s, shapes.detect(shapes.render(s, size))) for s in specs)
    assert hits / len(specs) >= 0.95
    spec = specs[0]
    image = shapes.render(spec, size)
    assert shapes.adheres(shapes.caption(spec), image)
    wrong = spec._replace(colors=((spec.colors[0] + 1) % 6,) + spec.colors[1:])
    assert not shapes.adheres(shapes.caption(wrong), image)
    blank = np.full((size, size, 3), 245, np.uint8)
    assert shapes.detect(blank) == []


def test_layout_respects_relation():
    rng = np.random.default_rng(0)
    for rel in range(1, 5):
        for _ in range(50):
            spec = shapes.layout((0, 4), (0, 1), rel, rng)
            (x0, y0, s0), (x1, y1, s1) = spec.boxes
            dets = [shapes.Detection(0, 0, (x0, y0)), shapes.Detection(4, 1, (x1, y1))]
            assert shapes.relation_of(*dets) == rel
            assert all(0 <= c - s / 2 and c + s / 2 <= 1 for c, s in
                       [(x0, s0), (y0, s0), (x1, s1), (y1, s1)])


# ------------------------------------------------------------------------------------ pipeline

def test_batches(data_dir):
    it = pipeline.make_dataset(data_config(data_dir), "train", tokenizer=StubTokenizer())
    b = next(it)
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].min() < 0.5
    assert b["tokens"].shape == (8, 16) and b["tokens"].dtype == np.int32
    assert b["mask"].dtype == bool and b["mask"][:, 0].all()
    assert isinstance(b["caption"][0], str)
    assert "low_res" not in b and "inpaint_mask" not in b
    # Image and caption still agree after the pipeline.
    img = np.round((b["image"][0] + 1) * 127.5).astype(np.uint8)
    assert shapes.adheres(b["caption"][0], img)
    assert "tensorflow" not in sys.modules  # reading must never need TensorFlow


def test_determinism_and_seeds(data_dir):
    cfg = data_config(data_dir)
    a = take(pipeline.make_dataset(cfg, "train", seed=1), 10)  # > 1 epoch: reshuffles
    b = take(pipeline.make_dataset(cfg, "train", seed=1), 10)
    c = take(pipeline.make_dataset(cfg, "train", seed=2), 10)
    assert digests(a) == digests(b)
    assert digests(a) != digests(c)
    assert digests(a[:8]) != digests(a[8:]) + digests(a[:6])  # epoch 2 order differs


def test_hosts_read_disjoint_records(data_dir):
    cfg = data_config(data_dir, batch_size=8)
    per_host = [digests(take(pipeline.make_dataset(cfg, "train", process_index=p,
                                                   process_count=2), N_TRAIN // 8))
                for p in range(2)]
    assert all(len(set(h)) == N_TRAIN // 2 for h in per_host)  # one epoch, 4 per batch
    assert not set(per_host[0]) & set(per_host[1])
    assert len(set(per_host[0]) | set(per_host[1])) == N_TRAIN


def test_resume_from_state(data_dir):
    cfg = data_config(data_dir, mask="mixed", random_flip=True)
    it = pipeline.make_dataset(cfg, "train")
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # survives the JSON checkpoint item
    expected = take(it, 2)
    resumed = pipeline.make_dataset(cfg, "train")
    resumed.set_state(state)
    got = take(resumed, 2)
    for e, g in zip(expected, got):
        for key in ("image", "inpaint_mask"):
            np.testing.assert_array_equal(e[key], g[key])


def test_low_res_and_masks(data_dir):
    cfg = data_config(data_dir, image_size=64, low_res_size=32, mask="mixed", batch_size=16)
    b = next(pipeline.make_dataset(cfg, "train"))
    assert b["low_res"].shape == (16, 32, 32, 3) and b["low_res"].dtype == np.float32
    # Area downsample of the high-res image (in uint8 units, as the model will see it).
    hi = (b["image"] + 1) * 127.5
    np.testing.assert_allclose((b["low_res"] + 1) * 127.5,
                               hi.reshape(16, 32, 2, 32, 2, 3).mean((2, 4)), atol=1e-3)
    m = b["inpaint_mask"]
    assert m.shape == (16, 64, 64, 1) and set(np.unique(m)) <= {0.0, 1.0}
    assert (m.mean((1, 2, 3)) > 0.05).all() and (m.mean((1, 2, 3)) < 0.99).all()
    np.testing.assert_array_equal(b["inpaint_image"], b["image"] * m)
    noisy = next(pipeline.make_dataset(dict(cfg, noise_aug_std=0.5, mask="none"), "train"))
    assert 0.4 < np.std(noisy["low_res"] - b["low_res"]) < 0.6
    for kind in ("rect", "brush"):
        m = next(pipeline.make_dataset(dict(cfg, mask=kind, batch_size=8), "train"))["inpaint_mask"]
        assert ((m == 0).mean((1, 2, 3)) > 0).all()


def test_flip_keeps_captions_true(data_dir):
    assert pipeline.swap_left_right("Left of the right, lefty") == "Right of the left, lefty"
    cfg = data_config(data_dir, random_flip=True, batch_size=32, image_size=64)
    b = next(pipeline.make_dataset(cfg, "train"))
    plain = next(pipeline.make_dataset(dict(cfg, random_flip=False), "train"))
    flipped = [not np.array_equal(x, y) for x, y in zip(b["image"], plain["image"])]
    assert 4 < sum(flipped) < 28
    images = np.round((b["image"] + 1) * 127.5).astype(np.uint8)
    assert all(shapes.adheres(c, x) for c, x in zip(b["caption"], images))


def test_random_crop(data_dir):
    cfg = data_config(data_dir, random_crop=True)
    b = next(pipeline.make_dataset(cfg, "train"))
    plain = next(pipeline.make_dataset(dict(cfg, random_crop=False), "train"))
    assert b["image"].shape == (8, 32, 32, 3)
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert not np.array_equal(b["image"], plain["image"])
    assert list(b["caption"]) == list(plain["caption"])


def test_make_global_batch(data_dir):
    import jax

    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    local = next(pipeline.make_dataset(data_config(data_dir), "train", tokenizer=StubTokenizer()))
    batch = pipeline.make_global_batch(local, mesh)
    assert set(batch) == {"image", "tokens", "mask", "label"}  # strings stay on the host
    assert batch["image"].shape == (8, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])


def test_workers_match_in_process(data_dir):
    cfg = data_config(data_dir)
    it = pipeline.make_dataset(dict(cfg, num_workers=1), "train")
    try:
        got = take(it, 3)
        it.set_state({"step": 1})
        again = next(it)
    finally:
        it.close()
    expected = take(pipeline.make_dataset(cfg, "train"), 3)
    assert digests(got) == digests(expected)
    assert digests([again]) == digests(expected[1:2])


def test_benchmark(data_dir):
    assert pipeline.benchmark(data_config(data_dir), steps=3, warmup=1) > 0


# ------------------------------------------------------------------------------ folder builder

def _png(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "pets"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(_png((255, 0, 0)))
    (root / "a.txt").write_text("  a red\n picture ")
    Image.new("RGBA", (50, 80), (0, 0, 255, 255)).save(root / "b.webp")
    (root / "b.txt").write_bytes(b"caf\xc3\xa9 \xff\xfe binary")
    Image.new("L", (64, 64), 128).save(root / "sub" / "c.jpg")
    (root / "sub" / "c.txt").write_text("x" * 5000)
    (root / "d.png").write_bytes(_png((0, 255, 0)))  # caption from captions.json
    (root / "e.png").write_bytes(_png((0, 0, 0)))  # no caption -> ""
    (root / "captions.json").write_text(json.dumps({"d.png": "a green one"}))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (root / "notes.pdf").write_bytes(b"%PDF-1.4 not an image")
    return root


def test_folder_builder(image_folder, tmp_path):
    cfg = folder_lib.FolderConfig.for_folder(str(image_folder), sizes=(16, 32),
                                             max_caption_bytes=100)
    builder = folder_lib.ImageCaptionFolder(config=cfg, data_dir=str(tmp_path / "tfds"),
                                            file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split="train")
    records = {source[i]["filename"].decode(): source[i] for i in range(len(source))}
    assert sorted(records) == ["a.png", "b.webp", "d.png", "e.png", "sub/c.jpg"]
    caps = {k: r["caption"].decode() for k, r in records.items()}
    assert caps["a.png"] == "a red picture" and caps["d.png"] == "a green one"
    assert caps["e.png"] == "" and caps["sub/c.jpg"] == "x" * 100
    assert caps["b.webp"].startswith("café \ufffd")
    assert records["a.png"]["image_32"].shape == (32, 32, 3)
    np.testing.assert_array_equal(records["b.webp"]["image_16"][8, 8], [0, 0, 255])
    np.testing.assert_array_equal(records["sub/c.jpg"]["image_32"][0, 0], [128, 128, 128])

    reread = folder_lib.ImageCaptionFolder(config=cfg, data_dir=str(tmp_path / "tfds"))
    counts = folder_lib.skipped_counts(reread)
    assert counts["corrupt"] == 1 and counts["non_image"] == 1 and counts["written"] == 5
    assert counts["missing_caption"] == 1 and counts["truncated_caption"] == 1
    sidecar = json.loads((reread.data_path / folder_lib.SKIPPED_FILE).read_text())
    assert sidecar["files"] == {"corrupt": ["broken.png"], "non_image": ["notes.pdf"]}


def test_folder_pipeline(image_folder, tmp_path):
    cfg = data_config(tmp_path / "tfds", name=f"folder:{image_folder}", batch_size=2,
                      train_examples=0)
    b = next(pipeline.make_dataset(cfg, "train", tokenizer=StubTokenizer()))
    assert b["image"].shape == (2, 32, 32, 3) and b["tokens"].shape == (2, 16)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    cfg = data_config(tmp_path / "tfds", name=f"folder:{tmp_path / 'empty'}")
    with pytest.raises(folder_lib.NoImagesError, match="no image files"):
        pipeline.make_dataset(cfg, "train")


def test_class_label_for_classifier_training():
    """Synthetic shapes carry colour x shape of the first object as the classifier label."""
    from glide_jax.data.pipeline import class_label

    assert class_label({"label": np.int64(7)}) == 7
    record = {"colors": np.array([4, 1]), "shapes": np.array([2, 0])}
    assert class_label(record) == 4 * len(shapes.SHAPES) + 2
    assert class_label({"caption": b"x"}) is None


def _prepare_in_subprocess(data_dir, q):
    builder = pipeline.prepare(data_config(data_dir, train_examples=16))
    q.put(str(builder.data_dir))


def test_two_processes_preparing_one_dataset_do_not_race(tmp_path):
    """Two runs started together on an empty data dir: one generates, the other waits on the
    lock and reads the same prepared version (without the lock tfds' final rename collides)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_subprocess, args=(tmp_path, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    dirs = {q.get(timeout=5), q.get(timeout=5)}
    assert len(dirs) == 1 and pipeline.get_builder(data_config(tmp_path, train_examples=16)).is_prepared()


def test_preparing_prints_nothing_on_stdout(tmp_path, capsys):
    """A tool's stdout carries its result (`bench data --json`: one JSON line); tfds' banner of a
    first preparation goes to stderr."""
    builder = pipeline.prepare(data_config(tmp_path, train_examples=16))
    assert builder.is_prepared()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "preparing dataset" in captured.err
