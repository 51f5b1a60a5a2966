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
