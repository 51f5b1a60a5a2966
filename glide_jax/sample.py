"""Sampling: the public API (`generate`, `sample_images`, `cascade`) and the command line.

    python -m glide_jax.sample --checkpoint DIR --prompt "a red circle" [--prompt ...] \
        --guidance cfg --scale 3 --steps 50 --sampler ddim --seed 0 --out grid.png
    python -m glide_jax.sample --checkpoint INPAINT_DIR --prompt "a dog" --inpaint photo.png \
        --mask mask.png      # an inpainting model; mask: white = keep, black = fill in

`DIR` is a training workdir (EMA params of its newest checkpoint) or a converted release
(`python -m glide_jax.convert`). Text is encoded once before the loop; the whole sampler
(one `lax.scan`) is jitted and compiled once per shape: new prompts, seeds and guidance
scales reuse the compiled program.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import pathlib
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from glide_jax import checkpoint, compile_cache, experiment, host, images, sharding
from glide_jax.console import setup_logging
from glide_jax.convert import load_converted
from glide_jax.diffusion import guidance as G
from glide_jax.diffusion import sampling, schedules

log = logging.getLogger("glide_jax.sample")

# "cfg" needs no second network; the others are named after the guide kind whose score they use.
GUIDANCE = ("none", "cfg") + experiment.GUIDES


class SampleError(ValueError):
    """A user mistake (bad checkpoint, wrong sizes, empty prompt list); printed without traceback."""


# ---------------------------------------------------------------------------- core


class _StepProgress:
    """A tqdm bar advanced from inside the jitted scan (a host callback per denoising step).

    The compiled sampler only knows whether progress is on; which bar it advances is chosen at
    call time (`with _PROGRESS.bar(total): ...`), so showing progress never forces a retrace.
    """

    def __init__(self):
        self._bar = None

    def tick(self, _):
        if self._bar is not None:
            self._bar.update(1)

    @contextlib.contextmanager
    def bar(self, total: int, desc: str = "sampling"):
        self._bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
        try:
            yield self._bar
        finally:
            self._bar.close()
            self._bar = None


_PROGRESS = _StepProgress()


@functools.partial(
    jax.jit,
    static_argnames=("model", "sampler", "eta", "guidance", "clip_denoised", "inpaint_known", "return_all",
                     "guide_model", "progress", "cfg_interval", "cfg_schedule", "threshold"),
)
def _generate(params, inputs, x_T, noise, rng, scale, sched, guide_params, guide_inputs, *,
              model, sampler, eta, guidance, clip_denoised, inpaint_known, return_all, guide_model,
              progress=False, cfg_interval=None, cfg_schedule=None, threshold=None):
    text = None
    model_inputs = dict(inputs)
    tokens = model_inputs.pop("tokens", None)
    mask = model_inputs.pop("mask", None)
    if tokens is not None:
        # encoded once, outside the scan loop
        text = model.apply({"params": params}, tokens, mask, method="encode_text")

    def model_fn(x, t):
        if progress:
            jax.debug.callback(_PROGRESS.tick, t[0])
        return model.apply({"params": params}, x, t, text=text, **model_inputs)

    if guidance == "cfg":
        n = x_T.shape[0] // 2
        cond_text = None if text is None else jax.tree.map(lambda a: a[:n], text)
        cond_inputs = {k: v[:n] for k, v in model_inputs.items()}

        def cond_model_fn(x, t):  # the conditional rows alone (outside the guidance interval)
            if progress:
                jax.debug.callback(_PROGRESS.tick, t[0])
            return model.apply({"params": params}, x, t, text=cond_text, **cond_inputs)

        model_fn = G.classifier_free(model_fn, scale, interval=cfg_interval, scale_schedule=cfg_schedule,
                                     cond_model_fn=cond_model_fn)
    cond_fn = None
    if guidance in experiment.GUIDES:
        guide_score = experiment.KINDS[guidance].guide_score
        cond_fn = G.gradient_cond_fn(lambda x, t: guide_score(guide_model, guide_params, x, t, guide_inputs), scale)
    denoised_fn = None
    if inpaint_known:
        denoised_fn = G.inpaint_denoised_fn(inputs["inpaint_image"], inputs["inpaint_mask"])
    return sampling.sample_loop(
        model_fn, sched, x_T, sampler=sampler, eta=eta, rng=rng, noise=noise,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, return_all=return_all,
        threshold=threshold,
    )


def _on_all_devices(mesh, tree):
    """Leaves not already spread over the mesh's devices are replicated onto all of them."""
    devices = set(mesh.devices.flat)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(
        lambda a: a if isinstance(a, jax.Array) and a.sharding.device_set == devices
        else jax.device_put(a, replicated), tree)


