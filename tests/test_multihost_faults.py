"""Multi-host preemption (issue 20): two jax.distributed CPU processes (gloo) training together.

A preempted TPU slice signals its hosts at slightly different times, and a host can be signalled
alone. Either way every process must checkpoint the same step and exit 0 inside the grace
period, and the next start must continue as if nothing happened. One chain of runs in one
workdir, compared bit for bit with an uninterrupted two-process run:

    A. SIGTERM to process 0, 2 s later to process 1        -> both stop at step a, exit 0
    B. the next start resumes at a; SIGTERM to process 1 only -> both stop at step b > a, exit 0
    C. the next start resumes at b and trains to the end  -> final state == the uninterrupted one

The uninterrupted run is also the plain two-process check: both processes see the 2 devices of
the two, finish every step and agree on a global checksum of the params.
"""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "scripts" / "multihost_preempt_worker.py"
STEPS, CKPT_EVERY, CHECK_EVERY = 10, 4, 3  # agreement steps 3, 6, 9; regular checkpoints 4, 8, 10
STEP_DELAY = "0.3"  # each step takes at least this long, so a signal surely lands mid-run
GRACE_S = 30


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_workers():
    """A failed assertion must not leave worker processes training (or holding their port)."""
    yield
    while _STARTED:
        p = _STARTED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, logs):
    """Both processes of one launch; (Popen, log path) per process."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    logs = pathlib.Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(2):
        log = logs / f"p{i}.log"
        with open(log, "w") as out:
            procs.append((subprocess.Popen(
                [sys.executable, str(WORKER), str(port), str(i), str(workdir), str(STEPS), str(CKPT_EVERY),
                 str(CHECK_EVERY), STEP_DELAY], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env), log))
        _STARTED.append(procs[-1][0])
    return procs


def finish(procs, timeout=400):
    """[(exit status, RESULT dict or None, log text)] per process."""
    out = []
    for p, log in procs:
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise
        text = log.read_text()
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        out.append((rc, json.loads(lines[-1][len("RESULT "):]) if lines else None, text))
    return out


def trained_steps(workdir) -> list[int]:
    """The steps process 0 logged (metrics.jsonl rows with a loss), this launch and earlier ones."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "loss" in r]


def wait_for_step(workdir, procs, step, timeout=400):
    """Until process 0 has logged a step >= `step`; every process must still be running."""
    t0 = time.time()
    while max(trained_steps(workdir), default=-1) < step:
        for p, log in procs:
            assert p.poll() is None, f"exited ({p.returncode}) before step {step}: {log.read_text()[-3000:]}"
        assert time.time() - t0 < timeout, f"no step {step} after {timeout} s"
        time.sleep(0.05)


def steps_in(workdir) -> list[int]:
    ckpts = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def restore(workdir, step):
    """(state as nested dicts of numpy, data position) of a finished checkpoint. Its arrays are
    sharded over the two processes' devices, so they are read as plain numpy (no target devices)."""
    path = pathlib.Path(workdir).absolute() / "checkpoints"
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(path / str(step) / "state").item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(path / str(step) / "state", args=ocp.args.PyTreeRestore(restore_args=args))
    mgr = ocp.CheckpointManager(path, item_names=("state", "data", "meta"))
    data = mgr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    mgr.close()
    return state, dict(data)


def check_preempted(results, grace, before):
    """Both exited 0 in the grace period at the same step, after `before`, checkpointed by both."""
    for rc, result, text in results:
        assert rc == 0 and result is not None, (rc, text[-3000:])
        assert "Traceback" not in text, text[-3000:]
    (_, r0, log0), (_, r1, _) = results
    assert grace < GRACE_S, grace
    assert r0["step"] == r1["step"], (r0, r1)
    step = r0["step"]
    assert before < step < STEPS and step % CHECK_EVERY == 0, (before, step)
    assert f"preempted: checkpoint of step {step} written; exiting" in log0
    return step


@pytest.mark.slow
def test_sigterm_to_both_then_to_one_host_resumes_bit_identical(tmp_path):
    # the uninterrupted two-process run, launched beside A (the steps mostly sleep, so the two
    # launches overlap rather than take turns)
    base = tmp_path / "base"
    base_procs = start(base, tmp_path / "logs_base")

    run = tmp_path / "run"
    # A: SIGTERM to both processes, 2 s apart
    procs = start(run, tmp_path / "logs_a")
    wait_for_step(run, procs, 1)
    t0 = time.time()
    procs[0][0].send_signal(signal.SIGTERM)
    time.sleep(2.0)
    procs[1][0].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=GRACE_S + 30)
    a = check_preempted(results, time.time() - t0, 0)
    assert a in steps_in(run)
    results = finish(base_procs)
    assert all(rc == 0 and r["process"] == i and r["step"] == STEPS and r["devices"] == 2
               for i, (rc, r, _) in enumerate(results)), results
    assert results[0][1]["checksum"] == results[1][1]["checksum"]
    assert steps_in(base) == [4, 8, 10]
    assert restore(run, a)[1] == {"step": a}

    # B: the next start resumes at a; SIGTERM to process 1 only (process 0 holds the workdir lock
    # and writes the log: it must stop because of the other's signal)
    procs = start(run, tmp_path / "logs_b")
    wait_for_step(run, procs, a + 1)
    t0 = time.time()
    procs[1][0].send_signal(signal.SIGTERM)
    results = finish(procs, timeout=GRACE_S + 30)
    assert f"resumed from step {a}" in results[0][2]
    b = check_preempted(results, time.time() - t0, a)
    assert b in steps_in(run)

    # C: the next start resumes at b and finishes; the final state is the uninterrupted run's
    results = finish(start(run, tmp_path / "logs_c"))
    assert all(rc == 0 and r["process"] == i and r["step"] == STEPS for i, (rc, r, _) in enumerate(results)), results
    assert f"resumed from step {b}" in results[0][2]
    got, got_data = restore(run, STEPS)
    want, want_data = restore(base, STEPS)
    assert got_data == want_data == {"step": STEPS}
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    differ = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(flat_got, flat_want) if not np.array_equal(x, y)]
    assert not differ, f"{len(differ)} leaves differ from the uninterrupted run, e.g. {differ[:5]}"
