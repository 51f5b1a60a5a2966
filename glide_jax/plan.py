"""Will a config's training (or sampling) step fit a mesh? Per-chip memory from an ahead-of-time compile.

    python -m glide_jax.plan --config configs/glide_base64_3p5b.py --mesh data=1,fsdp=16 \
        [--hbm-gib 32 | --chip v5e] [--batch B] [--micro-batches M] [--json]
    python -m glide_jax.plan --config glide_filtered_base64 --tpu v5litepod-16 [--mesh data=2,fsdp=8] \
        [--batch B] [--micro-batches M] [--remat config|on|off] [--program train|sample] [--json]
    python -m glide_jax.plan --config glide_filtered_base64 --tpu v4-32 --search [--max-compiles 12] [--json]

Two compilers, the same program. The train step is `glide_jax.train.make_jitted_step`, exactly
what training runs; the sample step (`--program sample`, TPU only) is one classifier-free-guided
denoising step of `glide_jax.sample`'s jitted sampler (`_generate`, respaced to one step: text
encoding, the CFG model call on 2 x batch rows, the sampler update). Nothing is allocated: the
state is `jax.eval_shape` of init, the inputs are ShapeDtypeStructs with their shardings.
Convolutions and norms are the "xla" kernels (the accelerator program). `--hparams FILE.json`
replaces the config's model hyper-parameters (GLIDE constructor keys, as `glide_jax.bench`).

`--tpu SLICE` (a Cloud TPU accelerator type: v4-8, v5litepod-16, v5p-128, v6e-8, ...; see
`glide_jax.tpu`): compiled by the real TPU compiler (libtpu, the `[tpu]` extra) for the slice's
abstract devices; no TPU is needed. Per chip: HBM = arguments + outputs - aliased (donated) +
temp from the compiler's buffer assignment (honours remat), FLOPs and bytes accessed from its
cost analysis, a roofline step time max(FLOPs / peak, bytes / HBM bandwidth), and the
collectives of the compiled HLO. The cost analysis counts every access alike, also those to
buffers the compiler keeps in on-chip memory (VMEM); `hbm_roofline_s` is the same roofline over
the accesses to HBM only (`hbm_traffic`, read off the compiled program's memory spaces). These
are compiler estimates, not measurements (docs/tpu.md).
`--search` compiles mesh factorisations x remat x micro-batches (pruned, at most --max-compiles)
and ranks them. The default mesh is the config's (`config.mesh`; sampling: data over all chips).
`--set train.compiler_effort=-1` compiles as training would with that setting (XLA's fastest
compile: the released base for a v4-8 in 60 % of the time and half the host memory, but without the
on-chip memory assignment, so its HBM traffic is not training's; glide_jax.compile_cache).

Without `--tpu`, on fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count, set
before jax starts; the module re-executes itself when jax is already running). Reported per
device:

  params / EMA / optimizer state   shard shapes of every leaf under the training shardings
  compiler temp                     memory_analysis().temp_size_in_bytes (activations etc.)
  total                             arguments + outputs - aliased (donated) + temp

  saved activations                 residuals of `jax.vjp` of the loss for one micro-batch
                                    (traced abstractly; honours remat), per device
  estimate                          state + f32 grads + saved activations + other inputs

XLA:CPU's temp is an upper bound: its schedule keeps rematerialised activations alive, so with
remat it barely shrinks (measured: 1.29 vs 1.36 GiB) while the saved activations drop 12x. The
`estimate` leaves out one block's working set and the all-gathered weights of one layer.
Chip memory: --hbm-gib, else --chip's HBM (default v4: 32 GiB).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax._src import xla_bridge  # backends_are_initialized: whether the fake device count can still apply
from jax.experimental import mesh_utils

from glide_jax import bench, compile_cache, configs_loader, experiment, host, sample, sharding, tpu, train
from glide_jax.diffusion import sampling

AXES = ("data", "fsdp", "tensor")
DEFAULT_CHIP = "v4"
GIB = 2**30
PROGRAMS = ("train", "sample")


class PlanError(ValueError):
    """A bad mesh, batch or config; printed without a traceback (exit 2)."""


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=4" -> {"data": 2, "fsdp": 4, "tensor": 1}."""
    sizes = {a: 1 for a in AXES}
    for part in filter(None, text.split(",")):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise PlanError(f"--mesh {text!r}: {part!r} is not AXIS=SIZE with AXIS one of {list(AXES)}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise PlanError(f"--mesh {text!r}: size of {name!r} is not an integer") from None
        if sizes[name] < 1:
            raise PlanError(f"--mesh {text!r}: axis sizes must be positive")
    return sizes


_CHILD = "GLIDE_JAX_PLAN_CHILD"  # set in the fresh process the planner starts for fake devices


def _fake_devices_env(n: int, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables that make jax start with n CPU devices."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", environ.get("XLA_FLAGS", ""))
    return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip(), "JAX_PLATFORMS": "cpu"}


def _set_fake_devices(n: int) -> None:
    os.environ.update(_fake_devices_env(n, os.environ))
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")  # jax read JAX_PLATFORMS when it was imported


def _leaf_bytes(tree, shardings) -> int:
    total = 0
    for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        total += int(np.prod(sh.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    return total


def residual_bytes(model, kind: str, sched, params, batch: int) -> int:
    """Bytes of the activations autodiff keeps between forward and backward for one (global)
    micro-batch of `batch` rows: the residuals of `jax.vjp` of the loss, traced abstractly.

    Only batch-major residuals (leading dimension a multiple of `batch`) are counted; the others
    are parameter casts. Backend independent, and it honours remat, unlike XLA:CPU's temp size.
    """
    loss_fn = experiment.get_kind(kind).loss
    shapes = experiment.abstract_batch(model, kind, batch)

    def vjp_of(p, b, k):
        return jax.vjp(lambda p: loss_fn(p, b, k, model=model, sched=sched)[0], p)[1]

    residuals = jax.tree.leaves(jax.eval_shape(vjp_of, params, shapes, jax.random.PRNGKey(0)))
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in residuals
                   if a.ndim and a.shape[0] % batch == 0))


# ---------------------------------------------------------------------------- the programs


def apply_overrides(config, *, batch: int | None = None, micro_batches: int | None = None,
                    remat: str = "config", hparams: Mapping[str, Any] | None = None):
    """The command line's changes to a loaded config, in place: the model (`--hparams`, then
    finalized again), batch, micro-batches, remat; kernels "xla" (the accelerator program)."""
    if hparams is not None:
        with config.ignore_type():
            config.model.hparams = ml_collections.ConfigDict(dict(hparams))
            config.data.image_size = 0  # follow the new model (finalize)
            config.data.text_ctx = 0
        experiment.finalize(config)
    if batch:
        config.data.batch_size = int(batch)
    if micro_batches:
        config.train.micro_batches = int(micro_batches)
    if remat != "config":
        config.model.remat = remat == "on"
    config.model.kernels = "xla"
    return config


@dataclasses.dataclass
class Program:
    """A step lowered for a mesh: `lowered`, and what the reports read from its set-up."""

    lowered: Any
    lower_s: float
    setup: experiment.Setup
    batch: int
    per_device_batch: int


