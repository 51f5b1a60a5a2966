"""glide_jax networks: layers, the GLIDE UNets and classifier (`unet`), the text transformer, the
noised CLIP, Inception for FID, Winograd convolutions, and the reference codebases' defaults.
Which network a model kind uses, with which defaults, is `glide_jax.experiment`'s business."""
