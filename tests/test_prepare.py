"""Beam preparation (glide_jax.data.prepare): webdataset shards and COCO built on the fly,
prepared by the CLI in a subprocess with the multi-process DirectRunner, then read by training's
pipeline. Skipped when apache_beam is not installed (`pip install glide_jax[beam]`)."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from glide_jax.data import folder as folder_lib
from glide_jax.data import pipeline

needs_beam = pytest.mark.skipif(
    importlib.util.find_spec("apache_beam") is None,
    reason="apache_beam is not installed (pip install glide_jax[beam])")

FILTERS = ["--min-side", "64", "--max-aspect", "2", "--max-caption-chars", "200"]
N_GOOD = 210  # well-formed samples spread over the shards, before duplicates are added
# Bad samples added to the shards: reason -> count.
WEB_DROPS = {"corrupt": 7, "too_small": 6, "aspect": 5, "caption_too_long": 4, "no_image": 3,
             "duplicate": 9, "unreadable_shard": 1}
MISSING_CAPTIONS = 3  # kept, caption ""


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour field (compresses like a photo) plus noise (unique pixels)."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.int16)
    return np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_webdataset(root) -> dict:
    """Writes shards 00000-00002.tar (+ a corrupt 00003.tar) under root; returns the kept
    examples, {sample key: (caption, encoded image)}."""
    rng = np.random.default_rng(0)
    samples = []  # (key, {ext: bytes}), in shard order
    kept = {}
    formats = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    for i in range(N_GOOD):
        ext, fmt = formats[i % 3]
        h, w = int(rng.integers(72, 140)), int(rng.integers(72, 140))  # aspect < 2
        img = encode(random_image(rng, h, w), fmt)
        caption = f"  photo   number {i}\n of\tsomething "
        files = {ext: img}
        if i < MISSING_CAPTIONS:
            caption = None
        elif i % 7 == 0:
            files["json"] = json.dumps({"caption": caption, "url": f"http://x/{i}"}).encode()
        else:
            files["txt"] = caption.encode()
            files["json"] = json.dumps({"caption": "ignored: .txt wins"}).encode()
        samples.append((f"{i:06d}", files))
        kept[f"{i:06d}"] = (" ".join(caption.split()) if caption else "", img)
    bad = []
    for i in range(WEB_DROPS["corrupt"]):
        bad.append(({"jpg": b"\xff\xd8 not really a jpeg" * (i + 1), "txt": b"corrupt"}))
    for i in range(WEB_DROPS["too_small"]):
        bad.append(({"png": encode(random_image(rng, 48, 90), "PNG"), "txt": b"small"}))
    for i in range(WEB_DROPS["aspect"]):
        bad.append(({"jpg": encode(random_image(rng, 80, 200), "JPEG"), "txt": b"wide"}))
    for i in range(WEB_DROPS["caption_too_long"]):
        bad.append(({"jpg": encode(random_image(rng, 96, 96), "JPEG"), "txt": b"long " * 50}))
    for i in range(WEB_DROPS["no_image"]):
        bad.append(({"txt": b"caption without an image"}))
    for j, files in enumerate(bad):
        samples.append((f"{N_GOOD + j:06d}", files))
    # Duplicates: the bytes of earlier good samples under new keys, all in the last shard, so
    # the originals have the smaller keys and are the ones kept.
    dups = []
    for i in range(WEB_DROPS["duplicate"]):
        src_key, src_files = samples[10 * i + 5]
        ext = next(e for e in ("jpg", "png", "webp") if e in src_files)
        dups.append((f"{N_GOOD + len(bad) + i:06d}", {ext: src_files[ext], "txt": b"a copy"}))
    # Shuffle the rest over the shards so bad samples land everywhere.
    order = rng.permutation(len(samples))
    os.makedirs(root, exist_ok=True)
    for shard in range(3):
        with tarfile.open(os.path.join(root, f"{shard:05d}.tar"), "w") as tar:
            for key, files in [samples[i] for i in order[shard::3]] + (dups if shard == 2 else []):
                for ext, data in files.items():
                    add(tar, f"{key}.{ext}", data)
    with open(os.path.join(root, "00003.tar"), "wb") as f:
        f.write(b"this is not a tar file" * 100)
    return kept


def make_coco(root) -> dict:
    """A COCO-style root: 24 train images x 2-3 captions, 10 val images x 5 captions; one
    missing train file, one corrupt train file, one caption repeated on an image."""
    rng = np.random.default_rng(1)
    counts = {}
    ann_id = 1000
    os.makedirs(os.path.join(root, "annotations"))
    for part, n_images, per_image in (("train", 24, (2, 3)), ("val", 10, (5, 5))):
        folder = os.path.join(root, f"{part}2014")
        os.makedirs(folder)
        images, annotations = [], []
        for i in range(n_images):
            image_id = 100 + 7 * i
            name = f"COCO_{part}2014_{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "width": 0, "height": 0})
            for k in range(int(rng.integers(per_image[0], per_image[1] + 1))):
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id,
                                    "caption": f"A {part} picture {i}, caption {k}.\n"})
            if part == "train" and i == 0:
                continue  # missing file
            data = (b"garbage" if part == "train" and i == 1
                    else encode(random_image(rng, 100, 120), "JPEG"))
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        if part == "train":  # the same caption twice on image 2: a duplicate pair
            ann_id += 1
            annotations.append({"id": ann_id, "image_id": 114, "caption": "A train picture 2, "
                                "caption 0."})
        rng.shuffle(annotations)
        with open(os.path.join(root, "annotations", f"captions_{part}2014.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations}, f)
        per = {a["image_id"]: 0 for a in annotations}
        for a in annotations:
            per[a["image_id"]] += 1
        counts[part] = (len(annotations), per[100], per[107])
    return counts


def run_prepare(*args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "glide_jax.data.prepare", "--direct-num-workers", "2",
           "--direct-running-mode", "multi_processing", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def prepared_path(stdout: str) -> str:
    return next(line.split("prepared:", 1)[1].strip() for line in stdout.splitlines()
                if "prepared:" in line)


def records(path: str, split: str = "train") -> list[dict]:
    cfg = {"name": f"prepared:{path}", "image_size": 64}
    source = pipeline.get_builder(cfg).as_data_source(split=split)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def webdataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    expected = make_webdataset(str(root / "shards"))
    proc = run_prepare("--format", "webdataset", "--input", str(root / "shards" / "*.tar"),
                       "--data-dir", str(root / "tfds"), "--sizes", "32,64", *FILTERS)
    return root, expected, proc


@needs_beam
def test_webdataset_counts(webdataset):
    root, expected, proc = webdataset
    path = prepared_path(proc.stdout)
    stats = json.loads(open(os.path.join(path, "prepare_stats.json")).read())["train"]
    assert stats["dropped"] == WEB_DROPS, proc.stdout
    assert stats["kept"] == N_GOOD
    assert stats["seen"] == N_GOOD + sum(WEB_DROPS.values())
    assert stats["notes"] == {"missing_caption": MISSING_CAPTIONS}
    assert "train: kept 210 of 245" in proc.stdout


@needs_beam
def test_webdataset_examples(webdataset):
    root, expected, proc = webdataset
    recs = records(prepared_path(proc.stdout))
    assert len(recs) == N_GOOD
    got = {r["key"].decode().split("/")[-1]: r for r in recs}
    assert set(got) == set(expected)  # every duplicate dropped, the first key of each kept
    for key, (caption, data) in expected.items():
        r = got[key]
        assert r["caption"].decode() == caption
        img = folder_lib.decode_rgb(io.BytesIO(data), draft_size=64)[0]
        for size in (32, 64):
            np.testing.assert_array_equal(r[f"image_{size}"], folder_lib.square_resize(img, size))


@needs_beam
def test_webdataset_deterministic(webdataset, tmp_path):
    root, expected, proc = webdataset
    again = run_prepare("--format", "webdataset", "--input", str(root / "shards" / "*.tar"),
                        "--data-dir", str(tmp_path / "tfds"), "--sizes", "32,64", *FILTERS)

    def digest(path):
        recs = records(prepared_path(path))
        return [(r["key"], r["caption"], hashlib.sha1(r["image_64"].tobytes()).hexdigest())
                for r in recs]

    first, second = digest(proc.stdout), digest(again.stdout)
    assert first == second  # same order too: tfds shuffles by a hash of the key


@needs_beam
def test_training_reads_prepared(webdataset):
    root, expected, proc = webdataset
    name = next(line.split("--config.data.name=")[1].split()[0]
                for line in proc.stdout.splitlines() if "--config.data.name=" in line)
    cfg = dict(name=name, data_dir=str(root / "tfds"), image_size=64, low_res_size=32,
               text_ctx=16, batch_size=8, seed=0, num_workers=0, random_flip=True)
    it = pipeline.make_dataset(cfg)
    for _ in range(2):
        batch = next(it)
        assert batch["image"].shape == (8, 64, 64, 3) and batch["low_res"].shape == (8, 32, 32, 3)
        assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert all(isinstance(c, str) for c in batch["caption"])
    it.close()


@needs_beam
def test_training_run(webdataset, tmp_path):
    """Two steps of the real training loop on the prepared dataset (found by path)."""
    root, expected, proc = webdataset
    cmd = [sys.executable, "-m", "glide_jax.train", "--config", "configs/test_tiny.py",
           "--workdir", str(tmp_path / "run"), "--config.train.num_steps=2",
           f"--config.data.name=prepared:{prepared_path(proc.stdout)}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "2").exists()


@needs_beam
def test_folder(tmp_path):
    """The plain folder format on the same path: .txt / captions.json captions, a corrupt
    image, a non-image file and a duplicate."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "pets"
    (folder / "sub").mkdir(parents=True)
    pixels = [random_image(rng, 80, 96) for _ in range(6)]
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(folder / f"img{i}.png")
        if i % 2:
            (folder / f"img{i}.txt").write_text(f"  pet\n{i} ")
    Image.fromarray(pixels[0]).save(folder / "sub" / "copy.png")  # same pixels as img0
    (folder / "sub" / "copy.txt").write_text("a copy")
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    (folder / "captions.json").write_text(json.dumps({"img0.png": "zero", "img2.png": "two"}))
    proc = run_prepare("--format", "folder", "--input", str(folder), "--data-dir",
                       str(tmp_path / "tfds"), "--sizes", "64")
    path = prepared_path(proc.stdout)
    stats = json.loads(open(os.path.join(path, "prepare_stats.json")).read())["train"]
    assert stats == {"seen": 9, "kept": 6, "notes": {"missing_caption": 1},
                     "dropped": {"corrupt": 1, "non_image": 1, "duplicate": 1}}
    got = {r["key"].decode(): r["caption"].decode() for r in records(path)}
    assert got == {"img0.png": "zero", "img1.png": "pet 1", "img2.png": "two",
                   "img3.png": "pet 3", "img4.png": "", "img5.png": "pet 5"}


