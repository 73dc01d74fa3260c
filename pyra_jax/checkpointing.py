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
    `training.loop.train_batches`).

Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when
complete, so a run killed while saving leaves the previous step as the latest
and the half-written directory is ignored (and cleaned up).

What else keeps a user's work (docs/reliability.md):
  * retention is ours, not Orbax's: the newest `keep` *verified* checkpoints stay,
    plus the one just written. A checkpoint is verified once the step after it
    computed a finite loss from its parameters, so after a divergence the
    checkpoint that produced the non-finite loss is set aside and an earlier,
    verified one is always still there to resume from;
  * a checkpoint that cannot be read (a truncated array file, an empty meta
    file) is set aside to `<workdir>/checkpoints_unreadable/<step>` and the
    newest one that restores is used, with a warning naming both steps;
  * a checkpoint this user may not read (its permissions) is not damage: the
    file is named and nothing moves or falls back (`first_unreadable`);
  * eval and export reading a workdir while its training saves and deletes
    checkpoints underneath them retry on the newest one instead of calling a
    vanished step damaged (`WorkdirLock.running_holder` names the run);
  * `WorkdirLock`: one training run per workdir at a time; `ResultsLock`: the
    read-modify-write of results.json by training and concurrent evaluations;
  * `check_compatible(..., allow=...)`: fields the user explicitly allows to
    change on resume (lr, clipping, epochs, ...; `--allow_config_change`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from typing import Any, Callable, Collection

from absl import logging

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from pyra_jax.errors import CheckpointMismatchError, CheckpointUnreadableError, WorkdirInUseError  # pylint: disable=unused-import

PyTree = Any

# Config fields that may change between a run and its resumption without
# changing what is computed: logging, checkpoint cadence, eval batching and
# where the data lives.
RESUMABLE_FIELDS = frozenset({
    'log_every_steps', 'eval_every_epochs', 'eval_epochs', 'headline',
    'checkpoint_every_steps',
    'keep_checkpoints', 'eval_batch_size', 'data.data_dir',
    'data.num_parallel_calls', 'model_init', 'benchmark_after_training',
    # How the same step is computed (same parameters, same update up to
    # round-off): a run may move to an accelerator that wants other values.
    'model.attention', 'grad_accum_steps',
    # Where PE-Dist's teacher lives (a moved folder): its weights are checked
    # by fingerprint on resume (training.loop._check_same_teacher).
    'distill.teacher_workdir', 'distill.teacher_export',
    # What `python -m pyra_jax.vtab` reads around the run, never the run itself.
    'vtab.pyra_lr_grid', 'vtab.backbone',
})

# What must match to evaluate or export a checkpoint: the fields that decide what
# the stored parameters mean. Anything else (data split, lr, ...) may differ.
EVAL_PREFIXES = ('model.', 'trainable.', 'model_init_format',
                 'model_init_first_blocks')


# Fields a user may change when resuming, but only when asking for it by name
# (`--allow_config_change=lr,grad_clip_norm`): they change how the remaining
# steps train, not what the saved parameters mean or which batch comes next,
# so the resumed run continues the same run with new hyperparameters. The
# change is recorded in metrics.jsonl and results.json.
CHANGEABLE_ON_REQUEST = frozenset({
    'lr', 'pyra_lr', 'diffrate_lr', 'min_lr', 'warmup_init_lr', 'warmup_epochs', 'num_epochs',
    'weight_decay', 'grad_clip_norm', 'b1', 'b2', 'eps',
})





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
  from pyra_jax.configs import common  # pylint: disable=g-import-not-at-top
  return common.get_base_config().to_json_best_effort()


def base_defaults() -> dict:
  """Every config field at its default (configs/common.py), as plain JSON types."""
  return json.loads(_base_defaults_json())


# Before the model fields that default to "unset" (None: from the variant or the
# task) were typed placeholders, configs wrote -1 for unset; stored runs keep it.
_LEGACY_UNSET = -1


def stored_model_config(saved_model: dict) -> dict:
  """A `model` section read back from a run, an export or a results file, in
  today's form: fields added since take their defaults, and the -1 that older
  runs stored for an unset field (width, num_classes, ...) becomes None."""
  defaults = base_defaults()['model']
  out = with_defaults(saved_model, defaults)
  return {k: None if (v == _LEGACY_UNSET and k in defaults and defaults[k] is None)
          else v for k, v in out.items()}


# The default `trainable.lora_head` before the PEFT modules other than LoRA
# existed. In every model of that time it selects exactly what today's default
# selects (there were no adapter/convpass/... scopes), so it reads as today's.
_LEGACY_LORA_HEAD = r'(.*/lora/.*|^head.*)'


# DiffRate searches stored before the rate logits had their own lr group ran
# them at the base lr, which is what -1 in `diffrate_lr` means (today's default
# is 0.1). Only searches have those logits: any other older run reads as
# today's default, so adding the field changes nothing for it.
_LEGACY_DIFFRATE_LR = -1.0


def stored_config(saved: dict) -> dict:
  """A whole stored config in today's form (see `stored_model_config`)."""
  defaults = base_defaults()
  if (isinstance(saved, dict) and 'diffrate_lr' not in saved
      and isinstance(saved.get('model'), dict) and saved['model'].get('diffrate_search')):
    saved = dict(saved, diffrate_lr=_LEGACY_DIFFRATE_LR)
  out = with_defaults(saved, defaults)
  if isinstance(out.get('model'), dict):
    out['model'] = stored_model_config(out['model'])
  trainable = out.get('trainable')
  if isinstance(trainable, dict) and trainable.get('lora_head') == _LEGACY_LORA_HEAD:
    out['trainable'] = dict(trainable, lora_head=defaults['trainable']['lora_head'])
  return out


def changed_fields(saved: dict, current: dict, *,
                   ignore: Collection[str] = RESUMABLE_FIELDS,
                   only_prefixes: tuple[str, ...] | None = None
                   ) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, current value)} for every differing field that counts."""
  a = traverse_util.flatten_dict(saved, sep='.') if saved else {}
  b = traverse_util.flatten_dict(current, sep='.') if current else {}
  out = {}
  for key in sorted(set(a) | set(b)):
    if key in ignore:
      continue
    if only_prefixes is not None and not key.startswith(only_prefixes):
      continue
    va, vb = a.get(key, '<absent>'), b.get(key, '<absent>')
    if va != vb:
      out[key] = (va, vb)
  return out


class Checkpointer:
  """A synchronous `ocp.CheckpointManager` for one workdir, with our retention.

  Orbax's own `max_to_keep` would delete the previous checkpoint as soon as a
  new one is written, before anything has shown that the new parameters are
  any good. Here a step is *verified* once the training step after it computed
  a finite loss from its parameters (`mark_verified`), and `save` deletes only
  verified checkpoints beyond the newest `keep` of them: whatever happens next,
  a checkpoint known to be good stays on disk.
  """

  def __init__(self, directory: str, *, keep: int | None = None,
               read_only: bool = False):
    if keep is not None and keep < 1:
      raise ValueError(f'keep = {keep}: at least the latest checkpoint is kept.')
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=not read_only, read_only=read_only,
        # Synchronous: the state is a few MB and a save that returns is on disk,
        # which keeps "the last good checkpoint" simple to reason about.
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only)
    self._mgr = ocp.CheckpointManager(self.directory, options=options)
    # What is on disk was written under this retention rule: every step but
    # the newest was followed by a finite loss (or is older still).
    self._verified = set(self.all_steps()[:-1])

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def is_verified(self, step: int) -> bool:
    return int(step) in self._verified

  def mark_verified(self, step: int) -> None:
    """The parameters saved at `step` produced a finite loss: keep them."""
    self._verified.add(int(step))

  def save(self, step: int, params: PyTree, opt_state: PyTree,
           meta: dict) -> None:
    """Writes `step` and prunes; a Ctrl-C meanwhile takes effect once it is done."""
    with interrupts_deferred():
      self._mgr.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave(meta)), force=True)
      self._mgr.wait_until_finished()
      self._prune()

  def _prune(self) -> None:
    if self.keep is None:
      return
    verified = [s for s in self.all_steps() if s in self._verified]
    for old in verified[:-self.keep]:
      self._mgr.delete(old)
      self._verified.discard(old)

  def finish(self) -> None:
    """The run ended: its last checkpoint is the result, so it counts as good."""
    latest = self.latest_step()
    if latest is not None:
      self.mark_verified(latest)
      self._prune()

  def set_aside(self, step: int, reason: str) -> str:
    """Moves `<step>/` to `<workdir>/checkpoints_<reason>/<step>` (never deletes).

    Orbax then no longer sees the step, so a resume takes the newest one left,
    and the moved files stay for the user to inspect.
    """
    src = os.path.join(self.directory, str(step))
    dest_root = f'{self.directory}_{reason}'
    os.makedirs(dest_root, exist_ok=True)
    dest = os.path.join(dest_root, str(step))
    if os.path.exists(dest):
      dest = f'{dest}.{int(time.time())}'
    # Several processes share the workdir: one moves, all wait for it.
    if jax.process_index() == 0:
      shutil.move(src, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'pyra_jax set_aside {step}')
    self._mgr.reload()
    self._verified.discard(step)
    return dest

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  @contextlib.contextmanager
  def _reading(self, step: int):
    """Turns whatever reading a step's files raises into CheckpointDamaged,
    except a permission problem, which stops with the file named.

    Truncated tensorstore chunks, an empty JSON file or a missing item surface
    as many different exception types from deep inside Orbax; they all mean the
    same thing to a user, so they become one type that the fallback catches.
    A file this user may not read is not damaged: setting it aside or falling
    back to an older step would lose work over a `chmod`, so it ends the
    command (`CheckpointUnreadableError`, which no fallback catches).
    """
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      denied = permission_denied(e) or first_unreadable(self.step_dir(step))
      if denied:
        raise CheckpointUnreadableError(
            f'{denied} cannot be read (permission denied), so checkpoint step '
            f'{step} in {self.directory} cannot be restored; it is not damaged and '
            'nothing was moved or changed: give this user read access (e.g. '
            f'chmod -R u+rwX {self.step_dir(step)}) and rerun the same command.'
        ) from None
      raise CheckpointDamaged(_short(e)) from e

  def restore_meta(self, step: int) -> dict:
    with self._reading(step):
      meta = self._mgr.restore(
          step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      if not isinstance(meta, dict) or 'step' not in meta:
        raise ValueError('its meta item is empty or not written by pyra_jax')
    return meta

  def restore_params(self, step: int, abstract: PyTree) -> PyTree:
    """Restores the trainable params onto the shardings given in `abstract`."""
    with self._reading(step):
      return self._mgr.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract))).params

  def restore_opt_state(self, step: int, abstract: PyTree) -> PyTree:
    with self._reading(step):
      return self._mgr.restore(step, args=ocp.args.Composite(
          opt_state=ocp.args.StandardRestore(abstract))).opt_state

  def training_elsewhere(self) -> dict | None:
    """The lock record of a training run live in this workdir, if another
    process holds it (a reader's view: eval, export, a teacher)."""
    if not self.read_only:
      return None  # We are the training run.
    return WorkdirLock(os.path.dirname(self.directory)).running_holder()

  def _vanished(self, step: int) -> bool:
    """Whether `step` is gone since it was listed (deleted by the run training here)."""
    self._mgr.reload()
    return step not in self.all_steps()

  def restore_newest_readable(
      self, read: Callable[[int], Any], step: int | None = None
  ) -> tuple[int, Any]:
    """(step, read(step)) for `step`, or else the newest step that reads.

    `read` restores whatever the caller needs from one step with the
    `restore_*` methods, which raise `CheckpointDamaged` when the files cannot
    be read. Without an explicit `step`, a damaged step is skipped with a
    warning naming it and the step used instead (and, unless read-only, set
    aside to `checkpoints_unreadable/`). Any other error (a config mismatch,
    missing pretrained weights, a file without read permission) is the user's
    to fix and goes through.

    A reader (eval, export) may run while training goes on in the same
    workdir, which saves new steps and deletes old ones (keep_checkpoints)
    underneath it. A step that vanished while being read, or fails while that
    run is live, is not damage: the newest step is listed again and read
    (`_CONCURRENT_RETRIES` times at most, then one sentence naming the run),
    and a note says which step of the running training was used.
    """
    live = self.training_elsewhere()
    steps = self.all_steps()
    if not steps:
      if live:
        raise CheckpointUnreadableError(
            f'{_describe_training(self.directory, live)} and has not saved a '
            'checkpoint yet: rerun when it has (every config.checkpoint_every_steps '
            'steps, and at the end).')
      raise CheckpointUnreadableError(
          f'No finished checkpoint in {self.directory}: train first.')
    if step is not None:
      if step not in steps:
        raise CheckpointUnreadableError(
            f'No checkpoint for step {step} in {self.directory}; available: {steps}'
            + (f' ({_describe_training(self.directory, live)})' if live else '') + '.')
      try:
        return step, read(step)
      except CheckpointDamaged as e:
        if self._vanished(step):
          live = self.training_elsewhere() or live
          raise CheckpointUnreadableError(
              f'Checkpoint step {step} in {self.directory} was deleted while it '
              'was being read' + (f' ({_describe_training(self.directory, live)}, '
                                  'keeping only its newest checkpoints)' if live else '')
              + f'; available now: {self.all_steps() or "none"}.') from None
        raise CheckpointUnreadableError(
            f'Checkpoint step {step} in {self.directory} cannot be read '
            f'({_short(e)}): its files are damaged. Other steps: '
            f'{[s for s in steps if s != step] or "none"}.') from None
    failed: list[tuple[int, str]] = []
    attempts: dict[int, int] = {}
    concurrent = 0
    while True:
      candidates = [s for s in reversed(self.all_steps())
                    if s not in {f for f, _ in failed}]
      if not candidates:
        break
      candidate = candidates[0]
      try:
        value = read(candidate)
      except CheckpointDamaged as e:
        live = self.training_elsewhere() or live
        attempts[candidate] = attempts.get(candidate, 0) + 1
        if self._vanished(candidate) or (live and attempts[candidate] < 3):
          # Replaced by the running training (or being deleted by it): read
          # the newest one again, after a moment.
          concurrent += 1
          if concurrent > _CONCURRENT_RETRIES:
            raise CheckpointUnreadableError(
                f'{_describe_training(self.directory, live)}, and it replaced '
                f'each checkpoint in {self.directory} while it was being read '
                f'({concurrent} tries): rerun when it has finished, or give '
                '--checkpoint_step of a checkpoint it keeps.') from None
          time.sleep(0.2)
          continue
        failed.append((candidate, _short(e)))
        where = ''
        if not self.read_only:
          where = f'; moved to {self.set_aside(candidate, "unreadable")}'
        logging.warning('Checkpoint step %d in %s cannot be read (%s)%s.',
                        candidate, self.directory, _short(e), where)
        continue
      if failed:
        msg = (f'Warning: checkpoint step {failed[0][0]} in {self.directory} cannot '
               f'be read ({failed[0][1]}); using step {candidate}, the newest '
               'that restores' + (f' (also unreadable: '
                                  f'{[f for f, _ in failed[1:]]})' if failed[1:] else '')
               + ('; the damaged files were moved to '
                  f'{self.directory}_unreadable/.' if not self.read_only else '.'))
        print(msg, flush=True)
        logging.warning('%s', msg)
      live = self.training_elsewhere() or live
      if live:
        print(f'Note: {_describe_training(self.directory, live)}: using its newest '
              f'checkpoint, step {candidate}.', flush=True)
      return candidate, value
    if not failed:  # Every step vanished underneath us and nothing is left.
      raise CheckpointUnreadableError(
          f'The checkpoints in {self.directory} were deleted while being read'
          + (f' ({_describe_training(self.directory, live)})' if live else '')
          + ': rerun the same command.')
    raise CheckpointUnreadableError(
        f'No checkpoint in {self.directory} can be read (steps '
        f'{[f for f, _ in failed]}: {failed[0][1]})'
        + (f'; they were moved to {self.directory}_unreadable/' if not self.read_only else '')
        + '. Train again in a new --workdir, or restore the files from a backup.')

  def close(self) -> None:
    self._mgr.close()


# How often a reader re-lists and retries when the training running in the
# same workdir deletes the checkpoint it is reading (0.2 s apart).
_CONCURRENT_RETRIES = 50


def _describe_training(directory: str, holder: dict) -> str:
  """'training is in progress in W (pid P on H, running since T)'."""
  return (f'Training is in progress in {os.path.dirname(directory)} '
          f'({WorkdirLock.describe(holder)})')


@contextlib.contextmanager
def interrupts_deferred():
  """Holds back SIGINT (Ctrl-C) until the block is done, then delivers it.

  A KeyboardInterrupt in the middle of a save would leave Orbax's writer
  threads running against an event loop that is being torn down (tracebacks
  at exit) and the step half written; a save takes a second or two, so the
  interrupt waits for it and the run stops on a complete checkpoint. Any
  Orbax save of ours (an export too) can be wrapped in it.
  Only the main thread can own signal handlers; elsewhere nothing changes.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  received = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
  if received and callable(previous):
    previous(signal.SIGINT, None)


class CheckpointDamaged(Exception):
  """Orbax could not read a step's files; `str()` says what it hit."""


_DENIED = (errno.EACCES, errno.EPERM)


def permission_denied(e: BaseException) -> str | None:
  """The path of a PermissionError in `e`'s chain of causes, if there is one."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _DENIED:
      return str(e.filename) if e.filename else None
    e = e.__cause__ or e.__context__
  return None


def first_unreadable(path: str) -> str | None:
  """The first file or folder under `path` this process may not read, if any.

  Tried by reading, not with `os.access`: a root process may be denied by an
  ACL or a missing capability that `os.access` does not see, and a file
  system mounted without permissions says so only when read.
  """
  try:
    names = sorted(os.listdir(path))
  except OSError as e:
    return path if e.errno in _DENIED else None
  for name in names:
    child = os.path.join(path, name)
    try:
      is_dir = os.path.isdir(child)
      if is_dir:
        found = first_unreadable(child)
        if found:
          return found
      else:
        with open(child, 'rb') as f:
          f.read(1)
    except OSError as e:
      if e.errno in _DENIED:
        return child
  return None


def _short(e: BaseException) -> str:
  """The first line of an exception, for one-sentence messages."""
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0][:160]}' if text else type(e).__name__


def check_compatible(meta: dict, config: ml_collections.ConfigDict,
                     frozen_fingerprint: str, directory: str, *,
                     for_eval: bool = False,
                     allow: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
  """Raises CheckpointMismatchError unless `meta` was written by this run.

  To resume training every field must match except RESUMABLE_FIELDS and the
  fields in `allow`; to evaluate or export, only the fields that give the
  parameters their meaning (and those in `allow`). `allow` names dotted fields
  the user or the caller decided may differ: `--allow_config_change` on resume,
  the merging fields for a two-stage evaluation. Returns the allowed fields
  that did change, {field: (saved, current)}, for the record.
  """
  changed = changed_fields(
      stored_config(meta.get('config', {})), config_to_dict(config),
      only_prefixes=EVAL_PREFIXES if for_eval else None)
  allowed = {k: v for k, v in changed.items() if k in allow}
  refused = [f'{k}: {va!r} -> {vb!r}' for k, (va, vb) in changed.items()
             if k not in allow]
  if refused:
    shown = '; '.join(refused[:12]) + ('; ...' if len(refused) > 12 else '')
    changeable = [k for k in changed if k in CHANGEABLE_ON_REQUEST]
    hint = ''
    if not for_eval and changeable:
      hint = (' To continue this run with the new '
              f'{", ".join(changeable)}, add --allow_config_change='
              f'{",".join(changeable)}.')
    raise CheckpointMismatchError(
        f'{directory} holds a checkpoint (step {meta.get("step")}) of a run with a '
        f'different config ({shown}). Use a new --workdir, or rerun with the '
        f'same config to resume.{hint}')
  if meta.get('frozen_fingerprint') not in (None, frozen_fingerprint):
    saved = meta.get('config', {})
    from pyra_jax.checkpoints import RANDOM_INIT  # pylint: disable=g-import-not-at-top
    if config.model_init in ('', RANDOM_INIT):
      seeds = (f' (config.seed: {saved.get("seed")!r} -> {config.seed!r})'
               if saved.get('seed') != config.seed else '')
      raise CheckpointMismatchError(
          f'{directory} holds a checkpoint trained on a different random frozen '
          f'backbone than the one built now{seeds}: with config.model_init = '
          f'{config.model_init!r} the backbone comes from config.seed. Use the '
          "run's seed, or a new --workdir.")
    raise CheckpointMismatchError(
        f'{directory} holds a checkpoint trained on different frozen backbone '
        'weights than the ones loaded now (fingerprints differ): the file at '
        f'config.model_init ({config.model_init}) changed. Restore that file or '
        'use a new --workdir.')
  return allowed


def check_allowed_changes(allow: Collection[str]) -> None:
  """Refuses `--allow_config_change` names that are not CHANGEABLE_ON_REQUEST."""
  bad = sorted(set(allow) - CHANGEABLE_ON_REQUEST)
  if bad:
    raise CheckpointMismatchError(
        f'--allow_config_change: {", ".join(bad)} cannot change within a run '
        '(it would change what the saved parameters mean or which batch comes '
        f'next); fields that can: {", ".join(sorted(CHANGEABLE_ON_REQUEST))}. '
        'Use a new --workdir for the other changes.')


# ----------------------------------------------------------------------------
# One run per workdir.
# ----------------------------------------------------------------------------

class WorkdirLock:
  """An exclusive `flock` on `<workdir>/.lock`, held while a run trains there.

  The kernel drops a flock when its process dies, however it dies (SIGKILL
  included), so a dead run's lock is taken over by the next run with no
  stale-lock cleanup; the file keeps the holder's pid, host and start time so
  the refusal can name them.
  """

  FILENAME = '.lock'

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), self.FILENAME)
    self._fd: int | None = None

  def holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or '{}')
    except (OSError, ValueError):
      return {}

  @staticmethod
  def describe(holder: dict) -> str:
    """'pid P on H, running since T' from a lock record."""
    if not holder:
      return 'another process'
    return (f'pid {holder.get("pid")} on {holder.get("host")}, running since '
            f'{holder.get("started")}')

  def running_holder(self) -> dict | None:
    """The holder's record if another live process holds the lock now, else None.

    Read without taking the lock: even a moment's shared lock taken by a
    reader (eval, export) could make a training run starting at that moment
    refuse the workdir. On Linux the kernel's table of locks (/proc/locks)
    says whether anyone holds this file's flock; elsewhere the recorded pid
    is checked for being alive on this host.
    """
    try:
      st = os.stat(self.path)
    except OSError:
      return None
    holder = self.holder()
    pids = _flock_holders(st)
    if pids is None:
      pid = holder.get('pid')
      if not isinstance(pid, int) or holder.get('host') != socket.gethostname():
        return None
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        return None
      except OSError:
        pass  # Alive, someone else's.
      pids = {pid}
    pids.discard(os.getpid())
    return (holder or {'pid': min(pids)}) if pids else None

  def acquire(self) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirInUseError(
          f'{os.path.dirname(self.path)} is in use by another run '
          f'({self.describe(self.holder())}): two '
          'runs in one workdir would overwrite each other\'s checkpoints and '
          'results. Wait for it to finish (or stop it), or use another --workdir.'
      ) from None
    previous = self.holder()
    if previous.get('pid') and previous.get('pid') != os.getpid():
      logging.info('Taking over the lock of %s left by pid %s on %s (no longer running).',
                   self.path, previous.get('pid'), previous.get('host'))
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        'pid': os.getpid(), 'host': socket.gethostname(),
        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}).encode())
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _flock_holders(st: os.stat_result) -> set[int] | None:
  """Pids holding a flock on the file of `st` (Linux's /proc/locks), or None
  where that table does not exist."""
  try:
    with open('/proc/locks') as f:
      lines = f.readlines()
  except OSError:
    return None
  dev = f'{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}'
  pids = set()
  for line in lines:
    # '1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF'; waiters have '->'.
    fields = line.split()
    if len(fields) >= 6 and fields[1] == 'FLOCK' and fields[5] == dev:
      try:
        pids.add(int(fields[4]))
      except ValueError:
        pass
  return pids


class ResultsLock:
  """An exclusive flock on `<workdir>/.results.lock` for one update of results.json.

  results.json is read, changed and written back by the training run (its
  final write) and by every `--mode=eval --two_stage` (its entry): without a
  lock, two of them at once each write what they read plus their own part,
  and one part is lost. This lock is separate from `WorkdirLock` on purpose:
  that one is held by a training run for its whole length and refuses a
  second holder, while this one is held for the milliseconds of one
  read-modify-write and waits, so evaluations neither wait for a training
  run nor disturb its lock. A holder that does not let go within `timeout`
  seconds (a stopped process) ends the wait in one sentence.
  """

  FILENAME = '.results.lock'

  def __init__(self, workdir: str, timeout: float = 120.0):
    self.path = os.path.join(os.path.abspath(workdir), self.FILENAME)
    self.timeout = timeout
    self._fd: int | None = None

  def __enter__(self) -> 'ResultsLock':
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline, told = time.time() + self.timeout, False
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          os.close(fd)
          raise
      if not told:
        print(f'waiting for another process to finish updating '
              f'{os.path.dirname(self.path)}/results.json ...', flush=True)
        told = True
      if time.time() > deadline:
        os.close(fd)
        raise WorkdirInUseError(
            f'Another process has held {self.path} for over {self.timeout:.0f} s '
            'while updating results.json (stopped?): let it finish or end it, '
            'then rerun the same command.')
      time.sleep(0.05)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
