"""The paper's competing compression methods (Table 14-15), one module each.

Each module holds a method's functional core as pure functions on arrays, with
docstrings that state its definition (docs/algorithm.md §9); the model and the
training loop call them.
"""
