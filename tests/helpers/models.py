"""Tiny configs, parameters and inputs for the tests.

`tiny_config` is the one builder of a tiny config: configs/tiny.py (the run a
user can start with `--config=configs/tiny.py`) with keyword overrides. Every
test module starts its config from it and names only what it changes, so the
shapes the tests share (width 32, 2 heads, 8 px patches of 32 px images) are
stated once. `tiny_model` is its three-block model with 5 classes, the model
most forward-pass tests compare with the numpy references.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pyra_jax.configs import tiny

CONFIG_DIR = Path(tiny.__file__).resolve().parent
from pyra_jax.models import build_model

IMAGE = 32  # configs/tiny.py's image size.


def _override(node: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets `key` (dotted for nested fields) of `node`; a dict value given for a
  sub-config updates that sub-config field by field."""
  *parents, leaf = key.split('.')
  for p in parents:
    node = node[p]
  if isinstance(value, dict) and isinstance(node.get(leaf), ml_collections.ConfigDict):
    for k, v in value.items():
      _override(node[leaf], k, v)
  else:
    node[leaf] = value


def tiny_config(arg: str | None = None, **overrides: Any) -> ml_collections.ConfigDict:
  """configs/tiny.py's config for `arg` (as `configs/tiny.py:<arg>`), overridden.

  Overrides are top-level fields (`lr=0.01`), sub-configs given as dicts
  (`model=dict(depth=3)`, `data=dict(eval_split='val200')`), or dotted names
  passed as a dict (`**{'model.depth': 3}`); they are applied in order.
  """
  config = tiny.get_config(arg)
  for key, value in overrides.items():
    _override(config, key, value)
  return config


def load_setting(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of the setting file configs/<name> (e.g. 'vitb_high.py'), for `arg`."""
  spec = importlib.util.spec_from_file_location(f'_setting_{name[:-3]}', CONFIG_DIR / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


# The tiny run's command line (tests.helpers.cli.TINY) as config overrides:
# evaluations on val200 in batches of 64 (the last one padded), a loss every step.
TINY_RUN = {'data.eval_split': 'val200', 'eval_batch_size': 64, 'log_every_steps': 1}


def tiny_run_config(arg: str | None = None, **extra: Any) -> ml_collections.ConfigDict:
  """The config of the TINY command line, then `extra`."""
  return tiny_config(arg, **{**TINY_RUN, **extra})


# The overrides that make a VTAB protocol run of the tiny config a few seconds
# (one epoch, no periodic evals, a two-value PYRA lr grid); also given on the
# command line as --config.<key>=<value>.
VTAB_QUICK = {'num_epochs': 1, 'warmup_epochs': 0, 'eval_every_epochs': 0,
              'log_every_steps': 1000, 'vtab.pyra_lr_grid': (1e-3, 3e-2)}


def quick_vtab_config(arg: str | None = None, **extra: Any) -> ml_collections.ConfigDict:
  """tiny_config(arg) with VTAB_QUICK, then `extra` (dotted names allowed)."""
  return tiny_config(arg, **{**VTAB_QUICK, **extra})


def tiny_model(method: str = 'pyra', schedule: str = '3,2,2',
               **fields: Any) -> ml_collections.ConfigDict:
  """The model config of three blocks and 5 classes (with drop-path 0.1, so that
  training-mode differences show), `method` set as a field (no method preset)."""
  return tiny_config(model={'depth': 3, 'num_classes': 5, 'drop_path': 0.1,
                            'method': method, 'schedule': schedule, **fields}).model


def images(n: int = 2, seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)), jnp.float32)


def randomize(params, pattern: str, seed: int = 1, scale: float = 0.3):
  """Gives parameters matching `pattern` random values (e.g. LoRA's zero B)."""
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 1000))
  def f(path, leaf):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    if re.search(pattern, name):
      return leaf + scale * jax.random.normal(next(keys), leaf.shape)
    return leaf
  return jax.tree_util.tree_map_with_path(f, params)


def init(cfg: ml_collections.ConfigDict, seed: int = 0):
  """(model, params) of a model config, initialised by a compiled `model.init`."""
  model = build_model(cfg)
  return model, jax.jit(lambda k: model.init(k, images(1)))(jax.random.PRNGKey(seed))['params']


def init_params(cfg: ml_collections.ConfigDict, seed: int = 0):
  """The model's own parameter tree (names, shapes), filled with random values.

  The tree comes from `model.init` under `jax.eval_shape` (no compilation: the
  tests stay fast); loading only needs the tree, plus values for what it keeps.
  """
  model = build_model(cfg)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, 3))
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), x, train=False))['params']
  rng = np.random.default_rng(1000 + seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def random_params(model, images_: jax.Array, seed: int, **fixed: float):
  """Random parameters of `model` without compiling its init (shapes only):
  N(0, 0.1^2) everywhere, LayerNorm scales 1 + N(0, 0.1^2), and `fixed`
  ({leaf name: value}) for the method's own parameters."""
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, images_))['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in fixed:
      return np.full(leaf.shape, fixed[name], np.float32)
    v = 0.1 * rng.normal(size=leaf.shape)
    return (v + 1.0 if name == 'scale' else v).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def jit_features(model, params, images_: jax.Array):
  """The class feature and the intermediates, through one compiled forward."""
  return jax.jit(lambda p, x: model.apply({'params': p}, x, features=True,
                                          mutable=['intermediates']))(params, images_)


def to_np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)
