"""One of two CPU processes training configs/test_tiny.py together, for the preemption tests.

    python tests/scripts/multihost_preempt_worker.py PORT PROCESS_ID WORKDIR NUM_STEPS \\
        CHECKPOINT_EVERY PREEMPT_CHECK_EVERY [STEP_DELAY_S]

Runs `train_and_evaluate` as `python -m glide_jax.train` does (the same SIGTERM handling),
resuming from WORKDIR's newest checkpoint, with a log line (and metrics.jsonl row) per step.
STEP_DELAY_S (default 0) sleeps that long before each batch is made global, so that a test can
signal a run that is surely still training; it changes timing only, never what is computed.
Prints `RESULT {"process": i, "step": ..., "devices": ..., "checksum": ...}`: the step the run
stopped at (NUM_STEPS, or less when it was preempted), the global device count, and a global
checksum of the params (a replicated scalar every process must agree on).
"""
import json
import os
import sys
import time


def _cache_every_process_compiles(jax):
    """Lets process 1 write the persistent compilation cache too (a test speed-up only).

    jax writes cache entries from process 0 alone, and on CPU the other processes' cache keys
    differ from process 0's, so without this process 1 would compile the train step again on
    every launch (about a minute on 2 busy cores). Skipped when jax's internals differ.
    """
    try:
        from jax._src import compilation_cache, compiler
        original = compiler._cache_write
    except (ImportError, AttributeError):
        return

    def write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if jax.process_index() == 0 or host_callbacks:
            return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
        if compile_time_secs >= jax.config.jax_persistent_cache_min_compile_time_secs:
            try:
                compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                          int(compile_time_secs))
            except Exception:  # a cache is an optimisation; never fail the run for it
                pass

    compiler._cache_write = write


def main():
    port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    num_steps, ckpt_every, check_every = (int(x) for x in sys.argv[4:7])
    delay = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
    os.environ["GLIDE_JAX_COORDINATOR"] = f"127.0.0.1:{port}"
    os.environ["GLIDE_JAX_NUM_PROCESSES"] = "2"
    os.environ["GLIDE_JAX_PROCESS_ID"] = str(pid)
    os.environ["GLIDE_JAX_CPU_COLLECTIVES"] = "gloo"
    import jax

    from glide_jax import configs_loader, train
    from glide_jax.console import setup_logging
    from glide_jax.data import pipeline

    _cache_every_process_compiles(jax)
    if delay:
        make_global_batch = pipeline.make_global_batch

        def slow(*args, **kwargs):
            time.sleep(delay)
            return make_global_batch(*args, **kwargs)

        pipeline.make_global_batch = slow

    setup_logging()
    train.maybe_init_distributed()
    assert jax.process_count() == 2, jax.process_count()
    config = configs_loader.load("test_tiny", lock=False)
    config.train.num_steps = num_steps
    config.train.checkpoint_every = ckpt_every
    config.train.preempt_check_every = check_every
    config.train.log_every = 1
    config.train.keep_checkpoints = 100  # every checkpoint stays, to compare
    state = train.train_and_evaluate(config, workdir)
    checksum = jax.jit(lambda p: sum(jax.numpy.sum(jax.numpy.square(x)) for x in jax.tree.leaves(p)))(state.params)
    print("RESULT " + json.dumps({"process": pid, "step": int(state.step), "devices": jax.device_count(),
                                  "checksum": float(checksum)}), flush=True)


if __name__ == "__main__":
    main()
