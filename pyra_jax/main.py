r"""Train, evaluate or export a PYRA model: `python -m pyra_jax.main`.

  python -m pyra_jax.main --config=configs/vitb_high.py:task=dtd \
      --config.model_init=/path/ViT-B_16.npz --workdir=/tmp/vitb_high_dtd
  python -m pyra_jax.main --config=... --workdir=... --mode=eval [--checkpoint_step=N]
  python -m pyra_jax.main --config=... --workdir=... --mode=export [--export_dir=DIR]
  python -m pyra_jax.main --config=... --mode=eval --export_dir=DIR
  python -m pyra_jax.main --config=<setting>:method=tome --workdir=<peft run> \
      --mode=eval --two_stage      # trained without merging, evaluated with it
  python -m pyra_jax.main --config=<setting>:method=diffrate --workdir=S \
      --mode=search                # DiffRate: search rates -> S/diffrate_rates.json
  python -m pyra_jax.main --config=<setting>:method=diffrate --workdir=W \
      --config.model.diffrate_rates=S/diffrate_rates.json   # train with them

The text after ':' in --config is the setting's argument, a comma-separated
list of key=value pairs (configs/paper.py documents the keys: task, method,
modulation, pyra_lr, lr, source, data_dir, init, teacher, teacher_export,
recipe: `recipe=authors_code` trains as the authors' code did, docs/algorithm.md §8). Any
config field can then be overridden with --config.<field>=<value>; `--helpfull`
lists every field.

Training resumes from the latest checkpoint in --workdir when there is one;
on a finished run it prints the recorded results and changes nothing.
Problems a user can fix (a bad config, missing data or weights, a workdir of
another run, a diverging loss) end the program with one clear message and a
non-zero exit status, without a traceback; so do the machine's (a full disk,
permissions, a read-only file system, a name too long: `environment_error`)
and Ctrl-C (exit status 130).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pyra_jax import cli
from pyra_jax import config_docs
from pyra_jax import configs
from pyra_jax import errors
from pyra_jax import recipe
from pyra_jax.cli import check_overrides, load_config  # pylint: disable=unused-import
from pyra_jax.errors import UsageError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'A setting file, e.g. configs/vitb_high.py or configs/vitb_high.py:task=dtd,'
    'method=tome. Override fields with --config.<field>=<value>.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, metrics.jsonl, TensorBoard logs and '
    'results.json go (one run per workdir; training resumes from it).')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'eval', 'export', 'search'],
    'train: train (or resume) then evaluate; eval: test accuracy of a saved '
    'checkpoint (or of --export_dir); export: write the deployable checkpoint '
    'with LoRA folded in; search: DiffRate\'s rate search (method=diffrate), '
    'resumable like train, writing <workdir>/diffrate_rates.json.')
_CHECKPOINT_STEP = flags.DEFINE_integer(
    'checkpoint_step', None, 'eval/export: the checkpoint step to use '
    '(default: the latest).')
_EXPORT_DIR = flags.DEFINE_string(
    'export_dir', None, 'export: where to write (default <workdir>/export). '
    'eval: evaluate this exported model instead of a training checkpoint.')
_FORMAT = flags.DEFINE_enum(
    'format', 'orbax', ['orbax', 'stablehlo'], 'export: orbax, the checkpoint '
    'pyra_jax reads back (eval, benchmark, teacher); stablehlo, the model '
    'compiled with jax.export for any batch size, run with jax, numpy and '
    'safetensors alone (docs/deploy.md). Both write params.safetensors and '
    'card.json beside it.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_list(
    'allow_config_change', [], 'train: resume a workdir whose checkpoint was '
    'written with other values of these fields (comma-separated, e.g. '
    'lr,grad_clip_norm after a divergence). Only optimisation fields may change '
    '(lr, pyra_lr, min_lr, warmup_init_lr, warmup_epochs, num_epochs, '
    'weight_decay, grad_clip_norm, b1, b2, eps); each change is recorded in '
    'metrics.jsonl and results.json.')
_TWO_STAGE = flags.DEFINE_bool(
    'two_stage', False, 'eval/export: use the trained weights with this '
    "config's merging (model.method, model.schedule), which may differ from "
    "the training run's if every trained parameter fits: the paper's two-stage "
    'baseline (train peft, deploy with tome; pyra adds generators at their '
    'initialisation, where PYRA equals ToMe). eval records the result in '
    "the workdir's results.json under 'two_stage'.")
_MULTIHOST = flags.DEFINE_bool(
    'multihost', False, 'Run as one of several processes (one per host, or '
    'several on one machine): calls jax.distributed.initialize(). On SLURM, '
    'Open MPI or Cloud TPU the three flags below are detected; elsewhere give '
    'them (or the environment variables JAX_COORDINATOR_ADDRESS, '
    'JAX_NUM_PROCESSES, JAX_PROCESS_ID). Also done automatically when such an '
    'environment with several processes is detected. Every process runs the '
    'same command with the same config and --workdir (docs/usage.md, "Multi-host").')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, '--multihost: host:port of process 0, where '
    'the coordinator listens (the same on every process), e.g. localhost:12345 '
    'for processes on one machine.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, '--multihost: how many processes the job has.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, '--multihost: this process\'s index, 0 .. '
    'num_processes - 1 (0 holds the workdir lock and writes metrics and results).')

_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout', 300, 'Multi-process runs: seconds to wait for all '
    'processes to join at the coordinator before ending with a message '
    '(a missing process, a wrong --coordinator_address).')

_HELP_FLAGS = cli.HELP_FLAGS



# ----------------------------------------------------------------------------
# Config documentation, for --helpfull.
# ----------------------------------------------------------------------------

def field_docs(source: str | None = None) -> dict[str, str]:
  """Maps 'config.a.b' to the comment that documents it in configs/common.py
  (pyra_jax.config_docs, which docs/configs.md is generated from too)."""
  return config_docs.field_docs(source)


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v:
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _type_name(config, key: str, value) -> str:
  """The field's type; for an unset typed field (a placeholder, None) the type
  an override must have, so `--config.model.width=384` reads as allowed."""
  if value is not None:
    return type(value).__name__
  *parents, leaf = key.split('.')
  node = config
  for name in parents:
    node = node[name]
  try:
    return f'{node.get_ref(leaf).get_type().__name__}, unset'
  except (AttributeError, KeyError, TypeError):
    return type(value).__name__


def config_help(config, docs: dict[str, str]) -> str:
  """Every config field: name, this setting's value, type and doc, by section."""
  flat = _flatten(config.to_dict())
  out = ['', 'Config fields (override any with --config.<field>=<value>; the values '
         "are this setting's):"]
  section = None
  for key in sorted(flat, key=lambda k: (k.count('.'), k)):
    parent = key.rsplit('.', 1)[0] if '.' in key else None
    if parent != section:
      section = parent
      doc = docs.get(f'config.{parent}', '')
      out.append(f'\n config.{parent}.*' + (f': {doc}' if doc else ''))
    value = flat[key]
    out.append(f'  --config.{key}={value!r}  ({_type_name(config, key, value)})')
    doc = docs.get(f'config.{key}')
    if doc:
      out.append(f'      {doc}')
  return '\n'.join(out) + '\n'


