"""Load an experiment config (`configs/NAME.py` with `get_config()`) by name or path."""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def resolve(name_or_path: str) -> pathlib.Path:
    p = pathlib.Path(name_or_path)
    if p.suffix == ".py" and p.is_file():
        return p
    candidate = CONFIGS_DIR / f"{p.stem}.py"
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in CONFIGS_DIR.glob("*.py"))
    raise FileNotFoundError(f"no config {name_or_path!r}; known configs: {known}")


def load(name_or_path: str, *, lock: bool = True) -> ml_collections.ConfigDict:
    path = resolve(name_or_path)
    spec = importlib.util.spec_from_file_location(f"glide_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if lock:
        config.lock()
    return config
