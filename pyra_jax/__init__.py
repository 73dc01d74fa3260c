"""pyra_jax: PYRA (ECCV 2024) in JAX/Flax: parameter-efficient fine-tuning of a
Vision Transformer with learned token merging.

  import pyra_jax
  config = pyra_jax.get_config('tiny')                  # a setting, as --config=tiny
  model, params = pyra_jax.create_model(config, num_classes=10, weights='random')
  logits = model.apply({'params': params}, images)      # (B, 10), tokens merged
  pyra_jax.train(config, 'runs/tiny')                   # as python -m pyra_jax.main

The names below are imported on first use, so `import pyra_jax` stays light
(no TensorFlow: the data pipeline, `pyra_jax.data`, needs the [data] extra).
To add ToMe or PYRA merging to a Flax ViT of your own, use the pure functions
`bipartite_soft_matching`, `merge_wavg`, `log_size_bias` and the
`PyraGenerator` module (docs/own_model.md).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = '0.3.0'

# name -> (module, attribute); attribute None: the module itself.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    # The API (pyra_jax/api.py).
    'get_config': ('pyra_jax.api', 'get_config'),
    'create_model': ('pyra_jax.api', 'create_model'),
    'split_params': ('pyra_jax.api', 'split_params'),
    'make_optimizer': ('pyra_jax.api', 'make_optimizer'),
    'train': ('pyra_jax.api', 'train'),
    'evaluate': ('pyra_jax.api', 'evaluate'),
    'export': ('pyra_jax.api', 'export'),
    'load_export': ('pyra_jax.api', 'load_export'),
    # Merging in a ViT of one's own (pyra_jax/merge.py, models/pyra.py).
    'bipartite_soft_matching': ('pyra_jax.merge', 'bipartite_soft_matching'),
    'merge_wavg': ('pyra_jax.merge', 'merge_wavg'),
    'merge_source': ('pyra_jax.merge', 'merge_source'),
    'log_size_bias': ('pyra_jax.merge', 'log_size_bias'),
    'PyraGenerator': ('pyra_jax.models.pyra', 'PyraGenerator'),
    # Modules a user reaches for.
    'data': ('pyra_jax.data', None),
    'registry': ('pyra_jax.registry', None),
    'errors': ('pyra_jax.errors', None),
    'PyraError': ('pyra_jax.errors', 'PyraError'),
}
__all__ = ['__version__', *_EXPORTS]


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module, attr = _EXPORTS[name]
  value = importlib.import_module(module)
  return value if attr is None else getattr(value, attr)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
