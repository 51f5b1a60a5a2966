"""glide_jax.workdir: the workdir lock (live, stale, concurrent takeover) and the disk-space helpers."""
from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from glide_jax import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _snapshot(d: pathlib.Path) -> dict[str, tuple[bytes, int]]:
    """Every file (and the directory itself) with its bytes and mtime: what "unchanged" means."""
    snap = {".": (b"", d.stat().st_mtime_ns)}
    for p in sorted(d.rglob("*")):
        snap[str(p.relative_to(d))] = (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
    return snap


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process now (reuse within the test is improbable)
    return proc.pid


def _write_lock(d: pathlib.Path, **fields) -> pathlib.Path:
    now = time.time()
    rec = {"host": socket.gethostname(), "pid": 1, "start_time": "2020-01-01T00:00:00+00:00",
           "start_unix": now, "command": "old trainer", "heartbeat_unix": now, "heartbeat_s": 1.0}
    rec.update(fields)
    path = d / wd.LOCK_NAME
    path.write_text(json.dumps(rec))
    return path


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


HOLDER = """
    import sys, time
    from glide_jax.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1], heartbeat_s=60.0, command="train --holder")
    lock.acquire()
    print("ready", flush=True)
    time.sleep(60)  # killed by the test
"""


def test_acquire_creates_workdir_and_release_removes_lock(tmp_path):
    workdir = tmp_path / "new" / "run"
    with wd.WorkdirLock(str(workdir), command="train --x") as lock:
        rec = json.loads((workdir / wd.LOCK_NAME).read_text())
        assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
        assert rec["command"] == "train --x" and rec["start_time"].endswith("+00:00")
        assert abs(rec["heartbeat_unix"] - time.time()) < 10
        assert os.listdir(workdir) == [wd.LOCK_NAME]
        # the same process through another lock object is refused too (the flock is per open file)
        with pytest.raises(wd.WorkdirLockedError):
            wd.WorkdirLock(str(workdir)).acquire()
    assert os.listdir(workdir) == []
    assert lock._thread is None


def test_disabled_lock_does_nothing(tmp_path):
    lock = wd.WorkdirLock(str(tmp_path / "run"), enabled=False)
    with lock:
        assert not (tmp_path / "run").exists()


def test_live_lock_in_other_process_is_refused_and_workdir_unchanged(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    holder = _spawn(HOLDER, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        before = _snapshot(tmp_path)
        with pytest.raises(wd.WorkdirLockedError) as info:
            wd.WorkdirLock(str(tmp_path), heartbeat_s=30.0, command="train --me").acquire()
        assert _snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"workdir {tmp_path} is in use by another trainer: host {socket.gethostname()}, "
                          f"pid {holder.pid}, started ")
    assert "command train --holder" in msg and f"(lock file {tmp_path / wd.LOCK_NAME};" in msg
    assert msg.endswith("taken over automatically after 240 s without heartbeat)")
    assert isinstance(info.value, RuntimeError)


def test_lock_of_dead_pid_is_taken_over_with_warning(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead, command="old --run")
    with caplog.at_level(logging.WARNING, logger="glide_jax.workdir"):
        with wd.WorkdirLock(str(tmp_path), command="new"):
            rec = json.loads((tmp_path / wd.LOCK_NAME).read_text())
            assert rec["pid"] == os.getpid() and rec["command"] == "new"
    assert f"pid {dead}" in caplog.text and "old --run" in caplog.text and "stale" in caplog.text


def test_other_host_lock_taken_over_only_when_heartbeat_is_old(tmp_path, caplog):
    path = _write_lock(tmp_path, host="other-host.example", pid=4242, heartbeat_unix=time.time())
    before = _snapshot(tmp_path)
    with pytest.raises(wd.WorkdirLockedError, match="host other-host.example, pid 4242.*after 4 s"):
        wd.WorkdirLock(str(tmp_path)).acquire()
    assert _snapshot(tmp_path) == before

    _write_lock(tmp_path, host="other-host.example", pid=4242, heartbeat_unix=time.time() - 60)
    with caplog.at_level(logging.WARNING, logger="glide_jax.workdir"):
        with wd.WorkdirLock(str(tmp_path)):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "other-host.example" in caplog.text


def test_unreadable_lock_is_judged_by_its_mtime(tmp_path):
    path = tmp_path / wd.LOCK_NAME
    path.write_text('{"host": "half-writ')  # a lock being created right now: live
    with pytest.raises(wd.WorkdirLockedError, match="host unknown, pid unknown"):
        wd.WorkdirLock(str(tmp_path), heartbeat_s=1.0).acquire()
    os.utime(path, (time.time() - 60, time.time() - 60))
    with wd.WorkdirLock(str(tmp_path), heartbeat_s=1.0):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_heartbeat_advances_and_keeps_the_flock(tmp_path):
    with wd.WorkdirLock(str(tmp_path), heartbeat_s=0.2):
        path = tmp_path / wd.LOCK_NAME
        first = json.loads(path.read_text())["heartbeat_unix"]
        time.sleep(0.7)
        rec = json.loads(path.read_text())
        assert rec["heartbeat_unix"] > first + 0.2
        assert os.listdir(tmp_path) == [wd.LOCK_NAME]  # no temp file left behind
        # the replaced file is still flocked: another process would be refused, not take over
        probe = _spawn("""
            import sys
            from glide_jax.workdir import WorkdirLock, WorkdirLockedError
            try:
                WorkdirLock(sys.argv[1], heartbeat_s=0.2).acquire()
            except WorkdirLockedError:
                print("refused")
        """, str(tmp_path))
        out, err = probe.communicate(timeout=30)
        assert out.strip() == "refused", err


def test_heartbeat_failure_keeps_old_heartbeat_and_thread(tmp_path, monkeypatch, caplog):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with wd.WorkdirLock(str(tmp_path), heartbeat_s=0.1) as lock:
        path = tmp_path / wd.LOCK_NAME
        with caplog.at_level(logging.WARNING, logger="glide_jax.workdir"):
            monkeypatch.setattr(wd, "_write_all", full)
            stuck = path.read_bytes()
            time.sleep(0.4)
            assert path.read_bytes() == stuck and os.listdir(tmp_path) == [wd.LOCK_NAME]
            assert lock._thread.is_alive()
            monkeypatch.undo()
        assert caplog.text.count("could not refresh the heartbeat") == 1
        time.sleep(0.3)
        assert json.loads(path.read_bytes())["heartbeat_unix"] > json.loads(stuck)["heartbeat_unix"]


def test_release_removes_only_our_lock(tmp_path):
    lock = wd.WorkdirLock(str(tmp_path), heartbeat_s=60.0)
    lock.acquire()
    path = _write_lock(tmp_path, host="other-host.example", pid=7, command="the new owner")
    lock.release()
    assert json.loads(path.read_text())["command"] == "the new owner"
    path.unlink()
    lock.acquire()
    path.unlink()
    lock.release()  # already gone: nothing to do, no error
    assert os.listdir(tmp_path) == []


TAKER = """
    import sys, time
    from glide_jax.workdir import WorkdirLock, WorkdirLockedError
    lock = WorkdirLock(sys.argv[1], heartbeat_s=60.0)
    while time.time() < float(sys.argv[2]):
        time.sleep(0.001)
    try:
        lock.acquire()
    except WorkdirLockedError:
        print("refused", flush=True)
    else:
        print("won", flush=True)
        time.sleep(1.0)  # hold it while the other one looks
        lock.release()
"""


def test_concurrent_takeover_of_stale_lock_has_one_winner(tmp_path):
    dirs = [tmp_path / str(rep) for rep in range(5)]
    for d in dirs:
        d.mkdir()
        _write_lock(d, pid=_dead_pid())
    start = time.time() + 1.5  # all ten start at once, after their imports
    procs = {d: [_spawn(TAKER, str(d), str(start)) for _ in range(2)] for d in dirs}
    for d, pair in procs.items():
        outs = [p.communicate(timeout=30) for p in pair]
        assert sorted(out.strip() for out, _ in outs) == ["refused", "won"], outs
        assert os.listdir(d) == []


def test_free_bytes(tmp_path):
    free = wd.free_bytes(str(tmp_path))
    assert isinstance(free, int) and free > 0
    assert isinstance(wd.free_bytes(str(tmp_path / "not" / "yet")), int)  # nearest existing ancestor
    assert wd.free_bytes("gs://bucket/run") is None


def test_check_space(tmp_path):
    assert wd.check_space(str(tmp_path), 1, last_good="step 10") > 0
    need = wd.free_bytes(str(tmp_path)) + 10**15
    with pytest.raises(wd.DiskFullError) as info:
        wd.check_space(str(tmp_path), need, last_good=f"step 10 ({tmp_path}/checkpoints/10)")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"not enough space to write the checkpoint in {tmp_path}: ")
    assert f"about 1.0 PB ({need} bytes) needed" in msg and " bytes) free," in msg
    assert msg.endswith(f"the last complete checkpoint is step 10 ({tmp_path}/checkpoints/10); "
                        "free some space and rerun the same command to resume")
    assert wd.format_bytes(12345678) == "12.3 MB (12345678 bytes)" and wd.format_bytes(5) == "5 bytes"


def _wrapped(err: BaseException) -> BaseException:
    try:
        try:
            raise err
        except OSError as e:
            raise RuntimeError("async save failed") from e
    except RuntimeError as outer:
        return outer


def test_is_space_or_permission_error():
    assert wd.is_space_or_permission_error(OSError(errno.ENOSPC, "full"))
    assert wd.is_space_or_permission_error(_wrapped(OSError(errno.EDQUOT, "quota")))
    try:  # implicit chaining (__context__): an error raised while handling the write error
        try:
            raise PermissionError(errno.EACCES, "denied")
        except OSError:
            raise ValueError("cleanup failed")
    except ValueError as e:
        assert wd.is_space_or_permission_error(e)
    group = ExceptionGroup("writers", [ValueError("x"), _wrapped(OSError(errno.EROFS, "ro"))])
    assert wd.is_space_or_permission_error(RuntimeError("no cause")) is False
    assert wd.is_space_or_permission_error(group)
    assert not wd.is_space_or_permission_error(FileNotFoundError(errno.ENOENT, "missing"))
    assert not wd.is_space_or_permission_error(_wrapped(FileNotFoundError(errno.ENOENT, "missing")))
    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop  # a cycle must terminate
    assert not wd.is_space_or_permission_error(loop)


def test_describe_write_failure(tmp_path):
    err = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "20" / "x"))
    msg = wd.describe_write_failure(_wrapped(err), str(tmp_path), last_good="step 10")
    assert "\n" not in msg
    assert msg.startswith(f"cannot write to {tmp_path} ({tmp_path}/checkpoints/20/x): the disk is full; ")
    assert " bytes) free; the last complete checkpoint is step 10; free some space and rerun" in msg
    ro = wd.describe_write_failure(OSError(errno.EROFS, "ro"), str(tmp_path), last_good="none yet")
    assert "the filesystem is read-only" in ro and "is none yet; make it writable" in ro
    assert "the disk quota is exceeded" in wd.describe_write_failure(
        OSError(errno.EDQUOT, "q"), "gs://b/run", last_good="step 1")


def test_remote_mode_protocol_on_a_local_path(tmp_path):
    """The gs:// code path (epath, heartbeat-only, write-then-re-read), run on a local directory."""
    first = wd.WorkdirLock(str(tmp_path), heartbeat_s=60.0, settle_s=0.0)
    first._remote = True
    first.acquire()
    rec = json.loads((tmp_path / wd.LOCK_NAME).read_text())
    assert rec["pid"] == os.getpid()
    second = wd.WorkdirLock(str(tmp_path), settle_s=0.0)
    second._remote = True
    with pytest.raises(wd.WorkdirLockedError, match=f"pid {os.getpid()}"):
        second.acquire()
    first.release()
    assert not (tmp_path / wd.LOCK_NAME).exists()
