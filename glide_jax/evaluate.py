"""Evaluation: caption adherence on synthetic shapes, and FID/KID (COCO-style zero-shot protocol).

    python -m glide_jax.evaluate adherence --checkpoint runs/demo --n 96 --scales 0,3 --json
    python -m glide_jax.evaluate adherence --checkpoint runs/miniature/base --n 192 --scales 1,3,10 \
        --guidance clip --guide runs/miniature/clip --json
    python -m glide_jax.evaluate steps --checkpoint runs/demo --n 96 --scale 3 \
        --settings ddpm:100,ddim:50,dpm++:10,dpm++:15,dpm++:25 --json
    python -m glide_jax.evaluate steps --checkpoint runs/miniature/base --upsample runs/miniature/upsample \
        --n 192 --scale 5 --settings ddpm:fast27,ddpm:25,sde-dpm++:20,unipc:25 --json
    python -m glide_jax.evaluate fid --checkpoint DIR --captions coco_eval_captions.txt \
        --reference REF_DIR_OR_STATS.npz --inception pt_inception-2015-12-05-6726825d.pth \
        --n 30000 --scale 1.5 [--upsample UP_DIR] --json

Adherence: held-out captions (scenes never seen in training, `synthetic_shapes` validation
split) and single-object captions are sampled with and without classifier-free guidance; a
pixel-level detector (the data are synthetic, so the truth is known) checks the colours
(colour adherence: exactly the caption's colours are present) and the full scene (colours,
shapes and the spatial relation). `--guidance clip|classifier --guide DIR` scores gradient
guidance by a noised CLIP or a noisy classifier instead (`--single-fraction 1`: single-object
captions only, what an 18-object classifier guides).

Steps: the same adherence score for several (sampler, number of steps) settings at one guidance
scale, with the sampling wall time of each (compilation excluded: every setting is compiled on
a first batch before the timed run), as a markdown table: fewer steps for the same quality.
With `--upsample UP_DIR` the settings are the upsampler stage's, on one fixed set of base
samples, scored at the upsampler's size (adherence, pixel KID against real renders, sharpness).
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from glide_jax import fid as fid_lib
from glide_jax import host, images
from glide_jax.console import setup_logging
from glide_jax.data import pipeline, shapes
from glide_jax.diffusion import guidance as G
from glide_jax.diffusion import sampling
from glide_jax.models.unet import upsample_bilinear
from glide_jax.sample import (FAST, GUIDANCE, SampleError, guided_images, load_for_sampling, respacing_for, sample_images,
                              schedule_for, upsample_images)

log = logging.getLogger("glide_jax.evaluate")


def heldout_captions(n: int, *, single_fraction: float = 0.5, seed: int = 0) -> list[str]:
    """n captions: a fraction of single-object captions, the rest held-out two-object scenes."""
    rng = np.random.default_rng(seed)
    n_single = int(round(n * single_fraction))
    out = []
    for _ in range(n_single):
        obj = int(rng.integers(shapes.NUM_OBJECTS))
        out.append(f"{'an' if shapes.COLORS[obj // 3][0] in 'aeiou' else 'a'} "
                   f"{shapes.COLORS[obj // 3]} {shapes.SHAPES[obj % 3]}")
    for i in range(n - n_single):
        out.append(shapes.caption(shapes.sample_spec("validation", i)))
    return out


def adherence_scores(captions: Sequence[str], images: np.ndarray) -> dict[str, float]:
    """Fractions of images whose detected colours / full scene match their caption. images uint8."""
    colour_ok, scene_ok = [], []
    for text, image in zip(captions, images):
        spec = shapes.parse_caption(text)
        found = shapes.detect(image)
        colour_ok.append(sorted({d.color for d in found}) == sorted(set(spec.colors)))
        scene_ok.append(shapes.matches(spec, found))
    return {"colour": float(np.mean(colour_ok)), "scene": float(np.mean(scene_ok))}


def class_of(caption: str) -> int:
    """The noisy classifier's class of a shapes caption: 3 * colour + shape of its first object
    (the label `data.pipeline.class_label` trains with)."""
    spec = shapes.parse_caption(caption)
    if spec is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return pipeline.class_label({"colors": spec.colors, "shapes": spec.shapes})


def mean_pairwise_distance(groups: np.ndarray) -> float:
    """Sample diversity: uint8 [K, M, H, W, C] (M samples of each of K captions) -> the mean over
    captions of the mean RMS pixel distance, in [0, 1] units, over the M(M-1)/2 pairs."""
    x = np.asarray(groups, np.float64).reshape(groups.shape[0], groups.shape[1], -1) / 255.0
    sq = np.sum(x * x, axis=-1)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * np.einsum("kid,kjd->kij", x, x)
    rms = np.sqrt(np.clip(d2, 0.0, None) / x.shape[-1])
    i, j = np.triu_indices(groups.shape[1], k=1)
    return float(rms[:, i, j].mean())


# Gradient-magnitude bin edges (uint8 levels, max over channels of |forward difference|); below 8
# levels counts as flat, so faint noise on a flat background does not outweigh the edges.
_GRAD_BINS = (0, 8, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 224, 256)


def _gradient_magnitude(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> int32 [N, (H-1)(W-1)]: max over channels and both axes of |forward difference|."""
    x = np.asarray(images).astype(np.int32)
    gx = np.abs(np.diff(x, axis=2)).max(-1)[:, :-1, :]
    gy = np.abs(np.diff(x, axis=1)).max(-1)[:, :, :-1]
    return np.maximum(gx, gy).reshape(x.shape[0], -1)


