"""Run set-up, shared by training, evaluation and export: model, parameters, mesh, restore.

`setup` builds a `Run` from a config: the model (`build_model`, memoised), its
parameters (random init, then the pretrained backbone: `init_params`) split
into the trainable and the frozen ones, and the mesh. `restore_run` builds the
same for a saved checkpoint and restores its trainable parameters, also for a
two-stage evaluation (which may change the merging only).

Data parallelism: a 1-D mesh 'data' over every device; batches are sharded on
their first axis (`shard`), parameters and optimiser state replicated. The
global batch is `config.batch_size`, whatever the number of devices.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pyra_jax import checkpointing
from pyra_jax import optim
from pyra_jax.errors import ConfigError
from pyra_jax.training import checks

PyTree = Any


# ----------------------------------------------------------------------------
# Compiled functions are memoised per (model, optimiser, mesh), so several runs
# in one process (tests, sweeps, eval after train) compile once. Keys are JSON
# of the config sections that define the function; a field missing from a key
# could only cause a recompilation, never a wrong reuse, because keys exclude
# fields by name (`steps.step_key`) rather than include them.
# ----------------------------------------------------------------------------

_CACHE: 'collections.OrderedDict[Any, Any]' = collections.OrderedDict()
_CACHE_SIZE = 16


def json_key(obj: Any) -> str:
  """`obj` as canonical JSON (sorted keys): a key of the compiled-function cache."""
  return json.dumps(obj, sort_keys=True, default=str)


def memo(key: Any, make: Callable[[], Any]) -> Any:
  """The cached value of `key`, made by `make()` on a miss (least recently used evicted)."""
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  value = _CACHE[key] = make()
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return value


# ----------------------------------------------------------------------------
# The modules a run drives. Indirections so tests can swap in tiny fakes.
# ----------------------------------------------------------------------------

def build_model(model_config: ml_collections.ConfigDict, dtype: str = 'float32'):
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  try:
    return memo(('model', json_key(model_config.to_dict()), dtype),
                lambda: vit.build_model(model_config, dtype=dtype))
  except ValueError as e:
    # Its checks are all about the user's config (model_kwargs validates the
    # variant, method and schedule before tracing): a plain ValueError there
    # is a config problem, reported as one.
    if type(e) is ValueError:
      raise ConfigError(str(e)) from e
    raise


def get_data(data_config, split: str, batch_size: int, *, image_size: int,
             train: bool, seed: int):
  from pyra_jax import data  # pylint: disable=g-import-not-at-top
  return data.get_data(data_config, split, batch_size, image_size=image_size,
                       train=train, seed=seed)


def load_pretrained(path: str, fmt: str, init_params: PyTree,
                    model_config: ml_collections.ConfigDict, *,
                    first_blocks: bool = False) -> PyTree:
  from pyra_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.load_pretrained(path, fmt, init_params, model_config,
                                     first_blocks=first_blocks)


# ----------------------------------------------------------------------------
# Setup shared by train, eval and export.
# ----------------------------------------------------------------------------

def make_mesh() -> Mesh:
  """A 1-D mesh named 'data' over every device (of every host)."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def resolve_model_config(config: ml_collections.ConfigDict,
                         num_classes: int) -> ml_collections.ConfigDict:
  """config.model with an unset num_classes set to the task's class count."""
  mc = ml_collections.ConfigDict(config.model.to_dict())
  if 'num_classes' in mc and mc.num_classes is None:  # A missing field: build_model names it.
    mc.num_classes = int(num_classes)
  return mc


def check_model_init(config: ml_collections.ConfigDict) -> None:
  """Refuses an empty `model_init` (naming the weights to fetch) or a malformed Hub name.

  A random frozen backbone trains without error, so a forgotten `init=` would
  silently give a meaningless run: it must be asked for by name
  (model_init='random', as the tiny test config does).
  """
  if not config.model_init:
    from pyra_jax import checkpoints  # pylint: disable=g-import-not-at-top
    raise ConfigError(checkpoints.missing_weights_message(config.model))
  from pyra_jax.checkpoints import hub  # pylint: disable=g-import-not-at-top
  if hub.is_hub_spec(config.model_init):
    hub.parse(config.model_init)  # A malformed Hub name, before the data.


