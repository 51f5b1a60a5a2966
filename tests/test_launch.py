"""launch/*.sh against a fake `gcloud`: the exact gcloud sequence per slice, DRY_RUN, refusals,
pid-file stop, the remote scripts run locally, the preemption watchdog, shellcheck, docs drift."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["create", "setup", "run", "logs", "stop", "delete", "resume_after_preemption"]
REQUIRED = {
    "create": ["TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION"],
    "setup": ["TPU_NAME", "ZONE", "ACCELERATOR_TYPE"],
    "run": ["TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "BUCKET", "CONFIG", "RUN"],
    "logs": ["TPU_NAME", "ZONE", "RUN"],
    "stop": ["TPU_NAME", "ZONE", "RUN"],
    "delete": ["TPU_NAME", "ZONE"],
    "resume_after_preemption": ["TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "BUCKET",
                                "CONFIG", "RUN"],
}
OPTIONAL = ["PROJECT", "SPOT", "PREEMPTIBLE", "QUEUED", "QUEUED_RESOURCE_ID", "PYTHON_VERSION",
            "EXTRA_FLAGS", "DRY_RUN", "WORKER", "LINES", "FOLLOW", "STOP_TIMEOUT",
            "KILL_AFTER_TIMEOUT", "MAX_RETRIES", "POLL_SECONDS", "READY_TIMEOUT", "ONCE"]

FAKE_GCLOUD = """\
#!{python}
# Fake gcloud: one JSON argv list per line in $FAKE_GCLOUD_LOG; `describe` answers from
# $FAKE_TPU_STATES (a file, one state per line, consumed in order, the last one repeats).
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if "describe" in argv:
    path = os.environ.get("FAKE_TPU_STATES")
    states = open(path).read().split() if path and os.path.exists(path) else ["READY"]
    if path and len(states) > 1:
        open(path, "w").write("\\n".join(states[1:]))
    if states[0] == "MISSING":
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
    print(states[0] if "--format=value(state)" in argv else "state: " + states[0])
elif "ssh" in argv:
    print(os.environ.get("FAKE_SSH_STDOUT", "ok"))