def _check_batch(batch: int, micro: int, dp: int, what: str = "batch") -> None:
    if batch % dp:
        raise PlanError(f"{what} {batch} is not divisible by the {dp} data-parallel devices (data x fsdp)")
    if batch % micro or (batch // micro) % dp:
        raise PlanError(f"{what} {batch} / {micro} micro-batches does not split evenly over {dp} devices")


def _abstract(shapes: Mapping[str, Any], mesh, rules) -> tuple[dict, dict]:
    """(ShapeDtypeStructs carrying batch shardings, the shardings) for a dict of shapes."""
    sh = {k: sharding.batch_sharding(mesh, len(s.shape), rules) for k, s in shapes.items()}
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh[k]) for k, s in shapes.items()}, sh


def _replicated(mesh, tree):
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype, sharding=rep), tree)


def train_program(config, mesh) -> Program:
    """The training step (`train.make_jitted_step`) lowered for `mesh` at config's batch."""
    dp = sharding.data_parallel_size(mesh)
    batch, micro = int(config.data.batch_size), int(config.train.micro_batches)
    _check_batch(batch, micro, dp)
    setup = experiment.setup_state(config, mesh, abstract_only=True)
    shapes = experiment.abstract_batch(setup.model, config.model.hparams.kind, batch)
    data, batch_sh = _abstract(shapes, mesh, config.mesh.rules)
    rng = _replicated(mesh, jax.random.PRNGKey(0))
    step_fn = train.make_jitted_step(config, setup.model, setup.tx, setup.shardings, batch_sh, mesh, pad_id=0)
    t0 = time.perf_counter()
    lowered = step_fn.lower(setup.abstract, data, rng)
    return Program(lowered, time.perf_counter() - t0, setup, batch, batch // dp)


def sample_sampler(config) -> str:
    """The config's sampler for one step (restart needs several steps: planned as ddpm)."""
    s = str(config.sample.sampler)
    return "ddpm" if s == "restart" else s


def sample_program(config, mesh, prompts: int) -> Program:
    """One CFG denoising step of the jitted sampler (`sample._generate`, respaced to 1 step) for
    `prompts` prompts (2 x prompts model rows: [conditional; unconditional]), EMA params under the
    training rules on `mesh` (data over all chips, as `sample.generate` does: replicated)."""
    kind = experiment.get_kind(config.model.hparams)
    if not kind.is_generator:
        raise PlanError(f"--program sample plans a generator; a {kind.name} model is a guide")
    rows = 2 * prompts
    dp = sharding.data_parallel_size(mesh)
    _check_batch(rows, 1, dp, what=f"2 x {prompts} prompts =")
    setup = experiment.setup_state(config, mesh, abstract_only=True)
    model = setup.model
    shapes = {k: v for k, v in experiment.abstract_batch(model, kind.name, rows).items() if k != "image"}
    if "tokens" not in shapes:
        raise PlanError("the sampling plan uses classifier-free guidance, which needs a text model (xf_width > 0)")
    s = int(model.config.image_size)
    shapes["x_T"] = jax.ShapeDtypeStruct((rows, s, s, 3), jnp.float32)
    data, _ = _abstract(shapes, mesh, config.mesh.rules)
    x_T = data.pop("x_T")
    sched = _replicated(mesh, experiment.schedule_for(config.model.hparams, "1"))
    rng = _replicated(mesh, jax.random.PRNGKey(0))
    scale = _replicated(mesh, jnp.float32(config.sample.guidance_scale))
    t0 = time.perf_counter()
    lowered = sample._generate.lower(
        setup.abstract.ema_params, data, x_T, None, rng, scale, sched, None, {}, model=model,
        sampler=sample_sampler(config), eta=0.0, guidance="cfg", clip_denoised=True,
        inpaint_known="inpaint_image" in data, return_all=False, guide_model=None, progress=False)
    return Program(lowered, time.perf_counter() - t0, setup, prompts, rows // dp)


def _compile(program: Program) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = program.lowered.compile()
    return compiled, time.perf_counter() - t0


def _state_bytes(setup: experiment.Setup) -> dict[str, int]:
    state, sh = setup.abstract, setup.shardings
    return dict(params=_leaf_bytes(state.params, sh.params), ema=_leaf_bytes(state.ema_params, sh.ema_params),
                opt_state=_leaf_bytes(state.opt_state, sh.opt_state),
                params_unsharded=int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state.params))))


def _n_params(setup: experiment.Setup) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(setup.abstract.params)))


# ---------------------------------------------------------------------------- CPU (fake devices)


