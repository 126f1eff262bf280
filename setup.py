"""illume_jax: a JAX/TPU-native reimplementation of the ILLUME family of unified multimodal LLMs."""
from setuptools import find_packages, setup

# Pinned where the stack is known to work on Python 3.11 (newer flax/jax need 3.12).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "array-record",
    "sentencepiece",
    "tokenizers",
    "ml_collections",
    "chex",
    "absl-py",
    "tqdm",
    "pillow",
    "numpy",
    "scipy",
    "tensorboardX",
    "importlib_resources",  # tensorflow-datasets imports it without declaring it
]

EXTRAS = {
    # The PyTorch references for parity tests. torch is pinned to the CPU wheel on disk;
    # any looser spec pulls a multi-GB CUDA build.
    # nbformat + nbclient + ipykernel: the Colab notebook is executed headless by a test.
    "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers", "diffusers", "safetensors", "nbformat",
             "nbclient", "ipykernel"],
    # libtpu: compiles TPU programs ahead of time on a CPU host (python -m illume_jax aot).
    "tpu": ["jax[tpu]==0.10.2"],
}

setup(
    name="illume_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["illume_jax", "illume_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
