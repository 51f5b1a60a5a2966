"""The miniature GLIDE (`python -m glide_jax.demo --all`, glide_jax.miniature) and its four configs.

One module-scoped run of the whole pipeline on shrunk sizes (a few steps per stage, 8 captions per
row) trains every config (the inpainting model from the base), samples or guides with each of
them in the evaluation, and writes the report; the other tests read that run or re-run it.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from glide_jax import configs_loader, demo, evaluate, experiment, miniature, tokenizer
from glide_jax.configs import shapes_tiny
from glide_jax.convert import load_converted
from glide_jax.data import shapes
from glide_jax.sample import load_for_sampling

TEXT = ("model.hparams.text_ctx=8", "model.hparams.xf_width=32", "model.hparams.xf_layers=1",
        "model.hparams.xf_heads=2")
TINY = [
    *(f"all:{f}" for f in ("data.train_examples=256", "data.batch_size=8", "train.log_every=1",
                           "train.async_checkpoint=False", "optim.warmup_steps=1")),
    *(f"{stage}:{f}" for stage in ("base", "inpaint", "upsample") for f in TEXT),
    "upsample:model.hparams.channel_mult=1,1,1,1", "upsample:model.hparams.attention_resolutions=",
    "upsample:sample.respacing=2",
    *(f"clip:model.hparams.{k}={v}" for k, v in (("n_embd", 16), ("n_head_state_text", 8), ("n_head_state_image", 8),
                                                   ("n_head_text", 2), ("n_head_image", 2), ("n_xf_blocks_text", 1),
                                                   ("n_xf_blocks_image", 1), ("max_text_len", 8))),
]
EVAL = ["--n", "8", "--batch", "8", "--respacing", "2", "--tradeoff-cfg", "0,3", "--tradeoff-clip", "0,3",
        "--tradeoff-captions", "2", "--tradeoff-samples", "4"]


def _argv(root, *extra):
    return ["--workdir", str(root), "--steps-scale", "0.0005", *(a for s in TINY for a in ("--set", s)), *EVAL, *extra]


def _main(argv, entry=miniature.main):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = entry(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("miniature")
    code, out, err = _main(["--all", *_argv(root)], entry=demo.main)
    assert code == 0, err[-3000:]
    return root, out


def test_configs_derive_from_shapes_tiny():
    base = configs_loader.load("shapes_tiny")
    up = configs_loader.load("shapes_upsample")
    inpaint = configs_loader.load("shapes_inpaint")
    clip = configs_loader.load("shapes_clip")
    classifier = configs_loader.load("shapes_classifier")
    size = base.model.hparams.image_size
    assert up.model.hparams.kind == "upsample" and up.model.hparams.image_size == 4 * size
    assert up.data.low_res_size == size and up.data.noise_aug_std > 0
    assert inpaint.model.hparams.kind == "base-inpaint" and inpaint.data.mask == "mixed"
    assert experiment.build(inpaint.model.hparams.to_dict()).config.in_channels == 7
    assert {k: v for k, v in inpaint.model.hparams.items() if k not in ("kind", "inpaint")} == \
        {k: v for k, v in base.model.hparams.items() if k not in ("kind", "inpaint")}
    assert clip.model.hparams.kind == "clip" and clip.model.hparams.image_size == size
    assert isinstance(experiment.tokenizer_for(clip.model.hparams), tokenizer.ClipTokens)
    assert classifier.model.hparams.out_channels == shapes.NUM_OBJECTS == 18
    for c in (up, inpaint, clip, classifier):
        assert c.data.name == base.data.name and c.data.train_examples == base.data.train_examples
        assert c.optim.lr == base.optim.lr and c.train.ema_rate == base.train.ema_rate
    assert clip.train.cond_drop == classifier.train.cond_drop == 0.0


def test_configs_follow_shapes_tiny_by_import(monkeypatch):
    original = shapes_tiny.get_config

    def changed():
        c = original()
        c.optim.lr = 1.234e-3
        c.model.hparams.xf_width = 64
        c.data.train_examples = 777
        return c

    monkeypatch.setattr(shapes_tiny, "get_config", changed)
    assert miniature.STAGES[0].get_config is original  # the base stage is shapes_tiny itself
    for stage in miniature.STAGES[1:]:
        c = stage.get_config()
        assert c.optim.lr == 1.234e-3 and c.data.train_examples == 777, stage.name
    assert miniature.STAGES[1].get_config().model.hparams.xf_width == 64  # the upsampler's text encoder
    assert miniature.STAGES[2].get_config().model.hparams.xf_width == 64  # the inpainting network


def test_all_trains_every_stage_and_writes_a_filled_report(run):
    root, out = run
    for stage in miniature.STAGES:
        assert f"{stage.config_name}): steps 0 ->" in out and "on 2 CPU cores (new)" in out
        assert miniature.latest_step(root / stage.name) >= 1, stage.name
    report = (root / "report.md").read_text()
    rows = [l for l in report.splitlines() if l.startswith("|") and not l.startswith("|---")]
    assert len(rows) > 30
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(cells), f"empty cell in report row: {row}"
    for name in ("guidance", "scale", "classifier", "CLIP", "pixel-KID", "known region", "Which GLIDE findings"):
        assert name in report
    findings = report.split("## Which GLIDE findings hold here")[1]
    assert len(re.findall(r"^- \*\*", findings, re.M)) == 7
    assert "python -m glide_jax.evaluate adherence" in report and "--guidance clip" in report
    assert "--guidance classifier" in report and "--section tradeoff" in report
    for png in ("grid_cfg.png", "grid_clip.png", "grid_classifier.png", "tradeoff.png", "tradeoff_samples.png",
                "inpaint.png", "cascade.png"):
        im = np.asarray(Image.open(root / png))
        assert im.ndim == 3 and im.std() > 1.0, png


def test_results_cover_every_model(run):
    root, _ = run
    res = {p.stem: json.loads(p.read_text())["result"] for p in (root / "eval").glob("*.json")}
    assert set(res) == set(miniature.SECTIONS)
    assert set(res["cfg"]["scales"]) == {"0", "1.5", "3", "6"}
    assert res["clip"]["guidance"] == "clip" and len(res["clip"]["scales"]) == 3
    assert res["classifier"]["single_fraction"] == 1.0 and "colour_heldout_pairs" not in res["classifier"]["scales"]["0"]
    assert [(p["method"], p["scale"]) for p in res["tradeoff"]["points"]] == [("cfg", 0), ("cfg", 3), ("clip", 0),
                                                                            ("clip", 3)]
    assert res["inpaint"]["known_max_abs_error"] <= 2  # the known pixels are forced back at every step
    assert res["inpaint"]["filled_reference"]["colour"] >= 0.75  # the detector sees the asked-for object
    rows = res["cascade"]["rows"]
    assert rows["base"]["size"] == 16 and rows["upsampled"]["size"] == rows["bilinear"]["size"] == 64
    assert rows["real"]["pixel_kid"] < rows["bilinear"]["pixel_kid"]


@pytest.mark.parametrize("section", ["cfg", "classifier"])
def test_report_commands_reproduce_the_numbers(run, section):
    root, _ = run
    result = json.loads((root / "eval" / f"{section}.json").read_text())["result"]
    argv = shlex.split(result["command"])
    assert argv[:3] == ["python", "-m", "glide_jax.evaluate"]
    code, out, err = _main(argv[3:] + ["--json"], entry=evaluate.main)
    assert code == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    for scale, scores in result["scales"].items():
        assert again["scales"][scale]["colour"] == scores["colour"] and again["scales"][scale]["scene"] == scores["scene"]


def test_inpaint_starts_from_the_base_with_zero_extra_channels(run):
    root, _ = run
    _, base_params, _, _ = load_for_sampling(str(root / "base"))
    hparams, init = load_converted(str(root / "inpaint_init"))
    assert hparams["kind"] == "base-inpaint"
    k_base = np.asarray(base_params["input_blocks_0_0"]["kernel"])
    k_init = np.asarray(init["input_blocks_0_0"]["kernel"])
    assert k_base.shape[-2] == 3 and k_init.shape[-2] == 7
    np.testing.assert_array_equal(k_init[..., :3, :], k_base)
    assert not k_init[..., 3:, :].any()


def test_rerun_skips_finished_stages_and_cached_sections(run):
    root, _ = run
    before = (root / "report.md").stat().st_mtime_ns
    code, out, err = _main(_argv(root))
    assert code == 0, err
    assert out.count("skipped") == len(miniature.STAGES) and out.count(": cached (") == len(miniature.SECTIONS)
    assert (root / "report.md").stat().st_mtime_ns > before


def test_more_steps_resume_the_stage_from_its_checkpoint(run):
    root, _ = run
    done = miniature.latest_step(root / "classifier")
    code, out, err = _main(_argv(root, "--steps", f"classifier={done + 2}", "--train-only"))
    assert code == 0, err
    assert f"classifier (shapes_classifier): steps {done} -> {done + 2}" in out and "(resuming)" in out
    assert miniature.latest_step(root / "classifier") == done + 2


def test_section_recomputes_and_prints_json(run):
    root, _ = run
    code, out, err = _main(_argv(root, "--section", "tradeoff"))
    assert code == 0, err
    assert [p["method"] for p in json.loads(out[out.index("{"):])["tradeoff"]["points"]] == ["cfg", "cfg", "clip", "clip"]


def test_upsampler_sweep_scores_each_setting_on_the_same_base_samples(run):
    root, _ = run
    argv = ["steps", "--checkpoint", str(root / "base"), "--upsample", str(root / "upsample"), "--n", "4",
            "--batch", "4", "--scale", "3", "--settings", "ddpm:fast27,sde-dpm++:3", "--json"]
    code, out, err = _main(argv, entry=evaluate.main)
    assert code == 0, err[-2000:]
    res = json.loads(out[out.index("{"):])
    assert res["size"] == 4 * res["base_size"] and res["base"] == "ddpm:25"
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["bilinear", "real", "ddpm:fast27", "sde-dpm++:3"]
    assert rows["ddpm:fast27"]["evaluations"] == 27 and rows["sde-dpm++:3"]["evaluations"] == 3
    assert rows["real"]["colour"] == 1.0 and rows["real"]["pixel_kid"] < rows["bilinear"]["pixel_kid"]
    assert all(r["seconds"] > 0 for r in res["rows"][2:]) and len(res["table"].splitlines()) == 6

    code, _, err = _main([*argv[:-3], "--settings", "ddpm:27@0-500"], entry=evaluate.main)
    assert code == 2 and err.startswith("error: ") and "no classifier-free guidance" in err
    code, _, err = _main(["steps", "--checkpoint", str(root / "base"), "--upsample", str(root / "base"),
                          "--settings", "ddpm:2"], entry=evaluate.main)
    assert code == 2 and "not an upsampler checkpoint" in err


def test_trained_clip_workdir_guides_the_sample_cli_with_the_clip_tokenizer(run, tmp_path):
    """A noised CLIP trained by glide_jax.train (the miniature's clip stage) loads from its workdir
    with CLIP's BPE, and `python -m glide_jax.sample --guidance clip --clip DIR` samples with it."""
    from glide_jax import sample

    root, _ = run
    _, _, tok, cfg = load_for_sampling(str(root / "clip"))
    assert isinstance(tok, tokenizer.ClipTokens) and cfg.hparams["kind"] == "clip"
    tokens, mask = tok.encode_batch(["a red circle"])
    assert tokens.shape == (1, 8) and tokens[0, 0] == tok.bpe.start_token and mask.sum() == 5
    out = tmp_path / "guided.png"
    code, _, err = _main(["--checkpoint", str(root / "base"), "--prompt", "a red circle", "--guidance", "clip",
                          "--clip", str(root / "clip"), "--scale", "2", "--steps", "2", "--out", str(out)],
                         entry=sample.main)
    assert code == 0, err[-2000:]
    assert np.asarray(Image.open(out)).std() > 1.0


def test_export_refuses_a_different_network(run):
    root, _ = run
    config = configs_loader.load("shapes_inpaint")  # the full-size network, not the run's shrunk one
    with pytest.raises(miniature.MiniatureError, match="hyper-parameters differ: .*xf_width"):
        miniature.export_init(root / "base", root / "refused_init", config)


@pytest.mark.parametrize("argv, message", [
    (["--set", "base:model.hparams.no_such_field=1"], "--set base:model.hparams.no_such_field: no such config field"),
    (["--set", "clip:train.num_steps=many"], "--set clip:train.num_steps: wrong type"),
    (["--section", "cfg"], "no trained base"),
])
def test_user_mistakes_are_one_error_line(tmp_path, argv, message):
    code, out, err = _main(["--workdir", str(tmp_path / "empty"), *argv])
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--steps", "5"], ["--steps-scale", "0"], ["--set", "nowhere:x=1"],
                                  ["--tradeoff-samples", "1"], ["--cfg-scales", "a,b"]])
