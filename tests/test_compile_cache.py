"""glide_jax.compile_cache: where `train.compile_cache_dir` puts jax's persistent cache (fresh
processes: the cache settings are process-global)."""
import json
import os
import subprocess
import sys

CODE = """
import json, sys, jax, jax.numpy as jnp
from glide_jax import compile_cache
d = compile_cache.enable(sys.argv[1], sys.argv[2] or None)
if len(sys.argv) > 3:
    jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()
print(json.dumps([d, jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
                  jax.config.jax_persistent_cache_min_entry_size_bytes]))
"""


def _enable(setting, workdir, *extra, **env_extra):
    """compile_cache.enable(setting, workdir) in a fresh process without the suite's cache settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", **env_extra)
    p = subprocess.run([sys.executable, "-c", CODE, setting, workdir, *extra], capture_output=True, text=True,
                       env=env, timeout=120, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_default_is_the_workdirs_and_small_programs_are_cached(tmp_path):
    d, configured, min_time, min_size = _enable("", str(tmp_path))
    assert d == configured == str(tmp_path / "compile_cache") and min_time == 0.1 and min_size == -1
    # a threshold from the environment wins; with 0 even this tiny program is written
    assert _enable("", str(tmp_path), "compile", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")[2] == 0
    assert any((tmp_path / "compile_cache").iterdir())


def test_none_off_and_explicit_dirs_pass_through(tmp_path):
    assert _enable("none", str(tmp_path))[:2] == [None, None]
    assert _enable("gs://bucket/cache", str(tmp_path))[:2] == ["gs://bucket/cache"] * 2
    # a process that already has a cache directory (the test suite's) keeps it by default
    suite = str(tmp_path / "suite")
    assert _enable("", str(tmp_path), JAX_COMPILATION_CACHE_DIR=suite)[:2] == [suite, suite]
    assert _enable(str(tmp_path / "mine"), str(tmp_path), JAX_COMPILATION_CACHE_DIR=suite)[0] == str(tmp_path / "mine")


EFFORT = """
import sys, jax, jax.numpy as jnp, ml_collections
from glide_jax import compile_cache
compile_cache.enable(sys.argv[1])
compile_cache.set_compiler_effort(ml_collections.ConfigDict({"train": {"compiler_effort": float(sys.argv[2])}}))
assert jax.config.jax_exec_time_optimization_effort == float(sys.argv[2])
jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.ones((96, 96))).block_until_ready()
"""


def test_compiler_effort_is_part_of_the_cache_key(tmp_path):
    """A program compiled at another `train.compiler_effort` is a new cache entry, not a stale hit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cache = tmp_path / "cache"

    def entries(effort):
        subprocess.run([sys.executable, "-c", EFFORT, str(cache), effort], env=env, timeout=120, check=True)
        return len(list(cache.iterdir()))

    first = entries("0")
    assert first >= 1
    assert entries("0") == first  # the same program at the same effort: read back, nothing new
    assert entries("-1") > first


def test_compiler_effort_checks_its_range():
    import pytest

    from glide_jax import compile_cache
    assert compile_cache.compiler_effort("-0.5") == -0.5
    for bad in (1.5, -2, float("nan"), None, "x"):
        with pytest.raises(ValueError, match="train.compiler_effort"):
            compile_cache.compiler_effort(bad)
