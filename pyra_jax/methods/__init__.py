"""The competing token-reduction methods of the paper's Table 14, one module each.

Pure functions on arrays and static Python ints (jit, vmap and grad work on
them); `pyra_jax/models/vit.py` calls them from `EncoderBlock`. Each module's
docstring states the method's definition (docs/algorithm.md §10).
"""
