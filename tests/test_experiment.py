"""The experiment layer: kinds, configs that tell the truth, sharding rules as data, one set-up."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from glide_jax import configs_loader, experiment, sharding, tokenizer
from glide_jax.config import default_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_kind_has_one_entry_with_what_the_tools_need():
    assert set(experiment.KINDS) == {"base", "base-inpaint", "upsample", "upsample-inpaint", "clip", "classifier"}
    assert set(experiment.GENERATORS) == {"base", "base-inpaint", "upsample", "upsample-inpaint"}
    for name in experiment.GUIDES:
        kind = experiment.KINDS[name]
        assert kind.guide_score is not None and kind.guide_inputs is not None, name
    for name, kind in experiment.KINDS.items():
        hp = experiment.hparams_with_defaults(name)
        assert hp["kind"] == name and kind.loss is not None
        model = experiment.from_hparams(hp)
        assert type(model).__name__ == {"clip": "ClipModel", "classifier": "EncoderUNet"}.get(name, "Text2ImUNet")


def test_choosing_a_kind_brings_its_defaults():
    up = default_config("upsample").model.hparams
    assert (up.image_size, up.num_res_blocks, up.noise_schedule, up.super_res) == (256, 2, "linear", True)
    inpaint = default_config("base-inpaint").model.hparams
    assert inpaint.inpaint and not inpaint.super_res
    cls = default_config("classifier").model.hparams
    assert cls.model_channels == 128 and "num_channels" not in cls
    clip = default_config("clip").model.hparams
    assert clip.max_text_len == 77 and clip.n_xf_blocks_text == 12


def test_finalize_fills_and_checks_what_must_agree():
    c = default_config("base")
    c.model.hparams.image_size = 32
    c.model.hparams.channel_mult = "1,2,3"
    experiment.finalize(c)
    assert (c.data.image_size, c.data.text_ctx) == (32, 128)
    assert c.model.kernels in ("xla", "cpu")  # resolved, so the saved config names what ran
    c = default_config("base")
    c.data.image_size = 16
    with pytest.raises(experiment.SetupError, match="data.image_size=16 disagrees with the model's 64"):
        experiment.finalize(c)
    c = default_config("base")
    c.model.hparams.kind = "classifier"
    with pytest.raises(experiment.SetupError, match="a classifier model does not take"):
        experiment.finalize(c)
    c = default_config("base")
    c.model.hparams.kind = "base-inpaint"  # same keys: the derived flag follows the kind
    assert experiment.finalize(c).model.hparams.inpaint
    c = default_config("clip")
    assert experiment.finalize(c).data.text_ctx == 77
    c = default_config("base")
    c.model.hparams.channel_mult = "1,2"  # a 64 px GLIDE UNet has four levels
    with pytest.raises(experiment.SetupError, match="model.hparams: channel_mult '1,2': GLIDE needs"):
        experiment.finalize(c)
    for bad, message in ((2.0, r"must be in \[-1, 1\].*got 2.0"), ("fast", "must be a number in .*got 'fast'"),
                         (float("nan"), "must be in")):
        c = default_config("base")
        with c.ignore_type():
            c.train.compiler_effort = bad
        with pytest.raises(experiment.SetupError, match="train.compiler_effort " + message):
            experiment.finalize(c)
    c = default_config("base")
    c.train.compiler_effort = -1
    assert experiment.finalize(c).train.compiler_effort == -1.0


def test_bad_config_on_the_command_line_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "glide_jax.train", "--config", "shapes_tiny", "--workdir",
                        str(tmp_path / "w"), "--config.data.image_size=64"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == [
        "error: bad --config: data.image_size=64 disagrees with the model's 16; leave data.image_size at 0 "
        "(it follows the model)"]
    assert not (tmp_path / "w").exists()


def test_tokenizer_follows_the_kind():
    assert isinstance(experiment.tokenizer_for(experiment.hparams_with_defaults("clip")), tokenizer.ClipTokens)
    assert isinstance(experiment.tokenizer_for(experiment.hparams_with_defaults("base")), tokenizer.GlideBPE)
    assert experiment.tokenizer_for(experiment.hparams_with_defaults("classifier")) is None
    bad = ml_collections.ConfigDict({"name": "clip_bpe", "model_file": ""})
    with pytest.raises(experiment.SetupError, match="noised CLIP always reads CLIP's BPE"):
        experiment.tokenizer_for(experiment.hparams_with_defaults("base"), bad)


def test_sharding_rules_are_config_data():
    """The rules in config.mesh.rules decide the shardings (flax's logical_to_mesh_axes)."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    config = configs_loader.load("test_tiny", lock=False)
    setup = experiment.setup_state(config, mesh, abstract_only=True)
    rules = sharding.normalize_rules(config.mesh.rules)
    assert rules == sharding.normalize_rules(sharding.DEFAULT_RULES)
    assert sharding.spec_for((64, 128), ("in_features", "out_features"), mesh, rules) == jax.sharding.PartitionSpec(
        None, None)  # size-1 axes are dropped
    assert sharding.batch_axes(mesh, rules) in ("data", ("data", "fsdp"), "fsdp", None)
    saved = json.loads(config.to_json_best_effort())["mesh"]["rules"]  # what the workdir's config.json holds
    assert sharding.normalize_rules(saved) == rules
    with pytest.raises(sharding.RulesError, match="unknown mesh axes"):
        sharding.check_rules([("batch", "pipeline")])
    assert setup.shardings is not None


def test_fsdp_rules_change_with_the_config():
    """On 8 fake devices: the default rules split kernels and embeddings over fsdp (each device
    holds ~1/8); mapping in_features and embed to None replicates every parameter. Runs in a subprocess (the device count is fixed when jax starts)."""
    code = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax
from glide_jax import configs_loader, experiment, sharding
config = configs_loader.load("test_tiny", lock=False)
mesh = sharding.mesh_from_config(config.mesh)
def frac(config):
    sh = experiment.setup_state(config, mesh, abstract_only=True).shardings.params
    leaves = jax.tree.leaves(experiment.setup_state(config, mesh, abstract_only=True).abstract.params)
    total = sum(a.size for a in leaves)
    per = sum(int(__import__("numpy").prod(s.shard_shape(a.shape))) for a, s in zip(leaves, jax.tree.leaves(sh)))
    return per / total
a = frac(config)
config.mesh.rules = [(n, None if n in ("in_features", "embed") else t) for n, t in config.mesh.rules]
print(a, frac(config))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    fsdp, replicated_in = map(float, r.stdout.split())
    assert fsdp < 0.15 and replicated_in == 1.0, (fsdp, replicated_in)


def test_train_step_pins_activations_to_the_batch_axes():
    """On 8 fake devices the UNet's block boundaries become batch-axis sharding constraints in
    the jitted train step (and none without the activation rules)."""
    code = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax
from glide_jax import configs_loader, experiment, sharding, train
config = configs_loader.load("test_tiny", lock=False)
mesh = sharding.mesh_from_config(config.mesh)
setup = experiment.setup_state(config, mesh, abstract_only=True)
shapes = experiment.abstract_batch(setup.model, "base", 8)
batch_sh = {k: sharding.batch_sharding(mesh, len(s.shape), config.mesh.rules) for k, s in shapes.items()}
data = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sh[k]) for k, s in shapes.items()}
step = train.make_jitted_step(config, setup.model, setup.tx, setup.shardings, batch_sh, mesh, pad_id=0)
text = step.lower(setup.abstract, data, jax.random.PRNGKey(0)).as_text()
plain = jax.jit(lambda p, x, t, tok, m: setup.model.apply({"params": p}, x, t, tok, m)).lower(
    setup.abstract.params, data["image"], jax.ShapeDtypeStruct((8,), "int32"), data["tokens"],
    data["mask"]).as_text()
