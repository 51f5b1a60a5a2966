"""glide_jax.evaluate: shapes adherence scoring, the adherence command and the steps sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glide_jax import evaluate
from glide_jax.data import shapes


def test_adherence_scores_on_rendered_truth_and_on_wrong_images():
    captions = evaluate.heldout_captions(24, seed=1)
    specs = [shapes.parse_caption(c) for c in captions]
    assert all(specs) and sum(s.relation == shapes.NONE for s in specs) == 12
    rng = np.random.default_rng(0)
    truth = np.stack([
        shapes.render(shapes.layout(s.colors, s.shapes, shapes.NONE, rng) if s.relation == shapes.NONE
                      else shapes.sample_spec("validation", i - 12), 32)  # the pairs: validation 0..11
        for i, s in enumerate(specs)])
    scores = evaluate.adherence_scores(captions, truth)
    assert scores == {"colour": 1.0, "scene": 1.0}
    blank = np.full_like(truth, 245)
    assert evaluate.adherence_scores(captions, blank) == {"colour": 0.0, "scene": 0.0}


def test_parse_settings():
    assert evaluate.parse_settings("ddpm:100, dpm++:10,ddim:50") == [("ddpm", 100, None), ("dpm++", 10, None),
                                                                      ("ddim", 50, None)]
    assert evaluate.parse_settings("unipc:15@200-800") == [("unipc", 15, (200, 800))]
    assert evaluate.parse_settings("ddpm:fast27") == [("ddpm", "fast27", None)]
    for bad in ("", "euler:10", "ddpm", "ddpm:0", "ddpm:x", "ddpm:fast28", "unipc:10@800-200", "unipc:10@a-b"):
        with pytest.raises(ValueError):
            evaluate.parse_settings(bad)


def test_steps_sweep_and_adherence_on_a_tiny_checkpoint(tmp_path, capsys):
    from helpers import random_checkpoint

    random_checkpoint("base", tmp_path / "ckpt")
    out = evaluate.steps_sweep(str(tmp_path / "ckpt"), n=4, scale=3.0,
                               settings=[("ddpm", 3, None), ("dpm++", 2, None), ("unipc", 4, (0, 500))], batch=2)
    assert [(r["sampler"], r["steps"]) for r in out["rows"]] == [("ddpm", 3), ("dpm++", 2), ("unipc", 4)]
    for r in out["rows"]:
        assert r["seconds"] > 0 and 0 <= r["colour"] <= 1 and 0 <= r["colour_heldout_pairs"] <= 1
    assert [r["evaluations"] for r in out["rows"]] == [3, 2, 4]
    # full CFG: one unconditional row per image per evaluation; the interval skips the noisiest steps
    assert out["rows"][0]["uncond_rows_per_image"] == 3 and 0 < out["rows"][2]["uncond_rows_per_image"] < 4
    table = out["table"].splitlines()
    assert len(table) == 5 and table[2].startswith("| DDPM | 3 | all | 3 |") and "DPM-Solver++" in table[3]
    assert table[4].startswith("| UniPC (bh2) | 4 | 0-500 |")

    res = evaluate.adherence(str(tmp_path / "ckpt"), n=4, scales=[0.0, 3.0], respacing="3", sampler="ddpm",
                             batch=2, grid_path=str(tmp_path / "grid.png"))
    assert set(res["scales"]) == {"0", "3"} and (tmp_path / "grid.png").stat().st_size > 0

    assert evaluate.main(["steps", "--checkpoint", str(tmp_path / "ckpt"), "--n", "2", "--batch", "2",
                          "--settings", "ddim:2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]["sampler"] == "ddim"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert evaluate.main(["steps", "--checkpoint", str(tmp_path), "--settings", "euler:3"]) == 2
    assert "SAMPLER:STEPS" in capsys.readouterr().err
    assert evaluate.main(["steps", "--checkpoint", str(tmp_path / "missing")]) == 2