def plan(config, mesh_sizes: Mapping[str, int], *, hbm_gib: float, batch: int | None = None,
         micro_batches: int | None = None) -> dict[str, Any]:
    """Compiles config's train step for the mesh (needs that many jax devices) and sizes it.

    Convolutions and norms are planned with the "xla" kernels: the plan stands for the
    accelerator program, and the CPU kernels would be picked on the fake CPU devices.
    """
    n = math.prod(mesh_sizes.values())
    mesh = sharding.make_mesh(mesh_sizes, jax.devices()[:n])
    apply_overrides(config, batch=batch, micro_batches=micro_batches)
    kind = config.model.hparams.kind
    prog = train_program(config, mesh)
    effort = compile_cache.set_compiler_effort(config)
    compiled, compile_s = _compile(prog)
    mem = compiled.memory_analysis()

    batch, micro, dp = prog.batch, int(config.train.micro_batches), sharding.data_parallel_size(mesh)
    sb = _state_bytes(prog.setup)
    params_b, ema_b, opt_b = sb["params"], sb["ema"], sb["opt_state"]
    arg_b = int(mem.argument_size_in_bytes)
    out_b = int(mem.output_size_in_bytes)
    alias_b = int(mem.alias_size_in_bytes)
    temp_b = int(mem.temp_size_in_bytes)
    total_b = arg_b + out_b - alias_b + temp_b
    sched = experiment.schedule_for(config.model.hparams)
    resid_b = residual_bytes(prog.setup.model, kind, sched, prog.setup.abstract.params, batch // micro) // dp
    # state + f32 gradients (sharded like the params) + saved activations + the other inputs
    estimate_b = params_b + ema_b + opt_b + params_b + resid_b + (arg_b - (params_b + ema_b + opt_b))
    return dict(
        kind=kind, params=_n_params(prog.setup), dtype=str(config.model.dtype),
        remat=bool(config.model.get("remat", False)),
        mesh=dict(mesh.shape), devices=n, batch=batch, per_device_batch=batch // dp, micro_batches=micro,
        per_device_micro_batch=batch // dp // micro,
        bytes=dict(params=params_b, ema=ema_b, opt_state=opt_b, state=params_b + ema_b + opt_b,
                   other_arguments=arg_b - (params_b + ema_b + opt_b), arguments=arg_b, outputs=out_b,
                   aliased=alias_b, temp=temp_b, total=total_b, params_unsharded=sb["params_unsharded"],
                   residuals=resid_b, estimate=estimate_b),
        gib=dict(params=params_b / GIB, ema=ema_b / GIB, opt_state=opt_b / GIB, temp=temp_b / GIB,
                 total=total_b / GIB, residuals=resid_b / GIB, estimate=estimate_b / GIB),
        hbm_gib=hbm_gib, fits=total_b <= hbm_gib * GIB, headroom_gib=hbm_gib - total_b / GIB,
        fits_estimate=estimate_b <= hbm_gib * GIB,
        lower_s=prog.lower_s, compile_s=compile_s, compiler_effort=effort, backend=jax.default_backend(),
        note="temp/total = XLA:CPU's buffer assignment for the same SPMD program: an upper bound that "
             "ignores remat (CPU scheduling keeps the rematerialised activations alive); estimate = state + "
             "f32 grads + autodiff residuals (honours remat; excludes one block's working set); state exact",
    )


def format_table(r: Mapping[str, Any], config_name: str, hbm_source: str) -> str:
    b = r["bytes"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    rows = [
        ("params", b["params"]), ("EMA params", b["ema"]), ("optimizer state", b["opt_state"]),
        ("batch, rng, step", b["other_arguments"]), ("compiler temp (activations)", b["temp"]),
        ("outputs not aliased to inputs", b["outputs"] - b["aliased"]), ("total (compiler)", b["total"]),
    ]
    lines = [
        f"plan: {config_name} on mesh {mesh} ({r['devices']} devices)",
        f"model {r['kind']}: {r['params']:,} params ({b['params_unsharded'] / GIB:.2f} GiB), compute "
        f"{r['dtype']}, remat {r['remat']}",
        f"global batch {r['batch']}: {r['per_device_batch']} per device in {r['micro_batches']} micro-batch(es) "
        f"of {r['per_device_micro_batch']}",
        f"{'per device':<32}{'GiB':>10}",
    ]
    lines += [f"  {name:<30}{v / GIB:>10.3f}" for name, v in rows]
    lines.append(f"  {'saved activations (autodiff)':<30}{b['residuals'] / GIB:>10.3f}")
    lines.append(f"  {'estimate: state+grads+saved':<30}{b['estimate'] / GIB:>10.3f}")
    verdict = lambda ok: "fits" if ok else "does NOT fit"
    lines.append(f"chip: {r['hbm_gib']:g} GiB ({hbm_source}); compiler total {verdict(r['fits'])}, "
                 f"estimate {verdict(r['fits_estimate'])}")
    lines.append(f"lowered in {r['lower_s']:.1f}s, compiled in {r['compile_s']:.1f}s{_effort(r)}")
    lines.append(f"note: {r['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- TPU (libtpu, compile only)

# HLO collectives; the async pairs ("-start" / "-done") are counted once, at the start.
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")


def _shape_bytes(shape: str) -> int:
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


_TILED_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")


_MEMORY_SPACE = re.compile(r"S\((\d+)\)")


def _tiled_bytes(shape: str, hbm_only: bool = False) -> int:
    """Bytes of the arrays in an HLO shape as their layouts store them: a TPU layout
    `{minor_to_major:T(8,128)...}` pads the most-minor dimensions to whole tiles (a 32-channel
    f32 activation takes the space of 128). Layouts without tiles (CPU) are the plain size.

    hbm_only: count only the arrays in the default memory space (HBM). The TPU compiler's
    memory-space assignment puts some buffers in on-chip memory, marked `S(1)` in the layout
    (VMEM; on v4 also CMEM): reading or writing those moves no HBM bytes."""
    total = 0.0
    for dtype, dims, layout in _TILED_ARRAY.findall(shape):
        if dtype not in _DTYPE_BYTES:
            continue
        space = _MEMORY_SPACE.search(layout) if layout else None
        if hbm_only and space and space.group(1) != "0":
            continue
        d = [int(x) for x in dims.split(",") if x]
        order_text, _, tiling = layout[1:-1].partition(":") if layout else ("", "", "")
        order = [int(x) for x in order_text.split(",") if x.strip().isdigit()]
        tile = re.match(r"T\(([0-9,]+)\)", tiling)
        if d and order and tile:
            sizes = [int(x) for x in tile.group(1).split(",")]
            for dim, size in zip(order, reversed(sizes)):  # the tile's last size pads the most-minor dim
                d[dim] = -(-d[dim] // size) * size
        total += _DTYPE_BYTES[dtype] * math.prod(d)
    return int(total)


def _split_instruction(line: str) -> tuple[str, str] | None:
    """(result shape, opcode) of an HLO instruction line, or None."""
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple shape: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:]
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"\s*([a-z][a-z0-9\-]*)\(", rest)
    return (shape, op.group(1)) if op else None


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collective ops of a compiled (per-device) HLO module: op -> {"count", "bytes"}.

    Static counts in the program text: an op inside a loop body (micro-batches, the sampler's
    scan) is counted once. Bytes are the op's result per device (an async op's "-done"), e.g.
    the gathered array of an all-gather, the reduced one of an all-reduce.
    """
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        parsed = _split_instruction(line)
        if parsed is None:
            continue
        shape, op = parsed
        base = re.sub(r"-(start|done|update)$", "", op)
        if base not in COLLECTIVES:
            continue
        entry = out.setdefault(base, {"count": 0, "bytes": 0})
        if not op.endswith(("-done", "-update")):
            entry["count"] += 1
        if not op.endswith(("-start", "-update")):
            entry["bytes"] += _shape_bytes(shape)
    return dict(sorted(out.items()))


def all_to_all_sources(hlo_text: str, limit: int = 6) -> dict[str, Any]:
    """Where the all-to-alls of a compiled HLO module come from (their jax op_name metadata).

    An all-to-all changes which dimension of an array is split over a mesh axis. In these
    programs they are small: activations moved between batch-sharded and channel-sharded layouts
    next to a matmul whose FSDP-sharded weight has its contracting dimension split (the
    partitioner moves the activation when that is cheaper than gathering the weight; in the
    backward pass the elementwise op after the matmul's transpose carries the op_name), partial
    sums of the gradients of replicated parameters (norm scales, biases) exchanged and added
    locally (a reduce-scatter), and, when sampling, the classifier-free-guidance concatenation
    [x[:n]; x[:n]] moving rows between chips (docs/tpu.md).

    Returns: {"count", "bytes", "backward" (how many are in the backward pass),
    "by_primitive": {jax primitive: count}, "examples": ["k x op_name", ...] (the most frequent,
    layer numbers replaced by N)}.
    """
    out: dict[str, Any] = {"count": 0, "bytes": 0, "backward": 0}
    prims: dict[str, int] = {}
    names: dict[str, int] = {}
    for line in hlo_text.splitlines():
        parsed = _split_instruction(line)
        if parsed is None or parsed[1] not in ("all-to-all", "all-to-all-start", "all-to-all-done"):
            continue
        if parsed[1] != "all-to-all-start":
            out["bytes"] += _shape_bytes(parsed[0])
        if parsed[1] == "all-to-all-done":
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        name = re.sub(r"^jit\([^)]*\)/", "", op.group(1)) if op else "?"
        out["count"] += 1
        out["backward"] += "transpose(" in name
        prim = name.rsplit("/", 1)[-1]
        prims[prim] = prims.get(prim, 0) + 1
        family = re.sub(r"_\d+", "_N", name.replace("while/body/closed_call/", ""))  # one per layer kind
        names[family] = names.get(family, 0) + 1
    out["by_primitive"] = dict(sorted(prims.items(), key=lambda kv: -kv[1]))
    out["examples"] = [f"{n}x {k}" for k, n in sorted(names.items(), key=lambda kv: -kv[1])[:limit]]
    return out


# ops that move no HBM bytes themselves (their bodies, for loops and calls, are counted)
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call", "after-all",
               "partition-id", "replica-id", "opt-barrier", "add-dependency", "constant"}
_READS_ITS_RESULT = {"slice", "dynamic-slice"}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_RESULT_NAME = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=")


def _operand_names(line: str, op: str) -> list[str]:
    start = line.index(op + "(") + len(op) + 1
    depth, end = 1, len(line)
    for end in range(start, len(line)):
        depth += {"(": 1, ")": -1}.get(line[end], 0)
        if depth == 0:
            break
    return re.findall(r"%([\w.\-]+)", line[start:end])


def _sliced_parameters(lines: Sequence[str], sizes: Mapping[str, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Parameters of a computation that are only read through (dynamic-)slices: index -> the bytes
    of those slices (tiled, plain), what a fusion reads of that operand."""
    params, users = {}, {}
    for line in lines:
        parsed, name = _split_instruction(line), _RESULT_NAME.match(line)
        if not (parsed and name):
            continue
        if parsed[1] == "parameter":
            index = re.search(r"parameter\((\d+)\)", line)
            if index:
                params[name.group(1)] = int(index.group(1))
            continue
        for o in set(_operand_names(line, parsed[1])):
            if o in params:
                users.setdefault(o, []).append((parsed[1], name.group(1)))
    out = {}
    for pname, index in params.items():
        use = users.get(pname, [])
        if use and all(op in _READS_ITS_RESULT for op, _ in use):
            parts = [sizes.get(u, (0, 0, 0)) for _, u in use]
            out[index] = (sum(p[0] for p in parts), sum(p[1] for p in parts))
    return out


def _sizes(shape: str) -> tuple[int, int, int]:
    """(tiled bytes, logical bytes, tiled bytes in HBM) of an HLO shape."""
    return _tiled_bytes(shape), _shape_bytes(shape), _tiled_bytes(shape, hbm_only=True)


def _part(whole: tuple[int, int, int], tiled: int, plain: int) -> tuple[int, int, int]:
    """The sizes of a part (`tiled`, `plain` bytes, never more than the whole) of an array `whole`
    (`_sizes`): in HBM where the array is."""
    tiled, plain = min(tiled, whole[0]), min(plain, whole[1])
    return tiled, plain, tiled if whole[2] else 0


def hbm_traffic(hlo_text: str, limit: int = 8) -> dict[str, Any]:
    """Where a compiled (per-device) HLO module's memory traffic goes: every instruction that runs
    (fusions, matmuls, collectives, copies; not the ops inside a fusion, which stay on chip) moves
    its operands in and its result out, as the compiler's cost analysis counts "bytes accessed"
    (a loop body once). Grouped two ways: by kind ("fusion:convolution" = a fusion around a
    convolution, "fusion:reduce" e.g. a norm's statistics, "fusion:elementwise", collectives, ...)
    and by the jax op that made it (op_name metadata, layer numbers replaced by N). Sizes are as
    the layouts store the arrays (`_tiled_bytes`: TPU tiles pad narrow minor dimensions);
    `unpadded_bytes` is the same count at the arrays' logical sizes, so the difference is what
    padding costs. Slices (also the asynchronous slice-start TPU programs use to stage an array's
    parts) read only what they return; a dynamic-update-slice at top level updates its buffer in
    place (the update read and written), and so does a fusion that ends in one; a fusion reads only
    the slices it takes of an operand. Our own count, not the compiler's: on TPU the cost
    analysis' "bytes accessed" lies between the two (its own model of each op); on CPU they agree.
    `hbm_bytes` counts only the accesses to arrays in HBM: the TPU compiler's memory-space
    assignment keeps some buffers in on-chip memory (`S(1)` layouts) and stages others there with
    asynchronous copies and slices (prefetches); the cost analysis counts every access alike, so
    both the staging and the on-chip reads it feeds. `hbm_bytes` is the traffic the HBM bandwidth
    limits: the prefetch's read from HBM, not its write to VMEM or the fusion's read from VMEM.

    Returns: {"bytes", "unpadded_bytes", "hbm_bytes", "by_kind": {kind: bytes}, "hbm_by_kind": {kind: bytes in
    HBM}, "top": [{"bytes", "count", "op_name"}]}.
    """
    comps: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            cur = comps.setdefault(m.group(1), [])
        elif line.startswith("}"):
            cur = None
        elif cur is not None and line.strip():
            cur.append(line)
    sizes: dict[str, tuple[int, int, int]] = {}  # result name -> (tiled bytes, plain bytes, tiled in HBM)
    inlined: set[str] = set()  # fusion bodies and reducers: their ops do not touch HBM
    for lines in comps.values():
        for line in lines:
            parsed, name = _split_instruction(line), _RESULT_NAME.match(line)
            if parsed and name:
                sizes[name.group(1)] = _sizes(parsed[0])
            if not (parsed and parsed[1] == "call"):
                inlined.update(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line))
    sliced: dict[str, dict[int, tuple[int, int]]] = {}  # fusion body -> parameters only sliced: bytes read
    body_kind, in_place = {}, {}  # in_place: fusion body -> the update its root dynamic-update-slice writes
    for name, lines in comps.items():
        root = next((ln for ln in lines if ln.lstrip().startswith("ROOT ")), "")
        parsed = _split_instruction(root)
        if parsed and parsed[1] == "dynamic-update-slice":
            update = _operand_names(root, parsed[1])[1:2]
            in_place[name] = sizes.get(update[0], (0, 0, 0)) if update else (0, 0, 0)
        sliced[name] = _sliced_parameters(lines, sizes)
        body = "\n".join(lines)
        body_kind[name] = ("convolution" if " convolution(" in body else "dot" if " dot(" in body
                           else "reduce" if " reduce(" in body or " reduce-window(" in body else "elementwise")
    total, plain, hbm, kinds, hbm_kinds, where = 0, 0, 0, {}, {}, {}
    for name, lines in comps.items():
        if name in inlined:
            continue
        for line in lines:
            parsed = _split_instruction(line)
            if parsed is None or parsed[1] in _NO_TRAFFIC:
                continue
            shape, op = parsed
            operands = [sizes.get(o, (0, 0, 0)) for o in _operand_names(line, op)]
            called = re.search(r"calls=%([\w.\-]+)", line)
            if op == "fusion" and called:  # a fused slice reads only its part of the operand
                for i, part in sliced.get(called.group(1), {}).items():
                    if i < len(operands):  # overlapping or padded slices: never more than the whole
                        operands[i] = _part(operands[i], *part)
            name = _RESULT_NAME.match(line)
            result = sizes[name.group(1)] if name else _sizes(shape)  # sized once, in the first pass
            if op in _READS_ITS_RESULT:  # a slice reads only the part it returns, then writes it
                arrays = [_part(operands[0], *result[:2]) if operands else result, result]
            elif op == "slice-start":  # result ((operand), slice, s32[]): the slice is read
                read = tuple(r - sum(o[i] for o in operands) for i, r in enumerate(result[:2]))
                arrays = [_part(operands[0], *read) if operands else read + (0,)]
            elif op == "dynamic-update-slice":  # in place: the update is read and written, the rest stays
                arrays = [operands[1], _part(operands[0], *operands[1][:2])] if len(operands) > 1 else []
            elif op == "fusion" and called and called.group(1) in in_place:
                # a fusion ending in an in-place update: its inputs but the buffer, and the update written
                rest = list(operands)
                if result in rest:
                    rest.remove(result)
                arrays = rest + [_part(result, *in_place[called.group(1)][:2])]
            else:
                arrays = ([] if op.endswith("-start") else [result]) + ([] if op.endswith("-done") else operands)
            moved = sum(a[0] for a in arrays)
            plain += sum(a[1] for a in arrays)
            in_hbm = sum(a[2] for a in arrays)
            hbm += in_hbm
            kind = (f"fusion:{body_kind.get(called.group(1), '?')}" if op == "fusion" and called
                    else re.sub(r"-(start|done)$", "", op))
            op_name = re.search(r'op_name="([^"]*)"', line)
            family = re.sub(r"_\d+\b", "_N", re.sub(r"^jit\([^)]*\)/", "", op_name.group(1))) if op_name else "?"
            total += moved
            kinds[kind] = kinds.get(kind, 0) + moved
            hbm_kinds[kind] = hbm_kinds.get(kind, 0) + in_hbm
            entry = where.setdefault(family, [0, 0])
            entry[0] += moved
            entry[1] += 1
    top = sorted(where.items(), key=lambda kv: -kv[1][0])[:limit]
    return {"bytes": total, "unpadded_bytes": plain, "hbm_bytes": hbm,
            "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "hbm_by_kind": dict(sorted(hbm_kinds.items(), key=lambda kv: -kv[1])),
            "top": [{"bytes": b, "count": n, "op_name": k} for k, (b, n) in top]}


def tpu_mesh(slc: tpu.Slice, devices: Sequence, sizes: Mapping[str, int]):
    """A (data, fsdp, tensor) mesh over the slice's devices, laid out along its torus."""
    shape = sharding.mesh_shape(sizes, len(devices))
    try:
        ordered = list(mesh_utils.create_device_mesh(shape, list(devices), allow_split_physical_axes=True).flat)
    except (ValueError, NotImplementedError, AssertionError):
        ordered = list(devices)  # a shape the layout helper does not know: device order
    return sharding.make_mesh(dict(zip(AXES, shape)), ordered)


def _cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return dict(ca or {})


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _oom_bytes(message: str) -> tuple[int | None, int | None]:
    """(bytes needed, bytes available) from libtpu's out-of-HBM compile error, where it says."""
    size = r"([\d.]+)([KMGT]?)i?B?"
    for pattern in (rf"required for [^(]*\({size}\) exceeds available HBM \({size}\)", rf"Used {size} of {size} hbm"):
        m = re.search(pattern, message)
        if m:
            return (int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)]))
    return None, None


