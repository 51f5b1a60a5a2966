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
import numpy as np

from glide_jax.diffusion import guidance as G
from glide_jax.diffusion import sampling, schedules

log = logging.getLogger("glide_jax.sample")

UNET_KINDS = ("base", "upsample", "base-inpaint", "upsample-inpaint")
GUIDANCE = ("none", "cfg", "clip", "classifier")


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
        from tqdm import tqdm

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
                     "guide_model", "progress"),
)
def _generate(params, inputs, x_T, noise, rng, scale, sched, guide_params, guide_inputs, *,
              model, sampler, eta, guidance, clip_denoised, inpaint_known, return_all, guide_model,
              progress=False):
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
        model_fn = G.classifier_free(model_fn, scale)
    cond_fn = None
    if guidance == "clip":
        def score(x, t):
            image_emb = guide_model.apply({"params": guide_params}, x, t, method="image_embeddings")
            return guide_model.config.logit_scale * jnp.sum(image_emb * guide_inputs["text_emb"], axis=-1)

        cond_fn = G.gradient_cond_fn(score, scale)
    elif guidance == "classifier":
        def score(x, t):
            logits = guide_model.apply({"params": guide_params}, x, t).astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return jnp.take_along_axis(logp, guide_inputs["y"][:, None], axis=-1)[:, 0]

        cond_fn = G.gradient_cond_fn(score, scale)
    denoised_fn = None
    if inpaint_known:
        denoised_fn = G.inpaint_denoised_fn(inputs["inpaint_image"], inputs["inpaint_mask"])
    return sampling.sample_loop(
        model_fn, sched, x_T, sampler=sampler, eta=eta, rng=rng, noise=noise,
        clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, return_all=return_all,
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
):
    """Runs the reverse process of `model` (a Text2ImUNet) on B rows.

    Args:
      inputs: per-row model inputs, NHWC: `tokens` [B, L], `mask` [B, L], optionally `low_res`
        [B, s, s, 3], `inpaint_image` [B, S, S, 3], `inpaint_mask` [B, S, S, 1]. With
        guidance="cfg" the rows are GLIDE's [conditional n; unconditional n] (B = 2n) and the
        first n rows of the result are the guided samples.
      sched: a respaced schedule (`schedules.make_schedule(name, steps, respacing)`).
      sampler: "ddpm" (ancestral, learned variance), "ddim" (eta), or "dpm++" (2M).
      guidance: "none", "cfg" (scale = guidance scale), "clip" / "classifier" (scale = gradient
        scale; guide_model/guide_params/guide_inputs = the noised CLIP with `text_emb` [B, D],
        or the classifier with labels `y` [B]).
      rng: key for x_T and the step noises (unused for what `x_T` / `noise` give explicitly).
      x_T: optional starting sample [B, S, S, 3] (already multiplied by the temperature).
      noise: optional explicit per-step noise [N, B, S, S, 3].
      temperature: multiplies a drawn x_T (GLIDE's upsampler uses 0.997).
      inpaint_known: force the known region (inpaint_mask = 1) back into every x̂₀.
      progress: show a progress bar over the denoising steps (stderr).
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
        from glide_jax import sharding

        mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
        params, guide_params = _on_all_devices(mesh, (params, guide_params))
        inputs = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in inputs.items()}
        x_T = jax.device_put(x_T, sharding.batch_sharding(mesh, x_T.ndim))
        if noise is not None:
            noise = jax.device_put(noise, jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec(None, (sharding.DATA, sharding.FSDP))))
    run = functools.partial(
        _generate,
        params, inputs, x_T, noise, loop_rng, jnp.asarray(scale, jnp.float32), sched, guide_params, dict(guide_inputs or {}),
        model=model, sampler=sampler, eta=float(eta), guidance=guidance, clip_denoised=clip_denoised,
        inpaint_known=inpaint_known, return_all=return_all, guide_model=guide_model, progress=progress,
    )
    if not progress:
        return run()
    with _PROGRESS.bar(sched.num_timesteps):
        return jax.block_until_ready(run())


# ---------------------------------------------------------------------------- convenience


def schedule_for(hparams: Mapping[str, Any], respacing: str) -> schedules.Schedule:
    from glide_jax.config import diffusion_of

    name, steps = diffusion_of(hparams)
    return schedules.make_schedule(name, steps, str(respacing))


def respacing_for(sampler: str, steps: int | str) -> str:
    """`--steps N` -> the respacing string ("ddimN" for DDIM, so its steps are evenly strided)."""
    if isinstance(steps, str) and not steps.isdigit():
        return steps
    return f"ddim{int(steps)}" if sampler == "ddim" else str(int(steps))


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
    progress: bool = False,
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
    )
    return np.asarray(out)[: len(prompts)]


def _gradient_guided(base, guide, prompts, *, guidance, guide_inputs, scale, respacing, seed, temperature,
                     progress):
    """Ancestral sampling of the conditional base model with the mean shifted by
    variance · scale · ∇ₓ score(x_t, t) of a guide network (GLIDE's CLIP / ADM classifier guidance)."""
    model, params, tok, cfg = base
    guide_model, guide_params, _, guide_cfg = guide
    if guide_cfg.hparams.get("image_size") != cfg.hparams.get("image_size"):
        raise SampleError(f"the {guidance} model sees {guide_cfg.hparams.get('image_size')} px images, the base "
                          f"model makes {cfg.hparams.get('image_size')} px")
    return np.asarray(generate(
        model, params, text_inputs(tok, prompts, model.config.text_ctx, cfg=False),
        sched=schedule_for(cfg.hparams, respacing), sampler="ddpm", guidance=guidance, scale=scale,
        temperature=temperature, rng=jax.random.PRNGKey(seed), guide_model=guide_model, guide_params=guide_params,
        guide_inputs=guide_inputs, progress=progress,
    ))


def clip_guided_images(base, clip, prompts: Sequence[str], *, scale: float = 3.0, respacing: str = "100",
                       seed: int = 0, temperature: float = 1.0, progress: bool = False) -> np.ndarray:
    """GLIDE's CLIP guidance with the noised CLIP: score = logit_scale·⟨image_emb(x_t, t), text_emb⟩.

    Args:
      base, clip: bundles (model, params, tokenizer, cfg) from `load_for_sampling`.
    Returns:
      [n, S, S, 3] in [-1, 1].
    """
    if not prompts:
        raise SampleError("no prompts given")
    clip_model, clip_params, clip_tok, clip_cfg = clip
    if base[3].hparams["kind"] not in UNET_KINDS or clip_cfg.hparams.get("kind") != "clip":
        raise SampleError("CLIP guidance needs a UNet checkpoint and a noised-CLIP checkpoint (--clip)")
    clip_tokens, clip_lens = clip_tok.encode_batch(list(prompts))
    text_emb = clip_model.apply({"params": clip_params}, jnp.asarray(clip_tokens), jnp.asarray(clip_lens),
                                method="text_embeddings")
    return _gradient_guided(base, clip, prompts, guidance="clip", guide_inputs={"text_emb": text_emb},
                            scale=scale, respacing=respacing, seed=seed, temperature=temperature,
                            progress=progress)


def classifier_guided_images(base, classifier, prompts: Sequence[str], labels: Sequence[int], *,
                             scale: float = 1.0, respacing: str = "100", seed: int = 0, temperature: float = 1.0,
                             progress: bool = False) -> np.ndarray:
    """ADM classifier guidance: score = log p(y | x_t, t) of the noisy classifier, one label per prompt."""
    if not prompts:
        raise SampleError("no prompts given")
    if classifier[3].hparams.get("kind") != "classifier":
        raise SampleError("classifier guidance needs a noisy-classifier checkpoint (--classifier)")
    n_classes = int(classifier[3].hparams.get("out_channels", 0))
    labels = list(labels) if len(labels) != 1 else list(labels) * len(prompts)
    if len(labels) != len(prompts) or any(not 0 <= y < n_classes for y in labels):
        raise SampleError(f"give one --label in [0, {n_classes}) (or one per prompt)")
    return _gradient_guided(base, classifier, prompts, guidance="classifier",
                            guide_inputs={"y": jnp.asarray(labels, jnp.int32)}, scale=scale,
                            respacing=respacing, seed=seed, temperature=temperature, progress=progress)


def upsample_images(up, prompts: Sequence[str], low: np.ndarray, *, respacing: str = "fast27",
                    temperature: float = 0.997, seed: int = 0, progress: bool = False) -> np.ndarray:
    """GLIDE's upsampling stage: low [n, s, s, 3] in [-1, 1], quantised to 8 bit as the reference
    does, -> [n, S, S, 3] from the super-resolution model (ancestral, fast27, temperature 0.997)."""
    from glide_jax import images

    up_model, up_params, up_tok, up_cfg = up
    if not getattr(up_model.config, "super_res", False):
        raise SampleError(f"{up_cfg.hparams.get('kind')} is not an upsampler checkpoint")
    low_q = images.from_uint8(images.to_uint8(low))
    return sample_images(up_model, up_params, up_tok, prompts, hparams=up_cfg.hparams, guidance_scale=0.0,
                         respacing=respacing, sampler="ddpm", seed=seed, temperature=temperature, low_res=low_q,
                         progress=progress)


def cascade(base, up, prompts: Sequence[str], *, guidance_scale: float = 3.0, base_respacing: str = "100",
            base_sampler: str = "ddpm", up_respacing: str = "fast27", up_temperature: float = 0.997,
            seed: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Base (CFG) -> 8-bit quantised low-res -> upsampler, as GLIDE's notebook. Returns (low, high)."""
    model, params, tok, cfg = base
    low = sample_images(model, params, tok, prompts, hparams=cfg.hparams, guidance_scale=guidance_scale,
                        respacing=base_respacing, sampler=base_sampler, seed=seed, progress=progress)
    high = upsample_images(up, prompts, low, respacing=up_respacing, temperature=up_temperature, seed=seed + 1,
                           progress=progress)
    return low, high


# ---------------------------------------------------------------------------- checkpoints


def load_for_sampling(path: str):
    """(model, params, tokenizer, config-like) from a training workdir or a converted release."""
    from glide_jax import checkpoint, models
    from glide_jax.tokenizer import GlideBPE, SentencePieceTokenizer

    p = pathlib.Path(path)
    if not p.exists() and "://" not in path:
        raise SampleError(f"checkpoint {path} does not exist")
    converted = (p / "params").exists() and (p / "config.json").exists() and not (p / "checkpoints").exists()
    if converted:
        from glide_jax.convert import load_converted

        hparams, params = load_converted(path)
        if hparams.get("kind") == "clip":
            from glide_jax.tokenizer import ClipBPE

            tok = ClipBPE(max_len=int(hparams.get("max_text_len", 77)))
        else:
            tok = GlideBPE(text_ctx=int(hparams.get("text_ctx", 128)))
        model = models.from_hparams(hparams)
        return model, params, tok, _Cfg(hparams)
    cfg_json = checkpoint.read_config(path)
    if cfg_json is None:
        raise SampleError(f"{path} is neither a training workdir (config.json + checkpoints/) nor a converted "
                          "checkpoint (config.json + params/)")
    import ml_collections

    from glide_jax.train import abstract_state, build_model, unbox
    from glide_jax.train_state import make_optimizer

    config = ml_collections.ConfigDict(cfg_json)
    model = build_model(config)
    hparams = config.model.hparams.to_dict()
    manager = checkpoint.make_manager(path, async_save=False)
    if not manager.all_steps():
        raise SampleError(f"{path} has no checkpoint yet")
    tx = make_optimizer(config.optim)
    boxed, _ = abstract_state(model, tx, model.init_inputs(batch=1), jax.random.PRNGKey(0))
    try:
        step, state, _, _ = checkpoint.restore_latest(manager, unbox(boxed))
    except checkpoint.UnreadableCheckpointsError as e:
        raise SampleError(str(e)) from None
    if config.tokenizer.name == "sentencepiece":
        tok = SentencePieceTokenizer(config.tokenizer.model_file, text_ctx=config.data.text_ctx)
    else:
        tok = GlideBPE(text_ctx=config.data.text_ctx)
    log.info("loaded EMA params of step %d from %s", step, path)
    return model, state.ema_params, tok, _Cfg(hparams)


def read_hparams(path: str) -> dict:
    """The model hyper-parameters of a workdir or converted checkpoint, without loading weights."""
    from glide_jax import checkpoint

    p = pathlib.Path(path)
    if not p.exists() and "://" not in path:
        raise SampleError(f"checkpoint {path} does not exist")
    if (p / "params").exists() and (p / "config.json").exists() and not (p / "checkpoints").exists():
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
    from glide_jax import images

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
    from glide_jax import images

    parser = argparse.ArgumentParser(prog="python -m glide_jax.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint dir")
    parser.add_argument("--prompt", action="append", default=[], help="a caption (repeat for several)")
    parser.add_argument("--guidance", choices=GUIDANCE, default="cfg")
    parser.add_argument("--scale", type=_finite_float, default=3.0, help="guidance scale")
    parser.add_argument("--steps", default="50", help="sampling steps (or a respacing string, e.g. fast27)")
    parser.add_argument("--sampler", choices=("ddpm", "ddim", "dpm++"), default="ddpm", help="ddpm (ancestral, GLIDE default), ddim (eta 0), dpm++ (2M)")
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
    if (args.inpaint is None) != (args.mask is None):
        parser.error("--inpaint and --mask go together")
    if args.guidance == "clip" and not args.clip:
        parser.error("--guidance clip needs --clip DIR (a noised-CLIP checkpoint)")
    if args.guidance == "classifier" and (not args.classifier or not args.label):
        parser.error("--guidance classifier needs --classifier DIR and --label Y")
    from glide_jax.console import setup_logging

    setup_logging()
    try:
        if not args.prompt:
            raise SampleError("no --prompt given")
        # everything checkable without the weights is checked before loading them
        hparams = read_hparams(args.checkpoint)
        respacing = respacing_for(args.sampler, args.steps)
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
        if args.guidance == "clip":
            x = clip_guided_images(base, load_for_sampling(args.clip), args.prompt, scale=args.scale,
                                   respacing=respacing, seed=args.seed, progress=True)
        elif args.guidance == "classifier":
            x = classifier_guided_images(base, load_for_sampling(args.classifier), args.prompt, args.label,
                                         scale=args.scale, respacing=respacing, seed=args.seed, progress=True)
        else:
            x = sample_images(
                model, params, tok, args.prompt, hparams=cfg.hparams,
                guidance_scale=args.scale if args.guidance == "cfg" else 0.0,
                respacing=respacing, sampler=args.sampler, seed=args.seed, progress=True, **inpaint,
            )
        if args.upsample:
            x = upsample_images(load_for_sampling(args.upsample), args.prompt, x, seed=args.seed + 1, progress=True)
    except (SampleError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pics = images.to_uint8(x)
    grid = images.grid(pics, args.prompt, scale=max(1, 128 // pics.shape[1]))
    out = images.save_png(args.out, grid)
    if args.individual:
        for i, pic in enumerate(pics):
            images.save_png(out.with_name(f"{out.stem}_{i}.png"), pic)
    print(f"wrote {out} ({len(args.prompt)} images, {time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