def test_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        _main(["--all", *argv], entry=demo.main)
    assert e.value.code == 2


def test_evaluate_guidance_needs_its_guide(tmp_path):
    code, _, err = _main(["adherence", "--checkpoint", str(tmp_path), "--guidance", "clip"], entry=evaluate.main)
    assert code == 2 and "needs --guide DIR" in err


def test_diversity_and_pixel_kid():
    imgs = np.stack([shapes.render(shapes.sample_spec("validation", i), 16) for i in range(12)])
    assert evaluate.mean_pairwise_distance(np.repeat(imgs[:2, None], 4, 1)) < 1e-6
    a, b = imgs[0].astype(np.float64) / 255, imgs[1].astype(np.float64) / 255
    pair = np.stack([imgs[:2]])
    assert evaluate.mean_pairwise_distance(pair) == pytest.approx(np.sqrt(np.mean((a - b) ** 2)))
    real = np.stack([shapes.render(shapes.sample_spec("validation", i), 64) for i in range(40)])
    real_2 = np.stack([shapes.render(shapes.sample_spec("validation", i), 64) for i in range(40, 80)])
    blurred = np.stack([np.asarray(Image.fromarray(x).resize((16, 16), Image.BOX).resize((64, 64), Image.BILINEAR))
                        for x in real_2])
    assert evaluate.pixel_kid(real_2, real) < 0.1 * evaluate.pixel_kid(blurred, real)
    assert evaluate.class_of("a blue square above a red circle") == 4 * 3 + 1


