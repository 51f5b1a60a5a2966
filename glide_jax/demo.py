"""`make demo`: train the tiny default config on synthetic shapes, then sample a captioned grid.

    python -m glide_jax.demo --workdir runs/demo [--steps N]
    python -m glide_jax.demo --all --workdir runs/miniature   # every GLIDE network + report (glide_jax.miniature)

`make demo` trains shapes_tiny's full 2500 steps (within 15 minutes on 2 CPU cores, venv
install included) and writes WORKDIR/demo_grid.png: the config's prompts without guidance and
with its classifier-free guidance scale, side by side. Resumable: re-running continues from the
workdir's last checkpoint (or only samples when training already finished); with --steps N
below the config's length the printed `glide_jax.train` command continues the same run.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

from glide_jax import configs_loader, host, images, miniature
from glide_jax.console import setup_logging
from glide_jax.sample import load_for_sampling, sample_images
from glide_jax.train import TrainingError, train_and_evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glide_jax.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--config", default=None, help="config file (default configs/shapes_tiny.py)")
    parser.add_argument("--all", action="store_true",
                        help="the miniature GLIDE instead: train base, upsampler, inpainting, noised CLIP and "
                             "classifier, evaluate, write WORKDIR/report.md (flags: python -m glide_jax.miniature -h)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--all" in argv:
        rest = [a for a in argv if a != "--all"]
        return miniature.main(rest, prog="python -m glide_jax.demo --all")
    args = parser.parse_args(argv)

    setup_logging()


    config = configs_loader.load(args.config or "shapes_tiny")
    full_steps = config.train.num_steps
    if args.steps is not None:
        config.train.num_steps = args.steps
    workdir = pathlib.Path(args.workdir)
    print(f"[demo] training {config.model.hparams.kind} ({config.model.hparams.image_size}px) on "
          f"{config.data.name} for {config.train.num_steps} steps in {workdir}")
    t0 = time.perf_counter()
    try:
        train_and_evaluate(config, str(workdir))
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[demo] training took {time.perf_counter() - t0:.0f}s")

    model, params, tok, cfg = load_for_sampling(str(workdir))
    prompts = list(config.sample.prompts)
    rows, labels = [], []
    for scale in (0.0, float(config.sample.guidance_scale)):
        x = sample_images(model, params, tok, prompts, config=cfg, guidance_scale=scale,
                          respacing=config.sample.respacing, sampler=config.sample.sampler, seed=0)
        rows.append(images.to_uint8(np.asarray(x)))
        labels.append("no guidance" if scale == 0 else f"CFG {scale:g}")
    size = rows[0].shape[1]
    grid = images.grid(np.concatenate(rows), prompts * 2, cols=len(prompts), scale=max(1, 96 // size),
                       row_labels=labels)
    out = images.save_png(workdir / "demo_grid.png", grid)
    print(f"[demo] sample grid (top: no guidance, bottom: CFG {config.sample.guidance_scale:g}): {out.resolve()}")
    if config.train.num_steps < full_steps:
        print(f"[demo] trained {config.train.num_steps} of the config's {full_steps} steps; to continue this run: "
              f"python -m glide_jax.train --config {args.config or 'configs/shapes_tiny.py'} --workdir {workdir}")
    return 0


if __name__ == "__main__":
    host.tune_for_cli()
    sys.exit(main())
