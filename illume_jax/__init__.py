"""illume_jax: ILLUME / ILLUME+ unified multimodal LLMs in JAX (Flax NNX)."""
__version__ = "0.1.0"


def __getattr__(name):
    # `illume_jax.Illume` without importing JAX at package import time.
    if name == "Illume":
        from illume_jax.infer.illume import Illume
        return Illume
    raise AttributeError(f"module 'illume_jax' has no attribute {name!r}")
