"""Reproduce the outputs of OpenAI's GLIDE code stored in a parity fixture folder.

Each per-kind module (`unet`, `classifier`, `clip`, `diffusion`, `tokenizer`) exposes
`compute(fixture_dir: pathlib.Path) -> dict[str, np.ndarray]` returning every `output` array
of the folder's `meta.json` with the listed name, shape, NCHW layout and dtype.
`python -m glide_jax.parity FIXTURE_DIR --out OUT.npz [--check]` is the command-line entry.
"""
