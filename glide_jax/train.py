"""Training: `python -m glide_jax.train --config configs/X.py --workdir DIR [--config.optim.lr=3e-4]`.

`--config` takes a path or the name of a shipped config (`--config shapes_tiny`).
Data flow: config -> mesh -> data iterator (global arrays, batch-sharded) -> `experiment.
setup_state` (model built abstractly, shardings from the config's rules, restored or jitted
init) -> loop of the pure `train_step` with periodic actions (metrics, async checkpoints, EMA
sample grids, preemption). SIGTERM (TPU preemption) writes a checkpoint of the current step and
exits 0. What each fault does (kill -9, SIGTERM, NaN, corrupt checkpoint, bad input):
docs/faults.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import sys
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from glide_jax import checkpoint, compile_cache, configs_loader, experiment, host, images, sharding, workdir as workdir_lib
from glide_jax.console import setup_logging
from glide_jax.convert import load_converted
from glide_jax.data import folder, pipeline
from glide_jax.metrics import MetricWriter
from glide_jax.sample import sample_images
from glide_jax.train_state import learning_rate_schedule
from glide_jax.train_step import train_step

log = logging.getLogger("glide_jax.train")


class TrainingError(RuntimeError):
    """A condition that stops training with a message for the user (no traceback needed)."""


# ---------------------------------------------------------------------------- building blocks


def make_jitted_step(config, model, tx, shardings_state, batch_shardings, mesh, pad_id: int):
    """The jitted `train_step` for this config, state donated, activations batch-sharded."""
    step_fn = functools.partial(
        train_step,
        loss_fn=experiment.loss_for(config),
        model=model,
        sched=experiment.schedule_for(config.model.hparams),
        tx=tx,
        lr_fn=learning_rate_schedule(config.optim),
        cond_drop=float(config.train.cond_drop),
        pad_id=pad_id,
        ema_rate=float(config.train.ema_rate),
        micro_batches=int(config.train.micro_batches),
        ema_warmup=bool(config.train.get("ema_warmup", False)),
        grad_shardings=shardings_state.params,
    )
    rules = config.mesh.rules

    def traced(state, batch, rng):
        with sharding.activation_rules(mesh, rules):
            return step_fn(state, batch, rng)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(traced, in_shardings=(shardings_state, batch_shardings, replicated),
                   out_shardings=(shardings_state, replicated), donate_argnums=(0,))


def check_batch(config, mesh) -> None:
    dp = sharding.data_parallel_size(mesh)
    batch, micro = int(config.data.batch_size), int(config.train.micro_batches)
    if batch % dp:
        raise TrainingError(f"data.batch_size={batch} is not divisible by the {dp} data-parallel devices of mesh "
                            f"{dict(mesh.shape)}")
    if batch % micro:
        raise TrainingError(f"data.batch_size={batch} is not divisible by train.micro_batches={micro}")


def init_params_fn(config) -> Callable | None:
    """params -> the converted/exported params of `config.init_from` (fine-tuning), or None."""
    if not config.init_from:
        return None
    return lambda params: load_converted(config.init_from)[1]


@dataclasses.dataclass
class Preemption:
    """Set by SIGTERM; the loop checkpoints and exits at the next step boundary.

    With several processes every one must stop at the same step (the checkpoint is a collective),
    so the flag is OR-reduced across processes every `check_every` steps
    (`train.preempt_check_every`): a SIGTERM to any one process stops all of them at the same
    agreement step, and none leaves before that agreement (it is a collective).
    """

    requested: bool = False
    check_every: int = 10

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if step % self.check_every:
            return False

        flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
        return bool(np.max(flags))

    def install(self) -> None:
        def handler(signum, frame):
            self.requested = True
            log.warning("SIGTERM received: checkpointing at the next step boundary")

        signal.signal(signal.SIGTERM, handler)


@dataclasses.dataclass
class Every:
    """A periodic action: `fn(step)` every `period` steps and at the last step (period 0: never)."""

    period: int
    fn: Callable[[int], None]

    def __call__(self, step: int, last: bool) -> None:
        if self.period and (step % self.period == 0 or last):
            self.fn(step)


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """One training run's moving parts; its methods are the loop's periodic actions."""

    config: ml_collections.ConfigDict
    workdir: str
    setup: experiment.Setup
    manager: object
    writer: MetricWriter
    tok: object
    state: object = None
    metrics: dict | None = None
    last_good: int | None = None
    data_position: dict | None = None
    window: tuple[float, int] = (0.0, 0)
    bar: object = None

    def last_good_text(self) -> str:
        if self.last_good is None:
            return "none (no checkpoint was written yet)"
        return f"step {self.last_good} ({self.workdir}/checkpoints/{self.last_good})"

    def checkpoint_bytes(self) -> int:
        """What the next checkpoint will take: the last one's size on disk (orbax compresses), or
        the state's bytes before the first; plus 10 % for metadata and growth."""
        last = pathlib.Path(self.workdir) / "checkpoints" / str(self.last_good)
        if self.last_good is not None and "://" not in self.workdir and last.is_dir():
            size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
        else:
            size = sum(x.nbytes for x in jax.tree.leaves(self.state))
        return int(1.1 * size)

    def save(self, step: int, *, force: bool = False) -> None:
        """Queues a checkpoint of `step`; refused before it starts when the disk cannot hold it."""
        if self.last_good == step:
            return
        self.manager.wait_until_finished()  # the previous save's bytes count against the free space
        try:
            workdir_lib.check_space(self.workdir, self.checkpoint_bytes(), last_good=self.last_good_text(),
                                    what=f"the checkpoint of step {step}")
        except workdir_lib.DiskFullError as e:
            raise TrainingError(str(e)) from None
        checkpoint.save(self.manager, step, self.state, self.data_position,
                        {"fingerprint": experiment.config_fingerprint(self.config), "step": step}, force=force)
        self.last_good = step

    def log_metrics(self, step: int) -> None:
        cfg = self.config.train
        metrics = jax.device_get(self.metrics)
        bad = int(jax.device_get(self.state.bad_steps))
        if bad:
            log.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", step, bad)
        if bad >= cfg.max_bad_steps:
            kept = (f"The last good checkpoint is step {self.last_good} in {self.workdir}/checkpoints (kept)"
                    if self.last_good is not None else "No checkpoint was written")
            raise TrainingError(f"stopping at step {step}: {bad} consecutive non-finite steps (loss or gradients are "
                                f"NaN/Inf; train.max_bad_steps={cfg.max_bad_steps}). {kept}; lower optim.lr or check "
                                "the data")
        t0, n = self.window
        elapsed = time.perf_counter() - t0
        img_s = n * self.config.data.batch_size / max(elapsed, 1e-9)
        scalars = {k: float(v) for k, v in metrics.items() if not k.startswith("loss_q")}
        for i in range(4):
            count = float(metrics.get(f"loss_q{i}_count", 0.0))
            if count:
                scalars[f"loss_q{i}"] = float(metrics[f"loss_q{i}_sum"]) / count
        scalars.update(images_per_s=img_s, step_time_s=elapsed / max(n, 1))
        self.writer.scalars(step, scalars)
        self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{img_s:.1f}", lr=f"{scalars['lr']:.2e}")
        self.bar.update(n)  # at synchronised points only, so the rate and ETA are real
        self.window = (time.perf_counter(), 0)

    def checkpoint(self, step: int) -> None:
        bad = int(jax.device_get(self.state.bad_steps))
        if bad:  # keep the checkpoints from before the non-finite run (max_to_keep would rotate them)
            log.warning("step %d: not checkpointing during %d consecutive non-finite steps", step, bad)
        else:
            self.save(step)

    def sample_grid(self, step: int) -> None:
        """EMA sample grid, the same captions without and with CFG, as PNG + TensorBoard image."""
        cfg = self.config.sample
        prompts, rows = list(cfg.prompts), []
        for scale in (0.0, float(cfg.guidance_scale)):
            x = sample_images(self.setup.model, self.state.ema_params, self.tok, prompts,
                              hparams=self.config.model.hparams.to_dict(), guidance_scale=scale,
                              respacing=cfg.respacing, sampler=cfg.sampler, seed=step)
            rows.append(images.to_uint8(np.asarray(x)))
        labels = ["no guidance", f"CFG {float(cfg.guidance_scale):g}"]
        size = rows[0].shape[1]
        grid = images.grid(np.concatenate(rows), prompts * 2, cols=len(prompts), scale=max(1, -(-64 // size)),
                           row_labels=labels)  # small images upscaled (nearest) to >= 64 px
        if jax.process_index() == 0:
            path = images.save_png(os.path.join(self.workdir, "samples", f"step_{step:07d}.png"), grid)
            self.writer.image(step, "samples/ema", grid)
            log.info("sample grid: %s", path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, force_new: bool = False):
    """Trains `config` (finalized) in `workdir`, resuming from its newest readable checkpoint.

    The workdir is locked for the run (process 0 holds the lock for the job): a second trainer
    on it stops with an error before touching any file there.
    """
    preempt = Preemption(check_every=int(config.train.get("preempt_check_every", 10)))
    preempt.install()  # before the slow set-up, so an early SIGTERM still ends in a checkpoint
    mesh = sharding.mesh_from_config(config.mesh)
    check_batch(config, mesh)
    lock = workdir_lib.WorkdirLock(workdir, command=" ".join(sys.orig_argv), enabled=jax.process_index() == 0)
    refused = None
    try:
        lock.acquire()
    except workdir_lib.WorkdirLockedError as e:
        refused = str(e)
    if jax.process_count() > 1:  # every process stops when process 0 could not lock the workdir
        held = multihost_utils.broadcast_one_to_all(np.asarray(int(refused is None), np.int32))
        if not int(held) and refused is None:
            refused = "process 0 could not lock the workdir (see its error)"
    if refused:
        raise TrainingError(refused)
    # before the first compile (init, step), so a resumed or repeated run reads them back
    cache_dir = compile_cache.enable(config.train.get("compile_cache_dir", ""), workdir)
    effort = compile_cache.set_compiler_effort(config)
    if jax.process_index() == 0:
        if cache_dir:
            log.info("compilation cache: %s", cache_dir)
        if effort:
            log.info("compiler effort %g (XLA exec_time_optimization_effort)", effort)
    try:
        return _train(config, workdir, mesh, preempt, force_new=force_new)
    finally:
        lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh, preempt: "Preemption", *, force_new: bool):
    is_main = jax.process_index() == 0
    hparams = config.model.hparams
    tok = experiment.tokenizer_for(hparams, config.tokenizer)
    data = pipeline.make_dataset(config.data, "train", tokenizer=tok, process_index=jax.process_index(),
                                 process_count=jax.process_count(), seed=config.data.seed)
    if force_new and (moved := checkpoint.set_aside(workdir)) is not None and is_main:
        log.warning("--force_new: moved the existing checkpoints to %s (not deleted)", moved)
    manager = checkpoint.make_manager(workdir, max_to_keep=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpoint)
    try:
        setup = experiment.setup_state(config, mesh, manager=manager, init_params=init_params_fn(config),
                                       log=log if is_main else None)
    except experiment.SetupError as e:
        raise TrainingError(str(e)) from None
    if setup.data_state is not None:
        data.set_state(setup.data_state)
    checkpoint.write_config(workdir, json.loads(config.to_json_best_effort()))
    writer = MetricWriter(workdir, enabled=is_main)
    run = Run(config, workdir, setup, manager, writer, tok, state=setup.state,
              last_good=max(manager.all_steps(), default=None), data_position=data.get_state())
    writer.record(setup.step, run={"kernels": config.model.kernels, "backend": jax.default_backend(),
                                   "devices": jax.device_count(), "mesh": dict(mesh.shape), **host.settings()})
    _log_skipped_files(config, writer, setup.step)
    if data.damaged:  # data.skip_damaged_shards: left out at start (logged by the pipeline)
        writer.scalars(setup.step, {"data/damaged_shards": float(len(data.damaged)),
                                    "data/damaged_records": float(sum(d.records for d in data.damaged))})
    step, num_steps = setup.step, int(config.train.num_steps)
    batch_axes = sharding.batch_axes(mesh, config.mesh.rules)  # once: the rules do not change in the loop
    batch = pipeline.make_global_batch(next(data), mesh, batch_axes)
    compiled = _compile(config, setup, batch, mesh, tok, is_main)
    actions = [Every(config.train.log_every, run.log_metrics), Every(config.train.checkpoint_every, run.checkpoint)]
    if experiment.get_kind(hparams).is_generator:
        actions.append(Every(config.train.sample_every, run.sample_grid))
    run.bar = tqdm(total=num_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True,
                   file=sys.stdout)
    run.window = (time.perf_counter(), 0)
    failed = False
    try:
        while step < num_steps:
            run.state, run.metrics = compiled(run.state, batch, jax.random.PRNGKey(config.seed))
            step += 1
            run.window = (run.window[0], run.window[1] + 1)
            run.data_position = data.get_state()  # before the next batch is read ahead
            batch = pipeline.make_global_batch(next(data), mesh, batch_axes) \
                if step < num_steps else None
            for action in actions:
                action(step, last=step == num_steps)
            if preempt.agreed(step):
                run.save(step, force=True)
                manager.wait_until_finished()
                if is_main:
                    log.warning("preempted: checkpoint of step %d written; exiting", step)
                break
        manager.wait_until_finished()
    except Exception as e:
        failed = True
        if workdir_lib.is_space_or_permission_error(e):
            raise TrainingError(workdir_lib.describe_write_failure(e, workdir, last_good=run.last_good_text())) \
                from None
        raise
    finally:
        run.bar.close()
        _close_quietly(manager, writer, quiet=failed)
    return run.state


def _close_quietly(manager, writer, *, quiet: bool) -> None:
    """Finishes pending writes; after a failure, a second failure of the same writes is not news."""
    try:
        manager.wait_until_finished()
        writer.close()
    except Exception:
        if not quiet:
            raise
        log.debug("closing after a failed run", exc_info=True)


def _compile(config, setup, batch, mesh, tok, is_main: bool):
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    pad_id = int(getattr(tok, "pad_id", 0)) if tok is not None else 0
    step_fn = make_jitted_step(config, setup.model, setup.tx, setup.shardings, batch_shardings, mesh, pad_id)
    t0 = time.perf_counter()
    compiled = step_fn.lower(setup.state, batch, jax.random.PRNGKey(config.seed)).compile()
    if is_main:
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.state.params))
        log.info("model %s: %s params; kernels %s; step compiled in %.1fs; mesh %s; global batch %d",
                 config.model.hparams.kind, f"{n_params:,}", config.model.kernels, time.perf_counter() - t0,
                 dict(mesh.shape), config.data.batch_size)
    return compiled