print(text.count('sdy.sharding_constraint'), text.count('[{"fsdp"}'), plain.count("sdy.sharding_constraint"))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    constraints, on_fsdp, outside = map(int, r.stdout.split())
    # test_tiny: 5 input blocks, the middle block and 5 output blocks, forward and backward
    assert constraints >= 11 and on_fsdp >= 11 and outside == 0, (constraints, on_fsdp, outside)


def test_setup_state_restores_what_train_wrote(tmp_path):
    """setup_state with a manager restores the newest checkpoint (same path for train and sample)."""
    from glide_jax import checkpoint

    config = configs_loader.load("test_tiny", lock=False)
    fresh = experiment.setup_state(config)
    manager = checkpoint.make_manager(str(tmp_path), async_save=False)
    checkpoint.save(manager, 3, fresh.state, {"step": 3}, {"fingerprint": experiment.config_fingerprint(config)})
    manager.wait_until_finished()
    again = experiment.setup_state(config, manager=checkpoint.make_manager(str(tmp_path), async_save=False))
    assert again.restored and again.step == 3 and again.data_state == {"step": 3}
    for a, b in zip(jax.tree.leaves(again.state.params), jax.tree.leaves(fresh.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = configs_loader.load("test_tiny", lock=False)
    other.model.hparams.num_channels = 64
    with pytest.raises(experiment.SetupError, match="checkpoint of another model"):
        experiment.setup_state(other, manager=checkpoint.make_manager(str(tmp_path), async_save=False))


@pytest.mark.slow
def test_non_editable_install_trains_a_shipped_config_by_name(tmp_path):
    """`pip install .` (not editable) ships the configs: `--config shapes_tiny` trains from any
    directory. The package goes to a fresh target dir (no dependencies: this venv has them) and
    wins over the editable install on sys.path."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "glide_jax" / "configs" / "shapes_tiny.py").is_file()
    env = dict(os.environ, PYTHONPATH=str(target))
    where = subprocess.run([sys.executable, "-c", "import glide_jax; print(glide_jax.__file__)"], env=env,
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip()
    assert where.startswith(str(target)), where
    r = subprocess.run([sys.executable, "-m", "glide_jax.train", "--config", "shapes_tiny", "--workdir",
                        str(tmp_path / "w"), "--config.train.num_steps=2", "--config.train.log_every=1",
                        "--config.train.checkpoint_every=2", "--config.train.async_checkpoint=False",
                        "--config.data.batch_size=4", "--config.data.train_examples=64",
                        # the text encoder shrunk: the shipped file is what is tested, not its compile
                        "--config.model.hparams.xf_layers=1", "--config.model.hparams.xf_width=32",
                        "--config.model.hparams.xf_heads=2", "--config.model.hparams.text_ctx=8",
                        f"--config.data.data_dir={tmp_path / 'data'}"],
                       env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "w" / "checkpoints" / "2").is_dir()


@pytest.mark.parametrize("kind", ["base", "base-inpaint", "upsample", "classifier", "clip"])
def test_abstract_batch_has_the_fields_each_loss_reads(kind):
    from tests.helpers import TINY
    model = experiment.build(TINY[kind])
    b = experiment.abstract_batch(model, kind, 4)
    assert b["image"].shape[0] == 4 and b["image"].shape[-1] == 3
    if kind != "classifier":
        assert b["tokens"].shape == b["mask"].shape and b["mask"].dtype == np.bool_
    assert ("label" in b) == experiment.KINDS[kind].labels


def test_scan_layers_is_a_runtime_switch():
    """config.model.scan_layers reaches the modules (on in the released-size configs); it is not a
    hyper-parameter, so neither the fingerprint nor the parameters depend on it."""
    from tests.helpers import TINY
    released = configs_loader.load("glide_filtered_base64", lock=False)
    assert released.model.scan_layers and experiment.model_from_config(released).config.scan_layers
    assert "scan_layers" not in experiment.config_fingerprint(released)["hparams"]
    assert not default_config("base").model.scan_layers
    assert not experiment.model_from_config(configs_loader.load("test_tiny", lock=False)).config.scan_layers
    assert experiment.build(TINY["base"], scan_layers=True).config.scan_layers
    assert experiment.build(TINY["clip"], scan_layers=True).config.scan_layers
    experiment.build(TINY["classifier"], scan_layers=True)  # no transformer: ignored
    # the UNet's block runs: the same kind of switch, for the generators only
    assert experiment.build(TINY["base"], scan_blocks=True).config.scan_blocks
    assert not experiment.build(TINY["base"]).config.scan_blocks
    experiment.build(TINY["clip"], scan_blocks=True)  # no UNet: ignored
    blocks = default_config("base")
    blocks.model.scan_blocks = True
    assert experiment.model_from_config(blocks).config.scan_blocks
    assert "scan_blocks" not in experiment.config_fingerprint(blocks)["hparams"]