@needs_beam
def test_coco(tmp_path):
    root = str(tmp_path / "coco")
    counts = make_coco(root)
    proc = run_prepare("--format", "coco", "--input", root, "--data-dir",
                       str(tmp_path / "tfds"), "--sizes", "64", "--eval-captions", "20",
                       "--eval-seed", "3")
    path = prepared_path(proc.stdout)
    stats = json.loads(open(os.path.join(path, "prepare_stats.json")).read())
    n_train, missing, corrupt = counts["train"]
    assert stats["train"]["dropped"] == {"missing_file": missing, "corrupt": corrupt,
                                         "duplicate": 1}
    assert stats["train"]["kept"] == n_train - missing - corrupt - 1
    assert stats["validation"] == {"seen": 50, "kept": 50, "dropped": {}, "notes": {}}
    train = records(path)
    assert len(train) == stats["train"]["kept"]
    assert all(r["caption"].decode().startswith("A train picture") for r in train)
    keys = {r["key"].decode() for r in train}
    assert len(keys) == len(train) and all(len(k.split("/")[0]) == 12 for k in keys)
    val = records(path, "validation")
    assert {r["caption"].decode() for r in val} == {
        f"A val picture {i}, caption {k}." for i in range(10) for k in range(5)}
    captions = open(os.path.join(tmp_path, "tfds", "coco_eval_captions.txt")).read().split("\n")
    images = open(os.path.join(tmp_path, "tfds", "coco_eval_images.txt")).read().split("\n")
    assert len(captions) == len(images) == 21 and captions[-1] == images[-1] == ""
    assert len(set(captions[:-1])) == 20 and all(c.startswith("A val") for c in captions[:-1])
    assert all(os.path.exists(p) for p in images[:-1])
    from glide_jax.data import coco
    again = coco.write_eval_captions(root, str(tmp_path / "again"), 20, 3)
    assert again.read_text().split("\n") == captions


