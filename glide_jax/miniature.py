"""The miniature GLIDE: every network of the paper trained on synthetic shapes, evaluated, reported.

    python -m glide_jax.demo --all --workdir runs/miniature          # = make miniature
    python -m glide_jax.miniature --workdir runs/miniature [--steps-scale 0.1] [--steps clip=500] \
        [--set base:optim.lr=5e-4] [--n 192] [--train-only] [--section tradeoff]

Stages, each in its own sub-workdir of --workdir and trained by `train.train_and_evaluate`:

    base        shapes_tiny         16 px text-to-image model (the demo's)
    upsample    shapes_upsample     16 -> 64 px text-conditioned upsampler, low-res noise augmentation
    inpaint     shapes_inpaint      base-inpaint, fine-tuned from base (4 zero input channels)
    clip        shapes_clip         noised CLIP, contrastive on q(x_t | x_0)
    classifier  shapes_classifier   noisy classifier over the 18 (colour, shape) objects

Resumable: a stage whose newest checkpoint is at its step count is skipped, an interrupted one
resumes from its checkpoint (the trainer's own resume); each evaluation section is cached in
WORKDIR/eval/<section>.json with its settings and the checkpoints' steps, and recomputed only
when those change. `--steps-scale F` multiplies every stage's step count (tests run in seconds),
`--steps STAGE=N` sets one, `--set STAGE:FIELD=VALUE` overrides a config field (STAGE "all" =
every stage).

Evaluation (held-out captions, `evaluate.heldout_captions`; pixel detector `data.shapes.detect`;
n = --n, 192 by default; DDPM at the base config's respacing), then WORKDIR/report.md + PNGs:

    cfg, clip, classifier   colour adherence without guidance and at 3 scales of CFG, CLIP
                            guidance (the trained noised CLIP) and classifier guidance
                            (single-object captions), via `evaluate.adherence`
    tradeoff                adherence vs diversity over guidance scales, CFG and CLIP: K captions
                            x M samples each; diversity = `evaluate.mean_pairwise_distance` (mean
                            RMS pixel distance between samples of one caption); tradeoff.png
    inpaint                 one object kept in one half, the other half masked, the caption
                            asking for a new object there: error in the known half, the filled
                            half's detected object vs the caption
    cascade                 base (CFG) -> upsampler at 64 px (GLIDE's sampler from noise, and one
                            started at t = 500 from the noised bilinear upscale) vs a bilinear
                            upscale: adherence, edge sharpness, `evaluate.pixel_kid` to real renders

Budget on 2 CPU cores (step times in `STAGES`, which the printed ETAs use): ~45 minutes of
training for the five stages (base 2500 steps ~8 min, upsampler 3000 ~16, inpainting 1500 ~5,
CLIP 3000 ~7, classifier 3000 ~8, plus start-up) and ~15 minutes of evaluation with nothing
else on the cores; ~1.5x that beside another job.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from glide_jax import configs_loader, evaluate, experiment, host, images
from glide_jax.configs import shapes_classifier, shapes_clip, shapes_inpaint, shapes_tiny, shapes_upsample
from glide_jax.console import setup_logging
from glide_jax.convert import save_converted
from glide_jax.data import shapes
from glide_jax.sample import SampleError, guided_images, load_for_sampling, sample_images
from glide_jax.train import TrainingError, train_and_evaluate

DEFAULT_WORKDIR = "runs/miniature"
SAMPLER = "ddpm"  # GLIDE's; the only sampler gradient (CLIP / classifier) guidance runs with


class MiniatureError(ValueError):
    """A user mistake or an unusable workdir; printed as one `error:` line."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One network of the miniature GLIDE.

    Attributes:
      name: the stage and its sub-workdir.
      get_config: the shipped config's `get_config` (not finalized: overrides go in first).
      config_name: its name under glide_jax/configs.
      s_per_step: the measured seconds per training step on 2 CPU cores (for the ETA).
      init_from: a stage whose trained EMA params start this one (inpainting from the base).
    """

    name: str
    get_config: Callable[[], ml_collections.ConfigDict]
    config_name: str
    s_per_step: float
    init_from: str = ""


# s/step: median of 12 training steps of each config (the real jitted step on random batches) on
# this project's 2-core machine with nothing else running; another job on the cores makes them
# ~1.5x slower (shapes_tiny: 0.19 alone, 0.30 beside one other process).
STAGES = (
    Stage("base", shapes_tiny.get_config, "shapes_tiny", 0.19),
    Stage("upsample", shapes_upsample.get_config, "shapes_upsample", 0.32),
    Stage("inpaint", shapes_inpaint.get_config, "shapes_inpaint", 0.20, init_from="base"),
    Stage("clip", shapes_clip.get_config, "shapes_clip", 0.13),
    Stage("classifier", shapes_classifier.get_config, "shapes_classifier", 0.15),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


@dataclasses.dataclass
class Options:
    """What to train and how to evaluate (the command line's flags).

    steps: per-stage step counts (override `steps_scale`); overrides: stage (or "all") ->
    {dotted config field: value}. The evaluation: `n` captions per row, sampled `batch` at a
    time; `respacing` for the base model ("" = its config's `sample.respacing`); guidance scales;
    the trade-off's `tradeoff_captions` captions x `tradeoff_samples` samples per scale;
    `upsample_start`: the timestep the cascade's second upsampler row starts at
    (`sample.upsample_images(start_t=...)`; the first row is GLIDE's sampler from noise).
    """

    steps_scale: float = 1.0
    steps: Mapping[str, int] = dataclasses.field(default_factory=dict)
    overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    n: int = 192
    batch: int = 32
    respacing: str = ""
    cfg_scales: tuple[float, ...] = (1.5, 3.0, 6.0)
    clip_scales: tuple[float, ...] = (1.0, 3.0, 10.0)
    classifier_scales: tuple[float, ...] = (1.0, 3.0, 10.0)
    tradeoff_cfg: tuple[float, ...] = (0.0, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 9.0)
    tradeoff_clip: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    tradeoff_captions: int = 16
    tradeoff_samples: int = 12
    upsample_start: int = 500
    seed: int = 0

    def eval_settings(self) -> dict:
        d = dataclasses.asdict(self)
        for key in ("steps_scale", "steps", "overrides"):
            d.pop(key)
        return d


# ---------------------------------------------------------------------------- configs and stages


def _set_field(config: ml_collections.ConfigDict, field: str, value: Any, where: str) -> None:
    try:
        configs_loader.set_field(config, field, value)
    except KeyError:
        raise MiniatureError(f"{where}: no such config field") from None
    except TypeError as e:
        raise MiniatureError(f"{where}: wrong type ({e})") from None


def stage_config(stage: Stage, root: pathlib.Path, opts: Options) -> ml_collections.ConfigDict:
    """The stage's config: the shipped one, `opts.overrides`, its step count, finalized and locked."""
    config = stage.get_config()
    for scope in ("all", stage.name):
        for field, value in opts.overrides.get(scope, {}).items():
            _set_field(config, field, value, f"--set {scope}:{field}")
    if stage.name in opts.steps:
        config.train.num_steps = int(opts.steps[stage.name])
    else:
        config.train.num_steps = max(1, int(round(config.train.num_steps * opts.steps_scale)))
    if stage.init_from:
        config.init_from = str(init_dir(root, stage))
    try:
        experiment.finalize(config)
    except experiment.SetupError as e:
        raise MiniatureError(f"stage {stage.name}: {e}") from None
    config.lock()
    return config


def init_dir(root: pathlib.Path, stage: Stage) -> pathlib.Path:
    return root / f"{stage.name}_init"


def latest_step(workdir: pathlib.Path) -> int:
    """The newest finished checkpoint's step in a training workdir (0: none)."""
    ckpt = workdir / "checkpoints"
    if not ckpt.is_dir():
        return 0
    return max((int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and p.is_dir()), default=0)


def export_init(source_dir: pathlib.Path, out_dir: pathlib.Path, config) -> None:
    """The trained EMA params of `source_dir` as a converted checkpoint for `config`'s network:
    equal shapes are copied; a kernel that is larger there (the inpainting model's first
    convolution, 3 -> 7 input channels) gets its extra entries zero, so the new model starts
    as the old one (GLIDE's inpainting fine-tune)."""
    _, params, _, source_cfg = load_for_sampling(str(source_dir))
    want = config.model.hparams.to_dict()
    ignore = {"kind", "inpaint", "super_res"}
    differ = sorted(k for k in want if k not in ignore and source_cfg.hparams.get(k) != want[k])
    if differ:
        raise MiniatureError(f"{out_dir.name}: the network must be {source_dir.name}'s to start from it; "
                             f"hyper-parameters differ: {', '.join(differ)} (use the same --set for both)")
    target = experiment.setup_state(config, abstract_only=True).abstract.params

    def fit(path, have, shape):
        have = np.asarray(have)
        if have.shape == tuple(shape.shape):
            return have
        if have.ndim != len(shape.shape) or any(h > w for h, w in zip(have.shape, shape.shape)):
            raise MiniatureError(f"{out_dir.name}: parameter {jax.tree_util.keystr(path)} is {have.shape} in "
                                 f"{source_dir.name}, {shape.shape} here")
        return np.pad(have, [(0, w - h) for h, w in zip(have.shape, shape.shape)])

    try:
        params = jax.tree_util.tree_map_with_path(fit, params, target)
    except ValueError as e:  # different trees
        raise MiniatureError(f"{out_dir.name}: {source_dir.name}'s parameters do not fit this network ({e})") from None
    save_converted(str(out_dir), want, params, force=True)


def _say(text: str) -> None:
    """A progress line, flushed (the output is often a log file)."""
    print(text, flush=True)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def train_stages(root: pathlib.Path, opts: Options, configs: Mapping[str, Any] | None = None,
                 say=_say) -> list[dict]:
    """Trains every stage not yet at its step count, in order; returns what each did."""
    configs = configs or {s.name: stage_config(s, root, opts) for s in STAGES}
    left = {s.name: max(0, configs[s.name].train.num_steps - latest_step(root / s.name)) for s in STAGES}
    out = []
    for i, stage in enumerate(STAGES, 1):
        config, workdir = configs[stage.name], root / stage.name
        total, done = int(config.train.num_steps), latest_step(root / stage.name)
        head = f"[miniature] stage {i}/{len(STAGES)} {stage.name} ({stage.config_name})"
        if done >= total:
            say(f"{head}: finished (step {done} of {total}), skipped")
            out.append(dict(stage=stage.name, skipped=True, steps=done))
            continue
        eta = left[stage.name] * stage.s_per_step
        rest = sum(left[s.name] * s.s_per_step for s in STAGES[i - 1:])
        say(f"{head}: steps {done} -> {total}, ~{_minutes(eta)} at {stage.s_per_step:.2f} s/step on 2 CPU cores "
            f"({'resuming' if done else 'new'}); all stages left: ~{_minutes(rest)}")
        if stage.init_from and done == 0:
            export_init(root / stage.init_from, init_dir(root, stage), config)
            say(f"[miniature] {stage.name} starts from {stage.init_from}'s EMA params ({init_dir(root, stage)})")
        t0 = time.perf_counter()
        train_and_evaluate(config, str(workdir))
        seconds = time.perf_counter() - t0
        say(f"[miniature] {stage.name}: {total - done} steps in {_minutes(seconds)} "
            f"({seconds / max(total - done, 1):.2f} s/step with start-up)")
        left[stage.name] = 0
        out.append(dict(stage=stage.name, skipped=False, steps=total, seconds=seconds))
    return out


def training_summary(root: pathlib.Path, configs: Mapping[str, Any]) -> list[dict]:
    """Per stage: steps, parameters, median logged step time, last logged loss (and accuracy)."""
    rows = []
    for stage in STAGES:
        config = configs[stage.name]
        logged = []
        path = root / stage.name / "metrics.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "loss" in rec:
                    logged.append(rec)
        abstract = experiment.setup_state(config, abstract_only=True).abstract.params
        times = [r["step_time_s"] for r in logged if r.get("step_time_s")]
        tail = logged[-4:]
        rows.append(dict(
            stage=stage.name, config=stage.config_name, kind=config.model.hparams.kind,
            params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract))),
            batch=int(config.data.batch_size), steps=latest_step(root / stage.name),
            s_per_step=float(np.median(times)) if times else None,
            loss=float(np.mean([r["loss"] for r in tail])) if tail else None,
            accuracy=float(np.mean([r["accuracy"] for r in tail])) if tail and "accuracy" in tail[0] else None,
        ))
    return rows