def generate(
    model,
    params,
    inputs: Mapping[str, Any],
    *,
    sched: schedules.Schedule,
    sampler: str = "ddpm",
    guidance: str = "none",
    scale: float = 0.0,
    eta: float = 0.0,
    rng: jax.Array | None = None,
    x_T: jax.Array | None = None,
    noise: jax.Array | None = None,
    temperature: float = 1.0,
    clip_denoised: bool = True,
    inpaint_known: bool = False,
    guide_model=None,
    guide_params=None,
    guide_inputs: Mapping[str, Any] | None = None,
    return_all: bool = False,
    progress: bool = False,
    cfg_interval: tuple[int, int] | None = None,
    cfg_schedule: str | None = None,
    threshold: str | None = None,
):
    """Runs the reverse process of `model` (a Text2ImUNet) on B rows.

    Args:
      inputs: per-row model inputs, NHWC: `tokens` [B, L], `mask` [B, L], optionally `low_res`
        [B, s, s, 3], `inpaint_image` [B, S, S, 3], `inpaint_mask` [B, S, S, 1]. With
        guidance="cfg" the rows are GLIDE's [conditional n; unconditional n] (B = 2n) and the
        first n rows of the result are the guided samples.
      sched: a respaced schedule (`schedules.make_schedule(name, steps, respacing)`).
      sampler: one of `sampling.SAMPLERS`: "ddpm" (ancestral, learned variance), "ddim" (eta),
        "dpm++" (2M), "sde-dpm++" (stochastic 2M), "unipc" (order 2), "restart".
      guidance: "none", "cfg" (scale = guidance scale), or a guide kind, "clip" / "classifier"
        (scale = gradient scale; guide_model/guide_params/guide_inputs = the noised CLIP with
        `text_emb` [B, D], or the classifier with labels `y` [B]).
      rng: key for x_T and the step noises (unused for what `x_T` / `noise` give explicitly).
      x_T: optional starting sample [B, S, S, 3] (already multiplied by the temperature).
      noise: optional explicit per-step noise [N, B, S, S, 3].
      temperature: multiplies a drawn x_T (GLIDE's upsampler uses 0.997).
      inpaint_known: force the known region (inpaint_mask = 1) back into every x̂₀.
      progress: show a progress bar over the denoising steps (stderr).
      cfg_interval: (t_lo, t_hi) in original timesteps: CFG only there; elsewhere the
        unconditional rows are not computed (`guidance.classifier_free`).
      cfg_schedule: the CFG scale over t (None/"constant", "linear", "cosine").
      threshold: None (clip_denoised decides), "none", "clip" or "dynamic" (Imagen).
    Returns:
      samples [B, S, S, 3] (and all steps [N, B, S, S, 3] with return_all).
    """
    if guidance not in GUIDANCE:
        raise SampleError(f"unknown guidance {guidance!r}; expected one of {GUIDANCE}")
    if guidance == "cfg" and inputs["tokens"].shape[0] % 2:
        raise SampleError("classifier-free guidance needs [conditional; unconditional] rows (an even batch)")
    size = model.config.image_size
    batch = inputs["tokens"].shape[0] if "tokens" in inputs else inputs["low_res"].shape[0]
    if rng is None:
        rng = jax.random.PRNGKey(0)
    x_rng, loop_rng = jax.random.split(rng)
    if x_T is None:
        x_T = temperature * jax.random.normal(x_rng, (batch, size, size, 3), jnp.float32)
    inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    x_T = jnp.asarray(x_T, jnp.float32)
    if noise is not None:
        noise = jnp.asarray(noise, jnp.float32)
    if jax.device_count() > 1 and batch % jax.device_count() == 0:
        # data-parallel sampling: rows over every device, weights replicated (jit propagates it)
        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        params, guide_params = _on_all_devices(mesh, (params, guide_params))
        inputs = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in inputs.items()}
        x_T = jax.device_put(x_T, sharding.batch_sharding(mesh, x_T.ndim))
        if noise is not None:
            noise = jax.device_put(noise, sharding.batch_sharding(mesh, noise.ndim, leading=1))
    run = functools.partial(
        _generate,
        params, inputs, x_T, noise, loop_rng, jnp.asarray(scale, jnp.float32), sched, guide_params, dict(guide_inputs or {}),
        model=model, sampler=sampler, eta=float(eta), guidance=guidance, clip_denoised=clip_denoised,
        inpaint_known=inpaint_known, return_all=return_all, guide_model=guide_model, progress=progress,
        cfg_interval=None if cfg_interval is None else tuple(int(v) for v in cfg_interval),
        cfg_schedule=cfg_schedule, threshold=threshold,
    )
    if not progress:
        return run()
    with _PROGRESS.bar(sampling.evaluations(sampler, sched)):
        return jax.block_until_ready(run())


