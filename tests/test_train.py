"""Training-system checks: caption dropout, FSDP equivalence and memory split, two processes."""
import json
import math
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax import configs_loader, sharding
from glide_jax.train_step import drop_captions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")


def test_caption_dropout_fraction_within_binomial_bound():
    n, p = 40_000, 0.2
    batch = {"tokens": jnp.ones((n, 4), jnp.int32), "mask": jnp.ones((n, 4), bool)}
    out, dropped = drop_captions(batch, jax.random.PRNGKey(3), p, pad_id=50256)
    frac = float(jnp.mean(dropped))
    bound = 4 * math.sqrt(p * (1 - p) / n)  # 4 sigma
    assert abs(frac - p) < bound, (frac, bound)
    d = np.asarray(dropped)
    assert np.all(np.asarray(out["tokens"])[d] == 50256)
    assert not np.asarray(out["mask"])[d].any()
    assert np.asarray(out["mask"])[~d].all()


def test_mesh_shape_errors():
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(sharding.MeshError, match="does not divide"):
        sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(sharding.MeshError, match="at most one"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(sharding.MeshError, match="unknown mesh axes"):
        sharding.mesh_shape({"model": 2}, 8)


def test_all_configs_load_and_build_abstractly():
    """Every experiment config builds its model and state abstractly (no memory)."""
    from glide_jax.train import abstract_state, build_model
    from glide_jax.train_state import make_optimizer

    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
    assert {"shapes_tiny", "glide_filtered_base64", "glide_filtered_upsample256", "glide_base64_3p5b",
            "glide_upsample256_1p5b", "inpaint64", "clip_noised64", "classifier64"} <= set(names)
    for name in names:
        config = configs_loader.load(name)
        model = build_model(config)
        boxed, _ = abstract_state(model, make_optimizer(config.optim), model.init_inputs(1), jax.random.PRNGKey(0))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(boxed.params))
        assert n > 0, name
        if name == "glide_filtered_base64":
            assert n == 385_030_726


@pytest.mark.slow
def test_fsdp_step_matches_single_device_and_splits_memory():
    out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "fsdp_check.py")], capture_output=True,
                         text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["num_devices"] == 8
    assert abs(r["loss_single"] - r["loss_fsdp"]) <= 1e-5 * abs(r["loss_single"])
    assert r["max_rel_param_diff"] <= 1e-5
    for frac in r["param_fraction_per_device"] + r["opt_fraction_per_device"]:
        assert abs(frac - 1 / 8) <= 0.15 / 8, r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_and_agree(tmp_path):
    port = _free_port()
    workdir = str(tmp_path / "run")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, os.path.join(SCRIPTS, "multihost_worker.py"), str(port), str(i),
                               workdir], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for i in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:]
        line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
        results.append(json.loads(line[len("RESULT "):]))
    assert {r["process"] for r in results} == {0, 1}
    assert all(r["devices"] == 2 and r["step"] == 3 for r in results)
    assert results[0]["checksum"] == results[1]["checksum"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
