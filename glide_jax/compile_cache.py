"""jax's persistent compilation cache for training and sampling runs (`train.compile_cache_dir`).

A compiled program is written to the cache directory under a key of its HLO, the compile
options, the devices and the jax/XLA versions; a later process that compiles the same program
(a resumed run, the next run of a config, sampling a workdir again) reads it back instead of
compiling. Only process 0 writes (jax's rule, so a shared gs:// directory sees one writer).

`train.compile_cache_dir`: "" (default) = `WORKDIR/compile_cache`, unless this process already
has a cache directory (`JAX_COMPILATION_CACHE_DIR`, as the test suite sets); "none" = off; any
other value (a local path or gs://) is passed to jax as is. jax's thresholds are lowered so the
CPU-sized programs of small configs are kept too: every entry size, and programs that took at
least `MIN_COMPILE_TIME_S` to compile (jax's default is 1 s; below 0.1 s are the one-op programs
of eager calls, not worth a file each). A threshold set in the environment
(`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`, `..._MIN_ENTRY_SIZE_BYTES`) wins.
"""
from __future__ import annotations

import os

import jax

MIN_COMPILE_TIME_S = 0.1
OFF = "none"


def enable(cache_dir: str, workdir: str | None = None) -> str | None:
    """Turns the persistent compilation cache on for this process; returns its directory
    (None: off). Call before the programs to be cached are compiled.

    Args:
      cache_dir: `train.compile_cache_dir` ("" = the default above, "none" = off).
      workdir: the run's workdir, for the default `WORKDIR/compile_cache`.
    """
    cache_dir = str(cache_dir or "").strip()
    if cache_dir.lower() == OFF:
        return None
    if not cache_dir:
        cache_dir = jax.config.jax_compilation_cache_dir or (
            os.path.join(workdir, "compile_cache") if workdir else "")
    if not cache_dir:
        return None
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size limit
    return cache_dir