# ----------------------------------------------------------------------------
# Command-line parsing with clear errors.
# ----------------------------------------------------------------------------

def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, plus config help and one-line errors.

  A packaged setting may be named instead of given as a file
  (`--config=vitb_high:task=dtd`, `configs.resolve`).
  """
  configs.resolve_argv(argv)
  configs.resolve_argv(sys.argv)
  cli.quiet_libraries(not cli.verbosity_given(argv))
  spec = cli.config_arg(argv)
  try:
    config = load_config(spec) if spec else None
    if config is not None and not any(a in _HELP_FLAGS for a in argv):
      check_overrides(config, argv)
  except UsageError as e:
    if not any(a in _HELP_FLAGS for a in argv):
      _fail(str(e), 2)
    config = None
  if any(a in _HELP_FLAGS for a in argv):
    try:
      flags.FLAGS(argv)
    except SystemExit:  # absl's help flags exit 1: asking for help is no error.
      if config is not None:
        print(config_help(config, field_docs()))
      else:
        print('\nGive --config=configs/<setting>.py to list its config fields.')
      sys.exit(0)
  return cli.parse_global(argv)


_fail = cli.fail
_is_user_error = cli.is_user_error


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, '')
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UsageError(f'The environment variable {name}={value!r} is not an '
                     'integer: set it to a whole number or unset it.') from None


def distributed_args() -> dict | None:
  """jax.distributed.initialize's arguments from the flags and environment.

  None when this is a single-process run. Flags win over the environment
  variables; what neither gives is left to JAX's cluster detection (SLURM,
  Open MPI, Cloud TPU).
  """
  env = os.environ
  args = {'coordinator_address': _COORDINATOR.value or env.get('JAX_COORDINATOR_ADDRESS'),
          'num_processes': (_NUM_PROCESSES.value if _NUM_PROCESSES.value is not None
                            else _env_int('JAX_NUM_PROCESSES')),
          'process_id': (_PROCESS_ID.value if _PROCESS_ID.value is not None
                         else _env_int('JAX_PROCESS_ID'))}
  given = {k: v for k, v in args.items() if v is not None}
  several = any(int(env.get(k, '1') or '1') > 1 for k in
                ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))
  if not (_MULTIHOST.value or several or given):
    return None
  n, i = args['num_processes'], args['process_id']
  # A coordinator address alone may be completed by JAX's cluster detection;
  # a process count or index without the rest cannot be.
  if (n is not None or i is not None) and len(given) < 3 and not several:
    missing = [f'--{k}' for k, v in args.items() if v is None]
    raise UsageError(
        f'A multi-process run needs --coordinator_address, --num_processes and '
        f'--process_id together; missing {", ".join(missing)} (or run under '
        'SLURM / Open MPI, which provide them).')
  if n is not None and n < 1:
    raise UsageError(f'--num_processes={n}: give the number of processes (>= 1).')
  if n is not None and i is not None and not 0 <= i < n:
    raise UsageError(f'--process_id={i} is not in 0 .. {n - 1}: number the '
                     f'{n} processes from 0.')
  if args['coordinator_address'] is not None and ':' not in args['coordinator_address']:
    raise UsageError(f'--coordinator_address={args["coordinator_address"]!r} has '
                     'no port: give host:port, e.g. localhost:12345.')
  return given


def _maybe_init_distributed() -> None:
  """jax.distributed.initialize, waiting at most --distributed_timeout seconds.

  JAX's own timeout ends the process with a C++ abort (SIGABRT, a stack
  dump) after 5 minutes of silence. Here the wait is announced, and a
  watchdog ends it after the stated time with one sentence; JAX's timeout is
  set past the watchdog's, so the watchdog always speaks first.
  """
  args = distributed_args()
  if args is None:
    return
  timeout = _DISTRIBUTED_TIMEOUT.value
  if timeout < 1:
    raise UsageError(f'--distributed_timeout={timeout}: give the seconds to wait '
                     'for the other processes (>= 1).')
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on CPU hosts (the gradient all-reduce) go
  # through Gloo over TCP; GPUs and TPUs use their own (NCCL, ICI) and ignore
  # this. It must be set before the first JAX computation creates the backend.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  n = args.get('num_processes', 'all')
  where = args.get('coordinator_address', 'the detected coordinator')
  print(f'waiting for {n} processes at {where} (up to {timeout} s, '
        '--distributed_timeout) ...', flush=True)

  def give_up() -> None:
    print(f'Error: not all {n} processes joined at {where} within {timeout} s '
          '(--distributed_timeout): start every process with the same '
          '--coordinator_address and --num_processes (process 0 listens there), '
          'or wait longer with a larger --distributed_timeout.',
          file=sys.stderr, flush=True)
    os._exit(1)  # pylint: disable=protected-access
  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**args, initialization_timeout=timeout + 60)
  finally:
    watchdog.cancel()
  logging.info('Process %d of %d (%d local of %d devices).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class _QuietOrbax:
  """Drops Orbax's INFO chatter (a dozen lines per save); keeps its warnings.

  Also drops the traceback Orbax logs from its writer thread when a save
  fails for a reason of the machine (a full disk): the same error reaches
  `main`, which says it once in a sentence.
  """

  def filter(self, record) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.exc_info and environment_error(record.exc_info[1]):
      return False
    return record.levelno >= 30


# errno values that are the machine's state, not a bug: each gets a sentence.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_FULL_TEXT = ('No space left on device', 'Disk quota exceeded', 'File too large')
_DENIED = (errno.EACCES, errno.EPERM)


def _os_error_in(e: BaseException | None) -> OSError | None:
  """The first OSError in `e`'s chain of causes (Orbax and tensorstore wrap them)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno is not None:
      return e
    e = e.__cause__ or e.__context__
  return None


