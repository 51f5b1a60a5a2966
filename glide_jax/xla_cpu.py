"""XLA:CPU settings glide_jax runs with, applied when the package is imported.

XLA reads `XLA_FLAGS` once, when jax creates its CPU client, so these go into the environment
before that (importing `glide_jax` does it; nothing here imports jax).

Measured on the 2-core CPU VM with jax 0.10.2 (see README "Benchmarks"): the default YNNPACK
fusions run 64-channel 3x3 convolutions single-threaded (~100 GFLOP/s whether 1 or 2 cores
are free); with them off XLA uses its Eigen convolutions, which use both cores (~150-200
GFLOP/s forward, input- and filter-gradient). The bench config's guided sampling call went
from 0.70 s to 0.49 s and its training step from 5.2 s to 4.2 s.

Set `GLIDE_JAX_XLA_DEFAULTS=0` to leave `XLA_FLAGS` alone; a flag you already set in
`XLA_FLAGS` is never overridden. Only applied for the jaxlib versions they were measured on
(XLA aborts on flags it does not know).
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import MutableMapping

# flag -> value; "" means "none of the optional library fusions".
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}
TESTED_JAXLIB = ("0.10.",)
OPT_OUT = "GLIDE_JAX_XLA_DEFAULTS"


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def apply(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None) -> bool:
    """Adds the CPU flags to environ["XLA_FLAGS"] unless opted out; returns whether it did."""
    if environ.get(OPT_OUT, "1") == "0":
        return False
    version = jaxlib_version if jaxlib_version is not None else _jaxlib_version()
    if not version or not version.startswith(TESTED_JAXLIB):
        return False
    flags = environ.get("XLA_FLAGS", "")
    added = [f"{k}={v}" for k, v in CPU_FLAGS.items() if k not in flags]
    if added:
        environ["XLA_FLAGS"] = " ".join([flags.strip(), *added]).strip()
    return True