# ---------------------------------------------------------------------------- evaluation


class Eval:
    """The trained stages, loaded once each, and the evaluation settings."""

    def __init__(self, root: pathlib.Path, opts: Options, configs: Mapping[str, Any]):
        self.root, self.opts, self.configs = root, opts, dict(configs)
        self._bundles: dict[str, tuple] = {}
        base = self.configs["base"]
        self.respacing = opts.respacing or str(base.sample.respacing)
        self.scale = float(base.sample.guidance_scale)  # CFG of the inpainting and cascade samples
        self.up_respacing = str(self.configs["upsample"].sample.respacing)

    def dir(self, stage: str) -> str:
        return str(self.root / stage)

    def bundle(self, stage: str):
        if stage not in self._bundles:
            self._bundles[stage] = load_for_sampling(self.dir(stage))
        return self._bundles[stage]

    def steps(self) -> dict[str, int]:
        return {s.name: latest_step(self.root / s.name) for s in STAGES}

    def samples(self, captions: Sequence[str], *, guidance: str = "cfg", scale: float = 0.0) -> np.ndarray:
        """uint8 [n, S, S, 3] base samples, `opts.batch` per call (seed + offset, as the evaluator)."""
        base, b, out = self.bundle("base"), self.opts.batch, []
        for i in range(0, len(captions), b):
            part = list(captions[i:i + b])
            if guidance == "cfg" or scale == 0:
                x = sample_images(*base[:3], part, hparams=base[3].hparams, guidance_scale=scale,
                                  respacing=self.respacing, sampler=SAMPLER, seed=self.opts.seed + i)
            else:
                labels = [evaluate.class_of(c) for c in part] if guidance == "classifier" else ()
                x = guided_images(base, self.bundle(guidance), part, guidance=guidance, labels=labels, scale=scale,
                                  respacing=self.respacing, seed=self.opts.seed + i)
            out.append(images.to_uint8(x))
        return np.concatenate(out)

    def cli_flags(self) -> str:
        """The flags that make `python -m glide_jax.miniature` use these settings."""
        default, flags = Options(), []
        for name, value in dataclasses.asdict(self.opts).items():
            if name in ("steps_scale", "steps", "overrides") or value == getattr(default, name):
                continue
            text = ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)
            flags.append(f"--{name.replace('_', '-')} {shlex.quote(text)}")
        return " ".join(flags)


