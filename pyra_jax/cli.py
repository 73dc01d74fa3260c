"""Command-line helpers shared by `pyra_jax.main` and `pyra_jax.vtab`.

No absl flags are defined here, so every command can use them without
defining the others' flags.
"""

from __future__ import annotations

import difflib
import importlib.util
import os

from pyra_jax import configs
from pyra_jax.errors import UsageError


def _config_arg(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config(spec: str):
  """Loads 'path.py[:arg]' like ml_collections does, with a one-line error."""
  path, sep, arg = spec.partition(':')  # As ml_collections splits it.
  if not os.path.isfile(path):
    raise UsageError(f'Config file {path!r} not found (relative paths are from '
                     f'{os.getcwd()}); the packaged settings, runnable by name '
                     f'(--config=vitb_high:task=dtd): {", ".join(configs.setting_names())}.')
  try:
    module_spec = importlib.util.spec_from_file_location('_pyra_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([arg] if sep else []))
  except (TypeError, ValueError, KeyError, AttributeError, ImportError) as e:
    raise UsageError(f'Cannot build config {spec!r}: {e}') from None


def check_overrides(config, argv: list[str]) -> None:
  """Rejects --config.<field> names that do not exist, listing valid ones."""
  for a in argv:
    if not a.startswith('--config.'):
      continue
    path = a[len('--config.'):].split('=', 1)[0]
    node, walked = config, 'config'
    for part in path.split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ''
        raise UsageError(
            f'Unknown config field --config.{path}: {walked} has no field '
            f'{part!r}.{hint} Valid fields of {walked}: {", ".join(sorted(keys))}.')
      node, walked = node[part], f'{walked}.{part}'
