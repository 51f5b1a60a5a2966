"""Orbax checkpointing of the train state, the data-iterator position and the config.

Layout of a workdir:
    WORKDIR/checkpoints/<step>/{state, data, meta}   orbax CheckpointManager (async)
    WORKDIR/config.json                               the full config of the run

`restore_latest` walks back from the newest step when a checkpoint is unreadable (truncated,
missing item) and says so; it never deletes anything it could not read.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint of a different model."""


def workdir_path(workdir: str) -> epath.Path:
    """Local or gs:// path (etils handles both)."""
    return epath.Path(workdir)


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


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """Restores the newest readable checkpoint.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with shardings (target layout).
    Returns:
      (step, state, data_state, meta), or None when there is no checkpoint at all.
    Raises:
      RuntimeError when checkpoints exist but none can be read.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None
    errors = []
    for step in steps:
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types for truncated / missing items
            msg = f"checkpoint at step {step} is unreadable ({type(e).__name__}: {str(e)[:200]})"
            log.warning("%s; trying an older one", msg)
            errors.append(msg)
            continue
        if errors:
            log.warning("restored step %d after skipping %d unreadable checkpoint(s)", step, len(errors))
        return step, restored["state"], dict(restored["data"]), dict(restored["meta"])
    raise RuntimeError("no readable checkpoint in the workdir:\n  " + "\n  ".join(errors))


def save_params(path: str | pathlib.Path, params: Any) -> None:
    """Saves a plain params pytree (used by the converter and for exports)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(epath.Path(path).absolute() if "://" not in str(path) else epath.Path(path), params)
    checkpointer.wait_until_finished()


def load_params(path: str | pathlib.Path, abstract: Any | None = None) -> Any:
    checkpointer = ocp.StandardCheckpointer()
    p = epath.Path(path)
    p = p.absolute() if "://" not in str(path) else p
    if abstract is None:
        return checkpointer.restore(p)
    return checkpointer.restore(p, abstract)


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
