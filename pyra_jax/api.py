"""The Python API: the command line's settings, models, training, evaluation and export.

  import pyra_jax
  config = pyra_jax.get_config('vitb_high', task='dtd', method='pyra')
  model, params = pyra_jax.create_model(config, weights='hf-hub:timm/...')
  result = pyra_jax.train(config, 'runs/dtd')             # as `python -m pyra_jax.main`
  pyra_jax.export(config, 'runs/dtd', format='stablehlo')

Every function takes the same configs as `python -m pyra_jax.main` (a
packaged setting by name, a setting file, or a ConfigDict) and does what the
command does, with the same checks and the same one-sentence errors
(`pyra_jax.errors.PyraError`). Data can also be passed in Python: a
`pyra_jax.data.Data` (`pyra_jax.data.from_arrays`, `from_tf_dataset`,
`get_data`) or a pair `(images, labels)` of arrays.
"""

from __future__ import annotations

import os
from typing import Any, Collection, Mapping, Optional, Union

import ml_collections

from pyra_jax.errors import ConfigError

Config = Union[str, ml_collections.ConfigDict]
PyTree = Any


def get_config(setting: Config = 'vitb_high', *,
               overrides: Optional[Mapping[str, Any]] = None,
               **arg: Any) -> ml_collections.ConfigDict:
  """A setting as a ConfigDict: what `--config=<setting>:<arg>` gives the command line.

  Args:
    setting: a packaged setting's name ('vitb_high', 'demo', 'tiny', ...:
      `pyra_jax.registry.SETTINGS`), a setting file's path, or a ConfigDict
      (returned as a copy).
    overrides: config fields by dotted name, e.g. {'model.lora_rank': 4,
      'num_epochs': 10}: what `--config.<field>=<value>` does.
    **arg: the setting's key=value argument (configs/paper.py: task, method,
      peft, modulation, pyra_lr, lr, source, data_dir, init, teacher,
      teacher_export, recipe), e.g. task='dtd', method='tome'.
  """
  from pyra_jax import cli  # pylint: disable=g-import-not-at-top
  from pyra_jax import configs  # pylint: disable=g-import-not-at-top
  if isinstance(setting, ml_collections.ConfigDict):
    if arg:
      raise ConfigError(f'get_config: {", ".join(sorted(arg))} apply to a setting by '
                        'name or file; on a ConfigDict set the fields with overrides=.')
    config = ml_collections.ConfigDict(setting.to_dict())
  else:
    spec = configs.resolve(str(setting))
    path, _, given = spec.partition(':')
    items = [given] if given else []
    items += [f'{k}={v}' for k, v in arg.items()]
    config = cli.load_config(path + (':' + ','.join(items) if items else ''))
  for dotted, value in (overrides or {}).items():
    _set_field(config, dotted, value)
  return config


def _set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """config.<dotted> = value, refusing a field the config does not have."""
  node, parts = config, dotted.split('.')
  for i, part in enumerate(parts):
    if not hasattr(node, 'keys') or part not in node:
      where = '.'.join(['config'] + parts[:i])
      raise ConfigError(f'Unknown config field {dotted!r}: {where} has no field {part!r} '
                        '(the fields: python -m pyra_jax.main --config=<setting> '
                        '--helpfull, or docs/configs.md).')
    if i == len(parts) - 1:
      node[part] = value
    else:
      node = node[part]


def _config(config: Config) -> ml_collections.ConfigDict:
  return config if isinstance(config, ml_collections.ConfigDict) else get_config(config)


def create_model(config: Config = 'vitb_high', *, num_classes: Optional[int] = None,
                 weights: Optional[str] = None, image_size: Optional[int] = None,
                 dtype: str = 'float32', **model_fields: Any) -> tuple[Any, PyTree]:
  """A Flax ViT with its parameters: the frozen backbone's weights, fresh LoRA,
  generators and head, as a training run starts.

  Args:
    config: a setting's name or file, or a ConfigDict (`get_config`).
    num_classes: the head's classes; default config.model.num_classes, else
      the configured task's class count.
    weights: the pretrained backbone: a weights file, 'hf-hub:<owner>/<name>',
      or 'random' (a random backbone); default config.model_init.
    image_size: the input resolution; default config.model.image_size.
    dtype: the compute dtype, 'float32' or 'bfloat16'.
    **model_fields: any `model.<field>`, e.g. method='tome', schedule='flops:2',
      peft='adapter', lora_rank=4 (configs/common.py documents them).

  Returns:
    (model, params): `model.apply({'params': params}, images, train=False)`
    gives the logits of (B, H, W, 3) images normalised as the config's data
    (ImageNet mean/std by default); train with `rngs={'dropout': key}`.
  """
  from pyra_jax import recipe as recipe_lib  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import setup  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(_config(config).to_dict())
  for name, value in model_fields.items():
    _set_field(config, f'model.{name}', value)
  if image_size is not None:
    config.model.image_size = image_size
  if weights is not None:
    config.model_init = weights
  recipe_lib.apply(config)  # As a run resolves it (e.g. recipe=authors_code's inits).
  if num_classes is None:
    num_classes = config.model.num_classes or _task_classes(config)
  model_config = setup.resolve_model_config(config, num_classes)
  model = setup.build_model(model_config, dtype)
  return model, setup.init_params(config, model_config, model)