"""

BASE_ENV = {
    "TPU_NAME": "glide-test", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-8",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base", "BUCKET": "my-bucket", "CONFIG": "shapes_tiny",
    "RUN": "r1",
}


@pytest.fixture
def fake(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    gcloud = bindir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    log = tmp_path / "gcloud.log"
    env = {k: v for k, v in os.environ.items() if k not in REQUIRED["resume_after_preemption"] + OPTIONAL}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_GCLOUD_LOG=str(log), POLL_SECONDS="0",
               STOP_TIMEOUT="5")

    class Fake:
        path = tmp_path

        def run(self, script, expect_rc=0, **extra):
            e = dict(env, **BASE_ENV)
            e.update({k: v for k, v in extra.items() if v is not None})
            for k, v in extra.items():
                if v is None:
                    e.pop(k, None)
            p = subprocess.run(["bash", str(LAUNCH / f"{script}.sh")], env=e, cwd=ROOT, text=True,
                               capture_output=True, stdin=subprocess.DEVNULL, timeout=60)
            assert p.returncode == expect_rc, f"{script}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
            return p

        def calls(self):
            if not log.exists():
                return []
            calls = [json.loads(line) for line in log.read_text().splitlines()]
            log.unlink()
            return calls

    return Fake()


def flag(call, name):
    """Value of --name=VALUE in one gcloud call (None if absent)."""
    for a in call:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def verb(call):
    """'tpu-vm create', 'queued-resources delete', ... from ['compute', 'tpus', X, Y, ...]."""
    assert call[:2] == ["compute", "tpus"], call
    return f"{call[2]} {call[3]}"


@pytest.mark.parametrize("accel,workers", [("v4-8", 1), ("v4-32", 4)])
def test_lifecycle_sequence(fake, accel, workers):
    extra = "--config.train.num_steps=10 --config.optim.lr=1e-4"
    outputs = {}
    calls = {}
    for script in ["create", "setup", "run", "logs", "stop", "delete"]:
        outputs[script] = fake.run(script, ACCELERATOR_TYPE=accel, EXTRA_FLAGS=extra, PROJECT="my-proj")
        calls[script] = fake.calls()
    seq = [verb(c) for s in calls for c in calls[s]]
    assert seq == ["tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm describe",
                   "tpu-vm ssh", "tpu-vm ssh", "tpu-vm delete"]
    every = [c for s in calls for c in calls[s]]
    assert all(c[4] == "glide-test" for c in every if verb(c) != "tpu-vm scp")
    assert all(flag(c, "zone") == "us-central2-b" and flag(c, "project") == "my-proj" for c in every)
    # every ssh/scp goes to all workers, single- and multi-host alike
    assert all(flag(c, "worker") == "all" for c in every if c[3] in ("ssh", "scp"))

    (create,) = calls["create"]
    assert flag(create, "accelerator-type") == accel
    assert flag(create, "version") == "tpu-ubuntu2204-base"
    assert "--spot" not in create and "--preemptible" not in create

    scp, setup = calls["setup"]
    assert scp[4].endswith(".tar.gz") and scp[5] == "glide-test:glide_jax_src.tar.gz"
    setup_cmd = flag(setup, "command")
    assert '"jax[tpu]==0.10.2"' in setup_cmd and "libtpu_releases.html" in setup_cmd
    assert "pip install --quiet -e" in setup_cmd and "tar -xzf glide_jax_src.tar.gz" in setup_cmd

    (run,) = calls["run"]
    run_cmd = flag(run, "command")
    assert ('-m glide_jax.train --config "configs/shapes_tiny.py" --workdir "gs://my-bucket/runs/r1" '
            + extra) in run_cmd
    assert "nohup" in run_cmd and "sudo rm -f /tmp/libtpu_lockfile" in run_cmd
    assert 'glide_jax_runs/r1"' in run_cmd and '"$d/worker.log"' in run_cmd and '"$d/train.pid"' in run_cmd
    assert "gsutil" not in run_cmd and " rm -rf" not in run_cmd  # the workdir is never wiped
    topology = f"multi-host slice: {workers} workers" if workers > 1 else "single-host slice: 1 worker"
    assert topology in outputs["run"].stdout and topology in outputs["setup"].stdout

    describe, logs = calls["logs"]
    assert flag(describe, "format") == "value(state)" and "state: READY" in outputs["logs"].stdout
    assert 'tail -n 50' in flag(logs, "command")

    (stop,) = calls["stop"]
    stop_cmd = flag(stop, "command")
    assert '"$HOME/glide_jax_runs/r1/train.pid"' in stop_cmd
    assert "pkill" not in stop_cmd and "killall" not in stop_cmd
    assert stop_cmd.index("kill -TERM") < stop_cmd.index("kill -KILL")
    assert stop_cmd.rstrip().endswith("stop_pid \"$HOME/glide_jax_runs/r1/train.pid\" 5 0;")

    (delete,) = calls["delete"]
    assert "--quiet" in delete


def test_no_pkill_or_killall_anywhere():
    for script in LAUNCH.glob("*.sh"):
        code = "\n".join(l for l in script.read_text().splitlines() if not l.lstrip().startswith("#"))
        assert not re.search(r"\b(pkill|killall)\b", code), script


@pytest.mark.parametrize("spot,preemptible,expect", [("1", None, "--spot"), (None, "1", "--preemptible")])
def test_capacity_flags(fake, spot, preemptible, expect):
    fake.run("create", SPOT=spot, PREEMPTIBLE=preemptible)
    (create,) = fake.calls()
    assert verb(create) == "tpu-vm create" and create[-1] == expect


def test_spot_and_preemptible_refused(fake):
    p = fake.run("create", expect_rc=2, SPOT="1", PREEMPTIBLE="1")
    assert "SPOT=1 and PREEMPTIBLE=1" in p.stderr and fake.calls() == []


def test_queued_resources(fake):
    fake.run("create", QUEUED="1", SPOT="1", ACCELERATOR_TYPE="v5p-64", RUNTIME_VERSION="v2-alpha-tpuv5")
    create, describe = fake.calls()
    assert create[:5] == ["compute", "tpus", "queued-resources", "create", "glide-test"]
    assert flag(create, "node-id") == "glide-test"
    assert flag(create, "accelerator-type") == "v5p-64"
    assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in create
    assert verb(describe) == "tpu-vm describe"  # waited for the node to be READY
    fake.run("delete", QUEUED="1", QUEUED_RESOURCE_ID="my-qr")
    (delete,) = fake.calls()
    assert delete[:5] == ["compute", "tpus", "queued-resources", "delete", "my-qr"]
    assert "--force" in delete and "--quiet" in delete
    p = fake.run("create", expect_rc=2, QUEUED="1", PREEMPTIBLE="1")
    assert "SPOT=1" in p.stderr


def test_queued_create_waits_for_ready(fake):
    states = fake.path / "states"
    states.write_text("MISSING\nCREATING\nREADY\n")
    fake.run("create", QUEUED="1", FAKE_TPU_STATES=str(states))
    assert [verb(c) for c in fake.calls()] == ["queued-resources create"] + ["tpu-vm describe"] * 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_and_calls_nothing(fake, script):
    p = fake.run(script, DRY_RUN="1", ACCELERATOR_TYPE="v4-32", QUEUED="1" if script == "create" else None)
    assert fake.calls() == []
    printed = [l for l in p.stdout.splitlines() if l.startswith("+ gcloud ")]
    assert printed, p.stdout
    for line in printed:  # each one a complete, shell-parseable command on one line
        argv = shlex.split(line[2:])
        assert argv[:3] == ["gcloud", "compute", "tpus"]
        assert flag(argv, "zone") == "us-central2-b"
        if "ssh" in argv or "scp" in argv:
            assert flag(argv, "worker") == "all"


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_variable_refused(fake, script):
    for var in REQUIRED[script]:
        p = fake.run(script, expect_rc=2, **{var: None})
        assert f"missing required environment variable(s): {var}" in p.stderr
        assert f"export {var}=" in p.stderr
    assert fake.calls() == []


def test_missing_variables_all_named(fake):
    p = fake.run("run", expect_rc=2, BUCKET=None, CONFIG="", RUN=None)
    assert "missing required environment variable(s): BUCKET CONFIG RUN" in p.stderr


def test_bad_values_refused(fake):
    assert "configs/nope.py" in fake.run("run", expect_rc=2, CONFIG="nope").stderr
    assert "RUN=" in fake.run("run", expect_rc=2, RUN="a b").stderr
    assert "EXTRA_FLAGS" in fake.run("run", expect_rc=2, EXTRA_FLAGS="oops").stderr
    assert "DRY_RUN must be 0 or 1" in fake.run("delete", expect_rc=2, DRY_RUN="yes").stderr
    assert fake.calls() == []


@pytest.mark.parametrize("accel,n", [("v4-8", 1), ("v4-32", 4), ("v5p-8", 1), ("v5p-64", 8),
                                     ("v5litepod-8", 1), ("v5litepod-16", 4), ("v6e-8", 1),
                                     ("v6e-256", 64), ("v3-32", 4)])
def test_num_workers(accel, n):
    out = subprocess.run(["bash", "-c", f'source launch/common.sh; ACCELERATOR_TYPE={accel}; num_workers'],
                         cwd=ROOT, text=True, capture_output=True, check=True).stdout
    assert out.strip() == str(n)


def _remote_commands(fake, script, **extra):
    fake.run(script, **extra)
    return [flag(c, "command") for c in fake.calls() if flag(c, "command")]


def test_remote_scripts_parse(fake):
    """Every remote --command is valid bash (bash -n)."""
    cmds = []
    for script in ["setup", "run", "logs", "stop"]:
        cmds += _remote_commands(fake, script, FOLLOW="1" if script == "logs" else None)
    cmds += _remote_commands(fake, "resume_after_preemption", FAKE_SSH_STDOUT="ALIVE", ONCE="1")
    assert len(cmds) == 5
    for cmd in cmds:
        p = subprocess.run(["bash", "-n", "-c", cmd], text=True, capture_output=True)
        assert p.returncode == 0, f"{p.stderr}\n{cmd}"


@pytest.mark.skipif(not shutil.which("setsid") or not Path("/proc/self/cmdline").exists(),
                    reason="needs Linux (setsid, /proc)")
def test_remote_run_and_stop_locally(fake, tmp_path):
    """The run/stop/logs remote commands, executed here with a fake venv python and sudo."""
    home = tmp_path / "home"
    (home / "glide_jax").mkdir(parents=True)
    venv_bin = home / "glide_jax_venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        trap 'echo "SIGTERM: final checkpoint written"; exit 0' TERM
        echo "training $*"
        while :; do sleep 0.1; done
        """))
    (venv_bin / "python").chmod(0o755)
    sudo = tmp_path / "bin" / "sudo"
    sudo.write_text('#!/usr/bin/env bash\necho "sudo $*" >> "$HOME/sudo.log"\n')
    sudo.chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")

    def remote(cmd):
        return subprocess.run(["bash", "-c", cmd], env=env, text=True, capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)

    (run_cmd,) = _remote_commands(fake, "run", EXTRA_FLAGS="--config.train.num_steps=3")
    p = remote(run_cmd)
    assert p.returncode == 0, p.stdout + p.stderr
    run_dir = home / "glide_jax_runs" / "r1"
    pid = int((run_dir / "train.pid").read_text())
    os.kill(pid, 0)
    assert "sudo rm -f /tmp/libtpu_lockfile" in (home / "sudo.log").read_text()
    log = (run_dir / "worker.log").read_text()
    assert ("training -m glide_jax.train --config configs/shapes_tiny.py --workdir gs://my-bucket/runs/r1 "
            "--config.train.num_steps=3") in log

    (logs_cmd,) = _remote_commands(fake, "logs")[-1:]
    p = remote(logs_cmd)
    assert f"RUNNING (pid {pid})" in p.stdout and "training -m glide_jax.train" in p.stdout

    # re-running frees the TPU: the old pid gets SIGTERM through its pid file, a new one starts
    p = remote(run_cmd)
    assert p.returncode == 0 and f"SIGTERM to pid {pid}" in p.stdout, p.stdout + p.stderr
    new_pid = int((run_dir / "train.pid").read_text())
    assert new_pid != pid

    (stop_cmd,) = _remote_commands(fake, "stop")
    p = remote(stop_cmd)
    assert p.returncode == 0 and f"pid {new_pid} stopped" in p.stdout, p.stdout + p.stderr
    assert not (run_dir / "train.pid").exists()
    assert (run_dir / "worker.log").read_text().count("SIGTERM: final checkpoint written") == 2
    assert "no pid file" in remote(stop_cmd).stdout  # idempotent

    (status_cmd,) = _remote_commands(fake, "logs")[-1:]
    assert "NOT RUNNING" in remote(status_cmd).stdout


