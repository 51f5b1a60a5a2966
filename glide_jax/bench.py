"""Speed of sampling, training and the input pipeline; one JSON object per run with --json.

    python -m glide_jax.bench sample --hparams FILE.json --steps 25 --batch 2 --guidance-scale 3 --json
    python -m glide_jax.bench train --hparams FILE.json --batch 8 [--dtype bfloat16] [--devices N] --json
    python -m glide_jax.bench data [--config configs/shapes_tiny.py] [--steps 20] --json

FILE.json holds GLIDE constructor keys (the format of tests/fixtures/parity/*/hparams.json);
missing keys take GLIDE's defaults, a missing "kind" means "base". Weights are random (init).

sample: CFG sampling of `batch` prompts (2·batch model rows: [conditional; unconditional])
with the jitted `glide_jax.sample.generate` (text encoded once, one `lax.scan` over the steps).
The scan is one program, so `per_step_s` is the median over `--repeats` full timed runs of
(run time / steps), after a first compiling call; `model_call_s` is the separately jitted,
guided model call alone (median of `--repeats` calls). `compile_s` = first call − median run.

train: one optimizer step of `glide_jax.train.make_jitted_step` (the training program:
forward + backward of the diffusion loss, caption dropout 0.2, AdamW, EMA) on random data,
state donated, FSDP over the first `--devices` devices; compiled ahead of time (`compile_s`),
one untimed warm-up step, then `--steps` timed steps.

`--kernels auto|xla|cpu|winograd` (default auto: "cpu" on the CPU backend, "xla" elsewhere; see
`glide_jax.experiment.resolve_kernels` and `glide_jax.models.layers.KERNELS`) chooses the kernel
set, "winograd" forcing Winograd on every 3x3 convolution it supports. FLOPs (`flops_per_step`,
`gflop_per_step`, `mfu`, `achieved_gflops`) are model FLOPs: XLA's cost analysis of the same
program lowered with the "xla" kernels (direct convolutions), whatever runs, so figures compare
across kernel sets and with other frameworks; `executed_*` is the cost analysis of the program
actually compiled (Winograd does fewer multiplies per 3x3 convolution). With remat the FLOPs
include recomputation.
Peaks: the bf16 dense peak of the chip (`CHIPS`); on CPU, a measured float32 matmul peak
(best of several jitted 2048x2048 matmuls) of the whole process, shared by all host devices.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glide_jax import configs_loader, experiment, host, sharding, tpu, train
from glide_jax.config import default_config
from glide_jax.data import pipeline
from glide_jax.diffusion import guidance as G
from glide_jax.models import layers
from glide_jax.sample import generate, respacing_for, schedule_for

KERNEL_CHOICES = ("auto",) + layers.KERNELS


class BenchError(ValueError):
    """A user mistake (missing file, bad option); printed without a traceback."""


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_gib: float  # memory per chip
    kinds: tuple[str, ...]  # lower-case substrings of jax's `device_kind`


# Order matters: the first chip whose pattern is in device_kind wins ("tpu v5 lite" before "tpu v5").
def _tpu(gen: str, *kinds: str) -> Chip:
    c = tpu.CHIPS[gen]  # the TPU facts live in glide_jax.tpu
    return Chip(c.name, c.peak_flops, c.hbm_bytes / 2**30, kinds)


CHIPS: dict[str, Chip] = {
    "v6e": _tpu("v6e", "tpu v6 lite", "tpu v6e"),
    "v5e": _tpu("v5e", "tpu v5 lite", "tpu v5e"),
    "v5p": _tpu("v5p", "tpu v5p", "tpu v5"),
    "v4": _tpu("v4", "tpu v4"),
    "a100": Chip("NVIDIA A100", 312e12, 80, ("a100",)),
    "h200": Chip("NVIDIA H200", 989e12, 141, ("h200",)),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80, ("h100",)),
}


def chip_of(device: jax.Device) -> Chip | None:
    kind = device.device_kind.lower()
    for chip in CHIPS.values():
        if any(k in kind for k in chip.kinds):
            return chip
    return None


def matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Best FLOP/s of a jitted n x n matmul on the default device (the CPU peak we compare to)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def peak_flops(devices: Sequence[jax.Device]) -> tuple[float, str]:
    """(peak FLOP/s of `devices` together, where the number comes from)."""
    if devices[0].platform == "cpu":
        return matmul_peak(), "measured float32 2048x2048 matmul, all host devices together"
    chip = chip_of(devices[0])
    if chip is None:
        return float("nan"), f"unknown device kind {devices[0].device_kind!r}"
    return chip.peak_flops * len(devices), f"{chip.name} bf16 peak x {len(devices)}"


def cost_flops(compiled) -> float:
    """FLOPs of one run of a program from XLA's cost analysis: of a `Compiled`, per device if
    sharded; of a `Lowered` (before partitioning, nothing compiled), of the whole program."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def load_hparams(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"cannot read hparams {path}: {e}") from None
    kind = d.get("kind", "base")
    if kind not in experiment.GENERATORS:
        raise BenchError(f"bench needs a Text2ImUNet kind {experiment.GENERATORS}, got {kind!r}")
    full = experiment.hparams_with_defaults(kind, d)
    try:  # building is lazy: trace an init (shapes only) so layer-level checks run here
        model = experiment.from_hparams(full)
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.init_inputs(1)))
    except (TypeError, ValueError) as e:
        raise BenchError(f"hparams {path}: {e}") from None
    return full