def edge_sharpness(images: np.ndarray) -> float:
    """Mean over images of the 99th percentile of the gradient magnitude (8-bit levels per pixel):
    how steep the steepest edges are (a blurred upscale has lower values than a sharp render)."""
    return float(np.mean(np.percentile(_gradient_magnitude(images), 99, axis=1)))


def pixel_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float64 [N, 80] pixel statistics: the square roots of each image's
    4x4x4 RGB histogram (64 bins: colours and anti-aliasing blends) and of its histogram of
    gradient magnitudes (16 bins: edge sharpness). Each block has unit norm (square roots of a
    distribution), so the blocks weigh alike in a kernel."""
    x = np.asarray(images).astype(np.int32)
    q = np.minimum(x // 64, 3)
    colour = q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]
    colour_hist = np.stack([np.bincount(c.ravel(), minlength=64) for c in colour]).astype(np.float64)
    g = _gradient_magnitude(x)
    grad_hist = np.stack([np.histogram(v, bins=_GRAD_BINS)[0] for v in g]).astype(np.float64)
    return np.concatenate([np.sqrt(colour_hist / colour_hist.sum(1, keepdims=True)),
                           np.sqrt(grad_hist / grad_hist.sum(1, keepdims=True))], axis=1)


def pixel_kid(images: np.ndarray, reference: np.ndarray, subset_size: int = 1000) -> float:
    """KID (`fid.kid`: unbiased MMD^2, cubic polynomial kernel) between two uint8 image sets of
    one size on `pixel_features` instead of Inception features: a distance that needs no
    downloaded network and sees colours and edge sharpness (blur raises it)."""
    a, b = pixel_features(images), pixel_features(reference)
    return fid_lib.kid(a, b, subset_size=min(subset_size, len(a), len(b)))


def reference_renders(captions: Sequence[str], size: int, seed: int) -> np.ndarray:
    """Real renders of the captions' scenes at `size`, uint8 [n, size, size, 3]: held-out pairs as
    the validation split draws them (`heldout_captions`' own scenes), single objects at a random
    layout."""
    rng = np.random.default_rng([seed, 11])
    out, pair = [], 0
    for text in captions:
        spec = shapes.parse_caption(text)
        if spec.relation == shapes.NONE:
            spec = shapes.layout(spec.colors, spec.shapes, shapes.NONE, rng)
        else:
            spec = shapes.sample_spec("validation", pair)
            pair += 1
        out.append(shapes.render(spec, size))
    return np.stack(out)


def adherence(checkpoint: str, *, n: int, scales: Sequence[float], respacing: str, sampler: str,
              seed: int = 0, batch: int = 32, grid_path: str | None = None, guidance: str = "cfg",
              guide: str | None = None, single_fraction: float = 0.5) -> dict:
    """Samples `n` held-out captions at each guidance scale and scores them.

    Args:
      guidance: "cfg" (scale 0 = no guidance), or a guide kind, "clip" / "classifier", with
        `guide` its checkpoint: the conditional model's DDPM sampling steered by the guide's
        gradient (`sample.guided_images`; scale 0 = the conditional model alone). The
        classifier guides towards `class_of(caption)`.
      single_fraction: the share of single-object captions (1: only those, the captions an
        18-object classifier can guide).
    """
    if guidance != "cfg":
        if guidance not in GUIDANCE or guidance == "none":
            raise SampleError(f"unknown guidance {guidance!r}")
        if not guide:
            raise SampleError(f"--guidance {guidance} needs --guide DIR (a {guidance} checkpoint)")
        if sampler != "ddpm":
            raise SampleError(f"--guidance {guidance} samples with ddpm (GLIDE's guided sampler), not {sampler}")
    base = model, params, tok, cfg = load_for_sampling(checkpoint)
    guide_bundle = load_for_sampling(guide) if guidance != "cfg" else None
    captions = heldout_captions(n, seed=seed, single_fraction=single_fraction)
    results = {"n": n, "respacing": respacing, "sampler": sampler, "guidance": guidance,
               "single_fraction": single_fraction, "scales": {}}
    rows = []
    for scale in scales:
        t0 = time.perf_counter()
        if guide_bundle is None or scale == 0:
            pics = _sample_uint8(model, params, tok, cfg, captions, scale=scale, respacing=respacing,
                                 sampler=sampler, seed=seed, batch=batch)
        else:
            pics = _guided_uint8(base, guide_bundle, captions, guidance=guidance, scale=scale, respacing=respacing,
                                 seed=seed, batch=batch)
        scores = adherence_scores(captions, pics)
        single, pair = _split_kinds(captions)
        for key, rows_of in (("colour_single", single), ("colour_heldout_pairs", pair)):
            if rows_of:
                scores[key] = adherence_scores([captions[i] for i in rows_of], pics[rows_of])["colour"]
        scores["seconds"] = time.perf_counter() - t0
        results["scales"][f"{scale:g}"] = scores
        rows.append(pics[:8])
        log.info("scale %g: %s", scale, scores)
    if grid_path:
        name = "CFG" if guidance == "cfg" else guidance
        labels = ["no guidance" if s == 0 else f"{name} {s:g}" for s in scales]
        grid = images.grid(np.concatenate(rows), captions[:8] * len(scales), cols=8, scale=3, row_labels=labels)
        results["grid"] = str(images.save_png(grid_path, grid))
    return results


def fid(checkpoint: str, *, captions_file: str, reference: str, inception: str, n: int, scale: float,
        respacing: str, sampler: str, batch: int = 16, seed: int = 0, upsample: str | None = None,
        inception_params=None) -> dict:
    """COCO-style zero-shot FID/KID: N captions -> N CFG samples -> Inception features vs reference."""
    captions = [l.strip() for l in pathlib.Path(captions_file).read_text().splitlines() if l.strip()]
    if not captions:
        raise ValueError(f"{captions_file} holds no captions")
    captions = (captions * (n // len(captions) + 1))[:n]
    feats = (fid_lib.InceptionFeatures(inception_params, progress=False) if inception_params is not None
             else fid_lib.InceptionFeatures.from_file(inception, progress=False))
    model, params, tok, cfg = load_for_sampling(checkpoint)
    up = load_for_sampling(upsample) if upsample else None

    def sample_batches():
        for i in range(0, n, batch):
            x = sample_images(model, params, tok, captions[i:i + batch], hparams=cfg.hparams,
                              guidance_scale=scale, respacing=respacing, sampler=sampler, seed=seed + i)
            if up is not None:
                x = upsample_images(up, captions[i:i + batch], x, seed=seed + i)
            yield images.to_uint8(x)

    t0 = time.perf_counter()
    gen = feats(sample_batches(), desc="samples")
    mu, sigma = fid_lib.feature_stats(gen)
    ref = pathlib.Path(reference)
    if ref.suffix == ".npz":
        mu_r, sigma_r = fid_lib.load_stats(ref)
        ref_feats = None
    else:
        files = sorted(p for p in ref.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        ref_images = np.stack([images.load_image(p) for p in files])
        ref_feats = feats(ref_images, desc="reference")
        mu_r, sigma_r = fid_lib.feature_stats(ref_feats)
    out = {"n": n, "scale": scale, "fid": fid_lib.frechet_distance(mu, sigma, mu_r, sigma_r),
           "seconds": time.perf_counter() - t0}
    if ref_feats is not None:
        out["kid"] = fid_lib.kid(gen, ref_feats, subset_size=min(1000, len(gen), len(ref_feats)))
    return out


def _sample_uint8(model, params, tok, cfg, captions: Sequence[str], *, scale: float, respacing: str,
                  cfg_interval: tuple[int, int] | None = None,
                  sampler: str, seed: int, batch: int) -> np.ndarray:
    """uint8 [len(captions), S, S, 3] samples, `batch` captions per call (seed + offset per call)."""
    return np.concatenate([
        images.to_uint8(sample_images(model, params, tok, captions[i:i + batch], hparams=cfg.hparams,
                                      guidance_scale=scale, respacing=respacing, sampler=sampler,
                                      seed=seed + i, cfg_interval=cfg_interval))
        for i in range(0, len(captions), batch)])


def _guided_uint8(base, guide, captions: Sequence[str], *, guidance: str, scale: float, respacing: str,
                  seed: int, batch: int) -> np.ndarray:
    """uint8 samples of `captions` steered by a guide network, `batch` per call (seed + offset)."""
    out = []
    for i in range(0, len(captions), batch):
        part = list(captions[i:i + batch])
        labels = [class_of(c) for c in part] if guidance == "classifier" else ()
        out.append(images.to_uint8(guided_images(base, guide, part, guidance=guidance, labels=labels, scale=scale,
                                                 respacing=respacing, seed=seed + i)))
    return np.concatenate(out)


def _split_kinds(captions: Sequence[str]) -> tuple[list[int], list[int]]:
    single = [i for i, c in enumerate(captions)
              if not any(r in c for r in (" of ", " above ", " below "))]
    return single, [i for i in range(len(captions)) if i not in set(single)]


NAMED_RESPACINGS = ("fast27",)  # respacing strings a --settings item may give instead of a step count


def parse_settings(text: str) -> list[tuple[str, int | str, tuple[int, int] | None]]:
    """"ddpm:100,unipc:15@200-800,ddpm:fast27" -> [("ddpm", 100, None), ("unipc", 15, (200, 800)),
    ("ddpm", "fast27", None)]: sampler, model evaluations (or a named respacing: GLIDE's
    upsampler list), and the optional CFG interval in original timesteps; ValueError on a bad item."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        sampler, _, rest = item.partition(":")
        steps, _, interval = rest.partition("@")
        lo, _, hi = interval.partition("-")
        named = steps in NAMED_RESPACINGS
        if (sampler not in sampling.SAMPLERS or not (named or steps.isdigit()) or (not named and int(steps) < 1)
                or (interval and not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)))):
            raise ValueError(f"--settings item {item!r}: want SAMPLER:STEPS[@LO-HI] with SAMPLER one of "
                             f"{', '.join(sampling.SAMPLERS)}, STEPS a positive integer (or "
                             f"{', '.join(NAMED_RESPACINGS)}) and LO <= HI timesteps")
        out.append((sampler, steps if named else int(steps), (int(lo), int(hi)) if interval else None))
    if not out:
        raise ValueError("--settings is empty")
    return out