def test_resume_recovers_preempted_tpu(fake):
    states = fake.path / "states"
    states.write_text("PREEMPTED\nREADY\n")
    p = fake.run("resume_after_preemption", ONCE="1", MAX_RETRIES="1", SPOT="1",
                 FAKE_TPU_STATES=str(states))
    seq = [verb(c) for c in fake.calls()]
    assert seq == ["tpu-vm describe", "tpu-vm delete", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh",
                   "tpu-vm ssh"]
    assert "recovered" in p.stdout


def test_resume_gives_up_after_max_retries(fake):
    states = fake.path / "states"
    states.write_text("MISSING\n")
    p = fake.run("resume_after_preemption", expect_rc=1, MAX_RETRIES="2", FAKE_TPU_STATES=str(states))
    seq = [verb(c) for c in fake.calls()]
    assert seq.count("tpu-vm create") == 2 and seq[-1] == "tpu-vm describe"
    assert "MAX_RETRIES=2" in p.stderr


def test_resume_watches_then_exits_when_run_ends(fake):
    fake.run("resume_after_preemption", ONCE="1", FAKE_SSH_STDOUT="ALIVE")
    (describe, ssh) = fake.calls()
    assert verb(describe) == "tpu-vm describe" and flag(ssh, "worker") == "0"
    p = fake.run("resume_after_preemption", FAKE_SSH_STDOUT="DEAD")
    assert "not alive" in p.stdout and [verb(c) for c in fake.calls()] == ["tpu-vm describe", "tpu-vm ssh"]


