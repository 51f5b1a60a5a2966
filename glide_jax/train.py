"""Training: `python -m glide_jax.train --config configs/X.py --workdir DIR [--config.optim.lr=3e-4]`.

Data flow: config -> mesh -> data iterator (global arrays, batch-sharded) -> model built
abstractly -> shardings from logical rules -> jitted init with out_shardings -> restore or
init from the workdir -> loop of the pure `train_step` -> metrics / async checkpoints / EMA
sample grids. SIGTERM (TPU preemption) writes a checkpoint of the current step and exits 0.
What each fault (kill -9, SIGTERM, NaN, corrupt checkpoint, bad input) does: docs/faults.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glide_jax import checkpoint, sharding
from glide_jax.diffusion import schedules
from glide_jax.losses import loss_for_kind
from glide_jax.train_state import TrainState, learning_rate_schedule, make_optimizer
from glide_jax.train_step import train_step

log = logging.getLogger("glide_jax.train")

UNET_KINDS = ("base", "upsample", "base-inpaint", "upsample-inpaint")


class TrainingError(RuntimeError):
    """A condition that stops training with a message for the user (no traceback needed)."""


# ---------------------------------------------------------------------------- building blocks


def build_model(config: ml_collections.ConfigDict):
    from glide_jax import models

    return models.build(config.model.hparams.to_dict(), jnp.dtype(config.model.dtype),
                        remat=config.model.get("remat", False),
                        conv_algorithm=config.model.get("conv_algorithm", "auto"))


class ClipTextTokens:
    """CLIP BPE with the (tokens, mask) batch interface the data pipeline uses."""

    def __init__(self):
        from glide_jax.tokenizer import ClipBPE

        self._bpe = ClipBPE()
        self.pad_id = 0

    def encode_batch(self, texts, text_ctx=None):
        tokens, lens = self._bpe.encode_batch(list(texts))
        mask = np.arange(tokens.shape[1])[None, :] < np.asarray(lens)[:, None]
        return tokens, mask


def build_tokenizer(config: ml_collections.ConfigDict):
    """GLIDE BPE or sentencepiece for the UNets, CLIP BPE for the noised CLIP, none for the classifier."""
    from glide_jax import tokenizer

    kind = config.model.hparams.kind
    if kind == "classifier":
        return None
    if kind == "clip":
        return ClipTextTokens()
    name = config.tokenizer.name
    if name == "clip_bpe":
        raise TrainingError("tokenizer.name='clip_bpe' is only for the noised CLIP; use glide_bpe or sentencepiece")
    kwargs = {"model_file": config.tokenizer.model_file} if name == "sentencepiece" else {}
    return tokenizer.get_tokenizer(name, text_ctx=config.data.text_ctx, **kwargs)


def pad_id_of(tok) -> int:
    return int(getattr(tok, "pad_id", 0)) if tok is not None else 0


def build_schedule(config: ml_collections.ConfigDict):
    """The training schedule: every original timestep (no respacing)."""
    from glide_jax.config import diffusion_of

    name, steps = diffusion_of(config.model.hparams)
    return schedules.make_schedule(name, steps, "")


def abstract_state(model, tx, example: dict, rng: jax.Array):
    """The boxed abstract TrainState (no memory), and the init function that builds it."""

    def init_fn(r):
        variables = model.init({"params": r, "dropout": r}, **example)
        return TrainState.create(variables["params"], tx)

    return jax.eval_shape(init_fn, rng), init_fn


def unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def state_shardings(boxed_abstract, mesh, rules=sharding.DEFAULT_RULES):
    """Shardings for every TrainState leaf: params/EMA/optimizer moments from logical names."""
    return sharding.logical_shardings(boxed_abstract, mesh, rules)


def config_fingerprint(config: ml_collections.ConfigDict) -> dict:
    """What must match between a workdir's checkpoint and the current config to resume."""
    return {"kind": config.model.hparams.kind, "hparams": config.model.hparams.to_dict()}


