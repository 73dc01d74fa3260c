"""Training checkpoints with Orbax, and the guard against resuming the wrong run.

A step directory `<workdir>/checkpoints/<step>/` holds three Orbax items:
  * `params`: the trainable params only (LoRA, PYRA, head: a few hundred KB for
    ViT-B); the frozen backbone is re-created from the pretrained weights on
    restore;
  * `opt_state`: the optimiser state (a separate item so eval/export need not
    rebuild the optimiser);
  * `meta` (JSON): the step, the config, the resolved model config, a
    fingerprint of the frozen params, the periodic evaluations so far and the
    training time so far. The data iterator position is the step itself (see
    `train.train_batches`).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete, so a run killed while saving leaves the previous step as the latest
and the half-written directory is ignored (and cleaned up).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Collection

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

PyTree = Any

# Config fields that may change between a run and its resumption without
# changing what is computed: logging, checkpoint cadence, eval batching and
# where the data lives.
RESUMABLE_FIELDS = frozenset({
    'log_every_steps', 'eval_every_epochs', 'checkpoint_every_steps',
    'keep_checkpoints', 'eval_batch_size', 'data.data_dir',
    'data.num_parallel_calls', 'model_init', 'benchmark_after_training',
})

# What must match to evaluate or export a checkpoint: the fields that decide what
# the stored parameters mean. Anything else (data split, lr, ...) may differ.
EVAL_PREFIXES = ('model.', 'trainable.', 'model_init_format',
                 'model_init_first_blocks')


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different run; the message says which fields differ."""


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """JSON-able dict of a config (tuples become lists, as after a JSON round trip)."""
  return json.loads(config.to_json_best_effort())


def fingerprint(tree: PyTree) -> str:
  """sha256 over the paths, shapes, dtypes and bytes of every leaf.

  Used to refuse resuming on top of different frozen weights (e.g. the file at
  `model_init` was replaced): the checkpoint alone could not detect it.
  """
  h = hashlib.sha256()
  flat = traverse_util.flatten_dict(jax.device_get(tree), sep='/')
  for path in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[path]))
    h.update(f'{path}|{a.dtype}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def with_defaults(saved: dict, defaults: dict) -> dict:
  """`saved` plus every field of `defaults` it lacks, recursively (no mutation).

  A config stored before a field existed ran with the behaviour that the
  field's default keeps (a new field defaults to the old behaviour), so the
  field counts as set to its default there: adding a config field must not
  make every earlier workdir or study run look like another run.
  """
  out = dict(saved)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = with_defaults(out[key], value)
  return out


@functools.lru_cache(maxsize=1)
def _base_defaults_json() -> str:
  from configs import common  # pylint: disable=g-import-not-at-top
  return common.get_base_config().to_json_best_effort()


def base_defaults() -> dict:
  """Every config field at its default (configs/common.py), as plain JSON types."""
  return json.loads(_base_defaults_json())


def config_differences(saved: dict, current: dict, *,
                       ignore=RESUMABLE_FIELDS,
                       only_prefixes: tuple[str, ...] | None = None) -> list[str]:
  """Lists 'field: saved -> current' for every differing field that counts."""
  a = traverse_util.flatten_dict(saved, sep='.') if saved else {}
  b = traverse_util.flatten_dict(current, sep='.') if current else {}
  out = []
  for key in sorted(set(a) | set(b)):
    if key in ignore:
      continue
    if only_prefixes is not None and not key.startswith(only_prefixes):
      continue
    va, vb = a.get(key, '<absent>'), b.get(key, '<absent>')
    if va != vb:
      out.append(f'{key}: {va!r} -> {vb!r}')
  return out


class Checkpointer:
  """A thin, synchronous wrapper of `ocp.CheckpointManager` for one workdir."""

  def __init__(self, directory: str, *, max_to_keep: int | None = None,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        # Synchronous: the state is a few MB and a save that returns is on disk,
        # which keeps "the last good checkpoint" simple to reason about.
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only)
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, params: PyTree, opt_state: PyTree,
           meta: dict) -> None:
    self._mgr.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._mgr.wait_until_finished()

  def restore_meta(self, step: int) -> dict:
    return self._mgr.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_params(self, step: int, abstract: PyTree) -> PyTree:
    """Restores the trainable params onto the shardings given in `abstract`."""
    return self._mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract))).params

  def restore_opt_state(self, step: int, abstract: PyTree) -> PyTree:
    return self._mgr.restore(step, args=ocp.args.Composite(
        opt_state=ocp.args.StandardRestore(abstract))).opt_state

  def close(self) -> None:
    self._mgr.close()


def check_compatible(meta: dict, config: ml_collections.ConfigDict,
                     frozen_fingerprint: str, directory: str, *,
                     for_eval: bool = False,
                     allow: Collection[str] = ()) -> None:
  """Raises CheckpointMismatchError unless `meta` was written by this run.

  To resume training every field must match except RESUMABLE_FIELDS; to
  evaluate or export only the fields that give the parameters their meaning.
  `allow` names further dotted fields (e.g. 'model.method') that the caller
  has decided may differ.
  """
  diffs = config_differences(
      with_defaults(meta.get('config', {}), base_defaults()), config_to_dict(config),
      ignore=RESUMABLE_FIELDS | frozenset(allow),
      only_prefixes=EVAL_PREFIXES if for_eval else None)
  if diffs:
    shown = '; '.join(diffs[:12]) + ('; ...' if len(diffs) > 12 else '')
    raise CheckpointMismatchError(
        f'{directory} holds a checkpoint (step {meta.get("step")}) of a run with a '
        f'different config ({shown}). Use a new --workdir, or rerun with the '
        'same config to resume.')
  if meta.get('frozen_fingerprint') not in (None, frozen_fingerprint):
    raise CheckpointMismatchError(
        f'{directory} holds a checkpoint trained on different frozen backbone '
        'weights than the ones loaded now (fingerprints differ): the file at '
        'config.model_init changed. Restore that file or use a new --workdir.')
