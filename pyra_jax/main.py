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

Training resumes from the latest checkpoint in --workdir when there is one.
Problems a user can fix (a bad config, missing data or weights, a workdir of
another run, a diverging loss) end the program with one clear message and a
non-zero exit status, without a traceback.
"""

from __future__ import annotations

import io
import os
import re
import sys
import tokenize
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from pyra_jax import configs
from pyra_jax import errors
from pyra_jax import recipe
from pyra_jax.cli import _config_arg, check_overrides, load_config  # pylint: disable=unused-import
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
    'same command with the same config and --workdir (README, "Multi-host").')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, '--multihost: host:port of process 0, where '
    'the coordinator listens (the same on every process), e.g. localhost:12345 '
    'for processes on one machine.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, '--multihost: how many processes the job has.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, '--multihost: this process\'s index, 0 .. '
    'num_processes - 1 (0 holds the workdir lock and writes metrics and results).')

_HELP_FLAGS = ('--help', '-help', '--helpfull', '-helpfull', '--helpshort',
               '-h', '-?', '--helpxml')



# ----------------------------------------------------------------------------
# Config documentation, for --helpfull.
# ----------------------------------------------------------------------------

def field_docs(source: str | None = None) -> dict[str, str]:
  """Maps 'config.a.b' to the comment that documents it in configs/common.py.

  A field's doc is the comment block right above its assignment plus its
  trailing comment (and the comment lines aligned under that trailing one).
  Section rulers ('# --- Model ---') are not docs.
  """
  if source is None:
    source = (configs.SETTINGS_DIR / 'common.py').read_text()
  aliases = {'config': 'config'}
  docs: dict[str, str] = {}
  pending: list[str] = []          # Comment lines above the next assignment.
  last_field, last_col = None, -1  # For continuation comment lines.
  lines = source.splitlines()
  comments = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = (tok.start[1], tok.string.lstrip('#').strip())
  assign = re.compile(r'^\s*((?:\w+\.)*\w+)\s*=\s*((?:\w+\.)*\w+\s*=)?')
  for lineno, line in enumerate(lines, start=1):
    code = line.split('#', 1)[0] if lineno in comments else line
    m = assign.match(code)
    if not code.strip():
      if lineno in comments:
        col, text = comments[lineno]
        if last_field and col == last_col:
          docs[last_field] += ' ' + text
        elif not text.startswith('---'):
          pending.append(text)
          last_field = None
      else:
        pending, last_field = [], None
      continue
    if not m:
      pending, last_field = [], None
      continue
    targets = [m.group(1)] + ([m.group(2).rstrip('=').strip()] if m.group(2) else [])
    # `model = config.model = ...`: the rightmost target is the full path.
    full = targets[-1]
    head = full.split('.', 1)[0]
    if head in aliases:
      full = aliases[head] + full[len(head):]
    else:
      pending, last_field = [], None
      continue
    for t in targets[:-1]:
      if '.' not in t:
        aliases[t] = full
    trailing = comments.get(lineno)
    text = ' '.join(pending + ([trailing[1]] if trailing else []))
    docs[full] = text
    pending = []
    last_field, last_col = (full, trailing[0]) if trailing else (None, -1)
  return docs


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
  spec = _config_arg(argv)
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
    except SystemExit:
      if config is not None:
        print(config_help(config, field_docs()))
      else:
        print('\nGive --config=configs/<setting>.py to list its config fields.')
      raise
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f'{str(e).strip().splitlines()[-1]}', 2)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    msg = str(e).strip().strip('\'"').replace('\\n', ' ')
    _fail(f'Bad command line: {msg.splitlines()[-1] if msg else type(e).__name__}', 2)


def _fail(message: str, code: int = 1):
  print(f'Error: {message}', file=sys.stderr)
  sys.exit(code)


def _is_user_error(e: BaseException) -> bool:
  """`pyra_jax.errors.PyraError`s (and a missing file) carry messages meant for users."""
  return isinstance(e, (errors.PyraError, FileNotFoundError))


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
  args = distributed_args()
  if args is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  # Cross-process collectives on CPU hosts (the gradient all-reduce) go
  # through Gloo over TCP; GPUs and TPUs use their own (NCCL, ICI) and ignore
  # this. It must be set before the first JAX computation creates the backend.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**args)
  logging.info('Process %d of %d (%d local of %d devices).', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class _QuietOrbax:
  """Drops Orbax's INFO chatter (a dozen lines per save); keeps its warnings."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or '/orbax/' not in record.pathname