def _adherence_command(ev: Eval, scales: Sequence[float], guidance: str = "cfg", single: float = 0.5) -> str:
    parts = [f"python -m glide_jax.evaluate adherence --checkpoint {ev.dir('base')} --n {ev.opts.n}",
             f"--scales {','.join(f'{s:g}' for s in scales)} --steps {ev.respacing} --sampler {SAMPLER}"]
    if ev.opts.batch != 32:
        parts.append(f"--batch {ev.opts.batch}")
    if ev.opts.seed:
        parts.append(f"--seed {ev.opts.seed}")
    if guidance != "cfg":
        parts.append(f"--guidance {guidance} --guide {ev.dir(guidance)}")
    if single != 0.5:
        parts.append(f"--single-fraction {single:g}")
    return " ".join(parts)


def _adherence_section(ev: Eval, scales, guidance="cfg", single=0.5, grid="") -> dict:
    result = evaluate.adherence(ev.dir("base"), n=ev.opts.n, scales=scales, respacing=ev.respacing, sampler=SAMPLER,
                                seed=ev.opts.seed, batch=ev.opts.batch, grid_path=str(ev.root / grid) if grid else None,
                                guidance=guidance, guide=ev.dir(guidance) if guidance != "cfg" else None,
                                single_fraction=single)
    result["command"] = _adherence_command(ev, scales, guidance, single)
    return result


def eval_cfg(ev: Eval) -> dict:
    """No guidance and CFG at `opts.cfg_scales`."""
    return _adherence_section(ev, (0.0,) + tuple(ev.opts.cfg_scales), grid="grid_cfg.png")


def eval_clip(ev: Eval) -> dict:
    """CLIP guidance by the trained noised CLIP at `opts.clip_scales`."""
    return _adherence_section(ev, tuple(ev.opts.clip_scales), guidance="clip", grid="grid_clip.png")


def eval_classifier(ev: Eval) -> dict:
    """Classifier guidance on single-object captions (and those captions without guidance)."""
    return _adherence_section(ev, (0.0,) + tuple(ev.opts.classifier_scales), guidance="classifier", single=1.0,
                              grid="grid_classifier.png")


