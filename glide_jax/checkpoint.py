"""Orbax checkpointing of the train state, the data-iterator position and the config.

Layout of a workdir:
    WORKDIR/checkpoints/<step>/{state, data, meta}   orbax CheckpointManager (async)
    WORKDIR/config.json                               the full config of the run

`restore_latest` walks back from the newest step when a checkpoint is unreadable (truncated,
missing item) and says so; it never deletes anything it could not read. During training the
unreadable newer steps are moved to WORKDIR/checkpoints_unreadable/<step> (kept for inspection),
so that new saves of those step numbers and orbax's `max_to_keep` clean-up cannot collide with or
count them. It refuses (`CheckpointMismatchError`) a checkpoint of another model before reading
its arrays. `--force_new` moves the whole checkpoints directory aside (`set_aside`), never deletes.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model."""


class UnreadableCheckpointsError(RuntimeError):
    """Checkpoints exist but none of them can be read."""


UNREADABLE_DIR = "checkpoints_unreadable"


def workdir_path(workdir: str) -> epath.Path:
    """Local (made absolute: orbax requires it) or gs:// path (etils handles both)."""
    path = epath.Path(workdir)
    return path if "://" in str(workdir) else path.absolute()


def make_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(
        workdir_path(workdir) / "checkpoints",
        item_names=("state", "data", "meta"),
        options=options,
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, meta: dict,
         *, force: bool = False) -> bool:
    """Queues an (async) save of state + data position + metadata at `step`."""
    return manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, *, fingerprint: dict | None = None,
                   set_aside_unreadable: bool = False) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest readable checkpoint.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with shardings (target layout).
      fingerprint: when given, a checkpoint whose meta holds another fingerprint is refused
        (checked before any array is read, so a different model shape is reported as such).
      set_aside_unreadable: after falling back to an older step, move the unreadable newer
        step directories to WORKDIR/checkpoints_unreadable/ (training does; sampling does not).
    Returns:
      (step, state, data_state, meta), or None when there is no checkpoint at all.
    Raises:
      CheckpointMismatchError: the newest readable meta is of another model.
      UnreadableCheckpointsError: checkpoints exist but none can be read (nothing is moved).
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    errors, bad_steps = [], []
    for step in steps:
        try:
            meta = read_meta(manager, step)
        except Exception as e:  # orbax raises many types for truncated / missing items
            meta, err = None, e
        if meta is not None and fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
            raise CheckpointMismatchError(
                f"{manager.directory}/{step} is a checkpoint of another model "
                f"({_describe_mismatch(meta['fingerprint'], fingerprint)})")
        if meta is not None:
            try:
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as e:  # noqa: BLE001 -- same reason
                err = e
            else:
                if errors:
                    log.warning("restored step %d after skipping %d unreadable checkpoint(s)", step, len(errors))
                    if set_aside_unreadable:
                        _set_aside_steps(manager, bad_steps)
                return step, restored["state"], dict(restored["data"]), dict(restored["meta"])
        msg = f"checkpoint at step {step} is unreadable ({type(err).__name__}: {str(err)[:200]})"
        log.warning("%s; trying an older one", msg)
        errors.append(msg)
        bad_steps.append(step)
    raise UnreadableCheckpointsError(f"no readable checkpoint in {manager.directory}:\n  " + "\n  ".join(errors))


def _describe_mismatch(theirs: dict, ours: dict) -> str:
    if theirs.get("kind") != ours.get("kind"):
        return f"kind {theirs.get('kind')!r}, this config has {ours.get('kind')!r}"
    a, b = theirs.get("hparams", {}), ours.get("hparams", {})
    diff = [f"{k}={a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "hyper-parameters differ: " + ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")


def _set_aside_steps(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves step directories to WORKDIR/checkpoints_unreadable/<step>[.<time>] (process 0)."""
    directory = epath.Path(manager.directory)
    if jax.process_count() > 1:  # every host has finished reading before process 0 renames

        multihost_utils.sync_global_devices("glide_jax_set_aside_unreadable")
    if jax.process_index() == 0:
        dest_dir = directory.parent / UNREADABLE_DIR
        dest_dir.mkdir(parents=True, exist_ok=True)
        for step in steps:
            src = directory / str(step)
            if not src.exists():
                continue
            dest = dest_dir / str(step)
            if dest.exists():
                dest = dest_dir / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
            src.rename(dest)
            log.warning("moved unreadable checkpoint %s to %s (not deleted)", src, dest)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("glide_jax_set_aside_unreadable_done")
    manager.reload()


def set_aside(workdir: str) -> epath.Path | None:
    """Renames WORKDIR/checkpoints to WORKDIR/checkpoints.replaced-<time> and moves the old run's
    config.json into it (for --force_new). Returns the new path, or None if there was nothing."""
    src = workdir_path(workdir) / "checkpoints"
    if not src.exists() or not any(src.iterdir()):
        return None
    dest = src.parent / f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
        src.rename(dest)
        if (src.parent / "config.json").exists():
            (src.parent / "config.json").rename(dest / "config.json")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("glide_jax_set_aside_checkpoints")
    return dest


def write_config(workdir: str, config_json: dict) -> None:
    if jax.process_index() == 0:
        path = workdir_path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))


def read_config(workdir: str) -> dict | None:
    path = workdir_path(workdir) / "config.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())