# ---------------------------------------------------------------- pure parts (no beam needed)

def test_expand_braces_and_list_shards(tmp_path):
    from glide_jax.data import webdataset as wds

    assert wds.expand_braces("a{008..010}.tar") == ["a008.tar", "a009.tar", "a010.tar"]
    assert wds.expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    for name in ("b/00001.tar", "b/00000.tar", "c/00000.tar"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    got = wds.list_shards(f"{tmp_path}/b/*.tar,{tmp_path}/{{b,c}}/00000.tar")
    assert got == [f"{tmp_path}/{n}" for n in ("b/00000.tar", "b/00001.tar", "c/00000.tar")]
    with pytest.raises(FileNotFoundError):
        wds.list_shards(f"{tmp_path}/none/*.tar")


def test_process_item_filters():
    from glide_jax.data import prepare

    cfg = prepare.PrepareConfig.for_input("/x/shards/*.tar", sizes=[32], min_side=40,
                                          max_aspect=2, max_caption_chars=10)
    assert cfg.name.startswith("shards_") and cfg.sizes == (32,)
    rng = np.random.default_rng(0)

    def run(img, captions):
        data = encode(img, "PNG") if img is not None else b"junk"
        return [t for t, _ in prepare.process_item(prepare.Item("k", data, captions), cfg)]

    ok = random_image(rng, 50, 60)
    assert run(ok, (("a", " fine \n cap "), ("b", None), ("c", "x" * 11))) == [
        "caption_too_long", "kept", "note:missing_caption", "kept"]
    assert run(None, (("a", "cap"),)) == ["corrupt"]
    assert run(random_image(rng, 30, 60), (("a", "cap"),)) == ["too_small"]
    assert run(random_image(rng, 41, 90), (("a", "cap"),)) == ["aspect"]
    (tag, (digest, (key, ex))), = prepare.process_item(
        prepare.Item("k", encode(ok, "PNG"), (("k", "  a\tb "),)), cfg)
    assert key == "k" and ex["caption"] == "a b" and ex["image_32"].shape == (32, 32, 3)
    assert prepare.summarize({"kept": 5, "duplicate": 2, "corrupt": 1, "note:x": 1}) == {
        "seen": 6, "kept": 3, "dropped": {"corrupt": 1, "duplicate": 2}, "notes": {"x": 1}}


def test_pipeline_does_not_import_beam():
    code = ("import sys, glide_jax.data.pipeline, glide_jax.data.webdataset, glide_jax.data.coco; "
            "assert 'apache_beam' not in sys.modules, 'beam imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_beam_message(tmp_path):
    """With apache_beam unimportable the CLI exits 2 and names the extra to install."""
    (tmp_path / "apache_beam.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "glide_jax.data.prepare", "--format", "folder",
                           "--input", str(tmp_path), "--data-dir", str(tmp_path / "d")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "glide_jax[beam]" in proc.stderr
