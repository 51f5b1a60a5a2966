"""Atomic outputs (issue 20): sample PNGs, converted checkpoints and prepared datasets appear
whole or not at all. A write that fails part-way (the writer patched to raise after writing some
bytes) or a process killed mid-write (SIGKILL from inside the writer) leaves the final path with
the old content, the whole new content, or nothing, and never a part that later loads."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from glide_jax import convert, images

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_beam = pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                                reason="apache_beam is not installed (pip install glide_jax[beam])")


def picture(value: int) -> np.ndarray:
    return np.full((8, 8, 3), value, np.uint8)


def failing_save(self, fp, *args, **kwargs):
    """PIL's Image.save that writes a few bytes, then fails (a full disk, an I/O error)."""
    fp.write(b"\x89PNG\r\n\x1a\n partial")
    raise OSError(28, "No space left on device")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


# ------------------------------------------------------------------------------------- PNGs

def test_save_png_failing_write_keeps_the_old_file_or_none(tmp_path, monkeypatch):
    path = tmp_path / "samples" / "grid.png"
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", failing_save)
        with pytest.raises(OSError):
            images.save_png(path, picture(10))
    assert not path.exists() and os.listdir(path.parent) == []  # nothing, not even a temporary file

    images.save_png(path, picture(10))
    old = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", failing_save)
        with pytest.raises(OSError):
            images.save_png(path, picture(200))
    assert path.read_bytes() == old and os.listdir(path.parent) == ["grid.png"]

    images.save_png(path, picture(200))
    assert (images.load_image(path) == 200).all() and os.listdir(path.parent) == ["grid.png"]


def test_save_png_killed_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "grid.png"
    images.save_png(path, picture(10))
    old = path.read_bytes()
    proc = run_python(f"""
        import os, signal
        import numpy as np
        from PIL import Image
        from glide_jax import images

        def save(self, fp, *args, **kwargs):
            fp.write(b"\\x89PNG\\r\\n\\x1a\\n partial")
            fp.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        Image.Image.save = save
        images.save_png({str(path)!r}, np.full((8, 8, 3), 200, np.uint8))
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert path.read_bytes() == old
    assert (images.load_image(path) == 10).all()


# ------------------------------------------------------------------------ converted checkpoints

HP_OLD, HP_NEW = {"kind": "base", "version": "old"}, {"kind": "base", "version": "new"}
P_OLD = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
P_NEW = {"w": -np.arange(6, dtype=np.float32).reshape(2, 3)}


def loads_as(out, hparams, params) -> None:
    got_h, got_p = convert.load_converted(str(out))
    assert got_h == hparams
    np.testing.assert_array_equal(np.asarray(got_p["w"]), params["w"])


def siblings(out) -> list[str]:
    return sorted(os.listdir(pathlib.Path(out).parent))


def test_save_converted_failing_write_leaves_nothing_or_the_old(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"

    def failing(self, directory, *args, **kwargs):
        pathlib.Path(directory).mkdir(parents=True)
        (pathlib.Path(directory) / "partial").write_bytes(b"half an array")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(convert.ocp.StandardCheckpointer, "save", failing)
        with pytest.raises(OSError):
            convert.save_converted(str(out), HP_NEW, P_NEW)
    assert siblings(out) == []  # no DIR, no DIR.tmp-*

    convert.save_converted(str(out), HP_OLD, P_OLD)
    with monkeypatch.context() as m:
        m.setattr(convert.ocp.StandardCheckpointer, "save", failing)
        with pytest.raises(OSError):
            convert.save_converted(str(out), HP_NEW, P_NEW, force=True)
    loads_as(out, HP_OLD, P_OLD)
    assert siblings(out) == ["ckpt"]

    # moving the new checkpoint in fails half-way: the old one is put back
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src) == "config.json" and ".tmp-" in src:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    with monkeypatch.context() as m:
        m.setattr(convert.os, "rename", rename)
        with pytest.raises(OSError):
            convert.save_converted(str(out), HP_NEW, P_NEW, force=True)
    loads_as(out, HP_OLD, P_OLD)
    assert siblings(out) == ["ckpt"]

    convert.save_converted(str(out), HP_NEW, P_NEW, force=True)
    loads_as(out, HP_NEW, P_NEW)
    assert siblings(out) == ["ckpt"] and sorted(os.listdir(out)) == ["config.json", "params"]


def test_save_converted_killed_while_replacing_never_loads_half(tmp_path):
    """SIGKILL after the new params moved in but before its config.json: DIR does not load (no
    config.json, so never old hyper-parameters with new weights); the old one is whole in DIR.old-*."""
    out = tmp_path / "ckpt"
    convert.save_converted(str(out), HP_OLD, P_OLD)
    proc = run_python(f"""
        import os, signal
        import numpy as np
        from glide_jax import convert

        real_rename = os.rename

        def rename(src, dst):
            if os.path.basename(src) == "config.json" and ".tmp-" in src:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(src, dst)

        convert.os.rename = rename
        convert.save_converted({str(out)!r}, {HP_NEW!r}, {{"w": -np.arange(6, dtype=np.float32).reshape(2, 3)}},
                               force=True)
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "config.json").exists()
    with pytest.raises(FileNotFoundError):
        convert.load_converted(str(out))
    (old,) = [tmp_path / n for n in siblings(out) if n.startswith("ckpt.old-")]
    loads_as(old, HP_OLD, P_OLD)
    convert.save_converted(str(out), HP_NEW, P_NEW, force=True)  # the rerun completes
    loads_as(out, HP_NEW, P_NEW)


