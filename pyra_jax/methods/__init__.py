"""Token reduction, one module per method, behind one interface (`methods.base`).

Each module holds a method's functional core as pure functions on arrays and
static Python ints (jit-able, every output shape known at trace time), with
docstrings that state its definition (docs/algorithm.md), and its
`TokenReducer`: how it is configured and checked, what it needs from attention,
how it reduces a block's tokens, its regulariser. `pyra_jax.registry.METHODS`
names them all; the model's blocks call the configured one.
"""