def environment_error(e: BaseException | None) -> str | None:
  """One sentence for an error of the machine (disk full, permissions, a
  read-only file system, a name too long), or None for anything else.

  These reach `main` as raw OSErrors from deep inside a write (Orbax,
  tensorstore, TensorBoard, json); they are never bugs, and the user's fix
  is outside the program, so each says what happened to which file and
  what to do. What was saved before stays: checkpoints are written to a
  temporary folder and renamed when complete, results.json atomically.
  """
  os_error = _os_error_in(e)
  text = str(e) if e is not None else ''
  if os_error is None:
    if not any(t in text for t in _DISK_FULL_TEXT):
      return None
    code, what, path = errno.ENOSPC, text.strip().splitlines()[0][:200], None
  else:
    code, what, path = os_error.errno, os_error.strerror, os_error.filename
  where = f' {path}' if path else ''
  if code in _DISK_FULL or any(t in text for t in _DISK_FULL_TEXT):
    return (f'disk full: cannot write{where} ({what}); free some space (or raise '
            'the file-size limit) and rerun the same command: a run resumes from '
            'its last complete checkpoint, which this did not touch.')
  if code in _DENIED:
    return (f'permission denied:{where} cannot be read or written by this user '
            f'({what}); change its permissions or choose another path '
            '(--workdir, --export_dir).')
  if code == errno.EROFS:
    return (f'read-only file system:{where} cannot be written ({what}); give a '
            '--workdir on a writable disk.')
  if code == errno.ENAMETOOLONG:
    shown = f' {path[:60]}...' if path and len(path) > 60 else where
    return (f'file name too long:{shown} ({what}); each folder name may have at '
            'most 255 characters: give a shorter --workdir.')
  return None


