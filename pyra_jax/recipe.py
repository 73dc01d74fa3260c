"""`config.recipe`: the paper's method, or training exactly as the authors' code did.

Where the PYRA paper and its authors' code differ (docs/algorithm.md §8),
pyra_jax's defaults follow the paper, each difference a field of its own.
`recipe='authors_code'` sets all of those fields to the code's values at once,
for people who want the paper's numbers the way the authors obtained them:

  lr_schedule           'authors'       timm's cosine, stepped once per epoch, late
  model.lora_init       'trunc_normal'  their model's init pass re-draws LoRA's B
  model.adapter_init    'trunc_normal'  ... and the Adapter's kernels (zero biases)
  model.distilled_train 'cls'           DeiT: the loss reads the class-token head
  model.distilled_eval  'avg'           ... evaluation averages both heads
  eval_epochs           'authors'       evaluations after epochs 1, 11, 21, ..., 100
  headline              'max'           the best of those evaluations is reported
  distill.loss          'authors_hard'  PE-Dist: ½ CE(labels) + ½ CE(teacher's argmax)

(a field this version's config lacks is skipped). `recipe='paper'`, the
default, changes nothing.

When: the recipe is resolved from the field when a run starts
(`pyra_jax.main` for every mode, `training.loop.train_and_evaluate`), not when the
config is built, so `--config=<setting>:recipe=authors_code` and
`--config.recipe=authors_code` both work. Resolving is idempotent: a stored,
resolved config resolves to itself, so a resumed run compares equal.

Overrides are refused, never silently lost or silently winning: a
`--config.<field>=<value>` that gives one of the recipe's fields another value
than the recipe's is an error (`check_overrides`), and so is a config whose
field holds a value that is neither the base default nor the recipe's
(`apply`). To change one of them, keep `recipe='paper'` and set the fields
one by one (docs/algorithm.md §8 names each). Only the config is read here:
no JAX.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from pyra_jax.errors import ConfigError, UsageError

RECIPES = ('paper', 'authors_code')

# (field path, the authors' code's value), in the order the start line lists them.
AUTHORS_CODE: tuple[tuple[str, Any], ...] = (
    ('lr_schedule', 'authors'),
    ('model.lora_init', 'trunc_normal'),
    ('model.adapter_init', 'trunc_normal'),
    ('model.distilled_train', 'cls'),
    ('model.distilled_eval', 'avg'),
    ('eval_epochs', 'authors'),
    ('headline', 'max'),
    ('distill.loss', 'authors_hard'),
)


def _lookup(config: ml_collections.ConfigDict, path: str) -> tuple[bool, Any]:
  """(whether `config` has the field at dotted `path`, its value)."""
  node: Any = config
  for part in path.split('.'):
    if not hasattr(node, 'keys') or part not in node.keys():
      return False, None
    node = node[part]
  return True, node


def _assign(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  parent, _, name = path.rpartition('.')
  node = config
  for part in parent.split('.') if parent else ():
    node = node[part]
  node[name] = value


def recipe_of(config: ml_collections.ConfigDict) -> str:
  """`config.recipe`, checked ('paper' when the config predates the field)."""
  name = config.get('recipe', 'paper')
  if name not in RECIPES:
    raise ConfigError(f'config.recipe = {name!r}: use one of '
                      f'{", ".join(repr(r) for r in RECIPES)}.')
  return name


def fields(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """The (path, value) pairs `config`'s recipe sets; [] for 'paper'.

  Only fields the config has: a version without one (e.g. no
  model.adapter_init) skips it.
  """
  if recipe_of(config) == 'paper':
    return []
  return [(path, value) for path, value in AUTHORS_CODE if _lookup(config, path)[0]]


def _base_default(path: str) -> Any:
  from pyra_jax.configs import common  # pylint: disable=g-import-not-at-top
  return _lookup(common.get_base_config(), path)[1]


def apply(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """Sets the fields of `config.recipe` in place; returns what it set.

  Raises ConfigError for an unknown recipe, or a field holding a value that
  is neither its default nor the recipe's (someone chose it: refusing is
  better than overwriting their choice or dropping the recipe's).
  """
  out = fields(config)
  for path, value in out:
    current = _lookup(config, path)[1]
    if current != value and current != _base_default(path):
      raise ConfigError(
          f'config.{path} = {current!r}, but recipe={config.recipe} sets it to '
          f'{value!r}: drop one of the two (to change a field of the recipe, leave '
          'config.recipe at \'paper\' and set its fields one by one, docs/algorithm.md §8).')
  for path, value in out:
    _assign(config, path, value)
  return out


def describe(config: ml_collections.ConfigDict) -> str:
  """The start-of-training line: the recipe and every field it set ('' for 'paper')."""
  set_ = fields(config)
  if not set_:
    return ''
  listed = ', '.join(f'{path}={value!r}' for path, value in set_)
  return (f'recipe={config.recipe} (the authors\' code, docs/algorithm.md §8) sets: '
          f'{listed}')


def overridden_paths(argv: Sequence[str]) -> list[str]:
  """The field paths given as `--config.<path>=<value>` (or `--config.<path> <value>`)."""
  out = []
  for a in argv:
    if a.startswith('--config.'):
      out.append(a[len('--config.'):].split('=', 1)[0])
  return out


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> None:
  """Refuses a command-line override that contradicts the recipe (UsageError).

  `config` is the parsed config, overrides applied, recipe not yet resolved:
  an overridden field of the recipe whose value differs from the recipe's
  was set by the user against it.
  """
  recipe = dict(fields(config))
  for path in overridden_paths(argv):
    if path in recipe:
      value = _lookup(config, path)[1]
      if value != recipe[path]:
        raise UsageError(
            f'--config.{path}={value!r} contradicts recipe={config.recipe}, which sets '
            f'{path}={recipe[path]!r}: drop one of the two (to change a field of the '
            'recipe, leave the recipe at \'paper\' and set its fields one by one, '
            'docs/algorithm.md §8).')
