"""OpenAI's PyTorch GLIDE on the bench configuration, timed the way `glide_jax.bench` times ours.

Not part of the package and not a dependency: it needs `torch` and a checkout of
openai/glide-text2im on PYTHONPATH, e.g.

    python3.11 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch numpy regex ftfy
    git clone https://github.com/openai/glide-text2im /tmp/glide_ref
    PYTHONPATH=/tmp/glide_ref /tmp/torchenv/bin/python benchmarks/torch_reference.py \
        sample --hparams ../shared/bench/bench_hparams.json --json
    PYTHONPATH=/tmp/glide_ref /tmp/torchenv/bin/python benchmarks/torch_reference.py \
        train --hparams ../shared/bench/bench_hparams.json --batch 8 --json

`benchmarks/compare.sh` runs both implementations back to back (same machine, same load) and
prints the ratios the benchmark targets are stated in.

sample: GLIDE's notebook recipe: CFG by doubling the batch (2 prompts -> 4 model rows), scale 3,
`p_sample_loop` over `timestep_respacing=str(steps)`, under `torch.inference_mode()`.
per_step_s = median of `--repeats` full loops / steps.
train: one optimizer step at float32: forward, hybrid loss (eps-MSE + the VB term of the learned
variance with a stop-gradient on the mean, as in guided-diffusion), backward, AdamW, EMA update.
per_step_s = median over `--steps` steps after `--warmup` steps.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch as th

from glide_text2im.model_creation import create_model_and_diffusion, model_and_diffusion_defaults


def _timed(fn, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of fn()."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def build(hparams_path: str, respacing: str):
    options = model_and_diffusion_defaults()
    with open(hparams_path) as f:
        options.update(json.load(f))
    options["timestep_respacing"] = respacing
    options["use_fp16"] = False
    return create_model_and_diffusion(**options), options


def tokens_for(model, options, batch: int, gen: th.Generator):
    ctx = options["text_ctx"]
    lengths = th.randint(1, ctx, (batch,), generator=gen)
    tokens = th.randint(0, 50000, (batch, ctx), generator=gen)
    mask = th.arange(ctx)[None, :] < lengths[:, None]
    tokens = th.where(mask, tokens, th.full_like(tokens, 50256))
    return tokens, mask


def bench_sample(args) -> dict:
    (model, diffusion), options = build(args.hparams, str(args.steps))
    model.eval()
    gen = th.Generator().manual_seed(0)
    tok, mask = tokens_for(model, options, args.batch, gen)
    tokens = th.cat([tok, th.full_like(tok, 50256)])
    mask = th.cat([mask, th.zeros_like(mask)])
    mask[args.batch:, 0] = True  # the empty caption still has its end token position
    size = options["image_size"]

    def model_fn(x_t, ts, **kwargs):
        half = x_t[: len(x_t) // 2]
        combined = th.cat([half, half], dim=0)
        out = model(combined, ts, **kwargs)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = th.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + args.guidance_scale * (cond_eps - uncond_eps)
        eps = th.cat([half_eps, half_eps], dim=0)
        return th.cat([eps, rest], dim=1)

    def run():
        with th.inference_mode():
            diffusion.p_sample_loop(model_fn, (2 * args.batch, 3, size, size), device="cpu",
                                    clip_denoised=True, progress=False,
                                    model_kwargs=dict(tokens=tokens, mask=mask))

    run()  # warm-up
    times = _timed(run, args.repeats)
    return dict(mode="sample", impl="openai/glide-text2im (PyTorch)", torch=th.__version__,
                threads=th.get_num_threads(), batch=args.batch, model_rows=2 * args.batch,
                steps=args.steps, guidance_scale=args.guidance_scale,
                params=sum(p.numel() for p in model.parameters()),
                per_step_s=statistics.median(times) / args.steps, run_times_s=times)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * th.exp(-logvar2))


def bench_train(args) -> dict:
    (model, diffusion), options = build(args.hparams, "")
    model.train()
    ema = [p.detach().clone() for p in model.parameters()]
    opt = th.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    gen = th.Generator().manual_seed(0)
    size = options["image_size"]
    n_t = diffusion.num_timesteps

    def step():
        x0 = th.rand((args.batch, 3, size, size), generator=gen) * 2 - 1
        tokens, mask = tokens_for(model, options, args.batch, gen)
        drop = th.rand((args.batch,), generator=gen) < 0.2
        tokens = th.where(drop[:, None], th.full_like(tokens, 50256), tokens)
        mask = th.where(drop[:, None], th.zeros_like(mask), mask)
        t = th.randint(0, n_t, (args.batch,), generator=gen)
        noise = th.randn(x0.shape, generator=gen)
        x_t = diffusion.q_sample(x0, t, noise)
        out = model(x_t, t, tokens=tokens, mask=mask)
        eps, var = th.split(out, 3, dim=1)
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        frozen = th.cat([eps.detach(), var], dim=1)
        p = diffusion.p_mean_variance(lambda *a, **k: frozen, x_t, t, clip_denoised=False)
        true_mean, _, true_logvar = diffusion.q_posterior_mean_variance(x0, x_t, t)
        kl = _normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"])
        vb = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        loss = (mse + vb * n_t / 1000.0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        th.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with th.no_grad():
            for e, p_ in zip(ema, model.parameters()):
                e.mul_(0.9999).add_(p_.detach(), alpha=1 - 0.9999)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    times = _timed(step, args.steps)
    return dict(mode="train", impl="openai/glide-text2im (PyTorch)", torch=th.__version__,
                threads=th.get_num_threads(), batch=args.batch,
                params=sum(p.numel() for p in model.parameters()),
                per_step_s=statistics.median(times), min_step_s=min(times), step_times_s=times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["sample", "train"])
    ap.add_argument("--hparams", required=True)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps / timed train steps")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--guidance-scale", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    th.manual_seed(0)
    if args.mode == "sample":
        args.steps = args.steps or 25
        args.batch = args.batch or 2
        result = bench_sample(args)
    else:
        args.steps = args.steps or 5
        args.batch = args.batch or 8
        result = bench_train(args)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
