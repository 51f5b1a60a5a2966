"""What a trainer needs from its workdir's filesystem: exclusive ownership and room to write.

`WorkdirLock` keeps two trainers from writing the same workdir at once (they would interleave
checkpoints and metrics). The lock is WORKDIR/.glide_jax.lock, a JSON record of its holder (host,
pid, start time, command, heartbeat) that a daemon thread refreshes every `heartbeat_s`. A lock
whose holder is gone is taken over with a warning, so a crashed run resumes with the same command.

`check_space`, `is_space_or_permission_error` and `describe_write_failure` turn a full disk or a
read-only/permission failure into one line that says where the last complete checkpoint is.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from typing import Any

log = logging.getLogger("glide_jax.workdir")

LOCK_NAME = ".glide_jax.lock"


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir."""


class DiskFullError(RuntimeError):
    """There is not enough free space for the next write."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())  # a command or path with newlines must not break the line


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def _try_flock(fd: int) -> bool | None:
    """True: we hold it now; False: another open file holds it; None: the filesystem can't tell."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK/EOPNOTSUPP on some network filesystems
        return None
    return True


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _parse(raw: bytes | str) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except ValueError:  # half-written (being created right now) or corrupt
        return None
    return rec if isinstance(rec, dict) else None


class WorkdirLock:
    """Exclusive ownership of a training workdir; take it before touching any file in it.

    Local: the lock file is created with O_CREAT|O_EXCL and its holder keeps an `fcntl.flock` on
    it for life, so a dead holder on this host is seen at once (even with its pid reused); holders
    on other hosts (shared filesystems) are gone once their heartbeat is older than `stale_after =
    4 * heartbeat_s`. Examining and taking over happen under an flock of the workdir itself, so of
    two processes taking over a stale lock exactly one wins (best-effort where the filesystem
    refuses directory flocks, e.g. some NFS).

    "://" paths (gs://): the same record through etils.epath, staleness by heartbeat only, and
    exclusivity best-effort: there is no exclusive create, so we write, wait `settle_s` and re-read;
    of two trainers starting within that window only the last writer continues (or, rarely, both).

    Multi-host jobs pass `enabled=(jax.process_index() == 0)`: process 0 holds the lock for the
    job; acquire/release are no-ops elsewhere.
    """

    def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, command: str = "",
                 enabled: bool = True, settle_s: float = 2.0) -> None:
        self.workdir = str(workdir)
        self.path = self.workdir.rstrip("/") + "/" + LOCK_NAME
        self.heartbeat_s = float(heartbeat_s)
        self.command = command
        self.enabled = enabled
        self.settle_s = settle_s
        self._remote = "://" in self.workdir
        self._fd: int | None = None  # local: the open lock file whose flock we hold
        self._record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock (taking over a stale one) or raises WorkdirLockedError."""
        if not self.enabled:
            return
        if self._record is not None:
            raise RuntimeError(f"the lock on {self.workdir} is already held by this object")
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                        "start_time": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
                        "start_unix": now, "command": self.command, "heartbeat_unix": now,
                        "heartbeat_s": self.heartbeat_s}
        try:
            (self._acquire_remote if self._remote else self._acquire_local)()
        except BaseException:
            self._record = None
            raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="glide_jax-workdir-heartbeat",
                                        daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock file if it is still ours."""
        if self._record is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._ours(self._read()):
                if self._remote:
                    self._remote_path().unlink()
                else:
                    os.unlink(self.path)
        except OSError as e:
            log.warning("could not remove the lock file %s: %s", self.path, e)
        finally:
            if self._fd is not None:
                os.close(self._fd)  # only after the unlink, so nobody sees it unlocked meanwhile
            self._fd, self._record, self._thread = None, None, None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _stale_after(self, holder: dict[str, Any] | None) -> float:
        hb = (holder or {}).get("heartbeat_s")  # the holder knows how often it beats
        return 4.0 * (hb if isinstance(hb, (int, float)) and hb > 0 else self.heartbeat_s)

    def _ours(self, holder: dict[str, Any] | None) -> bool:
        mine = self._record or {}
        return bool(holder) and all(holder.get(k) == mine.get(k) for k in ("host", "pid", "start_unix"))

    def _describe(self, holder: dict[str, Any] | None) -> str:
        h = holder or {}
        return (f"host {h.get('host', 'unknown')}, pid {h.get('pid', 'unknown')}, "
                f"started {h.get('start_time', 'unknown')}, command {h.get('command') or 'unknown'}")

    def _locked_error(self, holder: dict[str, Any] | None) -> WorkdirLockedError:
        return WorkdirLockedError(_one_line(
            f"workdir {self.workdir} is in use by another trainer: {self._describe(holder)} (lock file "
            f"{self.path}; if that process is gone, the lock is taken over automatically after "
            f"{self._stale_after(holder):g} s without heartbeat)"))

    def _heartbeat_stale(self, holder: dict[str, Any] | None, fallback: float) -> bool:
        hb = (holder or {}).get("heartbeat_unix")
        hb = hb if isinstance(hb, (int, float)) else fallback
        return time.time() - hb > self._stale_after(holder)

    def _probe_local(self) -> tuple[str, dict[str, Any] | None]:
        """("absent" | "live" | "stale" | "retry", holder) without changing any file."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return "absent", None
        try:
            st = os.fstat(fd)
            holder = _parse(os.read(fd, 1 << 20))
            pid = (holder or {}).get("pid")
            if holder and holder.get("host") == socket.gethostname() and isinstance(pid, int):
                if not _pid_alive(pid):
                    return "stale", holder
                got = _try_flock(fd)
                if got is False:
                    return "live", holder
                if got is None:  # no flocks here, and the pid may be reused: judge by heartbeat
                    return ("stale" if self._heartbeat_stale(holder, st.st_mtime) else "live"), holder
                try:  # a heartbeat may have just replaced the file we opened: look again
                    now = os.stat(self.path)
                except FileNotFoundError:
                    return "retry", holder
                same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                return ("stale" if same else "retry"), holder
            # Other host, or unreadable: a half-written new lock has a fresh mtime, so it is live.
            return ("stale" if self._heartbeat_stale(holder, st.st_mtime) else "live"), holder
        finally:
            os.close(fd)  # drops a probe flock

    def _acquire_local(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        dfd = os.open(self.workdir, os.O_RDONLY)
        try:
            deadline = time.monotonic() + 10.0  # the mutex is held for milliseconds
            while _try_flock(dfd) is False and time.monotonic() < deadline:
                time.sleep(0.01)
            for _ in range(100):
                state, holder = self._probe_local()
                if state == "retry":
                    continue
                if state == "live":
                    raise self._locked_error(holder)
                if state == "stale":
                    log.warning("taking over the stale lock on workdir %s held by %s", self.workdir,
                                self._describe(holder))
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:  # someone created it meanwhile: examine theirs
                    continue
                try:
                    _try_flock(fd)  # a brand-new inode: nobody else can hold it
                    _write_all(fd, json.dumps(self._record).encode())
                except BaseException:
                    os.unlink(self.path)
                    os.close(fd)
                    raise
                self._fd = fd
                return
            raise self._locked_error(self._read())
        finally:
            os.close(dfd)

    def _write_local(self, data: bytes) -> None:
        # A temp file then os.replace: readers never see a half record. We flock the new inode
        # before it replaces the old one, so the lock is held without a gap.
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _try_flock(fd)
            _write_all(fd, data)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)

    def _remote_path(self) -> Any:
        from etils import epath  # lazily: only gs:// workdirs need it, and it pulls in a lot
        return epath.Path(self.path)

    def _acquire_remote(self) -> None:
        path = self._remote_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            holder = self._read()
            if not self._heartbeat_stale(holder, 0.0):  # unreadable objects are never half-written
                raise self._locked_error(holder)
            log.warning("taking over the stale lock on workdir %s held by %s", self.workdir,
                        self._describe(holder))
        path.write_text(json.dumps(self._record))
        time.sleep(self.settle_s)  # let a concurrent writer's record land, then see who is last
        holder = self._read()
        if not self._ours(holder):
            raise self._locked_error(holder)

    def _read(self) -> dict[str, Any] | None:
        try:
            if self._remote:
                return _parse(self._remote_path().read_text())
            with open(self.path, "rb") as f:
                return _parse(f.read())
        except (OSError, UnicodeDecodeError):
            return None

    def _heartbeat_loop(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read()  # None (unreadable right now) is no reason to give up
                if holder is not None and not self._ours(holder):
                    log.error("the lock on workdir %s is no longer ours (%s); heartbeat stopped",
                              self.workdir, self._describe(holder))
                    return
                data = json.dumps(dict(self._record or {}, heartbeat_unix=time.time()))
                if self._remote:
                    self._remote_path().write_text(data)
                else:
                    self._write_local(data.encode())
                failing = False
            except Exception as e:  # ENOSPC and the like: keep the old heartbeat, try again later
                if not failing:
                    log.warning("could not refresh the heartbeat of %s: %s", self.path, e)
                failing = True


# -- space and write failures -------------------------------------------------------------------
def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing ancestor); None if unknown."""
    if "://" in str(path):
        return None
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def format_bytes(n: int) -> str:
    """"12.3 MB (12345678 bytes)": readable, and exact for whoever compares numbers."""
    if abs(n) < 1000:
        return f"{n} bytes"
    exp = min(int(math.log10(abs(n)) // 3), 5)
    return f"{n / 1000 ** exp:.1f} {' kMGTP'[exp]}B ({n} bytes)"


def check_space(path: str, need_bytes: int, *, last_good: str, what: str = "the checkpoint") -> int | None:
    """Raises DiskFullError if `path` has fewer than `need_bytes` free; returns the free bytes
    (None where unknown, e.g. gs://, and then nothing is checked)."""
    free = free_bytes(path)
    if free is not None and free < need_bytes:
        raise DiskFullError(_one_line(
            f"not enough space to write {what} in {path}: {format_bytes(free)} free, about "
            f"{format_bytes(int(need_bytes))} needed; the last complete checkpoint is {last_good}; "
            f"free some space and rerun the same command to resume"))
    return free


_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied"}


def _find_write_error(exc: BaseException, max_depth: int = 20) -> OSError | None:
    """The first space/permission OSError in exc, its causes/contexts and group members
    (orbax's async writers wrap the OSError of a failed write)."""
    todo, seen = [(exc, 0)], set()
    while todo:
        e, depth = todo.pop(0)
        if e is None or id(e) in seen or depth > max_depth:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _REASONS:
            return e
        todo += [(x, depth + 1) for x in (e.__cause__, e.__context__, *getattr(e, "exceptions", ()))]
    return None


def is_space_or_permission_error(exc: BaseException) -> bool:
    """True if exc is (or wraps) ENOSPC, EDQUOT, EROFS, EACCES or EPERM."""
    return _find_write_error(exc) is not None


def describe_write_failure(exc: BaseException, path: str, *, last_good: str) -> str:
    """One line for the user: what failed, where, how much space is left, what survives."""
    err = _find_write_error(exc)
    reason = _REASONS[err.errno] if err is not None else f"{type(exc).__name__}: {exc}"
    where = f" ({err.filename})" if err is not None and err.filename and str(err.filename) != str(path) else ""
    free = free_bytes(path)
    space = f"{format_bytes(free)} free" if free is not None else "free space unknown"
    fix = "free some space" if err is not None and err.errno in (errno.ENOSPC, errno.EDQUOT) \
        else "make it writable"
    return _one_line(f"cannot write to {path}{where}: {reason}; {space}; the last complete checkpoint "
                     f"is {last_good}; {fix} and rerun the same command to resume")
