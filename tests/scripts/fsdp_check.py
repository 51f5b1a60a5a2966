"""Runs one train step of configs/test_tiny.py on 1 device, on an 8-device FSDP mesh and on an
8-device data-parallel mesh with the optimizer state and EMA split over `data` (ZeRO-1).

Prints one JSON object: max relative param differences, losses, per-device byte fractions.
Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set below before jax loads).
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from glide_jax import configs_loader, experiment, sharding  # noqa: E402
from glide_jax.train import make_jitted_step  # noqa: E402


def main():
    jax.config.update("jax_default_matmul_precision", "highest")
    config = configs_loader.load("test_tiny")
    setup = experiment.setup_state(config)
    model, tx, rng = setup.model, setup.tx, jax.random.PRNGKey(0)
    state0 = jax.device_get(setup.state)

    b, s, l = 16, config.model.hparams.image_size, config.model.hparams.text_ctx
    r = np.random.default_rng(0)
    batch = {
        "image": r.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
        "tokens": r.integers(0, 50000, (b, l)).astype(np.int32),
        "mask": r.uniform(size=(b, l)) < 0.7,
    }
    results = {}
    zero1 = configs_loader.load("test_tiny")
    zero1.mesh.shard_update_over_data = True
    runs = (("single", jax.devices()[:1], config, {"data": 1, "fsdp": -1, "tensor": 1}),
            ("fsdp8", jax.devices(), config, {"data": 1, "fsdp": -1, "tensor": 1}),
            ("zero1", jax.devices(), zero1, {"data": 8, "fsdp": 1, "tensor": 1}))
    for name, devices, cfg, sizes in runs:
        mesh = sharding.make_mesh(sizes, devices)
        shard = experiment.setup_state(cfg, mesh, abstract_only=True).shardings
        state = jax.device_put(state0, shard)
        gbatch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        bshard = jax.tree.map(lambda x: x.sharding, gbatch)
        step = make_jitted_step(cfg, model, tx, shard, bshard, mesh, pad_id=50256)
        new_state, metrics = step(state, gbatch, rng)
        per_dev = sharding.bytes_per_device(new_state.params)
        opt_dev = sharding.bytes_per_device(new_state.opt_state)
        ema_dev = sharding.bytes_per_device(new_state.ema_params)
        results[name] = dict(
            loss=float(metrics["loss"]),
            params=jax.device_get(new_state.params),
            ema=jax.device_get(new_state.ema_params),
            ema_bytes=[int(v) for v in ema_dev.values()],
            param_bytes=[int(v) for v in per_dev.values()],
            opt_bytes=[int(v) for v in opt_dev.values()],
        )
    def rel(a, c):
        return max(float(np.max(np.abs(x - y)) / (np.max(np.abs(x)) + 1e-12))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))

    single = results["single"]
    total = sum(single["param_bytes"])
    total_opt = sum(single["opt_bytes"])
    total_ema = sum(single["ema_bytes"])
    z = results["zero1"]
    print(json.dumps(dict(
        loss_single=single["loss"], loss_fsdp=results["fsdp8"]["loss"],
        max_rel_param_diff=rel(single["params"], results["fsdp8"]["params"]),
        loss_zero1=z["loss"], zero1_max_rel_param_diff=rel(single["params"], z["params"]),
        zero1_max_rel_ema_diff=rel(single["ema"], z["ema"]),
        zero1_param_fraction_per_device=[x / total for x in z["param_bytes"]],
        zero1_opt_fraction_per_device=[x / total_opt for x in z["opt_bytes"]],
        zero1_ema_fraction_per_device=[x / total_ema for x in z["ema_bytes"]],
        param_fraction_per_device=[x / total for x in results["fsdp8"]["param_bytes"]],
        opt_fraction_per_device=[x / total_opt for x in results["fsdp8"]["opt_bytes"]],
        num_devices=len(results["fsdp8"]["param_bytes"]),
    )))


if __name__ == "__main__":
    sys.exit(main())
