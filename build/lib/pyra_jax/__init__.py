"""pyra_jax: PYRA (ECCV 2024) in JAX/Flax: LoRA + ToMe token merging + learned modulation."""
