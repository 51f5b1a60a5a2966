"""Test-session settings: float32 matmuls at full precision, a persistent compilation cache, and
the XLA:CPU flags the command-line tools run with (`glide_jax.host`; the re-exec is theirs only)."""
import os
import pathlib

from glide_jax import host

host.pin_cpu_platform()  # the [tpu] extra's libtpu would otherwise start in every test process
host.apply()

CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test (runs in CI too)")
