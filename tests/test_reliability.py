"""Reliability and bad input (issue 7); docs/faults.md is the table of what each test shows.

Training runs are real subprocesses of `python -m glide_jax.train` on configs/test_tiny.py. One
uninterrupted baseline run (module fixture) is shared: the kill/SIGTERM chain must end bit for bit
on it, and the NaN, corrupt-checkpoint, other-model and --force_new tests start from copies of it.
Every step program is the same XLA program (same model, batch and learning rate), so after the
first run they come from the persistent compilation cache (tests/conftest.py).
"""
import hashlib
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from pt_writer import write_raw_pt
from tests.helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = "configs/test_tiny.py"
STEPS = 16
EVERY = 4
# async checkpoints (the production default) and a log line per step
COMMON = (f"--config.train.num_steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
          "--config.train.async_checkpoint=True", "--config.train.log_every=1")


def train_cmd(workdir, *extra):
    return [sys.executable, "-m", "glide_jax.train", "--config", TINY, "--workdir", str(workdir), *COMMON, *extra]


def run(cmd, *, timeout=400, env=None):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def clean_failure(proc, rc_ok=lambda rc: rc != 0):
    """Non-zero exit, and a message rather than a traceback."""
    assert rc_ok(proc.returncode), (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error" in proc.stderr.lower(), proc.stderr[-3000:]


def steps_in(workdir):
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def restore(workdir, step):
    """(state as nested dicts of numpy, data position) of a finished checkpoint, read directly."""
    mgr = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / "checkpoints",
                                item_names=("state", "data", "meta"))
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                   data=ocp.args.JsonRestore()))
    mgr.close()
    return jax.tree.map(np.asarray, out["state"]), dict(out["data"])


