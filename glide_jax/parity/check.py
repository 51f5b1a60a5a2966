"""The parity tolerance table (tests/fixtures/parity/README.md, "Tolerances") as one function.

`check_array(name, got, want, kind=..., inputs=...)` picks the README row for an output array of a
fixture of `kind` (hparams.json "kind": "base", "upsample", "base-inpaint", "upsample-inpaint",
"clip", "classifier", "diffusion", "tokenizer") and returns (ok, worst, rule). For tolerance rules
`worst` is max |got − want| / allowed (ok iff ≤ 1); for exact rules it is max |got − want|
(ok iff 0). Shapes and dtypes must match exactly.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from glide_jax import experiment

EXACT_NAMES = frozenset({"timestep_map", "num_timesteps", "model_t", "cond_t", "loop_timestep_map"})
TRAIN_LOOSE = frozenset({"train.vb", "train.loss"})


def _abs_diff(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got − want| in float64; equal entries (also equal infs, both NaN) give 0, other NaNs inf."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore"):
        d = np.abs(g - w)
    same = (g == w) | (np.isnan(g) & np.isnan(w))
    return np.where(same, 0.0, np.where(np.isnan(d), np.inf, d))


def _ratio(diff: np.ndarray, allowed: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """max over (masked) entries of diff / allowed (0/0 = 0, x/0 = inf)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(diff == 0, 0.0, diff / np.broadcast_to(allowed, diff.shape))
    if mask is not None:
        r = r[np.broadcast_to(mask, r.shape)]
    return float(r.max()) if r.size else 0.0


def _train_rows(inputs: Optional[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    if inputs is None or "train_t" not in inputs:
        raise ValueError(f"{name}: the train.* rules need inputs['train_t'] (rows with t = 0 differ)")
    return np.asarray(inputs["train_t"]) == 0


def check_array(name: str, got, want, *, kind: str,
                inputs: Optional[Mapping[str, np.ndarray]] = None) -> tuple[bool, float, str]:
    """Compare one output array of a parity fixture against the README tolerance table.

    Args:
        name: array name in io.npz / meta.json (e.g. "pmv.mean", "train.vb", "output").
        got: our array, in the fixture layout (NCHW) and dtype.
        want: the fixture's array.
        kind: the fixture kind from hparams.json.
        inputs: the fixture's input arrays (only `train_t` is read, for the diffusion train.* rows).

    Returns:
        (ok, worst, rule): worst = max |got−want|/allowed for tolerance rules, max |got−want| for
        exact rules; rule names the README criterion that was applied.
    """
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return False, float("inf"), f"shape {got.shape} != {want.shape}"
    if got.dtype != want.dtype:
        return False, float("inf"), f"dtype {got.dtype} != {want.dtype}"

    if kind == "tokenizer" or name in EXACT_NAMES or not np.issubdtype(want.dtype, np.floating):
        worst = float(_abs_diff(got, want).max()) if want.size else 0.0
        return worst == 0.0, worst, "exact"

    diff = _abs_diff(got, want)
    b = np.abs(want.astype(np.float64))

    if name == "loop_samples":
        worst, rule = _ratio(diff, np.float64(2e-3)), "|a-b| <= 2e-3"
    elif name == "cond_grad" and kind in experiment.GUIDES:
        worst, rule = _ratio(diff, 1e-4 * b.max()), "max|a-b| <= 1e-4*max|b|"
    elif kind == "diffusion" and name.startswith("sched."):
        worst, rule = _ratio(diff, 1e-12 * b), "relative 1e-12"
    elif kind == "diffusion" and name in TRAIN_LOOSE:
        t0 = _train_rows(inputs, name).reshape((-1,) + (1,) * (want.ndim - 1))
        allowed = np.where(t0, 0.05 * b, 1e-4 + 1e-4 * b)
        worst, rule = _ratio(diff, allowed), "t>0: |a-b| <= 1e-4+1e-4|b|; t=0: |a-b| <= 0.05|b|"
    elif kind == "diffusion" and name == "train.grad_model_output":
        t0 = _train_rows(inputs, name)
        # Rows with t = 0: the variance channels (3-5, NCHW axis 1) are not comparable in float32.
        keep = np.ones(want.shape, bool)
        keep[t0, 3:] = False
        worst = _ratio(diff, 1e-4 + 1e-4 * b, keep)
        rule = "|a-b| <= 1e-4+1e-4|b| (t=0 rows: channels 0-2 only)"
    elif kind == "diffusion" and name.startswith("train."):
        worst, rule = _ratio(diff, 1e-4 + 1e-4 * b), "|a-b| <= 1e-4+1e-4|b|"
    elif kind == "diffusion":
        worst, rule = _ratio(diff, 1e-4 + 1e-5 * b), "|a-b| <= 1e-4+1e-5|b|"
    else:
        # UNet kinds, CLIP and classifier float outputs.
        worst, rule = _ratio(diff, 1e-4 + 1e-4 * b), "|a-b| <= 1e-4+1e-4|b|"
    return worst <= 1.0, worst, rule
