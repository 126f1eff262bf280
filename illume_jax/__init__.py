"""illume_jax: ILLUME / ILLUME+ unified multimodal LLMs in JAX (Flax NNX)."""
__version__ = "0.1.0"