# ---------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Preemption:
    """Set by SIGTERM; the loop checkpoints and exits at the next step boundary.

    With several processes every one must stop at the same step (the checkpoint is a collective),
    so the flag is OR-reduced across processes every `check_every` steps; a preempted TPU VM
    gets SIGTERM on all workers at about the same time, well inside the grace period.
    """

    requested: bool = False
    check_every: int = 10

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self.check_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
        return bool(np.max(flags))

    def install(self) -> None:
        def handler(signum, frame):
            self.requested = True
            log.warning("SIGTERM received: checkpointing at the next step boundary")

        signal.signal(signal.SIGTERM, handler)


def make_jitted_step(config, model, sched, tx, shardings_state, batch_shardings, mesh, pad_id):
    step_fn = functools.partial(
        train_step,
        loss_fn=loss_for_kind(config.model.hparams.kind),
        model=model,
        sched=sched,
        tx=tx,
        lr_fn=learning_rate_schedule(config.optim),
        cond_drop=float(config.train.cond_drop),
        pad_id=pad_id,
        ema_rate=float(config.train.ema_rate),
        micro_batches=int(config.train.micro_batches),
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        step_fn,
        in_shardings=(shardings_state, batch_shardings, replicated),
        out_shardings=(shardings_state, replicated),
        donate_argnums=(0,),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, force_new: bool = False) -> TrainState:
    """Trains `config` in `workdir`, resuming from its newest readable checkpoint."""
    from glide_jax.data import pipeline
    from glide_jax.metrics import MetricWriter

    is_main = jax.process_index() == 0
    preempt = Preemption()
    preempt.install()  # before the slow set-up, so an early SIGTERM still ends in a checkpoint
    mesh = sharding.make_mesh(config.mesh.to_dict())
    dp = sharding.data_parallel_size(mesh)
    if config.data.batch_size % dp:
        raise TrainingError(
            f"data.batch_size={config.data.batch_size} is not divisible by the {dp} data-parallel "
            f"devices of mesh {dict(mesh.shape)}"
        )
    if config.data.batch_size % (int(config.train.micro_batches) * 1):
        raise TrainingError(f"data.batch_size={config.data.batch_size} is not divisible by "
                            f"train.micro_batches={config.train.micro_batches}")

    tok = build_tokenizer(config)
    model = build_model(config)
    sched = build_schedule(config)
    tx = make_optimizer(config.optim)
    rng = jax.random.PRNGKey(config.seed)

    data = pipeline.make_dataset(
        config.data, "train", tokenizer=tok, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.data.seed,
    )
    example = model.init_inputs(batch=1)
    boxed, init_fn = abstract_state(model, tx, example, rng)
    shardings_state = state_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unbox(boxed), shardings_state
    )

    if force_new:
        moved = checkpoint.set_aside(workdir)
        if moved is not None and is_main:
            log.warning("--force_new: moved the existing checkpoints to %s (not deleted)", moved)
    manager = checkpoint.make_manager(workdir, max_to_keep=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpoint)
    fingerprint = config_fingerprint(config)
    try:
        restored = checkpoint.restore_latest(manager, abstract, fingerprint=fingerprint, set_aside_unreadable=True)
    except checkpoint.CheckpointMismatchError as e:
        raise TrainingError(f"{e}; nothing was changed. Use a new --workdir, or pass --force_new to start "
                            "over there (the old checkpoints are moved aside, not deleted)") from None
    except checkpoint.UnreadableCheckpointsError as e:
        raise TrainingError(f"{e}\nnothing was changed; pass --force_new to start over (the unreadable "
                            "checkpoints are moved aside, not deleted)") from None
    if restored is not None:
        start_step, state, data_state, meta = restored
        data.set_state(data_state)
        if is_main:
            log.info("resumed from step %d", start_step)
    else:
        t0 = time.perf_counter()
        state = jax.jit(lambda r: unbox(init_fn(r)), out_shardings=shardings_state)(rng)
        if config.init_from:
            state = _load_init(config, state, shardings_state)
        start_step = 0
        if is_main:
            log.info("initialised in %.1fs", time.perf_counter() - t0)
    checkpoint.write_config(workdir, json.loads(config.to_json_best_effort()))

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    batch_shardings = None  # filled from the first batch's structure
    writer = MetricWriter(workdir, enabled=is_main)
    _log_skipped_files(config, writer, start_step)

    def global_batch():
        local = next(data)
        return pipeline.make_global_batch(local, mesh)

    data_position = data.get_state()  # batches consumed by the steps applied so far (saved with them)
    batch = global_batch()
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    step_fn = make_jitted_step(config, model, sched, tx, shardings_state, batch_shardings, mesh, pad_id_of(tok))
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch, rng).compile()
    if is_main:
        log.info("model %s: %s params; step compiled in %.1fs; mesh %s; global batch %d",
                 config.model.hparams.kind, f"{n_params:,}", time.perf_counter() - t0, dict(mesh.shape),
                 config.data.batch_size)

    num_steps = int(config.train.num_steps)
    step = start_step
    last_good = max(manager.all_steps(), default=None)

    def save(step_now: int, *, force: bool = False) -> None:
        nonlocal last_good
        if last_good == step_now:
            return
        checkpoint.save(manager, step_now, state, data_position, {"fingerprint": fingerprint, "step": step_now},
                        force=force)
        last_good = step_now

    from tqdm import tqdm

    bar = tqdm(total=num_steps, initial=start_step, disable=not is_main, unit="step", dynamic_ncols=True,
               file=sys.stdout)
    window_t, window_n = time.perf_counter(), 0
    try:
        while step < num_steps:
            state, metrics = compiled(state, batch, rng)
            step += 1
            window_n += 1
            data_position = data.get_state()  # before the next batch is read ahead
            batch = global_batch() if step < num_steps else None
            if step % config.train.log_every == 0 or step == num_steps:
                metrics = jax.device_get(metrics)
                bad = int(jax.device_get(state.bad_steps))
                if bad:
                    log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", step, bad)
                if bad >= config.train.max_bad_steps:
                    kept = (f"The last good checkpoint is step {last_good} in {workdir}/checkpoints (kept)"
                            if last_good is not None else "No checkpoint was written")
                    raise TrainingError(
                        f"stopping at step {step}: {bad} consecutive non-finite steps (loss or gradients are "
                        f"NaN/Inf; train.max_bad_steps={config.train.max_bad_steps}). {kept}; lower optim.lr "
                        "or check the data"
                    )
                elapsed = time.perf_counter() - window_t
                img_s = window_n * config.data.batch_size / max(elapsed, 1e-9)
                scalars = {k: float(v) for k, v in metrics.items() if not k.startswith("loss_q")}
                for i in range(4):
                    cnt = float(metrics.get(f"loss_q{i}_count", 0.0))
                    if cnt:
                        scalars[f"loss_q{i}"] = float(metrics[f"loss_q{i}_sum"]) / cnt
                scalars.update(images_per_s=img_s, step_time_s=elapsed / window_n)
                writer.scalars(step, scalars)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{img_s:.1f}", lr=f"{scalars['lr']:.2e}")
                bar.update(window_n)  # at synchronised points only, so the rate and ETA are real
                window_t, window_n = time.perf_counter(), 0
            if step % config.train.checkpoint_every == 0 or step == num_steps:
                bad = int(jax.device_get(state.bad_steps))
                if bad:  # keep the checkpoints from before the non-finite run (max_to_keep would rotate them)
                    log.warning("step %d: not checkpointing during %d consecutive non-finite steps", step, bad)
                else:
                    save(step)
            if config.train.sample_every and (step % config.train.sample_every == 0 or step == num_steps) \
                    and config.model.hparams.kind in UNET_KINDS:
                _sample_grid(config, model, state, tok, writer, workdir, step)
            if preempt.agreed(step):
                save(step, force=True)
                manager.wait_until_finished()
                if is_main:
                    log.warning("preempted: checkpoint of step %d written; exiting", step)
                break
    finally:
        bar.close()
        manager.wait_until_finished()
        writer.close()
    return state