abstract_batch = experiment.abstract_batch


def random_batch(shapes: Mapping[str, jax.ShapeDtypeStruct], *, n_vocab: int = 50257, num_classes: int = 1,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Random values of the given shapes: images in [-1, 1], captions of random length."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, s in shapes.items():
        if name == "tokens":
            out[name] = rng.integers(1, n_vocab, s.shape).astype(np.int32)
        elif name == "mask":
            lens = rng.integers(1, s.shape[1] + 1, (s.shape[0], 1))
            out[name] = np.arange(s.shape[1])[None, :] < lens
        elif name == "label":
            out[name] = rng.integers(0, num_classes, s.shape).astype(np.int32)
        elif name == "inpaint_mask":
            out[name] = (rng.random(s.shape) < 0.5).astype(np.float32)
        else:
            out[name] = rng.uniform(-1, 1, s.shape).astype(np.float32)
    return out


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def _n_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------------------- sample


def bench_sample(hparams: Mapping[str, Any], *, steps: int = 25, batch: int = 2, guidance_scale: float = 3.0,
                 sampler: str = "ddpm", dtype: str = "float32", repeats: int = 3, seed: int = 0,
                 kernels: str = "auto") -> dict:
    """Times CFG sampling of `batch` prompts (see the module docstring)."""
    kernels = experiment.resolve_kernels(kernels)
    model = experiment.build(hparams, jnp.dtype(dtype), kernels=kernels)
    rng = jax.random.PRNGKey(seed)
    params = jax.jit(lambda r: nn.meta.unbox(model.init(r, **model.init_inputs(1))["params"]))(rng)
    rows = 2 * batch
    shapes = abstract_batch(model, hparams["kind"], rows)
    data = random_batch(shapes, n_vocab=model.config.n_vocab, seed=seed)
    inputs = {k: v for k, v in data.items() if k != "image"}
    # [conditional; unconditional]: the second half has the empty caption (all padding).
    inputs["tokens"][batch:] = 0
    inputs["mask"][batch:] = False
    sched = schedule_for(hparams, respacing_for(sampler, steps))
    n_steps = sched.num_timesteps

    def run():
        return generate(model, params, inputs, sched=sched, sampler=sampler, guidance="cfg",
                        scale=guidance_scale, rng=rng)

    first_s = _timed(run, 1)[0]
    run_times = _timed(run, repeats)
    total_s = statistics.median(run_times)

    # The guided model call the sampler makes at every step, jitted on its own; the text is
    # encoded once before the loop (as in generate), so it is outside this program.
    rest = {k: v for k, v in inputs.items() if k not in ("tokens", "mask")}
    text = jax.jit(lambda p, tok, m: model.apply({"params": p}, tok, m, method="encode_text"))(
        params, inputs["tokens"], inputs["mask"])

    def guided_call(net):
        def call(params, text, rest, x, t):
            model_fn = lambda x, t: net.apply({"params": params}, x, t, text=text, **rest)
            return G.classifier_free(model_fn, guidance_scale)(x, t)
        return jax.jit(call)

    s = model.config.image_size
    x = jax.random.normal(rng, (rows, s, s, 3))
    t = jnp.full((rows,), int(sched.timestep_map[-1]), jnp.int32)
    lowered = guided_call(model).lower(params, text, rest, x, t)
    compiled = lowered.compile()
    executed_gflop = cost_flops(compiled) / 1e9
    if kernels != "xla":  # model FLOPs: the same call with direct convolutions
        lowered = guided_call(experiment.build(hparams, jnp.dtype(dtype), kernels="xla")).lower(
            params, text, rest, x, t)
    gflop = cost_flops(lowered) / 1e9
    _timed(lambda: compiled(params, text, rest, x, t), 1)  # warm-up
    call_times = _timed(lambda: compiled(params, text, rest, x, t), repeats)

    per_step_s = total_s / n_steps
    devices = jax.devices()[:1]
    peak, peak_source = peak_flops(devices)
    achieved = gflop / per_step_s
    return dict(
        mode="sample", kind=hparams["kind"], backend=jax.default_backend(), device=devices[0].device_kind,
        dtype=dtype, kernels=kernels, sampler=sampler, batch=batch, model_rows=rows, steps=n_steps,
        guidance_scale=guidance_scale, params=_n_params(params),
        per_step_s=per_step_s, total_s=total_s, run_times_s=run_times, compile_s=max(first_s - total_s, 0.0),
        first_call_s=first_s, model_call_s=statistics.median(call_times),
        gflop_per_step=gflop, executed_gflop_per_step=executed_gflop, achieved_gflops=achieved,
        executed_gflops=executed_gflop / per_step_s, peak_gflops=peak / 1e9,
        peak_source=peak_source, peak_fraction=achieved * 1e9 / peak,
        host=host.settings(),
        timing=f"per_step_s = median of {repeats} full {n_steps}-step runs / steps (one scan program); "
               "model_call_s = the guided model call alone, text encoding excluded",
    )


# ---------------------------------------------------------------------------- train


def bench_train(hparams: Mapping[str, Any], *, batch: int = 8, dtype: str = "float32", devices: int = 1,
                steps: int = 3, seed: int = 0, kernels: str = "auto") -> dict:
    """Times one training step of the real training program (see the module docstring)."""
    all_devices = jax.devices()
    if not 1 <= devices <= len(all_devices):
        raise BenchError(f"--devices {devices}: {len(all_devices)} devices are available")
    if batch % devices:
        raise BenchError(f"--batch {batch} is not divisible by --devices {devices}")
    config = default_config(hparams["kind"])
    config.model.hparams = ml_collections.ConfigDict(dict(hparams))
    config.model.dtype = dtype
    config.model.kernels = kernels
    config.data.batch_size = batch
    config.seed = seed
    experiment.finalize(config)
    kernels = config.model.kernels
    mesh = sharding.make_mesh({"data": 1, "fsdp": devices, "tensor": 1}, all_devices[:devices])
    setup = experiment.setup_state(config, mesh)
    model, state, state_sh, rng = setup.model, setup.state, setup.shardings, jax.random.PRNGKey(seed)
    shapes = abstract_batch(model, hparams["kind"], batch)
    batch_sh = {k: sharding.batch_sharding(mesh, len(s.shape)) for k, s in shapes.items()}
    data = jax.device_put(random_batch(shapes, n_vocab=model.config.n_vocab, seed=seed), batch_sh)
    step_fn = train.make_jitted_step(config, model, setup.tx, state_sh, batch_sh, mesh, pad_id=0)

    t0 = time.perf_counter()
    lowered = step_fn.lower(state, data, rng)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    executed_flops = cost_flops(compiled) * devices  # the cost analysis is of one device's program
    if kernels != "xla":  # model FLOPs: the same program with direct convolutions, lowered only
        direct = experiment.model_from_config(config, kernels="xla")
        lowered = train.make_jitted_step(config, direct, setup.tx, state_sh, batch_sh, mesh, pad_id=0).lower(
            state, data, rng)
    flops = cost_flops(lowered)

    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], data, rng)
        return metrics

    _timed(one, 1)  # warm-up
    times = _timed(one, steps)
    per_step_s = statistics.median(times)
    peak, peak_source = peak_flops(all_devices[:devices])
    return dict(
        mode="train", kind=hparams["kind"], backend=jax.default_backend(), device=all_devices[0].device_kind,
        devices=devices, dtype=dtype, kernels=kernels, batch=batch,
        params=_n_params(holder["state"].params),
        per_step_s=per_step_s, min_step_s=min(times), step_times_s=times, compile_s=compile_s,
        flops_per_step=flops, executed_flops_per_step=executed_flops,
        achieved_gflops=flops / per_step_s / 1e9, executed_gflops=executed_flops / per_step_s / 1e9,
        peak_gflops=peak / 1e9,
        peak_source=peak_source, mfu=flops / per_step_s / peak, images_per_s=batch / per_step_s,
        host=host.settings(),
        timing=f"median of {steps} steps after compilation and one warm-up step",
    )