def steps_sweep(checkpoint: str, *, n: int, scale: float, settings: Sequence[tuple[str, int]],
                seed: int = 0, batch: int = 32) -> dict:
    """Adherence and sampling wall time of each (sampler, steps) at guidance `scale`."""

    model, params, tok, cfg = load_for_sampling(checkpoint)
    captions = heldout_captions(n, seed=seed)
    single, pair = _split_kinds(captions)
    rows = []
    for sampler, steps, interval in settings:
        respacing = respacing_for(sampler, str(steps), cfg.hparams)
        sched = schedule_for(cfg.hparams, respacing)
        kwargs = dict(scale=scale, respacing=respacing, sampler=sampler, seed=seed, batch=batch, cfg_interval=interval)
        _sample_uint8(model, params, tok, cfg, captions[:batch], **kwargs)  # compile outside the timing
        t0 = time.perf_counter()
        pics = _sample_uint8(model, params, tok, cfg, captions, **kwargs)
        seconds = time.perf_counter() - t0
        scores = adherence_scores(captions, pics)
        uncond = G.unconditional_rows(sched, 1, interval, sampler=sampler) if scale > 0 else 0
        rows.append(dict(sampler=sampler, steps=steps, evaluations=sampling.evaluations(sampler, sched),
                         cfg_interval=list(interval) if interval else None, uncond_rows_per_image=uncond,
                         seconds=seconds, seconds_per_image=seconds / n,
                         colour=scores["colour"], scene=scores["scene"],
                         colour_single=adherence_scores([captions[i] for i in single], pics[single])["colour"],
                         colour_heldout_pairs=adherence_scores([captions[i] for i in pair], pics[pair])["colour"]))
        log.info("%s-%d%s: %s", sampler, steps, f"@{interval}" if interval else "", rows[-1])
    return {"n": n, "scale": scale, "batch": batch, "backend": jax.default_backend(), "rows": rows,
            "table": steps_table(rows, n=n, scale=scale)}