# ---------------------------------------------------------------------------- convenience


schedule_for = experiment.schedule_for


# The recommended fast setting (`--sampler fast`): ancestral DDPM with the learned variance at 25
# evaluations kept DDPM-100's colour adherence in docs/benchmarks.md, where the deterministic and
# multistep solvers at <= 25 evaluations did not.
FAST = ("ddpm", 25)


def sampler_and_steps(sampler: str, steps: str | int | None) -> tuple[str, str]:
    """CLI (sampler, steps) -> concrete ones: "fast" names `FAST`; steps None = the default."""
    if sampler == "fast":
        return FAST[0], str(FAST[1] if steps is None else steps)
    return sampler, str(50 if steps is None else steps)


def respacing_for(sampler: str, steps: int | str, hparams: Mapping[str, Any] | None = None) -> str:
    """`--steps N` (model evaluations) -> the respacing string: "ddimN" for DDIM (evenly strided),
    "N" for ddpm / dpm++, and for the newer samplers the spacing that suits them
    (`sampling.timesteps_for`: uniform in λ for sde-dpm++ and unipc; restart's N steps spend
    at most N evaluations). A respacing string (e.g. "fast27") is passed through."""
    if isinstance(steps, str) and not steps.isdigit():
        return steps
    if sampler in ("ddpm", "ddim", "dpm++") or hparams is None:
        return f"ddim{int(steps)}" if sampler == "ddim" else str(int(steps))
    name, num_steps = experiment.diffusion_of(hparams)
    return sampling.timesteps_for(sampler, int(steps), num_steps, noise_schedule=name)


def text_inputs(tok, prompts: Sequence[str], text_ctx: int, *, cfg: bool) -> dict[str, np.ndarray]:
    """Tokens/mask rows for the prompts, followed by as many empty captions when `cfg`."""
    rows = list(prompts) + ([""] * len(prompts) if cfg else [])
    tokens, mask = tok.encode_batch(rows, text_ctx)
    return {"tokens": np.asarray(tokens, np.int32), "mask": np.asarray(mask, bool)}


def sample_images(
    model, params, tok, prompts: Sequence[str], *, config=None, hparams: Mapping | None = None,
    guidance_scale: float = 0.0, respacing: str = "50", sampler: str = "ddpm", seed: int = 0,
    eta: float = 0.0, temperature: float = 1.0, low_res: np.ndarray | None = None,
    inpaint_image: np.ndarray | None = None, inpaint_mask: np.ndarray | None = None,
    progress: bool = False, cfg_interval: tuple[int, int] | None = None, threshold: str | None = None,
) -> np.ndarray:
    """Samples one image per prompt; CFG when guidance_scale > 0. Returns [n, S, S, 3] in [-1, 1]."""
    if not prompts:
        raise SampleError("no prompts given")
    if hparams is None:
        hparams = config.model.hparams.to_dict() if hasattr(config.model.hparams, "to_dict") else config.model.hparams
    cfg = guidance_scale > 0
    inputs = text_inputs(tok, prompts, model.config.text_ctx, cfg=cfg)
    reps = 2 if cfg else 1
    for name, value in (("low_res", low_res), ("inpaint_image", inpaint_image), ("inpaint_mask", inpaint_mask)):
        if value is not None:
            inputs[name] = np.concatenate([np.asarray(value, np.float32)] * reps)
    out = generate(
        model, params, inputs, sched=schedule_for(hparams, respacing), sampler=sampler,
        guidance="cfg" if cfg else "none", scale=guidance_scale, eta=eta, temperature=temperature,
        rng=jax.random.PRNGKey(seed), inpaint_known=inpaint_image is not None, progress=progress,
        cfg_interval=cfg_interval if cfg else None, threshold=threshold,
    )
    return np.asarray(out)[: len(prompts)]