def _task_classes(config: ml_collections.ConfigDict) -> int:
  """The configured task's class count, without reading its data."""
  try:
    from pyra_jax.data import tasks  # pylint: disable=g-import-not-at-top
    return tasks.get_task(config.data.task).num_classes
  except ImportError as e:
    raise ConfigError(f'create_model: pass num_classes= (the task {config.data.task!r} '
                      f'could not be looked up: {e}).') from None


def split_params(params: PyTree, config: Config) -> tuple[PyTree, PyTree]:
  """(trainable, frozen) by the config's `trainable` regexes (LoRA, generators, head)."""
  from pyra_jax import optim  # pylint: disable=g-import-not-at-top
  return optim.split_params(params, _config(config).trainable)


def make_optimizer(config: Config, steps_per_epoch: int) -> Any:
  """The run's optax optimiser for the trainable parameters (AdamW, groups, schedule)."""
  from pyra_jax import optim  # pylint: disable=g-import-not-at-top
  return optim.make_optimizer(_config(config), steps_per_epoch)[0]


def _data(data: Any, config: ml_collections.ConfigDict, *, train: bool) -> Any:
  """A `pyra_jax.data.Data` from what the caller passed (None: the config's)."""
  if data is None or hasattr(data, 'make_dataset'):
    return data
  from pyra_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  kw = dict(batch_size=config.batch_size if train else config.eval_batch_size,
            image_size=config.model.image_size, train=train, seed=config.seed,
            normalization=config.data.normalization,
            num_classes=config.model.num_classes)
  if isinstance(data, tuple) and len(data) == 2:
    return data_lib.from_arrays(*data, **kw)
  if hasattr(data, 'element_spec'):  # A tf.data.Dataset.
    if kw['num_classes'] is None:
      raise ConfigError('A tf.data.Dataset does not say its class count: set '
                        "overrides={'model.num_classes': N} in get_config.")
    return data_lib.from_tf_dataset(data, **kw)
  raise ConfigError(f'Data of type {type(data).__name__}: pass (images, labels) arrays, '
                    'a tf.data.Dataset or a pyra_jax.data.Data.')


def train(config: Config, workdir: str, *, data: Any = None, eval_data: Any = None,
          allow_config_change: Collection[str] = ()) -> dict:
  """Trains (or resumes) the run in `workdir` and evaluates it: `--mode=train`.

  Args:
    config: a setting's name or file, or a ConfigDict (`get_config`).
    workdir: the run's folder (checkpoints, metrics, results.json); a rerun
      resumes, a finished run is reported.
    data, eval_data: the training and test data instead of config.data:
      (images, labels) arrays, a tf.data.Dataset or a `pyra_jax.data.Data`,
      batched as config.batch_size / eval_batch_size.
    allow_config_change: fields that may differ from the checkpoint's on
      resume (`--allow_config_change`).

  Returns:
    The results dict written to <workdir>/results.json.
  """
  from pyra_jax.training import loop  # pylint: disable=g-import-not-at-top
  config = _config(config)
  return loop.train_and_evaluate(
      config, os.fspath(workdir), allow_config_change=allow_config_change,
      train_data=_data(data, config, train=True),
      eval_data=_data(eval_data, config, train=False))


def evaluate(config: Config, workdir: Optional[str] = None, *,
             export_dir: Optional[str] = None, step: Optional[int] = None,
             eval_data: Any = None, two_stage: bool = False) -> dict:
  """Test accuracy of a run's checkpoint (or of an export): `--mode=eval`.

  Returns {'accuracy', 'correct', 'count', ...}.
  """
  config = _config(config)
  if export_dir is not None:
    from pyra_jax.training import export as export_lib  # pylint: disable=g-import-not-at-top
    if eval_data is not None:
      raise ConfigError('evaluate: an export is evaluated on its config\'s data; '
                        'pass eval_data= with workdir= instead.')
    return export_lib.evaluate_export(os.fspath(export_dir), config)
  if workdir is None:
    raise ConfigError('evaluate: give workdir= (a training run) or export_dir= (an export).')
  from pyra_jax import speedup_timer  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import evaluation  # pylint: disable=g-import-not-at-top
  speedup_timer.resolve(config, os.fspath(workdir))  # 'speedup:<x>': the run's choice
  return evaluation.evaluate_checkpoint(
      config, os.fspath(workdir), step, two_stage=two_stage,
      eval_data=_data(eval_data, config, train=False))


def export(config: Config, workdir: str, export_dir: Optional[str] = None, *,
           format: str = 'orbax', step: Optional[int] = None,  # pylint: disable=redefined-builtin
           two_stage: bool = False) -> str:
  """Writes the deployable model (LoRA folded, merging static): `--mode=export`.

  format 'orbax' (for pyra_jax) or 'stablehlo' (runs with jax, numpy and
  safetensors only; docs/deploy.md). Returns the export's folder.
  """
  from pyra_jax.training import export as export_lib  # pylint: disable=g-import-not-at-top
  from pyra_jax import speedup_timer  # pylint: disable=g-import-not-at-top
  setting = config if isinstance(config, str) else None
  config = _config(config)
  speedup_timer.resolve(config, os.fspath(workdir))  # 'speedup:<x>': the run's choice
  return export_lib.export(config, os.fspath(workdir), export_dir, step,
                           two_stage=two_stage, export_format=format, setting=setting)


def load_export(export_dir: str) -> tuple[Any, PyTree]:
  """(model, params) of an Orbax export: the deployed model, ready to apply."""
  from pyra_jax.training import export as export_lib  # pylint: disable=g-import-not-at-top
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  params, config = export_lib.load_export(os.fspath(export_dir))
  return vit.build_model(config.model), params
