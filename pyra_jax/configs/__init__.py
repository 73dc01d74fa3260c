"""pyra_jax's settings: the base config, the paper's settings table and one file per setting.

Each `<setting>.py` here has `get_config(arg)` (ml_collections config files, as
big_vision's). Run one by file or, installed, by name:

  python -m pyra_jax.main --config=configs/vitb_high.py:task=dtd,init=W ...   # from a clone
  pyra-jax --config=vitb_high:task=dtd,init=W ...                             # anywhere

(`configs/` at the repository root is a link to this folder.) `common.py` holds
every field with its documentation; `paper.py` the per-backbone table of the
paper's settings and the `key=value` argument.
"""

import os
import pathlib

SETTINGS_DIR = pathlib.Path(__file__).resolve().parent


def setting_names() -> list[str]:
  """The packaged settings, e.g. ['deitb_high', ..., 'vitb_high', ...] (`registry.SETTINGS`)."""
  from pyra_jax import registry  # pylint: disable=g-import-not-at-top
  return sorted(registry.SETTINGS)


def resolve(spec: str) -> str:
  """A `--config` value with a packaged setting's name replaced by its file.

  'vitb_high:task=dtd' (or 'vitb_high.py:...') becomes
  '<this folder>/vitb_high.py:task=dtd' when no such file exists where the
  command runs, so an installed pyra_jax runs every setting by name; a path
  to an existing file (a clone's configs/vitb_high.py, a user's own setting)
  is left as it is.
  """
  path, sep, arg = spec.partition(':')
  if os.path.isfile(path):
    return spec
  name = os.path.basename(path)
  name = name[:-3] if name.endswith('.py') else name
  packaged = SETTINGS_DIR / f'{name}.py'
  if name in setting_names() and (path == name or path == f'{name}.py'
                                  or os.path.dirname(path) in ('configs', './configs')):
    return f'{packaged}{sep}{arg}'
  return spec


def resolve_argv(argv: list[str]) -> None:
  """Applies `resolve` to the --config value in `argv`, in place.

  ml_collections reads the config flag (and its --config.<field> overrides)
  from sys.argv as well as from the list it is given, so callers pass both.
  """
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      argv[i] = '--config=' + resolve(a.split('=', 1)[1])
    elif a == '--config' and i + 1 < len(argv):
      argv[i + 1] = resolve(argv[i + 1])
