"""notebooks/sample.ipynb runs headless (nbclient) on tiny random-weight checkpoints of every kind."""
import os
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

from glide_jax import models

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNET = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", num_head_channels=32,
            attention_resolutions="8", dropout=0.0, text_ctx=8, xf_width=32, xf_layers=1, xf_heads=2)
KINDS = {
    "base": dict(kind="base", **UNET),
    "base-inpaint": dict(kind="base-inpaint", inpaint=True, **UNET),
    "upsample": dict(kind="upsample", super_res=True, noise_schedule="linear",
                     **dict(UNET, image_size=32, channel_mult="1,2,2")),
    "clip": dict(kind="clip", logit_scale=100.0, beta_schedule="squaredcos_cap_v2", n_timesteps=1000,
                 image_size=16, patch_size=4, n_vocab=49408, max_text_len=77, n_embd=16, n_head_state_text=8,
                 n_head_text=2, n_xf_blocks_text=1, n_head_state_image=8, n_head_image=2, n_xf_blocks_image=1),
}


def _random_checkpoint(kind, hparams, out):
    from glide_jax.convert import save_converted

    full = models.hparams_with_defaults(kind, hparams)
    model = models.from_hparams(full)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), **model.init_inputs(1))["params"])
    leaves, tree = jax.tree.flatten(params)  # zero-initialised output layers: perturb everything
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(tree, [np.asarray(p) + 0.02 * rng.standard_normal(p.shape).astype(np.float32)
                                       for p in leaves])
    save_converted(str(out), full, params)


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path):
    import nbclient
    import nbformat

    env = {}
    for kind, hparams in KINDS.items():
        _random_checkpoint(kind, hparams, tmp_path / kind)
    env = {"GLIDE_JAX_BASE": tmp_path / "base", "GLIDE_JAX_INPAINT": tmp_path / "base-inpaint",
           "GLIDE_JAX_UPSAMPLE": tmp_path / "upsample", "GLIDE_JAX_CLIP": tmp_path / "clip",
           "GLIDE_JAX_STEPS": "3", "GLIDE_JAX_OUT": tmp_path / "out"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        nb = nbformat.read(ROOT / "notebooks" / "sample.ipynb", as_version=4)
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    from PIL import Image

    for name in ("cfg", "clip", "inpaint", "upsampled"):
        path = tmp_path / "out" / f"{name}.png"
        assert path.exists(), name
        im = np.asarray(Image.open(path))
        assert im.ndim == 3 and im.std() > 1.0, name  # a real picture, not a blank canvas
    displayed = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if "image/png" in o.get("data", {})]
    assert len(displayed) == 4