def check_model_config(config: ml_collections.ConfigDict) -> None:
  """Resolves config.model once without data (pure Python, no tracing), so a bad
  model setting is reported before the data is prepared. The task's class
  count is not known yet: a stand-in is used when the config leaves it unset.
  """
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  try:
    vit.model_kwargs(resolve_model_config(config, 1))
  except ValueError as e:
    if type(e) is ValueError:
      raise ConfigError(str(e)) from e
    raise


def init_params(config: ml_collections.ConfigDict,
                model_config: ml_collections.ConfigDict, model) -> PyTree:
  """Random init (head, LoRA, PYRA), then the pretrained backbone."""
  from pyra_jax import checkpoints  # pylint: disable=g-import-not-at-top
  check_model_init(config)
  # An 'rbg' key: XLA compiles its RNG 3-4x faster than threefry on CPU (init
  # draws a key per parameter), and init runs on one device, so its values do
  # not depend on the mesh. Dropout keeps threefry (sharding-invariant).
  key = jax.random.key(config.seed, impl='rbg')
  size = model_config.image_size

  def make_init():
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.jit(lambda k: model.init({'params': k}, dummy, train=False))
  # id(model) is a safe key: the cached closure keeps the model alive, so its
  # id cannot be reused by another object while the entry exists.
  init = memo(('init', id(model), size), make_init)
  params = jax.device_get(init(key)['params'])
  if config.model_init != checkpoints.RANDOM_INIT:
    params = load_pretrained(
        config.model_init, config.model_init_format, params, model_config,
        first_blocks=config.get('model_init_first_blocks', False))
  return params


def dropout_key(config: ml_collections.ConfigDict) -> jax.Array:
  """The root dropout key; step s uses fold_in(root, s), so resume is exact."""
  return jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)


def shard(batch: dict, sharding: NamedSharding) -> dict:
  """Places a global numpy batch on the mesh, split along axis 0.

  Every host reads the same global batch (VTAB-1k is small) and contributes
  its own slice, so multi-host data needs no per-host sharding of the files.
  """
  pc, pi = jax.process_count(), jax.process_index()

  def put(x):
    x = np.asarray(x)
    if pc > 1:
      n = x.shape[0] // pc
      x = x[pi * n:(pi + 1) * n]
    return jax.make_array_from_process_local_data(sharding, x)
  return {k: put(batch[k]) for k in ('image', 'label', 'mask')}