def tree_digest(path):
    """sha1 over every file's relative path and bytes (to show a directory was not touched)."""
    h = hashlib.sha1()
    for p in sorted(pathlib.Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def copy_workdir(src, dst):
    shutil.copytree(src, dst)
    return dst


def wait_for(predicate, proc, timeout, what):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """An uninterrupted run of STEPS steps (checkpoints at 8, 12, 16 kept; 4 rotated out)."""
    workdir = tmp_path_factory.mktemp("baseline") / "run"
    proc = run(train_cmd(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert steps_in(workdir) == [8, 12, 16]
    # a checkpoint's data position counts the batches its steps consumed (not the one read ahead)
    assert restore(workdir, 8)[1] == {"step": 8}
    return workdir


# ------------------------------------------------------------------------------- interruptions

@pytest.mark.slow
def test_kill9_then_sigterm_then_resume_equals_uninterrupted_run(baseline, tmp_path):
    """kill -9 after the first checkpoint, restart, SIGTERM, restart: same final state, bit for bit."""
    workdir = tmp_path / "run"
    rng = random.Random()
    cmd = train_cmd(workdir)

    # 1. kill -9 at a random point after the first finished checkpoint
    with open(tmp_path / "kill.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: steps_in(workdir), proc, 400, "the first checkpoint")
        time.sleep(rng.uniform(0.0, 1.5))
        assert proc.poll() is None, "the run finished before it could be killed"
        killed_after = steps_in(workdir)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert STEPS not in killed_after, killed_after

    # 2. the same command resumes from the last complete checkpoint; SIGTERM it while it trains
    log = tmp_path / "term.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: "step compiled in" in log.read_text(), proc, 400, "the step to compile")
        time.sleep(rng.uniform(0.0, 0.5))
        assert proc.poll() is None, "the run finished before SIGTERM"
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        rc = proc.wait(timeout=60)
        grace = time.time() - t0
    text = log.read_text()
    resumed = int(re.search(r"resumed from step (\d+)", text).group(1))
    assert resumed >= max(killed_after), (resumed, killed_after)
    assert rc == 0 and grace < 30, (rc, grace, text[-3000:])
    preempted = int(re.search(r"preempted: checkpoint of step (\d+) written", text).group(1))
    assert resumed < preempted <= STEPS and preempted in steps_in(workdir)

    # 3. the next start resumes from the SIGTERM checkpoint and finishes
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {preempted}" in proc.stderr

    got, got_data = restore(workdir, STEPS)
    want, want_data = restore(baseline, STEPS)
    assert got_data == want_data == {"step": STEPS}
    flat_got, flat_want = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    differ = [jax.tree_util.keystr(p) for (p, a), (_, b) in zip(flat_got, flat_want) if not np.array_equal(a, b)]
    assert not differ, f"{len(differ)} leaves differ from the uninterrupted run, e.g. {differ[:5]}"


# ------------------------------------------------------------------------------------ NaN / Inf

def test_non_finite_step_is_not_applied():
    """A batch with a NaN pixel: params, EMA and optimizer state unchanged, bad_steps counts."""
    from glide_jax.config import default_config
    from glide_jax.train_state import TrainState, learning_rate_schedule, make_optimizer
    from glide_jax.train_step import train_step

    optim = default_config().optim
    optim.warmup_steps = 1
    tx = make_optimizer(optim)

    def loss_fn(params, batch, rng, *, model, sched):
        loss = jnp.mean((batch["image"] * params["w"] - 1.0) ** 2)
        return loss, {"loss": loss}

    step = jax.jit(lambda s, b: train_step(s, b, jax.random.PRNGKey(0), loss_fn=loss_fn, model=None, sched=None,
                                           tx=tx, lr_fn=learning_rate_schedule(optim), cond_drop=0.0, pad_id=0,
                                           ema_rate=0.5))
    state = TrainState.create({"w": jnp.full((4,), 0.5)}, tx)
    good = {"image": jnp.ones((2, 4))}
    state, m = step(state, good)
    assert float(m["finite"]) == 1.0 and int(state.bad_steps) == 0
    before = jax.device_get(state)
    bad = {"image": good["image"].at[1, 2].set(jnp.nan)}
    for n in (1, 2):
        state, m = step(state, bad)
        assert float(m["finite"]) == 0.0 and int(state.bad_steps) == n
        for name in ("params", "ema_params", "opt_state"):
            jax.tree.map(np.testing.assert_array_equal, getattr(before, name), jax.device_get(getattr(state, name)))
    assert int(state.step) == int(before.step) + 2  # the step counter (and rng) still advance
    state, m = step(state, good)
    assert int(state.bad_steps) == 0
    assert not np.array_equal(np.asarray(state.params["w"]), before.params["w"])


@pytest.mark.slow
def test_divergence_stops_with_message_and_keeps_last_good_checkpoint(baseline, tmp_path):
    """lr=1e30 from the baseline's step 16: the next step blows the params up, later ones are NaN."""
    workdir = copy_workdir(baseline, tmp_path / "run")
    kept = tree_digest(workdir / "checkpoints" / "16")
    proc = run(train_cmd(workdir, "--config.optim.lr=1e30", "--config.train.max_bad_steps=3",
                         "--config.train.num_steps=40"))
    clean_failure(proc)
    m = re.search(r"stopping at step (\d+): (\d+) consecutive non-finite steps", proc.stderr)
    assert m and int(m.group(1)) > 16 and int(m.group(2)) >= 3, proc.stderr[-3000:]
    assert "The last good checkpoint is step 16" in proc.stderr
    assert steps_in(workdir) == [8, 12, 16]  # nothing written during the non-finite run
    assert tree_digest(workdir / "checkpoints" / "16") == kept
    state, _ = restore(workdir, 16)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


# --------------------------------------------------------------------------- corrupt checkpoints

def _truncate_largest(step_dir):
    f = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


@pytest.mark.slow
def test_unreadable_checkpoints_fall_back_to_the_only_good_one(baseline, tmp_path):
    """Step 16 has a truncated array file, step 12 lost two items (a save cut off on a non-atomic
    filesystem): training resumes from 8, the only readable one, and never deletes it early."""
    workdir = copy_workdir(baseline, tmp_path / "run")
    ckpts = workdir / "checkpoints"
    _truncate_largest(ckpts / "16")
    shutil.rmtree(ckpts / "12" / "data")
    shutil.rmtree(ckpts / "12" / "meta")
    damaged = {s: tree_digest(ckpts / str(s)) for s in (16, 12)}
    proc = run(train_cmd(workdir, "--config.train.num_steps=20"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for s in (16, 12):
        assert f"checkpoint at step {s} is unreadable" in proc.stderr
        # kept for inspection, byte for byte, outside the managed directory
        assert tree_digest(workdir / "checkpoints_unreadable" / str(s)) == damaged[s]
    assert "restored step 8 after skipping 2 unreadable" in proc.stderr
    assert "resumed from step 8" in proc.stderr
    # 12 and 16 trained and saved again; 8 rotated out (max_to_keep=3) only after 20 was saved
    assert steps_in(workdir) == [12, 16, 20]
    _, data = restore(workdir, 20)
    assert data == {"step": 20}


# ------------------------------------------------------------------------------- untrusted files

def test_convert_cli_refuses_malicious_pickle(tmp_path):
    import pickle

    marker = tmp_path / "marker"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    write_raw_pt(tmp_path / "evil.pt", pickle.dumps({"w": Exploit()}, protocol=2))
    (tmp_path / "h.json").write_text(json.dumps(dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", num_head_channels=32,
        attention_resolutions="8", text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2)))
    out = tmp_path / "out"
    proc = run([sys.executable, "-m", "glide_jax.convert", "--kind", "base", "--hparams", str(tmp_path / "h.json"),
                str(tmp_path / "evil.pt"), "--out", str(out)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "refused to load global" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists() and not out.exists()


def _png(color, size=(24, 20)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """4 good images with empty / huge / binary / normal captions, 2 unreadable images, 1 non-image."""
    root = tmp_path_factory.mktemp("messy")
    folder = root / "imgs"
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0)]):
        (folder / f"{i}.png").write_bytes(_png(color))
    (folder / "0.txt").write_text("")
    (folder / "1.txt").write_text("a very long caption " * 50_000)  # 1 MB
    (folder / "2.txt").write_bytes(bytes(range(256)))
    (folder / "3.txt").write_text("a yellow square")
    (folder / "cut.png").write_bytes(_png((9, 9, 9))[:40])  # truncated PNG
    (folder / "text.jpg").write_text("this is not a jpeg")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4")
    return folder, root / "tfds"


def test_messy_folder_through_pipeline(messy_folder):
    from glide_jax.data import folder as folder_lib
    from glide_jax.data import pipeline
    from glide_jax.tokenizer import get_tokenizer

    folder, data_dir = messy_folder
    cfg = dict(name=f"folder:{folder}", data_dir=str(data_dir), image_size=16, text_ctx=8, batch_size=4, seed=0)
    tok = get_tokenizer("glide_bpe", text_ctx=8)
    it = pipeline.make_dataset(cfg, "train", tokenizer=tok)
    batches = [next(it) for _ in range(2)]
    it.close()
    counts = folder_lib.skipped_counts(pipeline.get_builder(cfg))
    assert counts["corrupt"] == 2 and counts["non_image"] == 1 and counts["written"] == 4
    assert counts["truncated_caption"] == 1
    caps = {}
    for b in batches:
        assert b["image"].shape == (4, 16, 16, 3) and np.isfinite(b["image"]).all()
        assert b["tokens"].shape == (4, 8) and b["tokens"].dtype == np.int32 and b["mask"].shape == (4, 8)
        for cap, mask in zip(b["caption"], b["mask"]):
            caps[cap] = mask
    assert len(caps) == 4
    assert not caps[""].any()  # empty caption -> the unconditional (all-padding) row
    huge = next(c for c in caps if c.startswith("a very long"))
    assert len(huge.encode()) <= 1024 and caps[huge].all()  # truncated by the builder, then to text_ctx
    binary = next(c for c in caps if "\ufffd" in c)
    assert caps[binary].any()


@pytest.mark.slow
def test_messy_folder_training_force_new_and_early_sigterm(baseline, messy_folder, tmp_path):
    """One run on the messy folder in a copy of the baseline with --force_new, SIGTERM'd during set-up:
    the skip counts reach the log and metrics, the old checkpoints are moved aside (not deleted), and
    the SIGTERM ends in a checkpoint of step 1 (also a regular checkpoint step: saved once) and exit 0."""
    folder, data_dir = messy_folder
    workdir = copy_workdir(baseline, tmp_path / "run")
    old = tree_digest(workdir / "checkpoints")
    old_config = (workdir / "config.json").read_text()
    log = tmp_path / "run.log"
    cmd = train_cmd(workdir, f"--config.data.name=folder:{folder}", f"--config.data.data_dir={data_dir}",
                    "--config.train.checkpoint_every=1", "--force_new")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        wait_for(lambda: "--force_new: moved the existing checkpoints" in log.read_text(), proc, 400, "set-up")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=400)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    assert "preempted: checkpoint of step 1 written" in text
    assert steps_in(workdir) == [1]
    assert "skipped 2 unreadable and 1 non-image files" in text
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    skips = [r for r in rows if "data/corrupt" in r]
    assert len(skips) == 1 and skips[0]["data/corrupt"] == 2 and skips[0]["data/non_image"] == 1
    moved = [p for p in workdir.iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(moved) == 1  # set aside with the old run's config, not deleted
    assert (moved[0] / "config.json").read_text() == old_config
    (moved[0] / "config.json").unlink()
    assert tree_digest(moved[0]) == old


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("override, message", [
    ("--config.optim.lrr=1", 'Did you mean "lr"'),
    ("--config.optim.lr=abc", "could not convert string to float"),
    ("--config.mesh.fsdp=3", "needs 3 devices"),
    ("--config.data.batch_size=12", "not divisible by the 8 data-parallel devices"),
])
def test_bad_training_config_is_refused(tmp_path, override, message):
    workdir = tmp_path / "run"
    env = {"XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    proc = run(train_cmd(workdir, override), env=env, timeout=120)
    clean_failure(proc)
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not workdir.exists()


@pytest.mark.slow
def test_workdir_of_another_model_is_refused_untouched(baseline, tmp_path):
    workdir = copy_workdir(baseline, tmp_path / "run")
    before = tree_digest(workdir)
    proc = run(train_cmd(workdir, "--config.model.hparams.num_channels=64"))
    clean_failure(proc)
    assert "checkpoint of another model" in proc.stderr and "num_channels=32 vs 64" in proc.stderr
    assert "--force_new" in proc.stderr
    assert tree_digest(workdir) == before


def _sample(*args):
    return run([sys.executable, "-m", "glide_jax.sample", "--prompt", "a red circle", *args], timeout=120)


def _sample_here(capsys, *args):
    """`sample.main` in this process (what the CLI runs, less a process start): an uncaught
    exception fails the test, so `clean_failure` means the same as for a subprocess."""
    from glide_jax import sample
    capsys.readouterr()
    try:
        rc = sample.main(["--prompt", "a red circle", *args])
    except SystemExit as e:  # argparse
        rc = e.code
    return subprocess.CompletedProcess(args, rc, "", capsys.readouterr().err)


def test_sample_cli_bad_arguments(baseline, tmp_path, capsys):
    proc = _sample("--checkpoint", str(tmp_path / "nonexistent"))  # the real command line once
    clean_failure(proc)
    assert "does not exist" in proc.stderr
    for scale in ("abc", "nan", "-1"):
        proc = _sample_here(capsys, "--checkpoint", str(baseline), "--scale", scale)
        clean_failure(proc)
        assert "--scale" in proc.stderr
    proc = _sample_here(capsys, "--checkpoint", str(baseline), "--steps", "ddimxyz")
    clean_failure(proc)
    assert "--steps ddimxyz" in proc.stderr
    image = tmp_path / "image.png"
    Image.new("RGB", (16, 16), (10, 20, 30)).save(image)
    proc = _sample_here(capsys, "--checkpoint", str(baseline), "--inpaint", str(image), "--mask", str(image))
    clean_failure(proc)
    assert "needs an inpainting model" in proc.stderr and "'base'" in proc.stderr
    proc = _sample_here(capsys, "--checkpoint", str(baseline), "--inpaint", str(image))
    clean_failure(proc)
    assert "go together" in proc.stderr


def _fake_inpaint_checkpoint(path, size=16):
    """A converted-checkpoint directory (config.json + params/) of an inpainting model; the CLI
    checks the inputs against config.json before it reads any weight."""
    from glide_jax.experiment import hparams_with_defaults

    path.mkdir()
    (path / "params").mkdir()
    hparams = dict(hparams_with_defaults("base"), kind="base-inpaint", inpaint=True, image_size=size)
    (path / "config.json").write_text(json.dumps(hparams))
    return path


@pytest.mark.parametrize("case, message", [
    ("image-size", "image is 32x32, expected 16x16"),
    ("mask-size", "image is 16x8, expected 16x16"),
    ("mask-colour", "the mask has colours"),
    ("not-an-image", "not a readable image"),
])
def test_sample_cli_bad_inpaint_inputs(tmp_path, case, message, capsys):
    ckpt = _fake_inpaint_checkpoint(tmp_path / "inpaint")
    image, mask = tmp_path / "image.png", tmp_path / "mask.png"
    Image.new("RGB", (32, 32) if case == "image-size" else (16, 16), (10, 20, 30)).save(image)
    if case == "mask-size":
        Image.new("L", (16, 8), 255).save(mask)
    elif case == "mask-colour":
        Image.new("RGB", (16, 16), (255, 0, 0)).save(mask)
    elif case == "not-an-image":
        mask.write_text("not a png")
    else:
        Image.new("L", (16, 16), 255).save(mask)
    out = tmp_path / "out.png"
    proc = _sample_here(capsys, "--checkpoint", str(ckpt), "--inpaint", str(image), "--mask", str(mask),
                        "--out", str(out))
    clean_failure(proc)
    assert message in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_inpaint_inputs_parse():
    """The accepted case: white = keep (1), black = fill in (0), image in [-1, 1]."""
    import tempfile

    from glide_jax.sample import load_inpaint_inputs

    with tempfile.TemporaryDirectory() as d:
        image, mask = pathlib.Path(d) / "i.png", pathlib.Path(d) / "m.png"
        Image.new("RGB", (8, 8), (255, 0, 0)).save(image)
        m = Image.new("RGB", (8, 8), (255, 255, 255))
        m.paste((0, 0, 0), (0, 0, 4, 8))
        m.save(mask)
        x, keep = load_inpaint_inputs(str(image), str(mask), {"kind": "base-inpaint", "image_size": 8})
    assert x.shape == (1, 8, 8, 3) and keep.shape == (1, 8, 8, 1)
    np.testing.assert_allclose(x[0, 0, 0], [1.0, -1.0, -1.0])
    assert (keep[0, :, :4] == 0).all() and (keep[0, :, 4:] == 1).all()


# ------------------------------------------------------------------ workdir lock and a full disk

def assert_same_state(workdir, baseline, step=STEPS):
    got, got_data = restore(workdir, step)
    want, want_data = restore(baseline, step)
    assert got_data == want_data == {"step": step}
    flat_got, flat_want = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    differ = [jax.tree_util.keystr(p) for (p, a), (_, b) in zip(flat_got, flat_want) if not np.array_equal(a, b)]
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want] and not differ, differ[:5]


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_second_trainer_on_a_live_workdir_is_refused_untouched(baseline, tmp_path):
    """Two trainers on one workdir: the second exits 1 with one error line naming the holder and
    changes no byte there; the first trains on, its metrics steps strictly increasing."""
    workdir = tmp_path / "run"
    log = tmp_path / "first.log"
    with open(log, "w") as err:
        first = subprocess.Popen(train_cmd(workdir), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            wait_for(lambda: "step compiled in" in log.read_text(), first, 400, "the first trainer to compile")
            first.send_signal(signal.SIGSTOP)  # frozen: whatever changes in the workdir now is the second's doing
            before = tree_digest(workdir)
            names_before = sorted(p.name for p in workdir.rglob("*"))
            second = run(train_cmd(workdir), timeout=300)
            assert tree_digest(workdir) == before and sorted(p.name for p in workdir.rglob("*")) == names_before
        finally:
            first.send_signal(signal.SIGCONT)
        rc = first.wait(timeout=400)
    clean_failure(second, rc_ok=lambda rc: rc == 1)
    lines = error_lines(second.stderr)
    assert len(lines) == 1, second.stderr[-2000:]
    assert f"pid {first.pid}" in lines[0] and "in use by another trainer" in lines[0] and "glide_jax.train" in lines[0]
    assert rc == 0, log.read_text()[-3000:]
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    assert_same_state(workdir, baseline)
    assert not (workdir / ".glide_jax.lock").exists()  # released at the end


@pytest.mark.slow
def test_force_new_never_breaks_a_live_lock(tmp_path):
    """--force_new on a workdir another live process has locked is refused like any second trainer."""
    workdir = tmp_path / "run"
    code = ("import sys, time; from glide_jax.workdir import WorkdirLock; "
            "lock = WorkdirLock(sys.argv[1], command='python -m glide_jax.train (the holder)'); lock.acquire(); "
            "print('locked', flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree_digest(workdir)
        proc = run(train_cmd(workdir, "--force_new"), timeout=300)
        assert tree_digest(workdir) == before
    finally:
        holder.kill()
        holder.wait()
    clean_failure(proc, rc_ok=lambda rc: rc == 1)
    assert len(error_lines(proc.stderr)) == 1 and f"pid {holder.pid}" in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 160 MB (root and mount(8) needed: CI and the development machines have both)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _dir_bytes(path):
    return sum(p.stat().st_size for p in pathlib.Path(path).rglob("*") if p.is_file())


@pytest.mark.slow
def test_full_disk_stops_cleanly_then_resumes_bit_identical(baseline, small_disk, tmp_path):
    """The disk fills up before the third checkpoint: one error line saying so and naming the last
    complete checkpoint, no traceback, older checkpoints intact; after space is freed the same
    command resumes and ends on the uninterrupted run's state."""
    ckpt = _dir_bytes(baseline / "checkpoints" / "8")
    workdir = small_disk / "run"
    filler = small_disk / "filler"
    import shutil as _shutil
    free = _shutil.disk_usage(small_disk).free
    # room for two checkpoints (and metrics), not for a third: before the first save the trainer
    # asks for 1.1x the state's bytes, later for 1.1x the last checkpoint's size on disk
    state_bytes = sum(a.nbytes for a in jax.tree.leaves(restore(baseline, 8)[0]))
    room = max(2.6 * ckpt, 1.1 * state_bytes + 0.1 * ckpt)
    assert room < 3.1 * ckpt, (state_bytes, ckpt)
    filler.write_bytes(b"\0" * int(free - room))
    cmd = train_cmd(workdir, f"--config.data.data_dir={tmp_path / 'data'}")
    proc = run(cmd)
    clean_failure(proc, rc_ok=lambda rc: rc == 1)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "space" in lines[0] and "last complete checkpoint is step 8" in lines[0], lines[0]
    assert steps_in(workdir) == [4, 8]
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    filler.unlink()
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 8" in proc.stderr
    assert_same_state(workdir, baseline)
