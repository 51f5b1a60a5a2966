"""glide_jax: GLIDE (text-guided diffusion) in JAX/Flax, built for TPU-pod training."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml_collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "tiktoken==0.14.0",
    "absl-py",
    "numpy",
    "pillow",
    "tqdm",
    "ftfy",
    "regex",
    "tensorboard",
    "importlib_resources",
]

setup(
    name="glide_jax",
    version="0.1.0",
    description="GLIDE text-guided diffusion in JAX/Flax for TPU-pod training",
    packages=find_packages(include=["glide_jax", "glide_jax.*"]),
    package_data={"glide_jax": ["assets/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "wheel"],
        "beam": ["apache-beam==2.77.0"],
        # the TPU compiler, for `python -m glide_jax.plan --tpu SLICE` on any machine; the version
        # jax[tpu]==0.10.2 pins (pip resolves it to libtpu 0.0.42.1)
        "tpu": ["libtpu==0.0.42.*"],
    },
)