def plan_tpu(config, slc: tpu.Slice, devices: Sequence, mesh_sizes: Mapping[str, int] | None = None, *,
             program: str = "train", batch: int | None = None, hlo_path: str | None = None) -> dict[str, Any]:
    """Compiles the train or sample step for `slc` with libtpu and sizes it per chip.

    A program that does not fit is an answer, not an error: libtpu refuses to compile it
    (RESOURCE_EXHAUSTED); the result then has fits=False, `compiler_error`, the HBM the compiler
    said it needs (`hbm_bytes_per_chip`, when it says) and no costs (None).

    Args:
      config: a finalized config with the command line's overrides (`apply_overrides`).
      devices: `tpu.compile_devices(slc)`.
      mesh_sizes: axis sizes (one may be -1); None = config.mesh (train) or data over all chips (sample).
      batch: prompts per step for program="sample" (default data.batch_size); train uses data.batch_size.
      hlo_path: also write the compiled per-chip HLO module there (text), to read it yourself.
    """
    if mesh_sizes is None:
        mesh_sizes = ({a: config.mesh[a] for a in AXES} if program == "train"
                      else {"data": -1, "fsdp": 1, "tensor": 1})
    mesh = tpu_mesh(slc, devices, mesh_sizes)
    if program == "train":
        prog = train_program(config, mesh)
    else:
        prog = sample_program(config, mesh, int(batch or config.data.batch_size))
    chip = slc.chip
    sb = _state_bytes(prog.setup)
    result = dict(
        backend="tpu", program=program, slice=slc.name, chip=chip.name, topology=slc.topology, chips=slc.chips,
        hosts=slc.hosts, processes=len({d.process_index for d in devices}), mesh=dict(mesh.shape),
        kind=config.model.hparams.kind, params=_n_params(prog.setup), params_bytes_unsharded=sb["params_unsharded"],
        dtype=str(config.model.dtype), remat=bool(config.model.get("remat", False)),
        batch=prog.batch, per_chip_batch=prog.per_device_batch,
        micro_batches=int(config.train.micro_batches) if program == "train" else 1,
        hbm_capacity_bytes=chip.hbm_bytes, peak_flops_per_chip=chip.peak_flops,
        hbm_bandwidth_per_chip=chip.hbm_bandwidth, lower_s=prog.lower_s,
        compiler_effort=compile_cache.set_compiler_effort(config),  # before the compile below
    )
    if program == "sample":
        sched = experiment.schedule_for(config.model.hparams, str(config.sample.respacing))
        result.update(sampler=sample_sampler(config), model_rows=2 * prog.batch,
                      sample_evaluations=sampling.evaluations(sample_sampler(config), sched))
    parts = dict(params=sb["params"], ema=sb["ema"], opt_state=sb["opt_state"]) if program == "train" \
        else dict(params=sb["ema"])  # the sampler reads the EMA params
    t0 = time.perf_counter()
    try:
        compiled = prog.lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed, available = _oom_bytes(str(e))
        result.update(
            hbm_bytes_per_chip=needed, hbm=parts, fits=False, headroom_bytes=None if needed is None
            else chip.hbm_bytes - needed, compiler_hbm_available_bytes=available,
            compiler_error=str(e).strip().splitlines()[0], compile_s=time.perf_counter() - t0,
            host_peak_rss_bytes=_peak_rss_bytes(), **{k: None for k in (
                "flops_per_chip", "bytes_accessed_per_chip", "compute_s", "memory_s", "roofline_s", "roofline_mfu",
                "hbm_traffic_bytes_per_chip", "hbm_roofline_s", "hbm_roofline_mfu",
                "bound", "images_per_s_per_chip", "collectives", "all_to_all")})
        result["note"] = "the TPU compiler refused the program: it does not fit in HBM (compiler_error)"
        return result
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = _cost(compiled)
    hlo = compiled.as_text()
    if hlo_path:
        pathlib.Path(hlo_path).write_text(hlo)
    parts.update(arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
                 aliased=int(mem.alias_size_in_bytes), temp=int(mem.temp_size_in_bytes),
                 generated_code=int(mem.generated_code_size_in_bytes))
    total = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temp"]
    raw_flops = float(cost.get("flops", float("nan")))
    raw_accessed = float(cost.get("bytes accessed", float("nan")))
    # The cost analysis counts a loop body once: the micro-batch scan's M iterations are scaled in,
    # an upper bound (the optimizer update outside the loop is counted M times too).
    loop_scale = result["micro_batches"]
    flops, accessed = raw_flops * loop_scale, raw_accessed * loop_scale
    compute_s, memory_s = flops / chip.peak_flops, accessed / chip.hbm_bandwidth
    roofline_s = max(compute_s, memory_s)
    optimal = float(cost.get("optimal_seconds", -1.0))
    images_per_step = prog.batch / result.get("sample_evaluations", 1)
    traffic = hbm_traffic(hlo)
    # The same roofline over the accesses to arrays in HBM only: what the compiler staged in on-chip
    # memory (memory-space assignment, `hbm_traffic`) is not limited by the HBM bandwidth.
    hbm_moved = traffic["hbm_bytes"] * loop_scale
    hbm_roofline_s = max(compute_s, hbm_moved / chip.hbm_bandwidth)
    result.update(
        hbm_bytes_per_chip=total, hbm=parts, fits=total <= chip.hbm_bytes, headroom_bytes=chip.hbm_bytes - total,
        compile_s=compile_s, host_peak_rss_bytes=_peak_rss_bytes(),
        flops_per_chip=flops, bytes_accessed_per_chip=accessed, loop_scale=loop_scale,
        compiler_flops_per_chip=raw_flops, compiler_bytes_accessed_per_chip=raw_accessed,
        compute_s=compute_s, memory_s=memory_s, roofline_s=roofline_s,
        roofline_mfu=compute_s / roofline_s if roofline_s > 0 else float("nan"),
        bound="compute" if compute_s >= memory_s else "memory",
        images_per_s_per_chip=images_per_step / roofline_s / slc.chips if roofline_s > 0 else float("nan"),
        compiler_optimal_s=optimal if optimal >= 0 else None,
        hbm_traffic_bytes_per_chip=hbm_moved, hbm_roofline_s=hbm_roofline_s,
        hbm_roofline_mfu=compute_s / hbm_roofline_s if hbm_roofline_s > 0 else float("nan"),
        collectives=collectives(hlo), all_to_all=all_to_all_sources(hlo), hbm_traffic=traffic,
    )
    result["note"] = ("compiler estimates for one step, not measurements: HBM from libtpu's buffer assignment; "
                      "FLOPs / bytes from its cost analysis (remat recompute included); roofline_s = max(flops / "
                      "peak, bytes / HBM bandwidth) ignores communication and overlap; hbm_roofline_s counts only "
                      "the bytes of arrays in HBM (our count of the compiled program; the cost analysis also counts "
                      "on-chip VMEM accesses); with M micro-batches the "
                      "loop body's cost is counted M times (upper bound); collectives are static counts in the "
                      "per-chip program (an op in a loop body counts once)")
    return result