def guided_images(base, guide, prompts: Sequence[str], *, guidance: str, labels: Sequence[int] = (),
                  scale: float = 1.0, respacing: str = "100", seed: int = 0, temperature: float = 1.0,
                  progress: bool = False) -> np.ndarray:
    """Ancestral sampling of the conditional base model with the mean shifted by
    variance · scale · ∇ₓ score(x_t, t) of a guide network: GLIDE's CLIP guidance (score =
    logit_scale·⟨image_emb(x_t, t), text_emb⟩) or ADM classifier guidance (score = log p(y | x_t, t),
    one label per prompt).

    Args:
      base, guide: bundles (model, params, tokenizer, cfg) from `load_for_sampling`.
      guidance: the guide's kind ("clip" or "classifier").
    Returns:
      [n, S, S, 3] in [-1, 1].
    """
    if not prompts:
        raise SampleError("no prompts given")
    model, params, tok, cfg = base
    guide_model, guide_params, guide_tok, guide_cfg = guide
    if not experiment.get_kind(cfg.hparams).is_generator or experiment.get_kind(guide_cfg.hparams).name != guidance:
        raise SampleError(f"{guidance} guidance needs a UNet checkpoint and a {guidance} checkpoint (--{guidance})")
    if guide_cfg.hparams.get("image_size") != cfg.hparams.get("image_size"):
        raise SampleError(f"the {guidance} model sees {guide_cfg.hparams.get('image_size')} px images, the base "
                          f"model makes {cfg.hparams.get('image_size')} px")
    try:
        guide_inputs = experiment.KINDS[guidance].guide_inputs(guide_model, guide_params, guide_tok, prompts, labels)
    except experiment.SetupError as e:
        raise SampleError(str(e)) from None
    return np.asarray(generate(
        model, params, text_inputs(tok, prompts, model.config.text_ctx, cfg=False),
        sched=schedule_for(cfg.hparams, respacing), sampler="ddpm", guidance=guidance, scale=scale,
        temperature=temperature, rng=jax.random.PRNGKey(seed), guide_model=guide_model, guide_params=guide_params,
        guide_inputs=guide_inputs, progress=progress,
    ))


def clip_guided_images(base, clip, prompts: Sequence[str], **kwargs) -> np.ndarray:
    """GLIDE's CLIP guidance with a noised CLIP (`guided_images` with guidance="clip")."""
    kwargs.setdefault("scale", 3.0)
    return guided_images(base, clip, prompts, guidance="clip", **kwargs)


def classifier_guided_images(base, classifier, prompts: Sequence[str], labels: Sequence[int],
                             **kwargs) -> np.ndarray:
    """ADM classifier guidance (`guided_images` with guidance="classifier")."""
    return guided_images(base, classifier, prompts, guidance="classifier", labels=labels, **kwargs)


def truncate_schedule(sched: schedules.Schedule, start_t: int) -> schedules.Schedule:
    """The respaced schedule's steps at original timesteps <= start_t: a reverse process that
    starts there (the tables of the kept steps do not depend on the dropped, noisier ones)."""
    k = int(np.searchsorted(np.asarray(sched.timestep_map), int(start_t), side="right"))
    if k < 1:
        raise SampleError(f"start_t={start_t} is below the schedule's first timestep")
    return jax.tree.map(lambda a: a[:k], sched)