# ----------------------------------------------------------------------------- prepared datasets

def prepare_cmd(folder, data_dir, *extra):
    return [sys.executable, "-m", "glide_jax.data.prepare", "--format", "folder", "--input", str(folder),
            "--data-dir", str(data_dir), "--sizes", "32", "--direct-num-workers", "2",
            "--direct-running-mode", "multi_processing", "--name", "pets", *extra]


def keys(path) -> list[str]:
    source = tfds.builder_from_directory(str(path)).as_data_source(split="train")
    return sorted(source[i]["key"].decode() for i in range(len(source)))


def write_images(folder, start, stop) -> list[str]:
    folder.mkdir(exist_ok=True)
    for i in range(start, stop):
        value = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(value).save(folder / f"im{i:02d}.png")
    return sorted(p.name for p in folder.iterdir())


@needs_beam
@pytest.mark.slow
def test_prepare_overwrite_keeps_the_old_dataset_until_the_new_one_is_complete(tmp_path):
    folder, data_dir = tmp_path / "imgs", tmp_path / "tfds"
    old = write_images(folder, 0, 30)
    proc = subprocess.run(prepare_cmd(folder, data_dir), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = data_dir / "folder_captions" / "pets" / "1.0.0"
    assert keys(final) == old

    # an --overwrite that fails (its input is gone): the old dataset stays, nothing is left over
    proc = subprocess.run(prepare_cmd(tmp_path / "gone", data_dir, "--overwrite"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert keys(final) == old and os.listdir(final.parent) == ["1.0.0"]
    assert not list(data_dir.glob(".overwrite-*"))

    # an --overwrite killed while it builds: the old dataset is untouched at the final path
    new = write_images(folder, 30, 36)
    proc = subprocess.Popen(prepare_cmd(folder, data_dir, "--overwrite"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not list(data_dir.glob(".overwrite-*/folder_captions/pets/incomplete.*")):
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() - t0 < 120
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert keys(final) == old and os.listdir(final.parent) == ["1.0.0"]

    # the next --overwrite replaces it
    proc = subprocess.run(prepare_cmd(folder, data_dir, "--overwrite"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"prepared:{final}" in proc.stdout
    assert keys(final) == new and len(new) == 36 and os.listdir(final.parent) == ["1.0.0"]
