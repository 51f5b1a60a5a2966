"""Port GLIDE / guided-diffusion / noised-CLIP PyTorch weights to glide_jax Flax params.

The port is the table in docs/DESIGN.md ("Parameter names") applied generically against the
abstract Flax parameter tree: a PyTorch key maps to a Flax path by splitting on `.` and gluing
numeric components onto the previous one (`input_blocks.1.0.in_layers.2.weight` ->
`input_blocks_1_0/in_layers_2/kernel`); the leaf is renamed and re-laid-out by the table. Any
disagreement (missing, unexpected or mis-shaped keys) raises `ConversionError` listing all of it.

Command line (reads `.pt` files without torch, see `glide_jax.pt_reader`):

    python -m glide_jax.convert --kind base --hparams base.json base.pt --out ckpt/base
    python -m glide_jax.convert --kind clip --hparams clip.json clip_image_enc.pt \\
        clip_text_enc.pt --out ckpt/clip

writes `DIR/config.json` (the full hyper-parameters, with `kind`) and `DIR/params` (an orbax
checkpoint of plain float32 arrays); `load_converted(DIR)` reads both back.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from glide_jax import experiment, host, pt_reader

__all__ = [
    "KINDS",
    "ConversionError",
    "torch_to_flax",
    "flax_to_torch",
    "default_hparams",
    "convert_files",
    "save_converted",
    "load_converted",
    "main",
]

Path = tuple[str, ...]

KINDS = tuple(experiment.KINDS)

# PyTorch leaf name -> Flax leaf names to try, in order (the first present in the Flax tree wins).
_LEAF_NAMES = {
    "weight": ("kernel", "scale", "embedding"),
    "w": ("kernel",),
    "g": ("scale",),
    "b": ("bias",),
}
# Free parameters that hold a PyTorch conv weight (O, I, kh, kw) and so take the conv layout.
_CONV_FREE_PARAMS = frozenset({"patch_proj"})


class ConversionError(ValueError):
    """The state dict does not fit the Flax tree. All problems are listed, not just the first.

    Attributes:
      missing: Flax paths ('a/b/kernel') that no PyTorch key filled.
      unexpected: PyTorch keys with no Flax counterpart (or a duplicate target).
      mismatched: (pytorch_key, flax_path, converted_shape, expected_shape) tuples.
    """

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[tuple], context: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        self.context = context
        super().__init__(self.summary(limit=None))

    def summary(self, limit: int | None = 20) -> str:
        head = f"{self.context}: " if self.context else ""
        lines = [
            f"{head}state dict does not match the model: {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mis-shaped"
        ]

        def section(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                shown = items if limit is None else items[:limit]
                lines.extend(f"    {s}" for s in shown)
                if len(shown) < len(items):
                    lines.append(f"    ... and {len(items) - len(shown)} more")

        section("missing in the file (Flax params no key filled)", self.missing)
        section("unexpected in the file (no Flax param)", self.unexpected)
        section(
            "shape mismatches (key -> path: converted vs expected)",
            [f"{k} -> {p}: {tuple(a)} vs {tuple(b)}" for k, p, a, b in self.mismatched],
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- tree helpers


def _unbox(tree: Any) -> Any:
    return nn.meta.unbox(tree)


def _flatten(tree: Mapping) -> dict[Path, Any]:
    out: dict[Path, Any] = {}

    def rec(node: Any, path: Path) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, path + (str(k),))
        else:
            out[path] = node

    rec(tree, ())
    return out


def _unflatten(flat: Mapping[Path, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _merge(a: dict, b: Mapping) -> dict:
    """Deep merge of nested dicts (b wins on leaves)."""
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v
    return a


def _key_to_path(key: str) -> Path:
    """'input_blocks.1.0.in_layers.2.weight' -> ('input_blocks_1_0', 'in_layers_2', 'weight')."""
    comps: list[str] = []
    for part in key.split("."):
        if part.isdigit() and comps:
            comps[-1] += "_" + part
        else:
            comps.append(part)
    return tuple(comps)


def _slash(path: Iterable[str]) -> str:
    return "/".join(path)


# ----------------------------------------------------------------------------- layouts


def _to_flax_layout(x: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    if leaf == "kernel":
        if x.ndim == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
            return x.transpose(2, 3, 1, 0)
        if x.ndim == 3 and target_ndim == 2 and x.shape[2] == 1:  # Conv1d k=1 as a Dense
            return x[:, :, 0].T
        if x.ndim == 3:  # Conv1d (O, I, k) -> (k, I, O)
            return x.transpose(2, 1, 0)
        if x.ndim == 2:  # Linear (O, I) -> (I, O)
            return x.T
    if leaf in _CONV_FREE_PARAMS and x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    return x


def _to_torch_layout(y: np.ndarray, leaf: str, torch_ndim: int | None) -> np.ndarray:
    if leaf == "kernel":
        if y.ndim == 4:
            return y.transpose(3, 2, 0, 1)
        if y.ndim == 2 and torch_ndim == 3:
            return y.T[:, :, None]
        if y.ndim == 3:
            return y.transpose(2, 1, 0)
        if y.ndim == 2:
            return y.T
    if leaf in _CONV_FREE_PARAMS and y.ndim == 4:
        return y.transpose(3, 2, 0, 1)
    return y


def _resolve(key: str, prefix: Path, flat: Mapping[Path, Any]) -> Path | None:
    comps = _key_to_path(key)
    module, leaf = prefix + comps[:-1], comps[-1]
    for name in _LEAF_NAMES.get(leaf, ()) + (leaf,):
        if module + (name,) in flat:
            return module + (name,)
    return None


# ----------------------------------------------------------------------------- conversion


def torch_to_flax(state_dict: Mapping[str, np.ndarray], abstract_params: Any, prefix: Iterable[str] = ()) -> dict:
    """Convert a PyTorch state dict to a Flax params tree following the DESIGN.md table.

    Args:
      state_dict: {pytorch_key: array in PyTorch layout}; floating arrays of any precision.
      abstract_params: the Flax `params` collection as a pytree of `jax.ShapeDtypeStruct` (or
        arrays), possibly in `nn.LogicallyPartitioned` boxes, e.g. from
        `jax.eval_shape(module.init, ...)["params"]`.
      prefix: Flax path under which the state dict's keys live (e.g. ('image_enc',)); only that
        subtree must be filled.
    Returns:
      Nested dicts of float32 numpy arrays (the abstract dtype) for the leaves under `prefix`,
      with the full tree's nesting (so results for several prefixes merge with a deep update).
    Raises:
      ConversionError: missing / unexpected / mis-shaped keys, all listed.
    """
    prefix = tuple(prefix)
    flat = _flatten(_unbox(abstract_params))
    wanted = {p: s for p, s in flat.items() if p[: len(prefix)] == prefix}
    out: dict[Path, np.ndarray] = {}
    source: dict[Path, str] = {}
    unexpected, mismatched = [], []
    for key, value in state_dict.items():
        path = _resolve(key, prefix, wanted)
        if path is None:
            unexpected.append(key)
            continue
        if path in source:
            unexpected.append(f"{key} (same Flax path {_slash(path)} as {source[path]})")
            continue
        spec = wanted[path]
        arr = _to_flax_layout(np.asarray(value), path[-1], len(spec.shape))
        if tuple(arr.shape) != tuple(spec.shape):
            mismatched.append((key, _slash(path), tuple(arr.shape), tuple(spec.shape)))
            source[path] = key
            continue
        source[path] = key
        out[path] = np.ascontiguousarray(arr, dtype=np.dtype(spec.dtype))
    missing = [_slash(p) for p in wanted if p not in source]
    if missing or unexpected or mismatched:
        raise ConversionError(missing, unexpected, mismatched, context=_slash(prefix))
    return _unflatten(out)


def flax_to_torch(params: Any, like: Mapping[str, Any] | None = None, prefix: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax`: Flax params -> {pytorch_key: array in PyTorch layout}.

    Args:
      params: Flax params (boxed or not) — the whole tree or one containing `prefix`.
      like: optional PyTorch state dict (or {key: shape}) giving the exact key names and the
        1-D-conv vs Linear layouts; with it the round trip `torch_to_flax` -> `flax_to_torch`
        is exact. Without it GLIDE UNet conventions are assumed: every `_<digits>` suffix of a
        module name becomes `.<digits>`, every kernel/scale/embedding leaf becomes `weight`, and
        2-D kernels become Linear weights (so CLIP and 1-D conv names need `like`).
      prefix: only the subtree at this Flax path is exported; keys are relative to it.
    """
    prefix = tuple(prefix)
    flat = {p: v for p, v in _flatten(_unbox(params)).items() if p[: len(prefix)] == prefix}
    out: dict[str, np.ndarray] = {}
    if like is not None:
        paths = {key: _resolve(key, prefix, flat) for key in like}
        unknown = [key for key, path in paths.items() if path is None]
        if unknown:
            raise ConversionError([], unknown, [], context="flax_to_torch")
        for key, path in paths.items():
            ndim = len(getattr(like[key], "shape", like[key]))
            out[key] = np.ascontiguousarray(_to_torch_layout(np.asarray(flat[path]), path[-1], ndim))
        return out
    for path, value in flat.items():
        mods = []
        for comp in path[len(prefix):-1]:
            parts = comp.split("_")
            i = len(parts)
            while i > 1 and parts[i - 1].isdigit():
                i -= 1
            mods.append(".".join(["_".join(parts[:i])] + parts[i:]))
        leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
        out[".".join(mods + [leaf])] = np.ascontiguousarray(_to_torch_layout(np.asarray(value), path[-1], None))
    return out


