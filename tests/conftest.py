"""Test-session settings: float32 matmuls at full precision, a persistent compilation cache, and
the XLA:CPU flags the command-line tools run with (`glide_jax.host`; the re-exec is theirs only)."""
import os
import pathlib

from glide_jax import host

# The suite's programs are tiny, so XLA:CPU spends most of a test compiling, most of that in
# LLVM's optimisation passes: tests compile with them off (about 40 % less compile time; results
# equal up to rounding). GLIDE_JAX_TEST_XLA_OPT=1 runs the suite at the level the tools use.
# Subprocesses inherit XLA_FLAGS; those that set a device count append it (`helpers.xla_flags`).
if os.environ.get("GLIDE_JAX_TEST_XLA_OPT", "0") != "1" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
host.pin_cpu_platform()  # the [tpu] extra's libtpu would otherwise start in every test process
host.apply()
# the tools' huge-page malloc for every subprocess from the start, so that none re-executes itself
# to get it (`host.tune_for_cli`; test_host.py checks the re-exec with the variable removed)
_tunables = host.malloc_tunables()
if _tunables is not None:
    os.environ["GLIBC_TUNABLES"] = _tunables

CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
# the tools' threshold (`compile_cache.MIN_COMPILE_TIME_S`): the many subprocesses that train or
# sample the same tiny configs read each other's programs back
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end test (runs in CI too)")


# `make test` runs the files on three workers (pytest-xdist, whole files per worker, handed out in
# collection order): longest first (by their measured times), so that the last files handed out are
# short ones and no worker waits long for the others at the end. Files not named run last.
LONGEST_FIRST = ("test_reliability.py", "test_miniature.py", "test_train.py", "test_multihost_faults.py",
                 "test_plan_tpu.py", "test_sample.py", "test_unet.py", "test_winograd.py", "test_experiment.py",
                 "test_fid.py", "test_bench.py", "test_plan.py", "test_prepare.py", "test_demo.py",
                 "test_notebook.py", "test_fast_sampling.py", "test_parity.py", "test_evaluate.py", "test_launch.py",
                 "test_clip.py", "test_layers.py", "test_data.py", "test_atomic_outputs.py", "test_damaged_data.py",
                 "test_host.py", "test_compile_cache.py", "test_convert.py", "test_diffusion.py",
                 "test_classifier.py", "test_sampling.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
