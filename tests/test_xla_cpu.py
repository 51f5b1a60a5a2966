"""glide_jax.xla_cpu: the XLA:CPU flags the package sets on import."""

import os
import subprocess
import sys

from glide_jax import xla_cpu

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


def test_import_sets_flag_before_jax_starts():
    code = ("import os, glide_jax, jax, jax.numpy as jnp; jnp.ones(2).block_until_ready(); "
            "print(os.environ['XLA_FLAGS'])")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_cpu.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{FLAG}="


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


def test_only_python_dash_m_glide_jax_is_a_tool_launch():
    assert xla_cpu.launched_as_tool(["python", "-m", "glide_jax.train", "--workdir", "w"], ["-m"])
    assert xla_cpu.launched_as_tool(["python", "-W", "ignore", "-m", "glide_jax.bench"], ["-m"])
    assert xla_cpu.launched_as_tool(["python", "-m", "glide_jax"], ["-m"])
    # the tool module itself already running, another package's tool, a script, pytest, -c
    assert not xla_cpu.launched_as_tool(["python", "-m", "glide_jax.train"], ["/x/glide_jax/train.py"])
    assert not xla_cpu.launched_as_tool(["python", "-m", "pytest", "tests"], ["-m"])
    assert not xla_cpu.launched_as_tool(["python", "-m", "glide_jaxx.train"], ["-m"])
    assert not xla_cpu.launched_as_tool(["python", "train.py"], ["train.py"])
    assert not xla_cpu.launched_as_tool(["python", "-c", "import glide_jax"], ["-c"])


def test_tool_launch_reexecs_once_with_huge_page_malloc(tmp_path):
    """`python -m glide_jax.bench` records the settings it ran with; an import elsewhere changes nothing."""
    import json

    from helpers import TINY_UNET
    hp = tmp_path / "tiny.json"
    hp.write_text(json.dumps(dict(TINY_UNET, image_size=8, channel_mult="1", attention_resolutions="")))
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XLA_FLAGS", xla_cpu.OPT_OUT)}
    cmd = [sys.executable, "-m", "glide_jax.bench", "train", "--hparams", str(hp), "--batch", "1", "--steps", "1",
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
