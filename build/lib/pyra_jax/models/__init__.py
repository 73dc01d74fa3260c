"""Models: the ViT backbone with LoRA and PYRA. `build_model` is the entry point."""

from pyra_jax.models.vit import VisionTransformer, build_model, model_kwargs  # noqa: F401