# ----------------------------------------------------------------------------- hyper-parameters


def default_hparams(kind: str) -> dict:
    """The released checkpoint's hyper-parameters for `kind` (`experiment.RELEASED`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    return dict(experiment.PRESETS[experiment.RELEASED[kind]])


def _with_defaults(kind: str, hparams: Mapping[str, Any]) -> dict:
    """The released `kind`'s hyper-parameters overridden by `hparams`."""
    return {**default_hparams(kind), **dict(hparams), "kind": kind}


# ----------------------------------------------------------------------------- files


class CliError(Exception):
    """A user-facing failure: printed without a traceback, exit status 2."""


def _abstract_params(hparams: Mapping[str, Any]) -> Any:
    try:
        module = experiment.from_hparams(dict(hparams))
    except (ValueError, TypeError, KeyError) as e:
        raise CliError(f"cannot build the {hparams.get('kind')} model from these hyper-parameters: "
                       f"{type(e).__name__}: {e}") from None
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **module.init_inputs()))
    return _unbox(variables["params"])


def _clip_role(sd: Mapping[str, Any], path: str) -> str:
    if "blocks.input.w_voc" in sd:
        return "text_enc"
    if "blocks.input.w_t" in sd or "blocks.input.patch_proj" in sd:
        return "image_enc"
    raise CliError(f"{path}: neither a CLIP image encoder nor a CLIP text encoder state dict")