def _fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def _effort(r: Mapping[str, Any]) -> str:
    e = r.get("compiler_effort") or 0.0
    return f" (train.compiler_effort {e:g})" if e else ""


def format_tpu(r: Mapping[str, Any], config_name: str) -> str:
    h = r["hbm"]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
    what = (f"train step, global batch {r['batch']} ({r['per_chip_batch']} per chip, {r['micro_batches']} "
            f"micro-batch(es))" if r["program"] == "train" else
            f"sample step ({r['sampler']}, CFG), {r['batch']} prompts = {r['model_rows']} model rows "
            f"({r['per_chip_batch']} per chip)")
    lines = [
        f"plan: {config_name} on {r['slice']} ({r['chips']} x {r['chip']}, {r['hosts']} host(s), topology "
        f"{r['topology']}), mesh {mesh}",
        f"model {r['kind']}: {r['params']:,} params ({_fmt_bytes(r['params_bytes_unsharded'])}), compute "
        f"{r['dtype']}, remat {r['remat']}; {what}",
        f"{'HBM per chip':<34}{'GiB':>10}",
    ]
    rows = [("params" + (" (EMA)" if r["program"] == "sample" else ""), h["params"])]
    if r["program"] == "train":
        rows += [("EMA params", h["ema"]), ("optimizer state", h["opt_state"])]
    if r.get("compiler_error"):
        lines += [f"  {name:<32}{v / GIB:>10.3f}" for name, v in rows]
        lines.append(f"does NOT fit: the TPU compiler refused it: {r['compiler_error']}")
        lines.append(f"lowered in {r['lower_s']:.1f}s, compiler gave up after {r['compile_s']:.1f}s; try --remat on, "
                     "--micro-batches, a smaller --batch, or more chips (--search)")
        return "\n".join(lines)
    rows += [("arguments", h["arguments"]), ("outputs", h["outputs"]), ("aliased (donated)", -h["aliased"]),
             ("temp (activations, buffers)", h["temp"]), ("total", r["hbm_bytes_per_chip"])]
    lines += [f"  {name:<32}{v / GIB:>10.3f}" for name, v in rows]
    lines.append(f"chip HBM {_fmt_bytes(r['hbm_capacity_bytes'])}: {'fits' if r['fits'] else 'does NOT fit'} "
                 f"(headroom {_fmt_bytes(r['headroom_bytes'])})")
    lines.append(f"per chip: {r['flops_per_chip'] / 1e9:,.1f} GFLOP, {r['bytes_accessed_per_chip'] / 1e9:,.2f} GB "
                 f"accessed -> compute {r['compute_s'] * 1e3:.2f} ms, HBM {r['memory_s'] * 1e3:.2f} ms; roofline "
                 f"{r['roofline_s'] * 1e3:.2f} ms ({r['bound']}-bound, MFU <= {r['roofline_mfu']:.0%}), "
                 f"<= {r['images_per_s_per_chip']:,.1f} images/s/chip")
    lines.append(f"HBM only (our count of the accesses to arrays in HBM; the compiler keeps others on chip): "
                 f"{r['hbm_traffic_bytes_per_chip'] / 1e9:,.2f} GB -> roofline {r['hbm_roofline_s'] * 1e3:.2f} ms "
                 f"(MFU <= {r['hbm_roofline_mfu']:.0%}), <= {r['images_per_s_per_chip'] * r['roofline_s'] / r['hbm_roofline_s']:,.1f} images/s/chip")
    traffic = r.get("hbm_traffic")
    if traffic and traffic["bytes"]:
        kinds = ", ".join(f"{k} {v / traffic['bytes']:.0%}" for k, v in list(traffic["by_kind"].items())[:5])
        lines.append(f"HBM traffic (our count from the HLO, tiled layouts: {traffic['bytes'] / 1e9:,.2f} GB, "
                     f"{traffic['unpadded_bytes'] / 1e9:,.2f} GB without tile padding) by kind: {kinds}")
        lines.append("  largest: " + "; ".join(f"{t['op_name']} {t['bytes'] / 1e9:,.2f} GB ({t['count']} ops)"
                                              for t in traffic["top"][:3]))
    coll = ", ".join(f"{op} {c['count']} ({c['bytes'] / 2**20:,.1f} MiB)" for op, c in r["collectives"].items())
    lines.append(f"collectives: {coll or 'none'}")
    a2a = r["all_to_all"]
    if a2a["count"]:
        prims = ", ".join(f"{k} {v}" for k, v in a2a["by_primitive"].items())
        lines.append(f"all-to-all: {a2a['count']} ({a2a['backward']} in the backward pass) at jax ops {prims}; "
                     f"most from {'; '.join(a2a['examples'][:2])}")
    lines.append(f"lowered in {r['lower_s']:.1f}s, compiled in {r['compile_s']:.1f}s{_effort(r)}; host peak RSS "
                 f"{_fmt_bytes(r['host_peak_rss_bytes'])}")
    lines.append(f"note: {r['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- search


def _meshes(chips: int, batch: int, max_tensor: int = 4) -> list[dict[str, int]]:
    """(data, fsdp, tensor) factorisations of the chips whose data-parallel size divides the batch,
    most promising first: full FSDP, then more data parallelism, then tensor parallelism."""
    out = []
    for t in (t for t in range(1, min(chips, max_tensor) + 1) if chips % t == 0):
        for d in (d for d in range(1, chips // t + 1) if (chips // t) % d == 0):
            f = chips // t // d
            if batch % (d * f) == 0:
                out.append({"data": d, "fsdp": f, "tensor": t})
    return sorted(out, key=lambda m: (m["tensor"], m["data"]))


def search(config, slc: tpu.Slice, devices: Sequence, *, max_compiles: int = 12,
           micro_choices: Sequence[int] = (1, 2, 4), progress: Callable[[str], None] | None = None
           ) -> list[dict[str, Any]]:
    """Compiles candidate (mesh, remat, micro-batches) train steps and ranks them.

    Per mesh, remat off at 1 micro-batch first; remat on only when that does not fit, more
    micro-batches only when the fewer did not fit (neither is faster in the roofline: both add
    work). At most `max_compiles` compiles; `progress` gets one line per compile with an ETA.
    Returns one summary per compile, best first: fitting, then the shortest roofline step.
    """
    batch = int(config.data.batch_size)
    meshes = _meshes(slc.chips, batch)
    if not meshes:
        raise PlanError(f"no mesh over {slc.chips} chips has a data-parallel size dividing batch {batch}")
    total = min(max_compiles, len(meshes) * (1 + len(micro_choices)))  # at most, per mesh: off/1, on/each
    results, times = [], []
    say = progress or (lambda line: None)
    for mesh_sizes in meshes:
        fitted = False
        for remat, micro in itertools.product((False, True), micro_choices):
            if fitted or len(times) >= max_compiles:
                break
            dp = mesh_sizes["data"] * mesh_sizes["fsdp"]
            if batch % micro or (batch // micro) % dp:
                continue
            if micro > 1 and not remat and len(micro_choices) > 1:
                continue  # more micro-batches are tried with remat on, after remat alone did not fit
            cand = copy.deepcopy(config)
            cand.model.remat, cand.train.micro_batches = remat, micro
            label = (f"data={mesh_sizes['data']} fsdp={mesh_sizes['fsdp']} tensor={mesh_sizes['tensor']} "
                     f"remat={'on' if remat else 'off'} micro={micro}")
            t0 = time.perf_counter()
            try:
                r = plan_tpu(cand, slc, devices, mesh_sizes)
            except (PlanError, sharding.MeshError) as e:
                say(f"[{len(times) + 1}/{total}] {label}: skipped ({e})")
                continue
            times.append(time.perf_counter() - t0)
            fitted = r["fits"]
            results.append(summary(r))
            eta = (total - len(times)) * sum(times) / len(times)
            verdict = (f"fits in {_fmt_bytes(r['hbm_bytes_per_chip'])}/chip, roofline {r['roofline_s'] * 1e3:.1f} ms"
                       if r["fits"] else "does NOT fit" + (f" ({_fmt_bytes(r['hbm_bytes_per_chip'])}/chip)"
                                                           if r["hbm_bytes_per_chip"] else ""))
            say(f"[{len(times)}/{total}] {label}: {verdict}; compiled in {times[-1]:.0f}s; "
                f"ETA ~{eta / 60:.1f} min for at most {total - len(times)} more")
        if len(times) >= max_compiles:
            break
    inf = float("inf")
    return sorted(results, key=lambda s: (not s["fits"], s["hbm_roofline_s"] or inf, s["roofline_s"] or inf,
                                          s["hbm_bytes_per_chip"] or inf))


def summary(r: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a TPU plan that `--search` ranks and prints."""
    keys = ("mesh", "remat", "micro_batches", "fits", "hbm_bytes_per_chip", "hbm_capacity_bytes", "roofline_s",
            "roofline_mfu", "hbm_roofline_s", "hbm_roofline_mfu", "bound", "images_per_s_per_chip",
            "flops_per_chip", "bytes_accessed_per_chip", "hbm_traffic_bytes_per_chip",
            "compile_s", "host_peak_rss_bytes", "collectives")
    return {k: r[k] for k in keys}


def format_search(rows: Sequence[Mapping[str, Any]], config_name: str, slc: tpu.Slice, batch: int) -> str:
    lines = [f"search: {config_name} train step on {slc.name} ({slc.chips} x {slc.chip.name}, "
             f"{_fmt_bytes(slc.chip.hbm_bytes)} HBM each), global batch {batch}; best first",
             f"{'data':>5}{'fsdp':>5}{'tensor':>7}{'remat':>6}{'micro':>6}{'fits':>6}{'HBM GiB':>9}"
             f"{'step ms':>9}{'MFU<=':>7}{'img/s/chip<=':>13}{'HBM-only ms':>12}{'MFU<=':>7}"]
    for r in rows:
        m = r["mesh"]
        row = (f"{m['data']:>5}{m['fsdp']:>5}{m['tensor']:>7}{'on' if r['remat'] else 'off':>6}"
               f"{r['micro_batches']:>6}{'yes' if r['fits'] else 'NO':>6}")
        row += f"{r['hbm_bytes_per_chip'] / GIB:>9.2f}" if r["hbm_bytes_per_chip"] else f"{'?':>9}"
        if r["roofline_s"] is not None:
            row += (f"{r['roofline_s'] * 1e3:>9.1f}{r['roofline_mfu']:>7.0%}{r['images_per_s_per_chip']:>13.1f}"
                    f"{r['hbm_roofline_s'] * 1e3:>12.1f}{r['hbm_roofline_mfu']:>7.0%}")
        else:
            row += f"{'-':>9}{'-':>7}{'-':>13}{'-':>12}{'-':>7}"
        lines.append(row)
    lines.append("step ms = roofline max(FLOPs / peak, bytes / HBM bandwidth) per chip: a compiler estimate, "
                 "communication not included; HBM-only: the same over the bytes of arrays in HBM (ranked by it)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


def _load_config(args) -> ml_collections.ConfigDict:
    config = configs_loader.load(args.config, lock=False)
    for item in args.set:
        field, eq, value = item.partition("=")
        if not eq:
            raise PlanError(f"--set {item!r}: want FIELD=VALUE, e.g. model.scan_layers=false")
        try:
            configs_loader.set_field(config, field.strip(), value.strip())
        except (KeyError, TypeError) as e:
            raise PlanError(f"--set {item}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    if args.set:
        config = experiment.finalize(config)
    hparams = bench.load_hparams(args.hparams) if args.hparams else None
    return apply_overrides(config, batch=args.batch if args.program == "train" else None,
                           micro_batches=args.micro_batches or None, remat=args.remat, hparams=hparams)


def _main_tpu(args) -> int:
    slc = tpu.get_slice(args.tpu)
    if args.search and args.program != "train":
        raise PlanError("--search plans the train step (--program train)")
    if args.search and (args.mesh or args.micro_batches or args.remat != "config"):
        raise PlanError("--search chooses the mesh, remat and micro-batches itself; drop --mesh, "
                        "--micro-batches and --remat")
    if not tpu.libtpu_available():  # before the (slow) config and model set-up
        raise tpu.SliceError(f"--tpu needs libtpu: {tpu.INSTALL_HINT}")
    sizes = parse_mesh(args.mesh) if args.mesh else None
    if sizes and math.prod(sizes.values()) != slc.chips:
        raise PlanError(f"mesh {sizes} has {math.prod(sizes.values())} devices; {slc.name} has {slc.chips} chips")
    # compile-only: the little that runs (a PRNG key) runs on the CPU, so a busy TPU on this VM is
    # left alone; no persistent cache, so compile_s is the compiler's time
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_compilation_cache", False)
    config = _load_config(args)
    devices = tpu.compile_devices(slc)
    if args.search:
        def progress(line):
            print(line, file=sys.stderr, flush=True)
        rows = search(config, slc, devices, max_compiles=args.max_compiles, progress=progress)
        for r in rows:
            r.update(slice=slc.name, config=args.config)
        print(json.dumps(rows) if args.json else format_search(rows, args.config, slc, int(config.data.batch_size)))
        return 0
    result = plan_tpu(config, slc, devices, sizes, program=args.program,
                      batch=args.batch if args.program == "sample" else None, hlo_path=args.hlo)
    result.update(config=args.config)
    print(json.dumps(result) if args.json else format_tpu(result, args.config))
    return 0


def _main_cpu(args, argv: list[str]) -> int:
    if not args.mesh:
        raise PlanError("--mesh is required without --tpu (fake CPU devices)")
    if args.program != "train" or args.search:
        raise PlanError("--program sample and --search need --tpu SLICE")
    sizes = parse_mesh(args.mesh)
    n = math.prod(sizes.values())
    if args.devices and args.devices != n:
        raise PlanError(f"mesh {sizes} needs {n} devices, but --devices {args.devices} were given")
    if args.hbm_gib:
        hbm, hbm_source = args.hbm_gib, "--hbm-gib"
    elif args.chip in bench.CHIPS:
        chip = bench.CHIPS[args.chip]
        hbm, hbm_source = chip.hbm_gib, f"{chip.name} HBM{' (default --chip)' if args.chip == DEFAULT_CHIP else ''}"
    else:
        raise PlanError(f"--chip {args.chip!r}: expected one of {sorted(bench.CHIPS)} or give --hbm-gib")
    # The fake device count only takes effect before jax starts (loading a config starts it: its
    # kernels are resolved for the backend), so a process where jax runs already checks the config
    # and mesh, then plans in a fresh process.
    started = xla_bridge.backends_are_initialized()
    if not started:
        _set_fake_devices(n)
    config = _load_config(args)
    _check_batch(int(config.data.batch_size), int(config.train.micro_batches), sizes["data"] * sizes["fsdp"])
    if started:
        if os.environ.get(_CHILD) == "1":  # never a chain of processes
            raise PlanError("jax started before the fake CPU devices could be set; run the planner as "
                            "`python -m glide_jax.plan` in a fresh process")
        env = dict(os.environ, **_fake_devices_env(n, os.environ), **{_CHILD: "1"})
        return subprocess.run([sys.executable, "-m", "glide_jax.plan", *argv], env=env).returncode
    result = plan(config, sizes, hbm_gib=hbm)
    result.update(config=args.config, hbm_source=hbm_source)
    print(json.dumps(result) if args.json else format_table(result, args.config, hbm_source))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m glide_jax.plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="configs/X.py or a config name")
    parser.add_argument("--tpu", metavar="SLICE", help="compile with libtpu for a Cloud TPU slice (v4-8, "
                        "v5litepod-4, v5p-128, v6e-8, ...); default: fake CPU devices")
    parser.add_argument("--mesh", default="", help="data=D,fsdp=F[,tensor=T] (required without --tpu; with "
                        "--tpu default: config.mesh, sampling: data over all chips)")
    parser.add_argument("--program", choices=PROGRAMS, default="train",
                        help="train step, or one CFG sampling step (--tpu only)")
    parser.add_argument("--search", action="store_true", help="--tpu: try meshes x remat x micro-batches, "
                        "print them ranked")
    parser.add_argument("--max-compiles", type=int, default=12, help="--search: at most this many compiles")
    parser.add_argument("--hparams", help="replace the model's hyper-parameters (GLIDE constructor keys, JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field before planning, e.g. model.scan_layers=false (repeatable)")
    parser.add_argument("--devices", type=int, default=0, help="chips the mesh must use (default: its product)")
    parser.add_argument("--hbm-gib", type=float, default=0.0, help="memory per chip (default: --chip's)")
    parser.add_argument("--chip", default=DEFAULT_CHIP, help="v4, v5e, v5p, v6e, a100, h100, h200 (for the HBM)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: config.data.batch_size); "
                        "--program sample: prompts per step (2x model rows)")
    parser.add_argument("--micro-batches", type=int, default=0, help="default: config.train.micro_batches")
    parser.add_argument("--remat", choices=("config", "on", "off"), default="config",
                        help="rematerialise each block in the backward pass (default: the config's model.remat)")
    parser.add_argument("--hlo", metavar="PATH", help="--tpu: write the compiled per-chip HLO module to PATH")
    parser.add_argument("--json", action="store_true", help="print one JSON object (--search: a list)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        if args.batch < 0 or args.micro_batches < 0 or args.max_compiles < 1:
            raise PlanError("--batch and --micro-batches must be >= 0, --max-compiles >= 1")
        return _main_tpu(args) if args.tpu else _main_cpu(args, argv)
    except (PlanError, tpu.SliceError, sharding.MeshError, sharding.RulesError, FileNotFoundError,
            experiment.SetupError, bench.BenchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    host.tune_for_cli()
    sys.exit(main())
