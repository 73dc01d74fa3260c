"""The paper's competing compression methods (Tables 14-15), one module each.

Each module holds a method's functional core as pure functions on arrays and
static Python ints (jit-able, every output shape known at trace time), with
docstrings that state its definition (docs/algorithm.md); the model
(`pyra_jax.models.vit.EncoderBlock`, after attention, where ToMe merges) and the
training loop (PE-Dist's loss) call them.
"""
