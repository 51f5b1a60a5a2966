"""The planner: an ahead-of-time compile on 8 fake CPU devices (a subprocess, so XLA_FLAGS applies)."""
import json
import subprocess
import sys

import pytest

from glide_jax import plan

TINY_CONFIG = '''
from glide_jax.config import default_config


def get_config():
    c = default_config()
    c.model.hparams.update(dict(
        image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8",
        num_head_channels=32, dropout=0.0, text_ctx=4, xf_width=32, xf_layers=1, xf_heads=2))
    c.data.image_size = 8
    c.data.text_ctx = 4
    c.data.batch_size = 8
    return c
'''


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "tiny_config.py"
    path.write_text(TINY_CONFIG)
    return str(path)


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "glide_jax.plan", *args], capture_output=True, text=True,
                          timeout=600)


def test_plan_fsdp8(config_file):
    p = _plan("--config", config_file, "--mesh", "data=1,fsdp=8", "--hbm-gib", "1", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    b = r["bytes"]
    assert r["devices"] == 8 and r["per_device_batch"] == 1 and r["hbm_gib"] == 1 and r["fits"]
    assert b["params"] == pytest.approx(b["params_unsharded"] / 8, rel=0.15)
    assert b["ema"] == b["params"] and b["opt_state"] >= 2 * b["params"]
    assert b["temp"] > 0 and b["total"] >= b["state"]
    assert b["residuals"] > 0 and b["estimate"] == b["state"] + b["params"] + b["residuals"] + b["other_arguments"]
    assert r["remat"] is False

    # --remat on: same state, fewer activations saved for the backward pass
    p = _plan("--config", config_file, "--mesh", "data=1,fsdp=8", "--hbm-gib", "1", "--remat", "on", "--json")
    assert p.returncode == 0, p.stderr
    rr = json.loads(p.stdout)
    assert rr["remat"] is True and rr["bytes"]["state"] == b["state"]
    assert rr["bytes"]["residuals"] < b["residuals"]


@pytest.mark.parametrize("mesh, extra, message", [
    ("data=2,fsdp=2", ["--devices", "8"], "needs 4 devices"),
    ("data=1,pipe=8", [], "not AXIS=SIZE"),
    ("fsdp=3", [], "not divisible"),
    ("fsdp=8", ["--set", "model.no_such=1"], "no such config field 'model.no_such'"),
    ("fsdp=8", ["--set", "model.remat"], "want FIELD=VALUE"),
])
def test_bad_mesh_exit_2(config_file, mesh, extra, message, capsys):
    """Found before the planner starts its fake-device process: one error line from this one."""
    assert plan.main(["--config", config_file, "--mesh", mesh, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_parse_mesh():
    assert plan.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(plan.PlanError):
        plan.parse_mesh("fsdp=0")


def test_set_overrides_config_fields_before_planning(config_file):
    args = plan.build_parser().parse_args(["--config", config_file, "--mesh", "fsdp=8", "--set", "model.remat=true",
                                           "--set", "model.dtype=bfloat16"])
    config = plan._load_config(args)
    assert config.model.remat is True and config.model.dtype == "bfloat16" and config.model.kernels == "xla"
