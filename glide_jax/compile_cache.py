"""How a run's programs are compiled: jax's persistent compilation cache (`train.compile_cache_dir`)
and the compiler's effort (`train.compiler_effort`).

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

`train.compiler_effort` is XLA's `exec_time_optimization_effort` in [-1, 1] (jax's
`jax_exec_time_optimization_effort`): 0 is XLA's default; -1 asks for the fastest compile. On the
TPU compiler it is the difference between compiling the released base for a v4-8 in 379 s with
13.5 GiB of host memory and in 225 s with 7.4 GiB, but at -1 the compiler skips its memory-space
assignment (nothing is staged in on-chip memory), so the program reads and writes HBM 2-3x as much
(the bench model: 8.2 instead of 3.2 GB per step; docs/tpu.md): a setting for planning a slice's
memory, not for training. It is part of the compile options, so it is part of the cache key.
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


EFFORT_RANGE = (-1.0, 1.0)


def compiler_effort(effort) -> float:
    """`train.compiler_effort` checked: a float in [-1, 1].

    Raises:
      ValueError: not a number in [-1, 1] (one line, naming the field).
    """
    try:
        value = float(effort)
    except (TypeError, ValueError):
        raise ValueError(f"train.compiler_effort must be a number in [-1, 1], got {effort!r}") from None
    lo, hi = EFFORT_RANGE
    if not lo <= value <= hi:  # also rejects nan
        raise ValueError(f"train.compiler_effort must be in [-1, 1] (XLA's exec_time_optimization_effort), "
                         f"got {value}")
    return value


def config_effort(config) -> float:
    """A config's `train.compiler_effort` (0 where the config predates the field), checked as
    `compiler_effort`."""
    return compiler_effort(config.train.get("compiler_effort", 0.0))


def set_compiler_effort(config) -> float:
    """Sets the compiler's execution-time effort to the config's `train.compiler_effort` (see
    above) for every later compile of this process; returns it. Raises ValueError as `compiler_effort`."""
    value = config_effort(config)
    jax.config.update("jax_exec_time_optimization_effort", value)
    return value