def _log_skipped_files(config, writer, step: int) -> None:
    """Logs (and records as metrics) the files a folder dataset skipped when it was prepared."""
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


# ---------------------------------------------------------------------------- command line


def maybe_init_distributed() -> None:
    """Multi-host: jax.distributed from GLIDE_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID or TPU env."""
    addr = os.environ.get("GLIDE_JAX_COORDINATOR")
    if addr:
        if os.environ.get("GLIDE_JAX_CPU_COLLECTIVES"):
            jax.config.update("jax_cpu_collectives_implementation", os.environ["GLIDE_JAX_CPU_COLLECTIVES"])
        jax.distributed.initialize(
            addr, num_processes=int(os.environ["GLIDE_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["GLIDE_JAX_PROCESS_ID"]),
        )
    elif host.on_tpu_vm():
        # A TPU VM: jax finds its peers from the VM metadata (one process on a single-host slice).
        jax.distributed.initialize()


def _config_names_to_paths(argv: list[str]) -> list[str]:
    """`--config NAME` (a shipped config) -> its path, so absl's config flag can load it."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            j, value = i + 1, out[i + 1]
        elif arg.startswith("--config="):
            j, value = i, arg.split("=", 1)[1]
        else:
            continue
        try:
            path = str(configs_loader.resolve(value))
        except FileNotFoundError:
            continue  # absl reports the missing file
        out[j] = path if j != i else f"--config={path}"
    return out


def _message(e: BaseException) -> str:
    return e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)


def main(argv=None) -> int:
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and samples go (local or gs://)")
    flags.DEFINE_bool("force_new", False, "start from scratch even if the workdir holds a checkpoint")
    config_flags.DEFINE_config_file("config", None, "experiment config: a file (configs/*.py) or a shipped "
                                    f"config's name ({', '.join(configs_loader.known())})", lock_config=True)

    def run(_):
        FLAGS = flags.FLAGS
        setup_logging()
        try:  # a config file that failed to load raises on first use
            config = FLAGS.config
            if config is not None:
                experiment.finalize(config)
        except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
            print(f"error: bad --config: {_message(e)}", file=sys.stderr)
            return 2
        if config is None or FLAGS.workdir is None:
            print("usage: python -m glide_jax.train --config configs/X.py --workdir DIR", file=sys.stderr)
            return 2
        maybe_init_distributed()
        try:
            train_and_evaluate(config, FLAGS.workdir, force_new=FLAGS.force_new)
        except (TrainingError, sharding.MeshError, pipeline.DamagedDatasetError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    def parse_flags(args):
        # config overrides are applied while flags are parsed; a misspelt key raises AttributeError
        try:
            return flags.FLAGS(_config_names_to_paths(args))
        except flags.Error as e:
            detail = str(e)
        except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
            detail = _message(e)
        print(f"error: bad flags: {detail}\nusage: python -m glide_jax.train --config configs/X.py --workdir DIR "
              "[--config.section.field=value ...]", file=sys.stderr)
        sys.exit(2)

    try:
        return app.run(run, argv=argv, flags_parser=parse_flags) or 0
    except SystemExit as e:
        return int(e.code or 0)


if __name__ == "__main__":
    host.tune_for_cli()
    sys.exit(main())