# ---------------------------------------------------------------------------- data


def bench_data(config_name: str, *, steps: int = 20, batch: int | None = None) -> dict:
    """Images/s that the per-host input pipeline delivers (process 0 of 1)."""
    config = configs_loader.load(config_name, lock=False)
    if batch:
        config.data.batch_size = batch
    tok = experiment.tokenizer_for(config.model.hparams, config.tokenizer)
    pipeline.prepare(config.data)
    rate = pipeline.benchmark(config.data, steps, tokenizer=tok)
    return dict(
        mode="data", dataset=config.data.name, images_per_s=rate, batch=int(config.data.batch_size),
        image_size=int(config.data.image_size), num_workers=int(config.data.num_workers), steps=steps,
        host_cpus=os.cpu_count(), timing="per host, after 3 warm-up batches", host=host.settings(),
    )


# ---------------------------------------------------------------------------- command line


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
        print(f"{k:>16}: {v}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glide_jax.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    ps = sub.add_parser("sample", help="CFG sampling speed")
    ps.add_argument("--hparams", required=True)
    ps.add_argument("--steps", type=int, default=25)
    ps.add_argument("--batch", type=int, default=2, help="prompts (2x model rows with CFG)")
    ps.add_argument("--guidance-scale", type=float, default=3.0)
    ps.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++"), default="ddpm")
    ps.add_argument("--dtype", default="float32")
    ps.add_argument("--repeats", type=int, default=3, help="timed full sampling runs")
    pt = sub.add_parser("train", help="training step speed")
    pt.add_argument("--hparams", required=True)
    pt.add_argument("--batch", type=int, default=8)
    pt.add_argument("--dtype", default="float32")
    pt.add_argument("--devices", type=int, default=1, help="first N devices, mesh fsdp=N")
    pt.add_argument("--steps", type=int, default=3, help="timed steps")
    pd = sub.add_parser("data", help="input pipeline images/s")
    pd.add_argument("--config", default="shapes_tiny")
    pd.add_argument("--steps", type=int, default=20)
    pd.add_argument("--batch", type=int, default=0, help="override data.batch_size")
    for p in (ps, pt):
        p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                       help="auto (cpu on the CPU backend, xla elsewhere) | xla | cpu | winograd (cpu, Winograd "
                            "forced on every supported 3x3 convolution)")
    for p in (ps, pt, pd):
        p.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.mode == "sample":
            result = bench_sample(load_hparams(args.hparams), steps=args.steps, batch=args.batch,
                                  guidance_scale=args.guidance_scale, sampler=args.sampler, dtype=args.dtype,
                                  repeats=args.repeats, kernels=args.kernels)
        elif args.mode == "train":
            result = bench_train(load_hparams(args.hparams), batch=args.batch, dtype=args.dtype,
                                 devices=args.devices, steps=args.steps, kernels=args.kernels)
        else:
            result = bench_data(args.config, steps=args.steps, batch=args.batch or None)
    except (BenchError, FileNotFoundError, experiment.SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    host.tune_for_cli()
    sys.exit(main())
