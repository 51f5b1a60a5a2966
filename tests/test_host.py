"""glide_jax.host: the CPU-host tuning the command-line tools opt into (nothing on import)."""

import os
import subprocess
import sys

from glide_jax import host as xla_cpu

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_adds_flag_keeping_user_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert xla_cpu.apply(env, jaxlib_version="0.10.2")
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}="


def test_user_value_wins_and_opt_out():
    env = {"XLA_FLAGS": f"{FLAG}=individual_dot"}
    xla_cpu.apply(env, jaxlib_version="0.10.2")
    assert env["XLA_FLAGS"] == f"{FLAG}=individual_dot"
    env = {xla_cpu.OPT_OUT: "0"}
    assert not xla_cpu.apply(env, jaxlib_version="0.10.2")
    assert "XLA_FLAGS" not in env


def test_untested_jaxlib_left_alone():
    env = {}
    assert not xla_cpu.apply(env, jaxlib_version="0.4.30")
    assert env == {}


def test_import_has_no_side_effects():
    """Importing the package (and a tool module) changes neither XLA_FLAGS nor GLIBC_TUNABLES."""
    code = ("import os, glide_jax, glide_jax.train, jax, jax.numpy as jnp; jnp.ones(2).block_until_ready(); "
            "print(repr(os.environ.get('XLA_FLAGS')), repr(os.environ.get('GLIBC_TUNABLES')))")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", xla_cpu.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None None"


def test_cpu_host_detection():
    assert xla_cpu.on_cpu_host({"JAX_PLATFORMS": "cpu"})
    assert not xla_cpu.on_cpu_host({"JAX_PLATFORMS": "tpu"})
    assert not xla_cpu.on_cpu_host({"JAX_PLATFORMS": "cuda,cpu"})
    assert not xla_cpu.on_cpu_host({"TPU_WORKER_HOSTNAMES": "a,b"})
    assert xla_cpu.on_tpu_vm({"MEGASCALE_COORDINATOR_ADDRESS": "x"})


def test_tune_for_cli_leaves_accelerator_hosts_alone():
    env = {"JAX_PLATFORMS": "tpu"}
    xla_cpu.tune_for_cli(env)
    assert env == {"JAX_PLATFORMS": "tpu"}
    env = {"JAX_PLATFORMS": "cpu", xla_cpu.OPT_OUT: "0"}
    xla_cpu.tune_for_cli(env)
    assert "XLA_FLAGS" not in env
    env = {"JAX_PLATFORMS": "cpu"}  # not the process environment: flags only, never a re-exec
    xla_cpu.tune_for_cli(env)
    assert FLAG in env.get("XLA_FLAGS", "")


TUNABLE = f"{xla_cpu.MALLOC_TUNABLE}=1"


def test_malloc_tunables_added_only_where_they_apply():
    assert xla_cpu.malloc_tunables({}, glibc=(2, 36), thp_mode="madvise") == TUNABLE
    kept = xla_cpu.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc=(2, 36), thp_mode="madvise")
    assert kept == f"glibc.malloc.arena_max=2:{TUNABLE}"
    # the user's own choice, an old glibc, musl, THP off or already always-on, opt-out: leave alone
    assert xla_cpu.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, glibc=(2, 36),
                                   thp_mode="madvise") is None
    assert xla_cpu.malloc_tunables({}, glibc=(2, 31), thp_mode="madvise") is None
    assert xla_cpu.malloc_tunables({}, glibc=None, thp_mode="madvise") is None
    assert xla_cpu.malloc_tunables({}, glibc=(2, 36), thp_mode="never") is None
    assert xla_cpu.malloc_tunables({}, glibc=(2, 36), thp_mode="always") is None
    assert xla_cpu.malloc_tunables({xla_cpu.OPT_OUT: "0"}, glibc=(2, 36), thp_mode="madvise") is None


def test_tool_launch_reexecs_once_with_huge_page_malloc(tmp_path):
    """`python -m glide_jax.bench` (a CPU host) records the settings it ran with; opted out, none.
    Its `data` mode: the re-exec happens at launch, whatever the tool then does, and this one
    compiles nothing."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", xla_cpu.OPT_OUT)}
    env["JAX_PLATFORMS"] = "cpu"
    # the suite's own flags (conftest) stay; only the tool's flag is left for the tool to add
    env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(FLAG))
    env["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
    cmd = [sys.executable, "-m", "glide_jax.bench", "data", "--config", "test_tiny", "--batch", "2", "--steps", "1",
           "--json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
    host = json.loads(out.stdout.strip().splitlines()[-1])["host"]
    expected = xla_cpu.malloc_tunables(env) or ""
    assert host["glibc_tunables"] == expected
    assert f"{FLAG}=" in host["xla_flags"]
    if expected:  # this host has glibc >= 2.35 and THP in madvise mode: the tunable is really on
        assert TUNABLE in host["glibc_tunables"]
    out = subprocess.run(cmd, env={**env, xla_cpu.OPT_OUT: "0"}, capture_output=True, text=True, check=True,
                         timeout=600)
    host = json.loads(out.stdout.strip().splitlines()[-1])["host"]
    assert host["glibc_tunables"] == "" and FLAG not in host["xla_flags"]
    code = "import os, glide_jax; print(os.environ.get('GLIBC_TUNABLES', ''))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
