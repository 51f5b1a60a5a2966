"""Reproduce a parity fixture's outputs: `python -m glide_jax.parity FIXTURE_DIR --out OUT.npz [--check]`.

Reads `hparams.json`, the weights and the `input` arrays of `io.npz`, computes every `output`
array listed in `meta.json` (same names, shapes, NCHW layouts and dtypes) and writes them to
OUT.npz. With `--check` it compares each array with the fixture under the tolerances of the
fixture README, prints the worst error per array and exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
import time

import jax
import numpy as np

from glide_jax import experiment
from glide_jax.parity.check import check_array



def fixture_kind(fixture_dir: pathlib.Path) -> str:
    """The fixture kind from hparams.json, with the diffusion folders named by their folder."""
    hparams = json.loads((fixture_dir / "hparams.json").read_text())
    if "kind" in hparams:
        return hparams["kind"]
    if fixture_dir.name.startswith("diffusion-") or "noise_schedule" in hparams:
        return "diffusion"
    if "glide_text_ctx" in hparams:
        return "tokenizer"
    raise ValueError(f"{fixture_dir}: cannot tell the fixture kind from hparams.json")


def compute(fixture_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every output array of the fixture, computed by glide_jax."""
    kind = fixture_kind(fixture_dir)
    module = "unet" if kind in experiment.GENERATORS else kind
    try:
        impl = importlib.import_module(f"glide_jax.parity.{module}")
    except ModuleNotFoundError as e:
        raise ValueError(f"{fixture_dir}: no parity implementation for kind {kind!r}") from e
    return impl.compute(fixture_dir)


def expected_outputs(fixture_dir: pathlib.Path) -> dict[str, dict]:
    meta = json.loads((fixture_dir / "meta.json").read_text())
    return {k: v for k, v in meta["arrays"].items() if v["role"] == "output"}


def check_outputs(fixture_dir: pathlib.Path, got: dict[str, np.ndarray]) -> list[tuple[str, bool, float, str]]:
    """Compares `got` with the fixture; one (name, ok, worst error, rule) row per output array."""
    kind = fixture_kind(fixture_dir)
    with np.load(fixture_dir / "io.npz") as f:
        ref = {k: f[k] for k in f.files}
    rows = []
    for name, spec in sorted(expected_outputs(fixture_dir).items()):
        if name not in got:
            rows.append((name, False, float("inf"), "missing"))
            continue
        a = np.asarray(got[name])
        if list(a.shape) != list(spec["shape"]):
            rows.append((name, False, float("inf"), f"shape {list(a.shape)} != {spec['shape']}"))
            continue
        ok, worst, rule = check_array(name, a, ref[name], kind=kind, inputs=ref)
        rows.append((name, bool(ok), float(worst), rule))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glide_jax.parity", description=__doc__.splitlines()[0])
    parser.add_argument("fixture_dir", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="where to write OUT.npz")
    parser.add_argument("--check", action="store_true", help="compare with the fixture's outputs")
    args = parser.parse_args(argv)

    fixture_dir = args.fixture_dir
    for needed in ("hparams.json", "meta.json", "io.npz"):
        if not (fixture_dir / needed).is_file():
            print(f"error: {fixture_dir} is not a parity fixture folder (no {needed})", file=sys.stderr)
            return 2
    jax.config.update("jax_default_matmul_precision", "highest")
    start = time.perf_counter()
    try:
        got = compute(fixture_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    expected = expected_outputs(fixture_dir)
    out = {}
    for name, spec in expected.items():
        if name in got:
            out[name] = np.asarray(got[name]).astype(spec["dtype"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"{fixture_dir.name}: wrote {len(out)}/{len(expected)} arrays to {args.out} "
          f"in {time.perf_counter() - start:.1f}s")
    if not args.check:
        return 0 if len(out) == len(expected) else 1
    rows = check_outputs(fixture_dir, out)
    width = max(len(r[0]) for r in rows)
    for name, ok, worst, rule in rows:
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<{width}}  worst {worst:.3g}  ({rule})")
    failed = [r[0] for r in rows if not r[1]]
    print(f"{fixture_dir.name}: {len(rows) - len(failed)}/{len(rows)} arrays within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
