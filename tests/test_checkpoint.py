"""Checkpoint manager details not covered by the end-to-end fault tests."""
import os

import jax.numpy as jnp
import numpy as np

from glide_jax import checkpoint


def test_relative_workdir_async_save_and_restore(tmp_path, monkeypatch):
    """orbax needs absolute paths: a relative --workdir (as `make demo` uses) must still save."""
    monkeypatch.chdir(tmp_path)
    manager = checkpoint.make_manager("runs/rel", async_save=True)
    state = {"w": jnp.arange(6.0).reshape(2, 3)}
    checkpoint.save(manager, 5, state, {"step": 5}, {"fingerprint": {"kind": "base"}, "step": 5})
    manager.wait_until_finished()
    assert os.path.isdir(tmp_path / "runs" / "rel" / "checkpoints" / "5")
    step, restored, data_state, meta = checkpoint.restore_latest(manager, {"w": jnp.zeros((2, 3))})
    assert step == 5 and data_state == {"step": 5}
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(6.0).reshape(2, 3))