def convert_files(kind: str, hparams: Mapping[str, Any], paths: list[str]) -> dict:
    """Read the `.pt` file(s) of `kind` and return Flax params (nested dicts of float32 numpy).

    A kind released as one file converts it whole; the noised CLIP's two encoder files are told
    apart by their keys and converted under their parameter prefixes.
    """
    roles = experiment.get_kind(kind).release_files
    if len(paths) != len(roles):
        what = "exactly one file" if len(roles) == 1 else " and ".join(f"a {r} file" for r in roles)
        raise CliError(f"--kind {kind} takes {what}, got {len(paths)}")
    abstract = _abstract_params(hparams)
    if len(roles) == 1:
        return torch_to_flax(pt_reader.to_float32(pt_reader.load_state_dict(paths[0])), abstract)
    params: dict = {}
    seen = {}
    for path in paths:
        sd = pt_reader.to_float32(pt_reader.load_state_dict(path))
        role = _clip_role(sd, path)
        if role in seen:
            raise CliError(f"{seen[role]} and {path} are both CLIP {role.split('_')[0]} encoders")
        seen[role] = path
        _merge(params, torch_to_flax(sd, abstract, prefix=(role,)))
    left = [_slash(p) for p in _flatten(abstract) if p not in _flatten(params)]
    if left:
        raise ConversionError(left, [], [], context=kind)
    return params


def _has_checkpoint(out_dir: str) -> bool:
    return any(os.path.exists(os.path.join(out_dir, n)) for n in ("params", "config.json"))


