"""bench sample / train on a tiny UNet: one JSON object with the required, positive numbers."""
import json

import pytest

from glide_jax import bench

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8",
            num_head_channels=32, dropout=0.0, text_ctx=4, xf_width=32, xf_layers=1, xf_heads=2)


@pytest.fixture(scope="module")
def hparams_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _run(capsys, argv):
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_sample_json(capsys, hparams_file):
    r = _run(capsys, ["sample", "--hparams", hparams_file, "--steps", "2", "--batch", "1", "--repeats", "1",
                      "--json"])
    assert r["batch"] == 1 and r["steps"] == 2 and r["model_rows"] == 2 and r["backend"] == "cpu"
    for key in ("per_step_s", "compile_s", "total_s", "params", "gflop_per_step", "achieved_gflops",
                "peak_fraction", "model_call_s"):
        assert r[key] > 0, key


def test_train_json_and_model_flops_do_not_depend_on_the_kernels(capsys, hparams_file):
    """One object per run with positive timings; flops_per_step counts direct convolutions
    whichever kernels run, executed FLOPs differ."""
    runs = {a: _run(capsys, ["train", "--hparams", hparams_file, "--batch", "2", "--steps", "1",
                             "--kernels", a, "--json"]) for a in ("xla", "winograd")}
    for r in runs.values():
        assert r["batch"] == 2 and r["dtype"] == "float32" and r["backend"] == "cpu"
        for key in ("per_step_s", "min_step_s", "compile_s", "params", "flops_per_step", "mfu", "achieved_gflops"):
            assert r[key] > 0, key
        assert r["min_step_s"] <= r["per_step_s"]
    xla, wino = runs["xla"], runs["winograd"]
    assert wino["kernels"] == "winograd" and xla["kernels"] == "xla"
    assert wino["flops_per_step"] == pytest.approx(xla["flops_per_step"], rel=1e-6)
    assert xla["executed_flops_per_step"] == pytest.approx(xla["flops_per_step"], rel=0.05)
    assert wino["executed_flops_per_step"] < 0.9 * xla["executed_flops_per_step"]


def test_bad_hparams_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**TINY, "channel_mult": "1,2,3"}))
    assert bench.main(["train", "--hparams", str(path), "--json"]) == 2
    assert "channel_mult" in capsys.readouterr().err
    path.write_text(json.dumps({**TINY, "num_head_channels": 64}))  # 32 channels: caught by the layers
    assert bench.main(["sample", "--hparams", str(path), "--json"]) == 2
    assert "num_head_channels 64" in capsys.readouterr().err


def test_chip_table():
    class Dev:
        device_kind = "TPU v5 lite"

    assert bench.chip_of(Dev()).name == "TPU v5e"
    Dev.device_kind = "NVIDIA H100 80GB HBM3"
    assert bench.chip_of(Dev()).peak_flops == 989e12


def test_data_json(capsys):
    r = _run(capsys, ["data", "--config", "test_tiny", "--steps", "2", "--batch", "8", "--json"])
    assert r["images_per_s"] > 0 and r["batch"] == 8