def _log_skipped_files(config, writer, step: int) -> None:
    """Logs (and records as metrics) the files a folder dataset skipped when it was prepared."""
    from glide_jax.data import folder, pipeline

    if not str(config.data.name).startswith(pipeline.FOLDER_PREFIX):
        return
    counts = folder.skipped_counts(pipeline.get_builder(config.data))
    if not counts:
        return
    if jax.process_index() == 0:
        log.info("data %s: %d examples; skipped %d unreadable and %d non-image files; %d missing and %d "
                 "truncated captions (see skipped.json in the prepared dataset)", config.data.name,
                 counts.get("written", 0), counts.get("corrupt", 0), counts.get("non_image", 0),
                 counts.get("missing_caption", 0), counts.get("truncated_caption", 0))
    writer.scalars(step, {f"data/{k}": float(v) for k, v in counts.items() if isinstance(v, (int, float))})


def _load_init(config, state, shardings_state):
    """Replaces params and EMA by a converted/exported checkpoint (fine-tuning)."""
    from glide_jax.convert import load_converted

    _, params = load_converted(config.init_from)
    params = jax.device_put(params, shardings_state.params)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params),
                         opt_state=state.opt_state)


def _sample_grid(config, model, state, tok, writer, workdir, step) -> None:
    """EMA sample grid (with and without CFG) as PNG + TensorBoard image."""
    from glide_jax import images
    from glide_jax.sample import sample_images

    prompts = list(config.sample.prompts)
    rows = []
    labels = []
    for scale in (0.0, float(config.sample.guidance_scale)):
        x = sample_images(
            model, state.ema_params, tok, prompts, config=config, guidance_scale=scale,
            respacing=config.sample.respacing, sampler=config.sample.sampler, seed=step,
        )
        rows.append(images.to_uint8(np.asarray(x)))
        labels.append("no guidance" if scale == 0 else f"cfg {scale:g}")
    grid = images.grid(np.concatenate(rows), prompts * len(rows), cols=len(prompts), scale=2)
    if jax.process_index() == 0:
        path = images.save_png(os.path.join(workdir, "samples", f"step_{step:07d}.png"), grid)
        writer.image(step, "samples/ema", grid)
        log.info("sample grid: %s", path)