def save_converted(out_dir: str, hparams: Mapping[str, Any], params: Mapping, force: bool = False) -> None:
    """Write DIR/config.json and DIR/params (orbax StandardCheckpointer), atomically.

    Both are written into `DIR.tmp-<pid>` first and moved into DIR when complete, config.json
    last (a DIR without it does not load). With `force` an existing checkpoint in DIR is moved
    to a new `DIR.old-<pid>-*` only once the new one is complete, put back if moving the new one
    in fails, and deleted once the new one is in place. A kill at any point leaves DIR holding
    the old checkpoint, the new one, or none (and then the old one is in `DIR.old-*`).
    """
    out_dir = os.path.abspath(out_dir)
    if _has_checkpoint(out_dir) and not force:
        raise CliError(f"{out_dir} already holds a converted checkpoint (use --force to overwrite)")
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # a partial write of an earlier process with this pid
    os.makedirs(tmp)
    names = ("config.json", "params")

    def put_back(old: str) -> None:  # the old checkpoint into DIR again, over a part of the new one
        for name in names:
            src, dst = os.path.join(old, name), os.path.join(out_dir, name)
            if os.path.exists(src):
                if os.path.isdir(dst):
                    shutil.rmtree(dst)
                elif os.path.exists(dst):
                    os.remove(dst)
                os.rename(src, dst)
        os.rmdir(old)

    try:
        ckptr = ocp.StandardCheckpointer()
        try:
            ckptr.save(os.path.join(tmp, "params"), params)
            ckptr.wait_until_finished()
        finally:
            ckptr.close()
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(dict(hparams), fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)  # one rename: DIR appears whole
            return
        old = tempfile.mkdtemp(prefix=f"{os.path.basename(out_dir)}.old-{os.getpid()}-",
                               dir=os.path.dirname(out_dir))
        try:
            for name in names:  # config.json first: DIR stops loading at once
                if os.path.exists(os.path.join(out_dir, name)):
                    os.rename(os.path.join(out_dir, name), os.path.join(old, name))
            for name in reversed(names):  # config.json last: it completes the new one
                os.rename(os.path.join(tmp, name), os.path.join(out_dir, name))
        except BaseException:
            put_back(old)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_converted(out_dir: str) -> tuple[dict, dict]:
    """Read back (hparams, params) written by `save_converted` / the command line."""
    out_dir = os.path.abspath(out_dir)
    with open(os.path.join(out_dir, "config.json")) as fh:
        hparams = json.load(fh)
    ckptr = ocp.StandardCheckpointer()
    try:
        params = ckptr.restore(os.path.join(out_dir, "params"))
    finally:
        ckptr.close()
    return hparams, params


# ----------------------------------------------------------------------------- command line


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m glide_jax.convert",
        description="Convert released GLIDE / CLIP / classifier PyTorch weights (no torch needed).",
    )
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--hparams", required=True, help="JSON of constructor keys; missing keys take GLIDE's defaults")
    p.add_argument("inputs", nargs="+", help="state dict .pt file(s); for clip the image and text encoders")
    p.add_argument("--out", required=True, help="output directory (config.json + params/)")
    p.add_argument("--force", action="store_true", help="overwrite an existing converted checkpoint")
    return p.parse_args(argv)


def _run(args: argparse.Namespace) -> None:
    start = time.time()
    for path in [args.hparams, *args.inputs]:
        if not os.path.isfile(path):
            raise CliError(f"no such file: {path}")
    if _has_checkpoint(os.path.abspath(args.out)) and not args.force:
        raise CliError(f"{os.path.abspath(args.out)} already holds a converted checkpoint (use --force to overwrite)")
    try:
        with open(args.hparams) as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as e:
        raise CliError(f"{args.hparams}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CliError(f"{args.hparams}: expected a JSON object of hyper-parameters")
    if raw.get("kind", args.kind) != args.kind:
        raise CliError(f"{args.hparams} is for kind {raw['kind']!r}, not --kind {args.kind}")
    hparams = _with_defaults(args.kind, raw)
    params = convert_files(args.kind, hparams, list(args.inputs))
    save_converted(args.out, hparams, params, force=args.force)
    leaves = list(_flatten(params).values())
    n = sum(int(np.prod(x.shape)) for x in leaves)
    nbytes = sum(x.nbytes for x in leaves)
    print(
        f"converted {args.kind}: {len(leaves)} tensors, {n:,} params, {nbytes / 2**20:.1f} MiB float32 "
        f"-> {os.path.abspath(args.out)} in {time.time() - start:.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for user-facing errors)."""
    args = _parse(argv)
    try:
        _run(args)
    except ConversionError as e:
        print(f"convert: error: {e.summary()}", file=sys.stderr)
        return 2
    except (CliError, FileNotFoundError, pt_reader.PtError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    host.tune_for_cli()
    sys.exit(main())