def upsample_images(up, prompts: Sequence[str], low: np.ndarray, *, respacing: str = "fast27",
                    temperature: float = 0.997, seed: int = 0, progress: bool = False,
                    start_t: int | None = None, sampler: str = "ddpm") -> np.ndarray:
    """GLIDE's upsampling stage: low [n, s, s, 3] in [-1, 1], quantised to 8 bit as the reference
    does, -> [n, S, S, 3] from the super-resolution model (ancestral, fast27, temperature 0.997).

    sampler / respacing: GLIDE's is ddpm on fast27; any `sampling.SAMPLERS` entry with the
    respacing `respacing_for(sampler, steps, hparams)` gives it.

    start_t: None (GLIDE: the whole reverse process from noise), or an original timestep: the
    reverse process starts there from q(x_t | x_0 = bilinear upscale of low), SDEdit-style, for
    an upsampler trained too briefly to have learned the lowest signal-to-noise steps.
    """
    up_model, up_params, up_tok, up_cfg = up
    if not getattr(up_model.config, "super_res", False):
        raise SampleError(f"{up_cfg.hparams.get('kind')} is not an upsampler checkpoint")
    low_q = images.from_uint8(images.to_uint8(low))
    if start_t is None:
        return sample_images(up_model, up_params, up_tok, prompts, hparams=up_cfg.hparams, guidance_scale=0.0,
                             respacing=respacing, sampler=sampler, seed=seed, temperature=temperature, low_res=low_q,
                             progress=progress)
    sched = truncate_schedule(schedule_for(up_cfg.hparams, respacing), start_t)
    size = up_model.config.image_size
    a = float(sched.alphas_cumprod[-1])
    rng, noise_rng = jax.random.split(jax.random.PRNGKey(seed))
    init = jax.image.resize(jnp.asarray(low_q), (len(low_q), size, size, 3), method="linear", antialias=False)
    x_T = np.sqrt(a) * init + np.sqrt(1.0 - a) * temperature * jax.random.normal(noise_rng, init.shape)
    inputs = dict(text_inputs(up_tok, prompts, up_model.config.text_ctx, cfg=False), low_res=low_q)
    return np.asarray(generate(up_model, up_params, inputs, sched=sched, sampler=sampler, rng=rng, x_T=x_T,
                               progress=progress))


