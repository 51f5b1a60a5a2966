"""Load an experiment config by name (`shapes_tiny`, a file shipped in `glide_jax/configs/`) or
by path (`configs/X.py`, any file with `get_config()`); every loader finalizes the result
(`glide_jax.experiment.finalize`), so a loaded config is consistent and names its kernels."""
from __future__ import annotations

import ast
import importlib.util
import pathlib
from typing import Any

import ml_collections

from glide_jax import experiment

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent / "configs"


def known() -> list[str]:
    return sorted(f.stem for f in CONFIGS_DIR.glob("*.py") if not f.stem.startswith("_"))


def resolve(name_or_path: str) -> pathlib.Path:
    """A config file's path: an existing .py path as given, else the shipped config of that name."""
    p = pathlib.Path(name_or_path)
    if p.suffix == ".py" and p.is_file():
        return p
    candidate = CONFIGS_DIR / f"{p.stem}.py"
    if candidate.is_file() and p.stem != "__init__":
        return candidate
    raise FileNotFoundError(f"no config {name_or_path!r}; known configs: {known()}")


def load(name_or_path: str, *, lock: bool = True) -> ml_collections.ConfigDict:
    """get_config() of the file, finalized (and locked)."""
    path = resolve(name_or_path)
    spec = importlib.util.spec_from_file_location(f"glide_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = experiment.finalize(module.get_config())
    if lock:
        config.lock()
    return config


def set_field(config: ml_collections.ConfigDict, field: str, value: Any) -> None:
    """config[a][b][c] = value for field "a.b.c", in place, before `finalize`. A string value for a
    field that is not a string is read as a Python literal ("True", "3", "(1, 2)").

    Raises:
      KeyError: no such field; TypeError: the value's type does not fit the field.
    """
    *path, leaf = field.split(".")
    node = config
    try:
        for part in path:
            node = node[part]
        if leaf not in node:
            raise KeyError(leaf)
    except (KeyError, AttributeError, TypeError):
        raise KeyError(f"no such config field {field!r}") from None
    if isinstance(value, str) and not isinstance(node[leaf], str):
        value = literal(value)
    node[leaf] = value


def literal(text: str) -> Any:
    """A command-line value as Python data: true/false, a literal, or else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
