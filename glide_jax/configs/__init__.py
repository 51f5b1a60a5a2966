"""The shipped experiment configs (`get_config()` each); load them by name or path with
`glide_jax.configs_loader.load`. The top-level `configs/` folder is this folder."""
