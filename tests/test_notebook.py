"""notebooks/sample.ipynb runs headless (nbclient) on tiny random-weight checkpoints of every kind."""
import os
import pathlib

import numpy as np
import pytest

from helpers import random_checkpoint

ROOT = pathlib.Path(__file__).resolve().parent.parent
KINDS = ("base", "base-inpaint", "upsample", "clip")


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path):
    import nbclient
    import nbformat

    env = {}
    for kind in KINDS:
        random_checkpoint(kind, tmp_path / kind)
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
