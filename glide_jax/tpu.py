"""Cloud TPU slices and chips, and the compile-only TPU devices of a slice (no TPU needed).

A slice is named as `gcloud compute tpus tpu-vm create --accelerator-type` takes it. v4 and v5p
count TensorCores (two per chip, fused into one "megacore" device: chips = N/2); v5e
(`v5litepod-N`) and v6e count chips. `SLICES` maps each name to its chip, chip count, hosts and
the topology name `jax.experimental.topologies.get_topology_desc` builds it from; with libtpu
installed (the `[tpu]` extra) `compile_devices(slice)` returns abstract TPU devices that
`jax.jit(...).lower(...).compile()` targets with the real TPU compiler on any machine.

Per-chip facts from Google's Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/
docs/v4, v5e, v5p, v6e): peak dense bf16 FLOP/s, HBM capacity and HBM bandwidth. The pages give
v4's HBM in GiB and the others' in "GB"; the table takes all of them as GiB (the chips' HBM
stacks come in binary sizes), and the runtime keeps a little of it for itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import tempfile

from jax.experimental import topologies

GIB = 2**30


class SliceError(ValueError):
    """An unknown slice name, or no libtpu to compile for one; the message is for the user."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation's chip.

    Attributes:
      name: the generation as Google writes it ("TPU v5e").
      topology: the generation prefix of a topology name ("v5e" in "v5e:2x2").
      device_kind: what jax reports as the devices' `device_kind`.
      hbm_bytes: HBM per chip.
      peak_flops: dense bf16 FLOP/s per chip.
      hbm_bandwidth: HBM bytes/s per chip.
      megacore: two TensorCores per chip driven as one device (v4, v5p); slice names count cores.
    """

    name: str
    topology: str
    device_kind: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    megacore: bool


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", "v4", "TPU v4", 32 * GIB, 275e12, 1.2e12, megacore=True),
    "v5e": Chip("TPU v5e", "v5e", "TPU v5 lite", 16 * GIB, 197e12, 8.19e11, megacore=False),
    "v5p": Chip("TPU v5p", "v5p", "TPU v5", 95 * GIB, 459e12, 2.765e12, megacore=True),
    "v6e": Chip("TPU v6e", "v6e", "TPU v6 lite", 32 * GIB, 918e12, 1.638e12, megacore=False),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A Cloud TPU accelerator type.

    Attributes:
      name: the accelerator type ("v4-8", "v5litepod-16").
      chip: its `Chip`.
      chips: chips (= jax devices: one per chip, megacore on v4/v5p).
      hosts: TPU VM hosts (jax processes).
      shape: chip grid, "2x2x1" (3-D tori: v4, v5p) or "4x4" (2-D: v5e, v6e).
    """

    name: str
    chip: Chip
    chips: int
    hosts: int
    shape: str

    @property
    def topology(self) -> str:
        """The name `get_topology_desc` takes ("v4:2x2x1")."""
        return f"{self.chip.topology}:{self.shape}"

    def topology_kwargs(self) -> dict:
        kw = {}
        if self.chip.megacore:
            kw["chip_config_name"] = "megacore"  # else each TensorCore is its own device
        elif self.chips in (1, 8):
            # single-host 1- and 8-chip VMs; libtpu's default host is 2x2 chips
            a, b = (int(v) for v in self.shape.split("x"))
            kw["chips_per_host_bounds"] = [a, b, 1]
        return kw


# Chip grids of the documented slice shapes, by chip count.
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 6144: "16x16x24"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def _slices() -> dict[str, Slice]:
    out = {}
    # v4 and v5p: N TensorCores = N/2 chips, 4 chips (8 cores) per host.
    for prefix, chip, largest in (("v4", CHIPS["v4"], 2048), ("v5p", CHIPS["v5p"], 6144)):
        for chips, shape in _SHAPES_3D.items():
            if chips <= largest:
                out[f"{prefix}-{2 * chips}"] = Slice(f"{prefix}-{2 * chips}", chip, chips, max(1, chips // 4), shape)
    # v5e and v6e: N chips; up to 8 on one host, multi-host slices have 4 chips per host.
    for prefix, chip in (("v5litepod", CHIPS["v5e"]), ("v6e", CHIPS["v6e"])):
        for chips, shape in _SHAPES_2D.items():
            out[f"{prefix}-{chips}"] = Slice(f"{prefix}-{chips}", chip, chips, 1 if chips <= 8 else chips // 4, shape)
    return out


SLICES: dict[str, Slice] = _slices()


def get_slice(name: str) -> Slice:
    """The slice of an accelerator type; SliceError (one line, listing the known ones) if unknown."""
    key = name.strip().lower()
    if key not in SLICES:
        raise SliceError(f"unknown TPU slice {name!r}; known: {', '.join(SLICES)}")
    return SLICES[key]


def libtpu_available() -> bool:
    """Whether the TPU compiler can be loaded (the libtpu package, or TPU_LIBRARY_PATH)."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if path and os.path.isfile(path):
        return True
    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):  # ValueError: a module blocked with sys.modules["libtpu"] = None
        return False


INSTALL_HINT = "pip install '.[tpu]' (the TPU compiler; no TPU needed)"


@contextlib.contextmanager
def _stderr_to(path: str):
    """fd 2 into `path` (libtpu's C++ start-up warnings about the missing TPU hardware)."""
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def compile_devices(slc: Slice) -> list:
    """The slice's abstract TPU devices (compile only: nothing can run on them).

    libtpu refuses a second process that loads it (/tmp/libtpu_lockfile) unless
    ALLOW_MULTIPLE_LIBTPU_LOAD=1, which is set here (the devices are never opened); the
    metadata-server query is skipped. Its start-up warnings on this machine without a TPU are
    kept out of the terminal and shown only if loading fails.
    """
    if not libtpu_available():
        raise SliceError(f"compiling for a TPU slice needs libtpu: {INSTALL_HINT}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        try:
            with _stderr_to(log.name):
                topo = topologies.get_topology_desc(platform="tpu", topology_name=slc.topology,
                                                    **slc.topology_kwargs())
        except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
            detail = " ".join(log.read().split()[-40:])
            raise SliceError(f"libtpu could not describe {slc.name} ({slc.topology}): {e}"
                             + (f"; libtpu said: {detail}" if detail else "")) from None
    devices = list(topo.devices)
    if len(devices) != slc.chips:
        raise SliceError(f"libtpu describes {slc.topology} with {len(devices)} devices, expected {slc.chips}")
    return devices
