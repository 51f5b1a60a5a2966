"""Host settings glide_jax runs with: XLA:CPU flags on import, and glibc's malloc tunables
for its command-line tools.

XLA reads `XLA_FLAGS` once, when jax creates its CPU client, so these go into the environment
before that (importing `glide_jax` does it; nothing here imports jax).

Measured on the 2-core CPU VM with jax 0.10.2 (see README "Benchmarks"): the default YNNPACK
fusions run 64-channel 3x3 convolutions single-threaded (~100 GFLOP/s whether 1 or 2 cores
are free); with them off XLA uses its Eigen convolutions, which use both cores (~150-200
GFLOP/s forward, input- and filter-gradient). The bench config's guided sampling call went
from 0.70 s to 0.49 s and its training step from 5.2 s to 4.2 s.

Huge pages for host memory (`python -m glide_jax.<tool>` only). XLA:CPU allocates each
execution's temporary buffers afresh (one train step of the bench config: ~1.4 GB); glibc
serves such sizes with mmap and returns them with munmap, so every step page-faults them in
again: 350,000 minor faults and 0.7 s of kernel time per step. With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge pages (2 MiB): ~2,200
faults, 0.15 s of kernel time, and the step is ~8% faster. glibc reads `GLIBC_TUNABLES` only
at process start, so when a glide_jax tool is started with `python -m glide_jax.<tool>` the
package re-executes the same command line once (same PID, `os.execv`) with the tunable added.
Nothing is re-executed when glide_jax is imported any other way (scripts, notebooks, tests),
on non-Linux / non-glibc hosts, when transparent huge pages are off (`never`) or always on,
or when `GLIBC_TUNABLES` already names the tunable.

Set `GLIDE_JAX_XLA_DEFAULTS=0` to leave `XLA_FLAGS` and `GLIBC_TUNABLES` alone; a flag you
already set in `XLA_FLAGS` is never overridden. XLA flags are only applied for the jaxlib
versions they were measured on (XLA aborts on flags it does not know).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any, MutableMapping, Sequence

# flag -> value; "" means "none of the optional library fusions".
CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}
TESTED_JAXLIB = ("0.10.",)
OPT_OUT = "GLIDE_JAX_XLA_DEFAULTS"
MALLOC_TUNABLE = "glibc.malloc.hugetlb"
MIN_GLIBC = (2, 35)  # first glibc with glibc.malloc.hugetlb
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _opted_out(environ: MutableMapping[str, str]) -> bool:
    return environ.get(OPT_OUT, "1") == "0"


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def apply(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None) -> bool:
    """Adds the CPU flags to environ["XLA_FLAGS"] unless opted out; returns whether it did."""
    if _opted_out(environ):
        return False
    version = jaxlib_version if jaxlib_version is not None else _jaxlib_version()
    if not version or not version.startswith(TESTED_JAXLIB):
        return False
    flags = environ.get("XLA_FLAGS", "")
    added = [f"{k}={v}" for k, v in CPU_FLAGS.items() if k not in flags]
    if added:
        environ["XLA_FLAGS"] = " ".join([flags.strip(), *added]).strip()
    return True


def _glibc_version() -> tuple[int, ...] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def _thp_mode(path: str = THP_SETTING) -> str | None:
    """The bracketed choice in the kernel's THP setting ("always", "madvise", "never")."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


_HOST: Any = object()  # "look at this host"


def malloc_tunables(environ: MutableMapping[str, str] = os.environ, glibc: tuple[int, ...] | None = _HOST,
                    thp_mode: str | None = _HOST) -> str | None:
    """The GLIBC_TUNABLES value to run with, or None when the current one should stay.

    glibc (None: not glibc) and thp_mode (None: unknown) default to this host's."""
    if _opted_out(environ):
        return None
    glibc = _glibc_version() if glibc is _HOST else glibc
    thp_mode = _thp_mode() if thp_mode is _HOST else thp_mode
    current = environ.get("GLIBC_TUNABLES", "")
    if glibc is None or glibc < MIN_GLIBC or thp_mode != "madvise" or MALLOC_TUNABLE in current:
        return None
    return ":".join(p for p in (current, f"{MALLOC_TUNABLE}=1") if p)


def launched_as_tool(orig_argv: Sequence[str], argv: Sequence[str]) -> bool:
    """True while `python [options] -m glide_jax[.tool] ...` is importing the package to locate
    the tool (Python keeps sys.argv[0] == "-m" until then); False for every other import."""
    if not argv or argv[0] != "-m" or "-m" not in orig_argv[1:]:
        return False
    module = orig_argv[list(orig_argv).index("-m", 1) + 1:][:1]
    return bool(module) and module[0].split(".")[0] == "glide_jax"


def reexec_with_malloc_tunables() -> None:
    """Re-executes `python -m glide_jax.<tool> ...` once with the huge-page malloc tunable
    (see the module docstring); returns without doing anything in every other case."""
    if not launched_as_tool(getattr(sys, "orig_argv", []), sys.argv):
        return
    tunables = malloc_tunables()
    if tunables is None:
        return
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def settings() -> dict[str, str]:
    """What this process runs with; benchmark records include it."""
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "transparent_hugepage": _thp_mode() or "unknown"}