def eval_tradeoff(ev: Eval) -> dict:
    """Adherence and diversity of K captions x M samples at each CFG and CLIP guidance scale."""
    k, m = ev.opts.tradeoff_captions, ev.opts.tradeoff_samples
    prompts = evaluate.heldout_captions(k, seed=ev.opts.seed + 1)
    captions = [c for c in prompts for _ in range(m)]
    points, unguided, strips = [], None, []
    for method, scales in (("cfg", ev.opts.tradeoff_cfg), ("clip", ev.opts.tradeoff_clip)):
        for scale in scales:
            t0 = time.perf_counter()
            if scale == 0 and unguided is not None:
                pics = unguided
            else:
                pics = ev.samples(captions, guidance=method, scale=scale)
            if scale == 0:
                unguided = pics
            scores = evaluate.adherence_scores(captions, pics)
            points.append(dict(method=method, scale=float(scale), colour=scores["colour"], scene=scores["scene"],
                               diversity=evaluate.mean_pairwise_distance(pics.reshape(k, m, *pics.shape[1:])),
                               seconds=time.perf_counter() - t0))
            if scale in (0, max(scales)) and not (method == "clip" and scale == 0):
                strips.append((f"{'CFG' if method == 'cfg' else 'CLIP'} {scale:g}", pics[:m]))
    plot_tradeoff(points, ev.root / "tradeoff.png")
    grid = images.grid(np.concatenate([p for _, p in strips]), cols=m, scale=max(1, 48 // strips[0][1].shape[1]),
                       row_labels=[label for label, _ in strips])
    images.save_png(ev.root / "tradeoff_samples.png", grid)
    return dict(captions=k, samples_per_caption=m, points=points, example_caption=prompts[0],
                command=f"python -m glide_jax.miniature --workdir {ev.root} --section tradeoff {ev.cli_flags()}".strip())


def inpaint_cases(n: int, size: int, seed: int = 0):
    """n inpainting tasks: (caption, source uint8 [S, S, 3], keep mask [S, S, 1], new object, full render).

    One object (colour, shape) sits in the left or top half (alternately) and is kept; the other
    half is masked and empty in the source; the caption names the scene with a new object of
    another colour in the masked half ("a red circle to the left of a blue square", or the other
    wording). The full render is what the caption describes (the detector's reference)."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for i in range(n):
        axis = i % 2
        keep = int(rng.integers(shapes.NUM_OBJECTS))
        new = int(rng.choice([o for o in range(shapes.NUM_OBJECTS) if o // 3 != keep // 3]))
        spec = shapes.layout((keep // 3, new // 3), (keep % 3, new % 3), (shapes.LEFT, shapes.ABOVE)[axis], rng)
        if rng.uniform() < 0.5:  # "new right of kept" / "new below kept"
            words = shapes.Spec(spec.colors[::-1], spec.shapes[::-1], (shapes.RIGHT, shapes.BELOW)[axis])
        else:
            words = spec
        kept = shapes.Spec(spec.colors[:1], spec.shapes[:1], shapes.NONE, spec.boxes[:1])
        mask = np.zeros((size, size, 1), np.float32)
        if axis == 0:
            mask[:, : size // 2] = 1.0
        else:
            mask[: size // 2] = 1.0
        out.append((shapes.caption(words), shapes.render(kept, size), mask, new, shapes.render(spec, size)))
    return out


def filled_region_scores(pics: np.ndarray, masks: np.ndarray, objects: Sequence[int]) -> dict[str, float]:
    """The filled (mask = 0) region alone, the known region painted background: the fraction
    whose detected colours are exactly the new object's, and whose one detection is that object."""
    background = shapes.BACKGROUND.astype(np.uint8)
    colour_ok, object_ok = [], []
    for pic, mask, obj in zip(pics, masks, objects):
        region = np.where(mask > 0.5, background, pic).astype(np.uint8)
        found = shapes.detect(region)
        colour_ok.append({d.color for d in found} == {obj // 3})
        object_ok.append([(d.color, d.shape) for d in found] == [(obj // 3, obj % 3)])
    return {"colour": float(np.mean(colour_ok)), "object": float(np.mean(object_ok))}


def eval_inpaint(ev: Eval) -> dict:
    """Known-region error and the filled region vs the caption's new object (CFG at the base config's scale)."""
    model, params, tok, cfg = ev.bundle("inpaint")
    size = int(cfg.hparams["image_size"])
    cases = inpaint_cases(ev.opts.n, size, ev.opts.seed)
    captions = [c[0] for c in cases]
    source = np.stack([c[1] for c in cases])
    masks = np.stack([c[2] for c in cases])
    objects = [c[3] for c in cases]
    truth = np.stack([c[4] for c in cases])
    src = images.from_uint8(source)
    t0, out, b = time.perf_counter(), [], ev.opts.batch
    for i in range(0, len(cases), b):
        x = sample_images(model, params, tok, captions[i:i + b], hparams=cfg.hparams, guidance_scale=ev.scale,
                          respacing=ev.respacing, sampler=SAMPLER, seed=ev.opts.seed + i,
                          inpaint_image=src[i:i + b] * masks[i:i + b], inpaint_mask=masks[i:i + b])
        out.append(images.to_uint8(x))
    pics = np.concatenate(out)
    known = masks[..., 0] > 0.5
    err = np.abs(pics.astype(np.int32) - source.astype(np.int32)).max(-1)[known]
    full = evaluate.adherence_scores(captions, pics)
    grid_rows = [np.where(masks[:8] > 0.5, source[:8], 128).astype(np.uint8), pics[:8], truth[:8]]
    images.save_png(ev.root / "inpaint.png", images.grid(np.concatenate(grid_rows), captions[:8] * 3, cols=8,
                                                         scale=max(1, 64 // size),
                                                         row_labels=["input", "inpainted", "asked for"]))
    return dict(
        n=len(cases), guidance_scale=ev.scale, seconds=time.perf_counter() - t0,
        known_mean_abs_error=float(err.mean()), known_max_abs_error=int(err.max()),
        filled=filled_region_scores(pics, masks, objects),
        filled_reference=filled_region_scores(truth, masks, objects),
        full_caption=full, full_caption_reference=evaluate.adherence_scores(captions, truth),
        command=f"python -m glide_jax.miniature --workdir {ev.root} --section inpaint {ev.cli_flags()}".strip(),
    )


def eval_cascade(ev: Eval) -> dict:
    """Base (CFG) -> upsampler (GLIDE's sampler from noise, and from `opts.upsample_start`) vs a
    bilinear upscale of the same base samples, at the upsampler's size."""
    up = ev.bundle("upsample")
    size = int(up[3].hparams["image_size"])
    captions = evaluate.heldout_captions(ev.opts.n, seed=ev.opts.seed)
    t0 = time.perf_counter()
    low = ev.samples(captions, scale=ev.scale)
    high = {name: evaluate.upsample_batched(up, captions, low, batch=ev.opts.batch, seed=ev.opts.seed,
                                            respacing=ev.up_respacing, start_t=start)
            for name, start in (("upsampled", None), ("upsampled_from_t", ev.opts.upsample_start))}
    bilinear = evaluate.bilinear_upscale(low, size)
    real = evaluate.reference_renders(captions, size, ev.opts.seed)
    real_low = evaluate.reference_renders(captions, low.shape[1], ev.opts.seed)
    # a second real set: the floor of the distance (two samples of the same distribution)
    real_2 = evaluate.reference_renders(captions[::-1], size, ev.opts.seed + 1)

    def row(pics, reference, compare=None):
        return dict(size=int(pics.shape[1]), **evaluate.adherence_scores(captions, pics),
                    pixel_kid=evaluate.pixel_kid(pics if compare is None else compare, reference),
                    sharpness=evaluate.edge_sharpness(pics))

    rows = {"base": row(low, real_low), "bilinear": row(bilinear, real),
            **{name: row(pics, real) for name, pics in high.items()}, "real": row(real, real, compare=real_2)}
    nearest = np.repeat(np.repeat(low[:8], size // low.shape[1], 1), size // low.shape[2], 2)
    images.save_png(ev.root / "cascade.png", images.grid(
        np.concatenate([nearest, bilinear[:8], high["upsampled"][:8], high["upsampled_from_t"][:8], real[:8]]),
        captions[:8] * 5, cols=8, row_labels=[f"base {low.shape[1]} px", "bilinear", "upsampled",
                                              f"from t={ev.opts.upsample_start}", "real"]))
    return dict(n=len(captions), guidance_scale=ev.scale, upsample_respacing=ev.up_respacing,
                upsample_start=ev.opts.upsample_start, rows=rows, seconds=time.perf_counter() - t0,
                command=f"python -m glide_jax.miniature --workdir {ev.root} --section cascade {ev.cli_flags()}".strip())


SECTIONS: dict[str, Callable[[Eval], dict]] = {
    "cfg": eval_cfg, "clip": eval_clip, "classifier": eval_classifier, "tradeoff": eval_tradeoff,
    "inpaint": eval_inpaint, "cascade": eval_cascade,
}


def run_sections(ev: Eval, names: Sequence[str] = tuple(SECTIONS), *, force: bool = False, say=_say) -> dict:
    """Each section's results, from WORKDIR/eval/<name>.json when its settings and checkpoints match."""
    key = {"settings": ev.opts.eval_settings(), "steps": ev.steps(), "respacing": ev.respacing}
    key = json.loads(json.dumps(key))  # tuples -> lists, as read back
    out = {}
    for i, name in enumerate(names, 1):
        path = ev.root / "eval" / f"{name}.json"
        if path.exists() and not force:
            try:
                cached = json.loads(path.read_text())
            except ValueError:
                cached = {}
            if cached.get("key") == key:
                say(f"[miniature] eval {i}/{len(names)} {name}: cached ({path})")
                out[name] = cached["result"]
                continue
        say(f"[miniature] eval {i}/{len(names)} {name} ...")
        t0 = time.perf_counter()
        out[name] = SECTIONS[name](ev)
        say(f"[miniature] eval {name}: {_minutes(time.perf_counter() - t0)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": out[name]}, indent=1))
        os.replace(tmp, path)
    return out


# ---------------------------------------------------------------------------- plot


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / max(ticks, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


COLOURS = {"cfg": (30, 80, 230), "clip": (240, 120, 0)}
LABELS = {"cfg": "Classifier-free guidance", "clip": "CLIP guidance"}


def plot_tradeoff(points: Sequence[Mapping[str, Any]], path: pathlib.Path, width: int = 720, height: int = 480) -> None:
    """Colour adherence (y) vs diversity (x), one polyline per method, each point labelled by its scale (PIL)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 52, 60
    # axes span the data (with a margin) so that nearby scales stay apart
    xs, ys = [p["diversity"] for p in points], [p["colour"] for p in points]
    x_step = _nice_step(max(max(xs) - min(xs), 1e-3))
    x_min = x_step * math.floor(min(xs) / x_step - 0.5)
    x_max = x_step * math.ceil(max(xs) / x_step + 0.5)
    y_step = _nice_step(max(max(ys) - min(ys), 0.05))
    y_min = max(0.0, y_step * math.floor(min(ys) / y_step - 0.5))
    y_max = min(1.0, y_step * math.ceil(max(ys) / y_step + 0.5))

    def px(x, y):
        return (left + (x - x_min) / (x_max - x_min) * (width - left - right),
                height - bottom - (y - y_min) / (y_max - y_min) * (height - top - bottom))

    for i in range(int(round((y_max - y_min) / y_step)) + 1):
        y = y_min + i * y_step
        a, b = px(x_min, y), px(x_max, y)
        draw.line([a, b], fill=(225, 225, 225))
        draw.text((left - 40, a[1] - 6), f"{y * 100:.3g}%", fill="black", font=font)
    for i in range(int(round((x_max - x_min) / x_step)) + 1):
        x = x_min + i * x_step
        a, b = px(x, y_min), px(x, y_max)
        draw.line([a, b], fill=(225, 225, 225))
        draw.text((a[0] - 12, height - bottom + 6), f"{x:.3g}", fill="black", font=font)
    draw.rectangle([px(x_min, y_max), px(x_max, y_min)], outline="black")
    draw.text((left, 8), "Colour adherence vs sample diversity over guidance scales (held-out captions)",
              fill="black", font=font)
    draw.text((left + 60, height - 24), "diversity: mean RMS pixel distance between samples of one caption "
              "(0-1 scale)", fill="black", font=font)
    draw.text((6, top - 20), "colour adherence", fill="black", font=font)
    for k, method in enumerate(m for m in COLOURS if any(p["method"] == m for p in points)):
        pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["scale"])
        xy = [px(p["diversity"], p["colour"]) for p in pts]
        if len(xy) > 1:
            draw.line(xy, fill=COLOURS[method], width=2)
        for p, (x, y) in zip(pts, xy):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLOURS[method])
            draw.text((x + 6, y - 14 if method == "cfg" else y + 2), f"{p['scale']:g}", fill=COLOURS[method], font=font)
        lx, ly = left + 10, height - bottom - 40 + 16 * k  # bottom left: low adherence and diversity stays empty
        draw.line([(lx, ly + 6), (lx + 20, ly + 6)], fill=COLOURS[method], width=2)
        draw.text((lx + 26, ly), LABELS[method], fill="black", font=font)
    images.save_png(path, np.asarray(img))


# ---------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "" if v is None else f"{v:.1%}"


def findings(results: Mapping[str, Any]) -> list[str]:
    """What the numbers say about GLIDE's claims, one sentence each."""
    out = []
    cfg, clip, cls = (results[k]["scales"] for k in ("cfg", "clip", "classifier"))
    none = cfg["0"]
    best = {name: max(((float(s), r) for s, r in res.items() if s != "0"), key=lambda t: (t[1]["colour"], t[1]["scene"]))
            for name, res in (("cfg", cfg), ("clip", clip))}
    (s_cfg, r_cfg), (s_clip, r_clip) = best["cfg"], best["clip"]
    wins = [m for m in ("colour", "scene") if r_cfg[m] > r_clip[m]]
    verdict = ("holds" if len(wins) == 2 else "does not hold" if not wins
               else f"holds for {wins[0]} only")
    out.append(f"**CFG over CLIP guidance** (paper: CFG is preferred; CLIP guidance finds adversarial directions): "
               f"{verdict} here. At each method's best scale for colour adherence: CFG {s_cfg:g} gives "
               f"{r_cfg['colour']:.1%} colour / {r_cfg['scene']:.1%} scene, CLIP guidance {s_clip:g} gives "
               f"{r_clip['colour']:.1%} / {r_clip['scene']:.1%} (no guidance: {none['colour']:.1%} / "
               f"{none['scene']:.1%}).")
    pts = results["tradeoff"]["points"]
    curves = {m: sorted((p for p in pts if p["method"] == m), key=lambda p: p["diversity"]) for m in ("cfg", "clip")}
    better = []
    for p in curves["clip"]:
        c = curves["cfg"]
        d = [q["diversity"] for q in c]
        if p["scale"] == 0 or not d[0] <= p["diversity"] <= d[-1]:
            continue
        better.append(np.interp(p["diversity"], d, [q["colour"] for q in c]) >= p["colour"])
    if better:
        out.append(f"**At equal diversity** CFG's curve is at or above CLIP guidance's at {sum(better)} of "
                   f"{len(better)} guided CLIP points inside CFG's diversity range (`tradeoff.png`).")
    else:
        out.append("**At equal diversity**: no guided CLIP point lies inside CFG's diversity range, so the curves "
                   "do not compare there (`tradeoff.png`).")
    for m in ("cfg", "clip"):
        c = sorted(curves[m], key=lambda p: p["scale"])
        if len(c) > 1:
            lo, hi = c[0], c[-1]
            trade = hi["diversity"] < lo["diversity"] and hi["colour"] > lo["colour"]
            out.append(f"**{LABELS[m]} trades diversity for adherence**: "
                       f"{'holds' if trade else 'does not hold'}; scale {lo['scale']:g} -> {hi['scale']:g}: "
                       f"diversity {lo['diversity']:.3f} -> {hi['diversity']:.3f}, adherence {lo['colour']:.1%} -> "
                       f"{hi['colour']:.1%}.")
    best_cls = max(((float(s), r["colour"]) for s, r in cls.items() if s != "0"), key=lambda t: t[1])
    out.append(f"**Classifier guidance** (ADM) on single-object captions: {cls['0']['colour']:.1%} without, "
               f"best {best_cls[1]:.1%} at scale {best_cls[0]:g} "
               f"({'helps' if best_cls[1] > cls['0']['colour'] else 'does not help'}).")
    inp = results["inpaint"]
    out.append(f"**Inpainting** (fine-tuned with 4 extra input channels): known half kept to "
               f"{inp['known_mean_abs_error']:.2f} levels on average (max {inp['known_max_abs_error']}); "
               f"the filled half shows the caption's new object's colour in {inp['filled']['colour']:.1%} "
               f"(detector on the true scene: {inp['filled_reference']['colour']:.1%}).")
    cas = results["cascade"]
    rows, up = cas["rows"], cas["rows"]["upsampled_from_t"]
    kept = up["colour"] >= rows["base"]["colour"]
    closer = up["pixel_kid"] < rows["bilinear"]["pixel_kid"]
    out.append(f"**Cascade** (upsampler started at t={cas['upsample_start']}): it {'keeps' if kept else 'loses'} colour "
               f"adherence ({rows['base']['colour']:.1%} at {rows['base']['size']} px -> {up['colour']:.1%} at "
               f"{up['size']} px), its edges are {up['sharpness']:.0f} levels steep vs {rows['bilinear']['sharpness']:.0f} "
               f"for a bilinear upscale and {rows['real']['sharpness']:.0f} for real renders, and it is "
               f"{'closer to' if closer else 'no closer to'} real renders by pixel-KID ({up['pixel_kid']:.4f} vs "
               f"{rows['bilinear']['pixel_kid']:.4f}; real vs real {rows['real']['pixel_kid']:.4f}). GLIDE's sampler "
               f"from pure noise: {rows['upsampled']['colour']:.1%} colour adherence, pixel-KID "
               f"{rows['upsampled']['pixel_kid']:.4f}.")
    return out


def write_report(root: pathlib.Path, results: Mapping[str, Any], training: Sequence[Mapping[str, Any]],
                 ev: Eval, command: str) -> pathlib.Path:
    """WORKDIR/report.md from the sections' results."""
    L = [f"# Miniature GLIDE on synthetic shapes", "",
         f"Made by `{command}` on {datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPUs, "
         f"jax {jax.__version__}, backend {jax.default_backend()}). Every network is trained here on the "
         "embedded synthetic-shapes renders (the inpainting model fine-tuned from the base); every number is on "
         "held-out captions (`glide_jax.evaluate.heldout_captions`: half single objects, half two-object scenes "
         "never seen in training) scored by the pixel detector (`glide_jax.data.shapes.detect`). **Colour "
         "adherence**: exactly the caption's colours are detected; **scene**: colours, shapes and relation. "
         f"Base sampling: {SAMPLER}, respacing {ev.respacing}. Each table gives the command that recomputes it.", "",
         "## Models", "",
         "| stage | config | kind | parameters | batch | steps | s/step (logged median) | final loss |",
         "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in training:
        loss = "" if r["loss"] is None else f"{r['loss']:.4f}"
        if r["accuracy"] is not None:
            loss += f" (accuracy {r['accuracy']:.0%})"
        sps = "" if r["s_per_step"] is None else f"{r['s_per_step']:.3f}"
        L.append(f"| {r['stage']} | `{r['config']}` | {r['kind']} | {r['params']:,} | {r['batch']} | {r['steps']} "
                 f"| {sps} | {loss} |")
    cfg, clip, cls = results["cfg"], results["clip"], results["classifier"]
    L += ["", f"## Caption adherence with and without guidance (n = {cfg['n']})", "",
          "| guidance | scale | colour, all | single objects | held-out pairs | full scene |",
          "|---|---:|---:|---:|---:|---:|"]
    for name, res in (("none / CFG", cfg), ("CLIP", clip)):
        for s, r in res["scales"].items():
            label = "none" if s == "0" else ("CFG" if res is cfg else "CLIP (noised CLIP)")
            L.append(f"| {label} | {s} | **{_pct(r['colour'])}** | {_pct(r.get('colour_single'))} | "
                     f"{_pct(r.get('colour_heldout_pairs'))} | {_pct(r['scene'])} |")
    L += ["", f"- none and CFG: `{cfg['command']}`", f"- CLIP: `{clip['command']}`",
          "", "![CFG](grid_cfg.png)", "", "![CLIP guidance](grid_clip.png)", "",
          f"## Classifier guidance, single-object captions (n = {cls['n']})", "",
          "Classes: the 18 (colour, shape) objects; a two-object training image is labelled with the object its "
          "caption names first (either one, equally often), so log p(y | x_t) rewards object y shown alone.", "",
          "| guidance | scale | colour | full scene (object) |", "|---|---:|---:|---:|"]
    for s, r in cls["scales"].items():
        L.append(f"| {'none' if s == '0' else 'classifier'} | {s} | **{_pct(r['colour'])}** | {_pct(r['scene'])} |")
    L += ["", f"`{cls['command']}`", "", "![classifier guidance](grid_classifier.png)", ""]
    tr = results["tradeoff"]
    L += ["## Trade-off: adherence vs diversity over guidance scales", "",
          f"{tr['captions']} held-out captions x {tr['samples_per_caption']} samples each per scale; **diversity** = "
          "the mean over captions of the mean RMS pixel distance (0-1 scale) between two samples of the same caption "
          "(`glide_jax.evaluate.mean_pairwise_distance`).", "", "![trade-off](tradeoff.png)", "",
          "| guidance | scale | colour adherence | full scene | diversity |", "|---|---:|---:|---:|---:|"]
    for p in tr["points"]:
        L.append(f"| {'CFG' if p['method'] == 'cfg' else 'CLIP'} | {p['scale']:g} | {_pct(p['colour'])} | "
                 f"{_pct(p['scene'])} | {p['diversity']:.4f} |")
    L += ["", f"`{tr['command']}`", "",
          f"Samples of \"{tr['example_caption']}\" without guidance and at the largest scales:", "",
          "![samples](tradeoff_samples.png)", ""]
    inp = results["inpaint"]
    L += [f"## Inpainting (n = {inp['n']}, CFG {inp['guidance_scale']:g})", "",
          "One object is kept in the left (or top) half; the other half is masked (empty in the source) and the "
          "caption asks for a new object of another colour there. Known region: absolute error of the output "
          "against the source in 8-bit levels over the kept pixels. Filled region: the masked half alone (the kept "
          "half painted background) through the detector: its colours are exactly the new object's (colour), and "
          "its one detection is the new object (object). Reference: the same measures on true renders of the asked "
          "scene (the detector's ceiling).", "",
          "| measure | inpainted | true render |", "|---|---:|---:|",
          f"| known region, mean abs error (levels) | {inp['known_mean_abs_error']:.3f} | 0 |",
          f"| known region, max abs error (levels) | {inp['known_max_abs_error']} | 0 |",
          f"| filled region: colour of the new object | **{_pct(inp['filled']['colour'])}** | "
          f"{_pct(inp['filled_reference']['colour'])} |",
          f"| filled region: the new object | {_pct(inp['filled']['object'])} | {_pct(inp['filled_reference']['object'])} |",
          f"| whole image vs caption: colour | {_pct(inp['full_caption']['colour'])} | "
          f"{_pct(inp['full_caption_reference']['colour'])} |",
          f"| whole image vs caption: scene | {_pct(inp['full_caption']['scene'])} | "
          f"{_pct(inp['full_caption_reference']['scene'])} |",
          "", f"`{inp['command']}`", "", "![inpainting](inpaint.png)", ""]
    cas = results["cascade"]
    rows = cas["rows"]
    L += [f"## Cascade: base -> upsampler (n = {cas['n']}, base CFG {cas['guidance_scale']:g}, upsampler "
          f"{cas['upsample_respacing']}, temperature 0.997)", "",
          "**upsampled**: GLIDE's sampler, the whole reverse process from noise. **from t**: the reverse process "
          f"started at timestep {cas['upsample_start']} from q(x_t | bilinear upscale of the base sample) "
          "(`sample.upsample_images(start_t=...)`, SDEdit-style): a briefly trained upsampler has not learned the "
          "lowest signal-to-noise steps, which set the global colour, and drifts there (its background tint in "
          "`cascade.png`). **sharpness**: mean over images of the 99th percentile of the gradient magnitude "
          "(`glide_jax.evaluate.edge_sharpness`, 8-bit levels per pixel). **pixel-KID**: KID (`glide_jax.fid.kid`, "
          "unbiased MMD^2 with the cubic polynomial kernel) to real renders of the same captions at the same size, on "
          "pixel statistics instead of Inception features (`glide_jax.evaluate.pixel_features`: square roots of each "
          "image's 4x4x4 RGB histogram and of its 16-bin histogram of gradient magnitudes, so colours and edge "
          "sharpness, with faint noise on a flat background, under 8 levels, counted as flat; lower is closer; no "
          "downloaded network). The base row is measured against real renders at its own size (KIDs of different "
          "sizes do not compare); the 'real' row compares a second real set to the first (the floor).", "",
          "| images | size | colour adherence | full scene | sharpness | pixel-KID to real |",
          "|---|---:|---:|---:|---:|---:|"]
    for name in ("base", "bilinear", "upsampled", "upsampled_from_t", "real"):
        r = rows[name]
        label = f"upsampled from t={cas['upsample_start']}" if name == "upsampled_from_t" else name
        L.append(f"| {label} | {r['size']} | {_pct(r['colour'])} | {_pct(r['scene'])} | {r['sharpness']:.0f} | "
                 f"{r['pixel_kid']:.4f} |")
    L += ["", f"`{cas['command']}`", "", "![cascade](cascade.png)", "",
          "## Which GLIDE findings hold here", ""]
    L += [f"- {f}" for f in findings(results)]
    L.append("")
    path = root / "report.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(L))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- command line


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected finite scales >= 0, got {text!r}")
    return values


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        return value
    return parse


def _stage_steps(text: str) -> tuple[str, int]:
    name, _, n = text.partition("=")
    if name not in STAGE_NAMES or not n.isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(f"expected STAGE=N with STAGE one of {', '.join(STAGE_NAMES)} and N >= 1, "
                                         f"got {text!r}")
    return name, int(n)


def _override(text: str) -> tuple[str, str, str]:
    scope, _, rest = text.partition(":")
    field, eq, value = rest.partition("=")
    if scope not in STAGE_NAMES + ("all",) or not field or not eq:
        raise argparse.ArgumentTypeError(f"expected STAGE:FIELD=VALUE with STAGE one of {', '.join(STAGE_NAMES)} or "
                                         f"all, got {text!r}")
    return scope, field, value


def parse_args(argv: Sequence[str] | None, prog: str = "python -m glide_jax.miniature") -> tuple[argparse.Namespace, Options]:
    d = Options()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--steps-scale", type=_positive(float), default=1.0, help="multiplies every stage's step count")
    p.add_argument("--steps", type=_stage_steps, action="append", default=[], metavar="STAGE=N",
                   help="one stage's step count (repeatable)")
    p.add_argument("--set", type=_override, action="append", default=[], metavar="STAGE:FIELD=VALUE",
                   help="override a config field of a stage, or of every stage with 'all' (repeatable)")
    p.add_argument("--train-only", action="store_true", help="train the stages, no evaluation")
    p.add_argument("--section", choices=tuple(SECTIONS), action="append", default=[],
                   help="recompute these evaluation sections (repeatable) and print their JSON; no training")
    p.add_argument("--n", type=_positive(int), default=d.n, help="captions per evaluation row")
    p.add_argument("--batch", type=_positive(int), default=d.batch, help="images per sampling call")
    p.add_argument("--respacing", default=d.respacing, help="base sampling steps (default: the base config's)")
    for name in ("cfg_scales", "clip_scales", "classifier_scales", "tradeoff_cfg", "tradeoff_clip"):
        p.add_argument(f"--{name.replace('_', '-')}", type=_scales, default=getattr(d, name), metavar="S,S,...")
    p.add_argument("--tradeoff-captions", type=_positive(int), default=d.tradeoff_captions)
    p.add_argument("--tradeoff-samples", type=_positive(int), default=d.tradeoff_samples)
    p.add_argument("--upsample-start", type=_positive(int), default=d.upsample_start, metavar="T",
                   help="the cascade's second upsampler row starts the reverse process at timestep T")
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    if args.tradeoff_samples < 2:
        p.error("--tradeoff-samples needs at least 2 samples per caption (diversity is over pairs)")
    overrides: dict[str, dict[str, str]] = {}
    for scope, field, value in args.set:
        overrides.setdefault(scope, {})[field] = value
    opts = Options(steps_scale=args.steps_scale, steps=dict(args.steps), overrides=overrides, n=args.n,
                   batch=args.batch, respacing=args.respacing, cfg_scales=args.cfg_scales, clip_scales=args.clip_scales,
                   classifier_scales=args.classifier_scales, tradeoff_cfg=args.tradeoff_cfg,
                   tradeoff_clip=args.tradeoff_clip, tradeoff_captions=args.tradeoff_captions,
                   tradeoff_samples=args.tradeoff_samples, upsample_start=args.upsample_start, seed=args.seed)
    return args, opts


def run(root: str | os.PathLike, opts: Options, *, train_only: bool = False, sections: Sequence[str] = (),
        command: str = "python -m glide_jax.miniature", say=_say) -> dict:
    """Trains what is missing (unless `sections` are given), evaluates, writes the report.

    Returns {"training": [...], "results": {...}, "report": path or None}.
    """
    root = pathlib.Path(root)
    configs = {s.name: stage_config(s, root, opts) for s in STAGES}
    out: dict[str, Any] = {"training": [], "results": {}, "report": None}
    t0 = time.perf_counter()
    if not sections:
        out["training"] = train_stages(root, opts, configs, say=_say)
        if train_only:
            return out
    missing = [s.name for s in STAGES if latest_step(root / s.name) == 0]
    if missing:
        raise MiniatureError(f"{root}: no trained {', '.join(missing)} yet; run without --section first")
    ev = Eval(root, opts, configs)
    out["results"] = run_sections(ev, sections or tuple(SECTIONS), force=bool(sections), say=_say)
    if not sections:
        out["report"] = write_report(root, out["results"], training_summary(root, configs), ev, command)
        say(f"[miniature] report: {out['report'].resolve()} ({_minutes(time.perf_counter() - t0)})")
    return out


def main(argv: Sequence[str] | None = None, prog: str = "python -m glide_jax.miniature") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, opts = parse_args(argv, prog)
    setup_logging()
    command = " ".join([prog] + [shlex.quote(a) for a in argv])
    try:
        out = run(args.workdir, opts, train_only=args.train_only, sections=args.section, command=command)
    except (MiniatureError, TrainingError, SampleError, experiment.SetupError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.section:
        print(json.dumps({k: out["results"][k] for k in args.section}, indent=1))
    return 0


if __name__ == "__main__":
    host.tune_for_cli()
    sys.exit(main())
