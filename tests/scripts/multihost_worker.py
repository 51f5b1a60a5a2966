"""One of two CPU processes training configs/test_tiny.py together through jax.distributed.

    python tests/scripts/multihost_worker.py PORT PROCESS_ID WORKDIR

Prints `RESULT {"process": i, "checksum": ..., "step": ...}` with a global checksum of the
final params (a replicated scalar every process must agree on).
"""
import json
import os
import sys


def main():
    port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.environ["GLIDE_JAX_COORDINATOR"] = f"127.0.0.1:{port}"
    os.environ["GLIDE_JAX_NUM_PROCESSES"] = "2"
    os.environ["GLIDE_JAX_PROCESS_ID"] = str(pid)
    os.environ["GLIDE_JAX_CPU_COLLECTIVES"] = "gloo"
    import jax
    import jax.numpy as jnp

    from glide_jax import configs_loader
    from glide_jax.train import maybe_init_distributed, train_and_evaluate

    maybe_init_distributed()
    assert jax.process_count() == 2, jax.process_count()
    config = configs_loader.load("test_tiny", lock=False)
    config.train.num_steps = 3
    config.train.checkpoint_every = 3
    state = train_and_evaluate(config, workdir)
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p)))(state.params)
    print("RESULT " + json.dumps({"process": pid, "checksum": float(checksum), "step": int(state.step),
                                  "devices": jax.device_count()}), flush=True)


if __name__ == "__main__":
    main()