def bilinear_upscale(low: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, s, s, 3] -> uint8 [n, size, size, 3], the upsampler's conditioning upscale."""
    return images.to_uint8(np.asarray(upsample_bilinear(images.from_uint8(low), size)))


def upsample_batched(up, captions: Sequence[str], low: np.ndarray, *, batch: int, seed: int,
                     respacing: str, sampler: str = "ddpm", start_t: int | None = None) -> np.ndarray:
    """`sample.upsample_images` over uint8 base samples [n, s, s, 3] in batches of `batch`
    (batch i seeded seed + i + 1, as the evaluations do) -> uint8 [n, S, S, 3]."""
    return np.concatenate([
        images.to_uint8(upsample_images(up, captions[i:i + batch], images.from_uint8(low[i:i + batch]),
                                        respacing=respacing, sampler=sampler, seed=seed + i + 1, start_t=start_t))
        for i in range(0, len(captions), batch)])


def upsample_sweep(checkpoint: str, upsampler: str, *, n: int, scale: float, settings: Sequence[tuple],
                   seed: int = 0, batch: int = 32, base_setting: tuple[str, int] = FAST) -> dict:
    """The upsampling stage's (sampler, steps) settings on one fixed set of base samples.

    The base model samples the held-out captions once (`base_setting`, CFG `scale`); each setting
    then upsamples them (`sample.upsample_images` from noise, GLIDE's temperature 0.997). Scores
    at the upsampler's size: colour adherence, pixel KID against real renders of the same captions
    (`pixel_kid`, lower is closer), edge sharpness, and the upsampling wall time (compiled on a
    first batch outside the timing). Rows for the bilinear upscale of the base samples and for a
    second real set (the distance floor) frame them.
    """
    for _, _, interval in settings:
        if interval:
            raise ValueError("the upsampler has no classifier-free guidance: drop @LO-HI from --settings")
    model, params, tok, cfg = load_for_sampling(checkpoint)
    up = load_for_sampling(upsampler)
    if not up[3].hparams.get("super_res"):
        raise SampleError(f"--upsample {upsampler}: not an upsampler checkpoint (kind {up[3].hparams.get('kind')})")
    size = int(up[3].hparams["image_size"])
    captions = heldout_captions(n, seed=seed)
    base_sampler, base_steps = base_setting
    low = _sample_uint8(model, params, tok, cfg, captions, scale=scale, sampler=base_sampler, seed=seed, batch=batch,
                        respacing=respacing_for(base_sampler, base_steps, cfg.hparams))
    real = reference_renders(captions, size, seed)

    def row(name, pics, seconds=None, compare=None, **extra):
        return dict(name=name, **extra, seconds=seconds, **adherence_scores(captions, pics),
                    pixel_kid=pixel_kid(pics if compare is None else compare, real), sharpness=edge_sharpness(pics))

    rows = [row("bilinear", bilinear_upscale(low, size)),
            row("real", real, compare=reference_renders(captions[::-1], size, seed + 1))]
    for sampler, steps, _ in settings:
        respacing = respacing_for(sampler, str(steps), up[3].hparams)
        sched = schedule_for(up[3].hparams, respacing)
        kw = dict(batch=batch, seed=seed, respacing=respacing, sampler=sampler)
        upsample_batched(up, captions[:batch], low[:batch], **kw)  # compile outside the timing
        t0 = time.perf_counter()
        pics = upsample_batched(up, captions, low, **kw)
        rows.append(row(f"{sampler}:{steps}", pics, time.perf_counter() - t0, sampler=sampler, steps=steps,
                        evaluations=sampling.evaluations(sampler, sched)))
        log.info("%s", rows[-1])
    out = {"n": n, "scale": scale, "batch": batch, "size": size, "base_size": int(low.shape[1]),
           "base": f"{base_sampler}:{base_steps}", "backend": jax.default_backend(), "rows": rows}
    out["table"] = upsample_table(out)
    return out