def _report_speedup(config, workdir: str) -> None:
  """Times the trained method against the uncompressed model (deployed, LoRA folded).

  Random weights of the same shapes: throughput does not depend on their values.
  Stored in <workdir>/speedup.json, once: the shapes and so the speeds are
  those of the run, so a rerun of the command does not measure again.
  """
  from pyra_jax import throughput  # pylint: disable=g-import-not-at-top
  method = config.model.method
  if method == 'peft':
    return
  path = os.path.join(workdir, 'speedup.json')
  if os.path.isfile(path):  # A rerun of a finished run: measured already.
    print(f'throughput: measured earlier, see {path}')
    return
  print(f'measuring inference throughput: uncompressed vs {method} '
        f'(batch {throughput.after_training_batch(config)}, deployed models) ...', flush=True)
  res = throughput.speedup_after_training(config)
  print(throughput.speedup_line(res, method))
  from pyra_jax.training import records  # pylint: disable=g-import-not-at-top
  records.write_json(os.path.join(workdir, 'speedup.json'), res)


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    _fail(f'Unexpected arguments: {" ".join(argv[1:])}', 2)
  config = _CONFIG.value
  if config is None:
    _fail('Give a setting with --config=configs/<setting>.py (see configs/).', 2)
  mode = _MODE.value
  if _WORKDIR.value is None and not (mode == 'eval' and _EXPORT_DIR.value):
    _fail(f'--mode={mode} needs --workdir=DIR.', 2)
  if _WORKDIR.value is not None and not _WORKDIR.value.strip():
    # os.path.join('', 'checkpoints') is the current directory: fail before
    # anything is written there.
    _fail('--workdir is empty: give a folder, e.g. --workdir=runs/mine.', 2)
  if _EXPORT_DIR.value is not None and not _EXPORT_DIR.value.strip():
    _fail('--export_dir is empty: give a folder, or leave the flag out.', 2)
  if _FORMAT.value != 'orbax' and mode != 'export':
    _fail(f'--format={_FORMAT.value} applies to --mode=export.', 2)
  if _TWO_STAGE.value and (mode in ('train', 'search') or _EXPORT_DIR.value and mode == 'eval'):
    _fail('--two_stage applies to --mode=eval or --mode=export of a training '
          'checkpoint in --workdir (an export keeps the merging it was written '
          'with: export with --two_stage instead).', 2)
  try:  # Before JAX: a contradicted recipe is a command-line mistake.
    recipe.check_overrides(config, sys.argv)
  except errors.PyraError as e:  # Also an unknown config.recipe.
    _fail(str(e), 2)
  try:
    recipe.apply(config)  # Every mode: e.g. eval reads the DeiT heads it sets.
    _maybe_init_distributed()
    import jax  # pylint: disable=g-import-not-at-top
    from pyra_jax.training import evaluation, loop, setup  # pylint: disable=g-import-not-at-top
    from pyra_jax.training import export as export_lib  # pylint: disable=g-import-not-at-top
    logging.info('JAX devices: %s', jax.devices())
    if mode != 'train':  # (train resolves it under the workdir's lock)
      from pyra_jax import speedup_timer  # pylint: disable=g-import-not-at-top
      speedup_timer.resolve(config, _WORKDIR.value)  # 'speedup:<x>': the workdir's choice
    from pyra_jax.training import stages  # pylint: disable=g-import-not-at-top
    pipeline = config.model.method in stages.METHODS
    if pipeline and mode == 'train':  # RaP, SPViT: LoRA, prune, retrain.
      r = stages.run_pipeline(
          config, _WORKDIR.value,
          allow_config_change=[f.strip() for f in _ALLOW_CONFIG_CHANGE.value])
      config = stages.final_config(config, _WORKDIR.value)
      if jax.process_index() == 0:
        print(f"pruning ({config.model.method}): "
              f"{os.path.join(_WORKDIR.value, stages.STAGE2)}")
    elif pipeline and _WORKDIR.value:  # eval / export read stage 3's pruned model.
      config = stages.final_config(config, _WORKDIR.value)
    if mode == 'train' and not pipeline:
      r = loop.train_and_evaluate(
          config, _WORKDIR.value,
          allow_config_change=[f.strip() for f in _ALLOW_CONFIG_CHANGE.value])
    if mode == 'train':
      if jax.process_index() == 0:
        split = f'{r["eval_split"]}, {r["num_test_images"]} images'
        lines = [f'final accuracy ({split}): {100 * r["final_accuracy"]:.2f}%',
                 f'max accuracy ({split}), paper protocol (max over periodic '
                 f'evals): {100 * r["max_accuracy_paper_protocol"]:.2f}%']
        if r.get('headline') == 'max':  # The authors' code reports the max.
          lines.reverse()
        print('\n'.join(lines))
        print(f'checkpoint (Orbax): {setup.checkpoint_dir(_WORKDIR.value)}/{r["steps"]}')
        if 'ltmp' in r:
          print(f"ltmp: effective FLOPs {r['ltmp']['effective_flops_fraction']:.3f} of "
                'uncompressed with the masked tokens removed (static shapes run all '
                f"tokens: 1.0); active tokens after each block {r['ltmp']['mean_active_tokens']}")
        print(f'results: {os.path.join(_WORKDIR.value, "results.json")}')
        if config.get('benchmark_after_training', False):
          _report_speedup(config, _WORKDIR.value)
    elif mode == 'search':
      from pyra_jax.training import search as search_lib  # pylint: disable=g-import-not-at-top
      r = search_lib.run_search(
          config, _WORKDIR.value,
          allow_config_change=[f.strip() for f in _ALLOW_CONFIG_CHANGE.value])
      if jax.process_index() == 0:
        print(f"searched rates (kept tokens per layer): prune {[p for p, _ in r['rates']]}, "
              f"merge {[m for _, m in r['rates']]}; FLOPs ratio {r['flops_ratio']:.2f} "
              f"(target {r['target_flops_ratio']:.2f})")
        print(f"rates file: {r['path']} (train with "
              f"--config.model.diffrate_rates={r['path']})")
        if r['shortfall']:
          print(r['shortfall'])
    elif mode == 'eval':
      if _EXPORT_DIR.value:
        r = export_lib.evaluate_export(_EXPORT_DIR.value, config)
        what = f'export {_EXPORT_DIR.value}'
      else:
        r = evaluation.evaluate_checkpoint(config, _WORKDIR.value,
                                           _CHECKPOINT_STEP.value,
                                           two_stage=_TWO_STAGE.value)
        what = f'checkpoint step {r["step"]}'
        if _TWO_STAGE.value:
          t, e = r['trained'], r['evaluated']
          what += (f' (two-stage: trained {t["method"]} {t["schedule"]}, '
                   f'evaluated {e["method"]} {e["schedule"]})')
      print(f'{what}: {r["split"]} accuracy {100 * r["accuracy"]:.2f}% '
            f'({r["correct"]}/{r["count"]})')
      if r.get('recorded_in'):
        print(f"recorded in {r['recorded_in']} under 'two_stage'")
    else:
      out = export_lib.export(config, _WORKDIR.value, _EXPORT_DIR.value,
                              _CHECKPOINT_STEP.value, two_stage=_TWO_STAGE.value,
                              export_format=_FORMAT.value,
                              setting=config_flags.get_config_filename(flags.FLAGS['config']))
      given = os.path.abspath(_EXPORT_DIR.value or out)
      stablehlo = _FORMAT.value == 'stablehlo'
      print(f'exported ({"StableHLO, " if stablehlo else ""}LoRA folded): {out}' +
            (f' (the folder the link {given} points to)' if given != out else ''))
      if stablehlo:
        print('run it with jax, numpy and safetensors alone: python '
              f'{os.path.join(out, "run.py")}')
  except KeyboardInterrupt:
    _interrupted(mode)
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e):
      message = environment_error(e)
      if message is None:
        raise
      logging.debug('%s', traceback.format_exc())
      _fail(message, 1)
    logging.debug('%s', traceback.format_exc())
    _fail(str(e), 1)


def _interrupted(mode: str | None) -> None:
  """Ctrl-C: one line and exit status 130 (128 + SIGINT), as shells expect."""
  if mode in ('train', 'search'):
    what = ('interrupted, resume with the same command (it continues from the '
            'last checkpoint).')
  else:
    what = 'interrupted, nothing was changed: rerun the same command.'
  print(f'\n{what}', file=sys.stderr, flush=True)
  sys.exit(130)


def run() -> None:
  try:
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:  # While parsing flags or importing, before main.
    _interrupted(None)


if __name__ == '__main__':
  run()