# ---------------------------------------------------------------------------- command line


def _maybe_init_distributed() -> None:
    """Multi-host: jax.distributed from GLIDE_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID or TPU env."""
    addr = os.environ.get("GLIDE_JAX_COORDINATOR")
    if addr:
        if os.environ.get("GLIDE_JAX_CPU_COLLECTIVES"):
            jax.config.update("jax_cpu_collectives_implementation", os.environ["GLIDE_JAX_CPU_COLLECTIVES"])
        jax.distributed.initialize(
            addr, num_processes=int(os.environ["GLIDE_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["GLIDE_JAX_PROCESS_ID"]),
        )
    elif (os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
          or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")):
        # A TPU VM: jax finds its peers from the VM metadata (one process on a single-host slice).
        jax.distributed.initialize()


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go (local or gs://)")
    flags.DEFINE_bool("force_new", False, "start from scratch even if the workdir holds a checkpoint")
    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)", lock_config=True)

    def run(_):
        FLAGS = flags.FLAGS
        from glide_jax.console import setup_logging

        setup_logging()
        try:  # a config file that failed to load raises on first use
            config = FLAGS.config
            if config is not None:
                config.keys()
        except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
            detail = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
            print(f"error: bad --config: {detail}", file=sys.stderr)
            return 2
        if config is None or FLAGS.workdir is None:
            print("usage: python -m glide_jax.train --config configs/X.py --workdir DIR", file=sys.stderr)
            return 2
        _maybe_init_distributed()
        try:
            train_and_evaluate(config, FLAGS.workdir, force_new=FLAGS.force_new)
        except (TrainingError, sharding.MeshError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    def parse_flags(args):
        # config overrides are applied while flags are parsed; a misspelt key raises AttributeError
        try:
            return flags.FLAGS(args)
        except flags.Error as e:
            detail = str(e)
        except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
            detail = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
        print(f"error: bad flags: {detail}\nusage: python -m glide_jax.train --config configs/X.py --workdir DIR "
              "[--config.section.field=value ...]", file=sys.stderr)
        sys.exit(2)

    try:
        return app.run(run, argv=argv, flags_parser=parse_flags) or 0
    except SystemExit as e:
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
