"""Host tuning for the command-line tools on CPU machines: XLA:CPU flags and glibc's malloc
tunables. Opt-in: importing glide_jax changes nothing; each tool's `__main__` block calls
`tune_for_cli()` first, which does nothing on TPU VMs, GPU hosts, or with GLIDE_JAX_XLA_DEFAULTS=0.

XLA reads `XLA_FLAGS` once, when jax creates its CPU client, so the flags go into the
environment before that (nothing here imports jax; the tools have not run a computation yet).

- JAX_PLATFORMS=cpu where no accelerator is attached (`pin_cpu_platform`): with libtpu
  installed, jax would otherwise try (and fail) to start the TPU backend in every process.
- XLA:CPU flags: the default YNNPACK fusions run 64-channel 3x3 convolutions single-threaded;
  with them off XLA uses its Eigen convolutions, which use every core (docs/benchmarks.md, "Host
  settings"). Applied only for the jaxlib versions they were measured on (XLA aborts on flags
  it does not know); a flag already in `XLA_FLAGS` is never overridden.
- Huge pages for host memory: XLA:CPU allocates each execution's temporary buffers afresh;
  glibc serves such sizes with mmap and returns them with munmap, so every step page-faults them
  in again. With glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge
  pages (2 MiB). glibc reads `GLIBC_TUNABLES` only at process start, so the tool re-executes its
  own command line once (same PID, `os.execv`) with the tunable added. Not done on non-Linux /
  non-glibc hosts, when transparent huge pages are off (`never`) or always on, or when
  `GLIBC_TUNABLES` already names the tunable.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any, MutableMapping

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


def on_tpu_vm(environ: MutableMapping[str, str] = os.environ) -> bool:
    """A Cloud TPU VM (TPU devices or the TPU runtime's environment)."""
    return bool(environ.get("TPU_WORKER_HOSTNAMES") or environ.get("MEGASCALE_COORDINATOR_ADDRESS")
                or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))


def on_cpu_host(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether jax will run on the CPU here: JAX_PLATFORMS says so, or no TPU/GPU is attached."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not (on_tpu_vm(environ) or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd"))


def pin_cpu_platform(environ: MutableMapping[str, str] = os.environ) -> bool:
    """JAX_PLATFORMS=cpu when nothing chose a platform and no TPU/GPU is attached; returns
    whether it did.

    With libtpu installed (the [tpu] extra, for `glide_jax.plan --tpu`), jax otherwise tries the
    TPU backend in every process: five lines of libtpu warnings on stderr, ~230 MB more resident
    memory and a log file in /tmp/tpu_logs, before it falls back to the CPU (docs/tpu.md). The
    TPU compiler stays reachable (`jax.experimental.topologies` loads libtpu itself). A tool's
    `__main__` runs after its module imported jax, which read JAX_PLATFORMS at import: its
    config is updated too while no backend has started.
    """
    if environ.get("JAX_PLATFORMS") or not on_cpu_host(environ):
        return False
    environ["JAX_PLATFORMS"] = "cpu"
    jax = sys.modules.get("jax") if environ is os.environ else None
    if jax is not None and jax.config.jax_platforms is None:
        jax.config.update("jax_platforms", "cpu")
    return True


def tune_for_cli(environ: MutableMapping[str, str] = os.environ) -> None:
    """What a glide_jax tool's `__main__` calls first: on a CPU host, pin jax to the CPU
    (`pin_cpu_platform`), re-execute once with the huge-page malloc tunable (does not return
    then), and add the XLA:CPU flags (those two not with GLIDE_JAX_XLA_DEFAULTS=0)."""
    pin_cpu_platform(environ)
    if _opted_out(environ) or not on_cpu_host(environ):
        return
    tunables = malloc_tunables(environ)
    if tunables is not None and environ is os.environ:
        os.environ["GLIBC_TUNABLES"] = tunables
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    apply(environ)


def settings() -> dict[str, str]:
    """What this process runs with; benchmark records include it."""
    return {"xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "transparent_hugepage": _thp_mode() or "unknown"}