def upsample_table(result: Mapping[str, Any]) -> str:
    """Markdown table of an upsampler sweep."""
    lines = [f"| upsampler setting | model evaluations | wall time for {result['n']} images (s) | colour adherence "
             f"at {result['size']} px | full scene | pixel KID vs real (lower = closer) | edge sharpness |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        seconds = "" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['name']} | {r.get('evaluations', '')} | {seconds} | {r['colour']:.0%} | {r['scene']:.0%} "
                     f"| {r['pixel_kid']:.4f} | {r['sharpness']:.3f} |")
    return "\n".join(lines)


def steps_table(rows: Sequence[dict], *, n: int, scale: float) -> str:
    """Markdown table of a steps sweep."""
    lines = [f"| sampler | model evaluations | CFG interval | unconditional rows / image | wall time for {n} "
             f"images (s) | colour adherence, CFG {scale:g} | singles | held-out pairs | full scene |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    names = {"ddpm": "DDPM", "ddim": "DDIM (eta 0)", "dpm++": "DPM-Solver++(2M)", "sde-dpm++": "SDE-DPM-Solver++(2M)",
             "unipc": "UniPC (bh2)", "restart": "Restart"}
    for r in rows:
        interval = "all" if not r.get("cfg_interval") else f"{r['cfg_interval'][0]}-{r['cfg_interval'][1]}"
        lines.append(f"| {names[r['sampler']]} | {r.get('evaluations', r['steps'])} | {interval} "
                     f"| {r.get('uncond_rows_per_image', '')} | {r['seconds']:.1f} | {r['colour']:.0%} "
                     f"| {r['colour_single']:.0%} | {r['colour_heldout_pairs']:.0%} | {r['scene']:.0%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glide_jax.evaluate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("adherence", help="synthetic-shapes caption adherence with/without CFG")
    a.add_argument("--checkpoint", required=True)
    a.add_argument("--n", type=int, default=96)
    a.add_argument("--scales", default="0,3")
    a.add_argument("--steps", default="50")
    a.add_argument("--sampler", default="ddpm", choices=sampling.SAMPLERS)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--grid", default=None, help="write a PNG of the first 8 captions per scale")
    a.add_argument("--guidance", default="cfg", choices=[g for g in GUIDANCE if g != "none"],
                   help="cfg, or gradient guidance by a noised CLIP / noisy classifier given by --guide")
    a.add_argument("--guide", default=None, metavar="DIR", help="the clip / classifier checkpoint for --guidance")
    a.add_argument("--single-fraction", type=float, default=0.5,
                   help="share of single-object captions (1 for --guidance classifier: the 18 objects)")
    a.add_argument("--batch", type=int, default=32, help="captions per sampling call")
    a.add_argument("--json", action="store_true")
    st = sub.add_parser("steps", help="adherence and wall time per (sampler, steps) setting")
    st.add_argument("--checkpoint", required=True)
    st.add_argument("--n", type=int, default=96)
    st.add_argument("--scale", type=float, default=3.0)
    st.add_argument("--settings", default="ddpm:100,ddim:50,dpm++:10,dpm++:15,dpm++:25",
                    help="comma-separated SAMPLER:STEPS[@LO-HI] (STEPS = model evaluations; LO-HI = CFG only for "
                         "those original timesteps)")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--batch", type=int, default=32)
    st.add_argument("--upsample", default=None, metavar="UP_DIR",
                    help="sweep the upsampler stage instead: --settings apply to UP_DIR, on base samples drawn "
                         f"once with {FAST[0]}-{FAST[1]} at --scale (e.g. --settings ddpm:fast27,sde-dpm++:20)")
    st.add_argument("--json", action="store_true")
    f = sub.add_parser("fid", help="zero-shot FID/KID against reference images or stats")
    f.add_argument("--checkpoint", required=True)
    f.add_argument("--captions", required=True)
    f.add_argument("--reference", required=True, help="folder of reference images or a stats .npz (mu, sigma)")
    f.add_argument("--inception", required=True, help="pt_inception-2015-12-05-6726825d.pth")
    f.add_argument("--n", type=int, default=30000)
    f.add_argument("--scale", type=float, default=1.5)
    f.add_argument("--steps", default="100")
    f.add_argument("--sampler", default="ddpm", choices=sampling.SAMPLERS)
    f.add_argument("--upsample", default=None)
    f.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    setup_logging()

    try:
        if args.command == "adherence":
            scales = [float(s) for s in args.scales.split(",")]
            if not 0.0 <= args.single_fraction <= 1.0:
                raise ValueError(f"--single-fraction {args.single_fraction}: expected a fraction in [0, 1]")
            out = adherence(args.checkpoint, n=args.n, scales=scales, respacing=respacing_for(args.sampler, args.steps),
                            sampler=args.sampler, seed=args.seed, batch=args.batch, grid_path=args.grid,
                            guidance=args.guidance, guide=args.guide, single_fraction=args.single_fraction)
        elif args.command == "steps" and args.upsample:
            out = upsample_sweep(args.checkpoint, args.upsample, n=args.n, scale=args.scale,
                                 settings=parse_settings(args.settings), seed=args.seed, batch=args.batch)
            if not args.json:
                print(out["table"])
                return 0
        elif args.command == "steps":
            out = steps_sweep(args.checkpoint, n=args.n, scale=args.scale, settings=parse_settings(args.settings),
                              seed=args.seed, batch=args.batch)
            if not args.json:
                print(out["table"])
                return 0
        else:
            out = fid(args.checkpoint, captions_file=args.captions, reference=args.reference,
                      inception=args.inception, n=args.n, scale=args.scale,
                      respacing=respacing_for(args.sampler, args.steps), sampler=args.sampler, upsample=args.upsample)
    except (SampleError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    host.tune_for_cli()
    sys.exit(main())
