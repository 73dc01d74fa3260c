"""The competing token-reduction methods of the paper's Table 14 (docs/algorithm.md §10).

One module per method, each a set of pure functions on arrays and static Python
ints (jit-able, every output shape known at trace time), called by
`pyra_jax.models.vit.EncoderBlock` after attention, where ToMe merges.
"""