def cascade(base, up, prompts: Sequence[str], *, guidance_scale: float = 3.0, base_respacing: str = "100",
            base_sampler: str = "ddpm", up_respacing: str = "fast27", up_temperature: float = 0.997,
            seed: int = 0, progress: bool = False, up_start_t: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Base (CFG) -> 8-bit quantised low-res -> upsampler, as GLIDE's notebook. Returns (low, high).
    `up_start_t`: see `upsample_images` (None: GLIDE's)."""
    model, params, tok, cfg = base
    low = sample_images(model, params, tok, prompts, hparams=cfg.hparams, guidance_scale=guidance_scale,
                        respacing=base_respacing, sampler=base_sampler, seed=seed, progress=progress)
    high = upsample_images(up, prompts, low, respacing=up_respacing, temperature=up_temperature, seed=seed + 1,
                           progress=progress, start_t=up_start_t)
    return low, high


# ---------------------------------------------------------------------------- checkpoints


def _is_converted(p: pathlib.Path) -> bool:
    return (p / "params").exists() and (p / "config.json").exists() and not (p / "checkpoints").exists()


def load_for_sampling(path: str):
    """(model, params, tokenizer, config-like) from a training workdir or a converted release.

    The tokenizer is the model kind's (`experiment.tokenizer_for`): a noised CLIP reads CLIP's
    BPE, a UNet GLIDE's BPE or the sentencepiece model it was trained with.
    """
    p = pathlib.Path(path)
    if not p.exists() and "://" not in path:
        raise SampleError(f"checkpoint {path} does not exist")
    if _is_converted(p):
        hparams, params = load_converted(path)
        return (experiment.build(hparams, kernels="auto"), params, experiment.tokenizer_for(hparams),
                _Cfg(hparams))
    cfg_json = checkpoint.read_config(path)
    if cfg_json is None:
        raise SampleError(f"{path} is neither a training workdir (config.json + checkpoints/) nor a converted "
                          "checkpoint (config.json + params/)")
    config = ml_collections.ConfigDict(cfg_json)
    config.model.kernels = "auto"  # the kernels of this backend; they never change the parameters
    compile_cache.enable(cfg_json.get("train", {}).get("compile_cache_dir", ""), path)  # the run's (train.py)
    try:
        experiment.finalize(config)
        compile_cache.set_compiler_effort(config)  # the run's (finalize checked it)
        manager = checkpoint.make_manager(path, async_save=False)
        if not manager.all_steps():
            raise SampleError(f"{path} has no checkpoint yet")
        setup = experiment.setup_state(config, manager=manager)
        if not setup.restored:
            raise SampleError(f"{path} has no readable checkpoint")
    except experiment.SetupError as e:
        raise SampleError(str(e)) from None
    hparams = config.model.hparams.to_dict()
    log.info("loaded EMA params of step %d from %s", setup.step, path)
    return setup.model, setup.state.ema_params, experiment.tokenizer_for(hparams, config.tokenizer), _Cfg(hparams)


def read_hparams(path: str) -> dict:
    """The model hyper-parameters of a workdir or converted checkpoint, without loading weights."""
    p = pathlib.Path(path)
    if not p.exists() and "://" not in path:
        raise SampleError(f"checkpoint {path} does not exist")
    if _is_converted(p):
        try:
            return dict(json.loads((p / "config.json").read_text()))
        except (ValueError, OSError) as e:
            raise SampleError(f"{p / 'config.json'}: unreadable ({e})") from None
    try:
        cfg_json = checkpoint.read_config(path)
    except (ValueError, OSError) as e:
        raise SampleError(f"{path}/config.json: unreadable ({e})") from None
    if cfg_json is None:
        raise SampleError(f"{path} is neither a training workdir (config.json + checkpoints/) nor a converted "
                          "checkpoint (config.json + params/)")
    return dict(cfg_json["model"]["hparams"])


def load_inpaint_inputs(image_path: str, mask_path: str, hparams: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(image [1, S, S, 3] in [-1, 1], mask [1, S, S, 1] in {0, 1}, 1 = keep) for an inpainting model.

    Raises SampleError when the model is not an inpainting one, a file is not an image, its size
    is not the model's S x S, or the mask is not black and white.
    """
    kind = hparams.get("kind", "base")
    if not (hparams.get("inpaint") or kind.endswith("inpaint")):
        raise SampleError(f"--inpaint needs an inpainting model; this checkpoint is a {kind!r} model")
    if hparams.get("super_res") or kind.startswith("upsample"):
        raise SampleError(f"the command line samples base models only; this checkpoint is a {kind!r} model")
    size = int(hparams["image_size"])
    try:
        image = images.load_image(image_path, size)
        mask = images.load_image(mask_path, size)
    except ValueError as e:
        raise SampleError(f"{e} (the model's image size)" if "expected" in str(e) else str(e)) from None
    if not ((mask[..., 0] == mask[..., 1]) & (mask[..., 1] == mask[..., 2])).all():
        raise SampleError(f"{mask_path}: the mask has colours; expected a black-and-white image (white = keep)")
    keep = (mask[None, ..., :1] >= 128).astype(np.float32)
    return images.from_uint8(image)[None], keep


def _interval(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two integers), got {text!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return lo, hi


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


@dataclasses.dataclass
class _Cfg:
    """The minimal config view `sample_images` needs (model.hparams)."""

    hparams: dict

    @property
    def model(self):
        return self

# ---------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glide_jax.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint dir")
    parser.add_argument("--prompt", action="append", default=[], help="a caption (repeat for several)")
    parser.add_argument("--guidance", choices=GUIDANCE, default="cfg")
    parser.add_argument("--scale", type=_finite_float, default=3.0, help="guidance scale")
    parser.add_argument("--steps", default=None,
                        help="sampling steps = model evaluations (default 50; --sampler fast: "
                             f"{FAST[1]}), or a respacing string, e.g. fast27")
    parser.add_argument("--sampler", choices=sampling.SAMPLERS + ("fast",), default="ddpm",
                        help="ddpm (ancestral, GLIDE default), ddim (eta 0), dpm++ (2M), sde-dpm++ (stochastic 2M), "
                             f"unipc (order 2), restart; fast = the recommended fast setting ({FAST[0]}, "
                             f"{FAST[1]} evaluations); --steps counts model evaluations")
    parser.add_argument("--cfg-interval", metavar="LO,HI", type=_interval, default=None,
                        help="classifier-free guidance only for original timesteps LO..HI (0..999); elsewhere the "
                             "unconditional half is not computed")
    parser.add_argument("--threshold", choices=sampling.THRESHOLDS, default=None,
                        help="x0 thresholding: clip (default), none, dynamic (Imagen, percentile 0.995)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="grid.png")
    parser.add_argument("--individual", action="store_true", help="also write each image as OUT_<i>.png")
    parser.add_argument("--inpaint", metavar="IMAGE", help="inpainting models: the image to fill in (S x S)")
    parser.add_argument("--mask", metavar="MASK", help="with --inpaint: S x S mask image, white = keep")
    parser.add_argument("--clip", metavar="DIR", help="noised-CLIP checkpoint for --guidance clip")
    parser.add_argument("--classifier", metavar="DIR", help="noisy-classifier checkpoint for --guidance classifier")
    parser.add_argument("--label", type=int, action="append", default=[], help="class for --guidance classifier")
    parser.add_argument("--upsample", metavar="DIR", help="upsampler checkpoint: base -> upsampler cascade "
                        "(fast27, temperature 0.997)")
    args = parser.parse_args(argv)
    args.sampler, args.steps = sampler_and_steps(args.sampler, args.steps)
    if (args.inpaint is None) != (args.mask is None):
        parser.error("--inpaint and --mask go together")
    if args.guidance in experiment.GUIDES:
        guide = experiment.KINDS[args.guidance]
        if not getattr(args, args.guidance) or (guide.labels and not args.label):
            parser.error(f"--guidance {args.guidance} needs --{args.guidance} DIR (a {args.guidance} checkpoint)"
                         + (" and --label Y" if guide.labels else ""))
    setup_logging()
    try:
        if not args.prompt:
            raise SampleError("no --prompt given")
        # everything checkable without the weights is checked before loading them
        hparams = read_hparams(args.checkpoint)
        respacing = respacing_for(args.sampler, args.steps, hparams)
        try:
            schedule_for(hparams, respacing)
        except ValueError as e:
            raise SampleError(f"--steps {args.steps}: {e}") from None
        inpaint = {}
        if args.inpaint is not None:
            image, mask = load_inpaint_inputs(args.inpaint, args.mask, hparams)
            n = len(args.prompt)
            inpaint = dict(inpaint_image=np.repeat(image, n, 0), inpaint_mask=np.repeat(mask, n, 0))
        base = load_for_sampling(args.checkpoint)
        model, params, tok, cfg = base
        t0 = time.perf_counter()
        if args.guidance in experiment.GUIDES:
            guide = load_for_sampling(getattr(args, args.guidance))
            x = guided_images(base, guide, args.prompt, guidance=args.guidance, labels=args.label, scale=args.scale,
                              respacing=respacing, seed=args.seed, progress=True)
        else:
            x = sample_images(
                model, params, tok, args.prompt, hparams=cfg.hparams,
                guidance_scale=args.scale if args.guidance == "cfg" else 0.0,
                respacing=respacing, sampler=args.sampler, seed=args.seed, progress=True,
                cfg_interval=args.cfg_interval, threshold=args.threshold, **inpaint,
            )
        if args.upsample:
            x = upsample_images(load_for_sampling(args.upsample), args.prompt, x, seed=args.seed + 1, progress=True)
    except (SampleError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pics = images.to_uint8(x)
    grid = images.grid(pics, args.prompt, cols=min(8, len(pics)), scale=max(1, 128 // pics.shape[1]))  # rows of <= 8
    out = images.save_png(args.out, grid)
    if args.individual:
        for i, pic in enumerate(pics):
            images.save_png(out.with_name(f"{out.stem}_{i}.png"), pic)
    print(f"wrote {out} ({len(args.prompt)} images, {time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    host.tune_for_cli()
    sys.exit(main())
