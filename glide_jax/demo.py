"""`make demo`: train the tiny default config on synthetic shapes, then sample a captioned grid.

    python -m glide_jax.demo --workdir runs/demo [--steps N]

`make demo` passes --steps 2000, the first third of shapes_tiny's 6000 steps, to fit a
15-minute budget on 2 CPU cores. Resumable: re-running continues from the workdir's last
checkpoint (or only samples when training already finished); the printed `glide_jax.train`
command continues the same run to the config's full length.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

from glide_jax import configs_loader, host, images
from glide_jax.console import setup_logging
from glide_jax.sample import load_for_sampling, sample_images
from glide_jax.train import TrainingError, train_and_evaluate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glide_jax.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--config", default=None, help="config file (default configs/shapes_tiny.py)")
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