def _report_speedup(config, workdir: str) -> None:
  """Times the trained method against the uncompressed model (deployed, LoRA folded).

  Random weights of the same shapes: throughput does not depend on their values.
  Stored in <workdir>/speedup.json.
  """
  from pyra_jax import benchmark  # pylint: disable=g-import-not-at-top
  method = config.model.method
  if method == 'peft':
    return
  print(f'measuring inference throughput: uncompressed vs {method} '
        f'(batch {config.eval_batch_size}, deployed models) ...', flush=True)
  res = benchmark.run_forward(config, batch_size=config.eval_batch_size,
                              methods=('peft', method), num_iters=5, warmup=1,
                              matmul_size=512)
  fast, slow = res['models'][method], res['models']['peft']
  print(f'throughput: {method} {fast["images_per_sec"]:.1f} images/s vs uncompressed '
        f'{slow["images_per_sec"]:.1f} images/s: {fast["speedup"]:.2f}x faster '
        f'(FLOPs ratio {fast["flops_ratio"]:.2f}x)')
  from pyra_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  train_lib.write_json(os.path.join(workdir, 'speedup.json'), res)


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if config is None:
    _fail('Give a setting with --config=configs/<setting>.py (see configs/).', 2)
  mode = _MODE.value
  if _WORKDIR.value is None and not (mode == 'eval' and _EXPORT_DIR.value):
    _fail(f'--mode={mode} needs --workdir=DIR.', 2)
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
    from pyra_jax import export as export_lib  # pylint: disable=g-import-not-at-top
    from pyra_jax import train as train_lib  # pylint: disable=g-import-not-at-top
    logging.info('JAX devices: %s', jax.devices())
    if mode == 'train':
      r = train_lib.train_and_evaluate(
          config, _WORKDIR.value,
          allow_config_change=[f.strip() for f in _ALLOW_CONFIG_CHANGE.value])
      if jax.process_index() == 0:
        split = f'{r["eval_split"]}, {r["num_test_images"]} images'
        lines = [f'final accuracy ({split}): {100 * r["final_accuracy"]:.2f}%',
                 f'max accuracy ({split}), paper protocol (max over periodic '
                 f'evals): {100 * r["max_accuracy_paper_protocol"]:.2f}%']
        if r.get('headline') == 'max':  # The authors' code reports the max.
          lines.reverse()
        print('\n'.join(lines))
        print(f'checkpoint (Orbax): {train_lib.checkpoint_dir(_WORKDIR.value)}/{r["steps"]}')
        if 'ltmp' in r:
          print(f"ltmp: effective FLOPs {r['ltmp']['effective_flops_fraction']:.3f} of "
                'uncompressed with the masked tokens removed (static shapes run all '
                f"tokens: 1.0); active tokens after each block {r['ltmp']['mean_active_tokens']}")
        print(f'results: {os.path.join(_WORKDIR.value, "results.json")}')
        if config.get('benchmark_after_training', False):
          _report_speedup(config, _WORKDIR.value)
    elif mode == 'search':
      from pyra_jax import search as search_lib  # pylint: disable=g-import-not-at-top
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
        r = train_lib.evaluate_checkpoint(config, _WORKDIR.value,
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
                              _CHECKPOINT_STEP.value, two_stage=_TWO_STAGE.value)
      given = os.path.abspath(_EXPORT_DIR.value or out)
      print(f'exported (LoRA folded): {out}' +
            (f' (the folder the link {given} points to)' if given != out else ''))
  except Exception as e:  # pylint: disable=broad-except
    if not _is_user_error(e):
      raise
    logging.debug('%s', traceback.format_exc())
    _fail(str(e), 1)


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