def test_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck not installed: apt-get install shellcheck")
    scripts = sorted(str(p.relative_to(ROOT)) for p in [*LAUNCH.glob("*.sh"), *(ROOT / "benchmarks").glob("*.sh")])
    assert "benchmarks/compare.sh" in scripts
    p = subprocess.run(["shellcheck", *scripts], cwd=ROOT, text=True, capture_output=True)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout + p.stderr


def test_compare_script_needs_the_reference_environment():
    """benchmarks/compare.sh (glide_jax vs PyTorch GLIDE) says what it needs before timing anything."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_PYTHON", "GLIDE_REF")}
    p = subprocess.run(["bash", "benchmarks/compare.sh"], cwd=ROOT, text=True, capture_output=True, env=env)
    assert p.returncode != 0 and "TORCH_PYTHON" in p.stderr


def test_docs_match_scripts():
    """docs/tpu.md names every script it tells you to run, every variable the scripts require,
    and marks step times as estimates."""
    doc = (ROOT / "docs" / "tpu.md").read_text()
    for script in re.findall(r"bash launch/(\w+)\.sh", doc):
        assert (LAUNCH / f"{script}.sh").exists(), script
    for script in ["create", "setup", "run", "logs", "stop", "delete", "resume_after_preemption"]:
        assert f"bash launch/{script}.sh" in doc, script
    for var in REQUIRED["resume_after_preemption"] + ["PROJECT", "SPOT", "QUEUED", "EXTRA_FLAGS", "DRY_RUN",
                                                     "MAX_RETRIES", "PYTHON_VERSION"]:
        assert re.search(rf"\b{var}\b", doc), var
    for config in re.findall(r"CONFIG=(\w+)", doc):
        assert (ROOT / "configs" / f"{config}.py").exists(), config
    assert "ESTIMATE" in doc and "v4-8" in doc and "v5p-64" in doc


def test_extra_flags_reach_the_remote_command_intact(fake):
    """Overrides are quoted for the remote shell; '&' survives (bash 5.2 patsub_replacement)."""
    (cmd,) = _remote_commands(fake, "run", EXTRA_FLAGS="--config.a=x&y --config.b=1,2")
    argv = shlex.split(cmd[cmd.index("setsid nohup"):cmd.index(">>", cmd.index("setsid nohup"))])
    assert argv[-2:] == ["--config.a=x&y", "--config.b=1,2"]