@dataclasses.dataclass
class Run:
  """Everything train/eval/export need, built once from a config."""
  config: ml_collections.ConfigDict
  model_config: ml_collections.ConfigDict
  model: Any
  mesh: Mesh
  trainable: PyTree          # host arrays, fresh init (before any restore)
  frozen: PyTree             # on the mesh, replicated
  frozen_fingerprint: str
  # PE-Dist's frozen teacher (`training.teacher.Teacher`), loaded for training
  # only when config.distill.enabled; eval and export never need it.
  teacher: Any = None

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P('data'))

  def replicate(self, tree: PyTree) -> PyTree:
    return jax.device_put(tree, self.replicated)

  def abstract(self, tree: PyTree) -> PyTree:
    """ShapeDtypeStructs with the replicated sharding, for Orbax restores."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                       sharding=self.replicated), tree)


def setup(config: ml_collections.ConfigDict, num_classes: int) -> Run:
  model_config = resolve_model_config(config, num_classes)
  model = build_model(model_config, config.get('dtype', 'float32'))
  params = init_params(config, model_config, model)
  trainable, frozen = optim.split_params(params, config.trainable)
  if not jax.tree.leaves(trainable):
    raise ConfigError('No parameter matches config.trainable '
                      f'{json.loads(config.trainable.to_json())}: nothing would '
                      'train. Check the regexes against the parameter paths.')
  fp = checkpointing.fingerprint(frozen)
  mesh = make_mesh()
  run = Run(config, model_config, model, mesh, trainable, None, fp)
  run.frozen = run.replicate(frozen)
  return run


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def get_eval_data(config: ml_collections.ConfigDict, image_size: int | None = None):
  """The eval split in batches of config.eval_batch_size, clamped to the split.

  A batch larger than the split would only add padding (zero images, masked
  out), so a larger eval_batch_size evaluates the whole split in one batch,
  rounded up to a multiple of the device count: the accuracy is the same, and
  eval_batch_size=1000000 no longer allocates a million images. `image_size`:
  the model's, when it is not config.model's (an export's).
  """
  size = config.model.image_size if image_size is None else image_size
  data = get_data(config.data, config.data.eval_split, config.eval_batch_size,
                  image_size=size, train=False, seed=config.seed)
  n = jax.device_count()
  whole = -(-int(data.num_examples) // n) * n
  if data.batch_size > whole:
    logging.info('config.eval_batch_size = %d exceeds the %d images of split %r: '
                 'evaluating in batches of %d.', data.batch_size, data.num_examples,
                 config.data.eval_split, whole)
    data = get_data(config.data, config.data.eval_split, whole,
                    image_size=size, train=False, seed=config.seed)
  return data


# ----------------------------------------------------------------------------
# Restore for eval / export.
# ----------------------------------------------------------------------------


# What a two-stage evaluation (train without merging, deploy with merging, the
# paper's Table 16) may change: the merging only. The parameter tree is checked
# on top of that (`_two_stage_tree`), so e.g. trained PYRA generators cannot be
# dropped or reshaped by it.
TWO_STAGE_FIELDS = ('model.method', 'model.schedule')


def _stored_trainable_shapes(meta: dict, config: ml_collections.ConfigDict
                             ) -> PyTree:
  """Shapes of the trainable params a checkpoint holds, from its model config."""
  mc = ml_collections.ConfigDict(checkpointing.stored_model_config(meta['model_config']))
  model = build_model(mc, config.get('dtype', 'float32'))
  dummy = jax.ShapeDtypeStruct((1, mc.image_size, mc.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(
      lambda x: model.init({'params': jax.random.PRNGKey(0)}, x, train=False),
      dummy)['params']
  return optim.split_params(shapes, config.trainable)[0]


def _two_stage_tree(stored: PyTree, fresh: PyTree, meta: dict,
                    config: ml_collections.ConfigDict, directory: str
                    ) -> tuple[PyTree, list[str]]:
  """(the part of `fresh` the checkpoint fills, paths left at their init).

  Every trained parameter must exist with its shape in the evaluated model.
  Parameters only the evaluated model has (PYRA's generators on a PEFT or ToMe
  checkpoint) keep their fresh initialisation, where W_D = 0 makes PYRA equal
  ToMe.
  """
  flat_stored = traverse_util.flatten_dict(stored, sep='/')
  flat_fresh = traverse_util.flatten_dict(fresh, sep='/')
  lost = [k for k, v in flat_stored.items()
          if k not in flat_fresh or np.shape(flat_fresh[k]) != tuple(v.shape)]
  if lost:
    trained = meta['config']['model']
    raise checkpointing.CheckpointMismatchError(
        f'{directory} holds a checkpoint (step {meta.get("step")}) trained with '
        f'method {trained["method"]!r}, schedule {trained["schedule"]!r}, whose '
        f'trained parameters ({", ".join(lost[:3])}{", ..." if len(lost) > 3 else ""}) '
        f'do not fit method {config.model.method!r}, schedule '
        f'{config.model.schedule!r}: --two_stage may change only the merging, '
        'and only of a model trained without PYRA generators (e.g. peft -> tome '
        'or pyra); evaluate with the config it was trained with.')
  added = sorted(k for k in flat_fresh if k not in flat_stored)
  kept = {k: v for k, v in flat_fresh.items() if k in flat_stored}
  return traverse_util.unflatten_dict(kept, sep='/'), added


def restore_run(config: ml_collections.ConfigDict, workdir: str,
                step: int | None = None, *, two_stage: bool = False
                ) -> tuple[Run, PyTree, int]:
  """Rebuilds the model and restores the trainable params of `step` (or latest).

  The restored run must match `config` in the fields that define the
  parameters (model, trainable groups) and in the frozen weights. With
  `two_stage`, `config` may merge differently (TWO_STAGE_FIELDS) as long as
  every trained parameter fits; parameters the checkpoint lacks keep their
  initialisation. Without a `step`, a latest checkpoint that cannot be read
  falls back to the newest one that can, with a warning (nothing is moved:
  eval and export only read).
  """
  checks.check_workdir(workdir)
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    live = checkpointing.WorkdirLock(workdir).running_holder()
    if live:
      raise checkpointing.CheckpointUnreadableError(
          f'Training is in progress in {workdir} '
          f'({checkpointing.WorkdirLock.describe(live)}) and has not saved a '
          'checkpoint yet: rerun when it has.')
    raise checkpointing.CheckpointMismatchError(
        f'No checkpoints in {directory}: train first with --mode=train '
        f'--workdir={workdir}.')
  ckpt = checkpointing.Checkpointer(directory, read_only=True)
  runs = {}

  def read(s: int):
    meta = ckpt.restore_meta(s)
    _RESTORED_MODELS.clear()
    _RESTORED_MODELS[(os.path.abspath(directory), s)] = meta['config']['model']
    num_classes = meta['model_config']['num_classes']
    if num_classes not in runs:
      runs[num_classes] = setup(config, num_classes)
    run = runs[num_classes]
    try:
      checkpointing.check_compatible(
          meta, config, run.frozen_fingerprint, directory, for_eval=True,
          allow=TWO_STAGE_FIELDS if two_stage else ())
    except checkpointing.CheckpointMismatchError as e:
      if two_stage:
        raise
      # Only the merging differs: say how to evaluate these weights with it.
      checkpointing.check_compatible(meta, config, run.frozen_fingerprint,
                                     directory, for_eval=True,
                                     allow=TWO_STAGE_FIELDS)
      raise checkpointing.CheckpointMismatchError(
          f'{e} To evaluate these weights with this merging (two-stage), add '
          '--two_stage.') from None
    if not two_stage:
      return run, ckpt.restore_params(s, run.abstract(run.trainable))
    stored, added = _two_stage_tree(_stored_trainable_shapes(meta, config),
                                    run.trainable, meta, config, directory)
    trainable = ckpt.restore_params(s, run.abstract(stored))
    fresh = traverse_util.flatten_dict(run.trainable, sep='/')
    return run, optim.merge_params(
        run.replicate(traverse_util.unflatten_dict(
            {k: fresh[k] for k in added}, sep='/')), trainable)
  try:
    step, (run, trainable) = ckpt.restore_newest_readable(read, step)
  finally:
    ckpt.close()
  return run, trainable, step


# The `model` section of the checkpoint `restore_run` restored last, by
# (checkpoint folder, step): `checkpoint_model` right after a restore must not
# read the step again, since a training run live in the same workdir may have
# deleted it in between (keep_checkpoints).
_RESTORED_MODELS: dict[tuple[str, int], dict] = {}


def checkpoint_model(workdir: str, step: int) -> dict:
  """The `model` config section a checkpoint was trained with."""
  known = _RESTORED_MODELS.get((os.path.abspath(checkpoint_dir(workdir)), step))
  if known is not None:
    return known
  ckpt = checkpointing.Checkpointer(checkpoint_dir(workdir), read_only=True)
  try:
    return ckpt.restore_meta(step)['config']['model']
  finally:
    ckpt.close()