def test_tradeoff_plot_draws_both_curves(tmp_path):
    points = [dict(method=m, scale=s, colour=c, diversity=d) for m, pts in
              (("cfg", [(0, 0.3, 0.3), (3, 0.8, 0.2)]), ("clip", [(0, 0.3, 0.3), (10, 0.6, 0.25)])) for s, c, d in pts]
    miniature.plot_tradeoff(points, tmp_path / "t.png")
    im = np.asarray(Image.open(tmp_path / "t.png"))[..., :3].reshape(-1, 3)
    for colour in miniature.COLOURS.values():
        assert (np.abs(im.astype(int) - colour).sum(-1) == 0).sum() > 20


def test_inpaint_cases_keep_one_object_and_ask_for_a_new_colour():
    for caption, source, mask, new, truth in miniature.inpaint_cases(12, 16):
        spec = shapes.parse_caption(caption)
        assert spec is not None and spec.relation != shapes.NONE and new // 3 in spec.colors
        found = shapes.detect(source)
        assert len(found) == 1 and found[0].color != new // 3 and found[0].color in spec.colors
        assert np.array_equal(source[mask[..., 0] == 0], np.broadcast_to(shapes.BACKGROUND.astype(np.uint8),
                                                                          source[mask[..., 0] == 0].shape))
        assert truth.shape == source.shape and mask.mean() == 0.5

