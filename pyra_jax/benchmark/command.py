"""The command line of `python -m pyra_jax.benchmark` (and `pyra-jax-benchmark`):
flags, presets, their checks, and the program that runs a mode and prints it."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from pyra_jax import cli
from pyra_jax import errors
from pyra_jax import field_ranges
from pyra_jax import registry
from pyra_jax.benchmark import formatting
from pyra_jax.benchmark import forward
from pyra_jax.benchmark import train_step
from pyra_jax.errors import BenchmarkError
from pyra_jax.throughput import DEFAULT_METHODS, DTYPES, METHODS


def define_flags() -> dict[str, Any]:
  """Defines the command-line flags (only when run as a program, so importing
  this module next to `pyra_jax.main`, which also has --config, is safe)."""
  return dict(
      config=config_flags.DEFINE_config_file(
          'config', None, 'A config file with get_config(), e.g. configs/vitb_high.py.',
          lock_config=False),
      mode=flags.DEFINE_enum('mode', 'forward', ['forward', 'train'],
                             'forward: deployed inference; train: one training step.'),
      out=flags.DEFINE_string('out', '', 'Write the results as JSON here.'),
      gemm_bound=flags.DEFINE_bool(
          'gemm_bound', True, "forward mode: also time each model's dense-layer "
          'matmuls alone, at its token counts, and report the speed-up they '
          'allow (the ceiling on this machine).'),
      batch_size=flags.DEFINE_integer('batch_size', 0,
                                      'Images per call; 0: 8 on CPU, 64 otherwise.'),
      dtype=flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Compute dtype.'),
      image_size=flags.DEFINE_integer('image_size', 0,
                                      "0: the config's model.image_size."),
      num_iters=flags.DEFINE_integer('num_iters', 0,
                                     'At least this many timed rounds; 0: 10 '
                                     '(forward) or 5 (train).'),
      min_seconds=flags.DEFINE_float('min_seconds', 0.0,
                                     'Keep timing rounds until this much time has passed.'),
      warmup=flags.DEFINE_integer('warmup', 2, 'Untimed calls per model after compiling.'),
      matmul_size=flags.DEFINE_integer('matmul_size', 2048,
                                       'n of the n x n x n reference matmul.'),
      params=flags.DEFINE_string(
          'params', '', 'A pyra_jax export directory (`main --mode=export`) to take '
          'the weights from; default: random weights (speed does not depend on them).'),
      methods=flags.DEFINE_list('methods', list(DEFAULT_METHODS),
                                f'Which of {",".join(METHODS)} to run, or "all" '
                                '(every one; evit_own: EViT at its own keep rate).'),
      peft=flags.DEFINE_list('peft', [],
                             'forward mode: time every method with each of these PEFT '
                             'modules (model.peft: lora,adapter,convpass,fact,snf), in '
                             "the same rounds; empty: the config's own module."),
      schedules=flags.DEFINE_list(
          'schedules', [], 'forward mode: time every compressing method at each of '
          'these schedules (e.g. vitb_low,vitb_high) in the same rounds, as '
          "'<method>@<schedule>'; default: the config's schedule only."),
      num_classes=flags.DEFINE_integer('num_classes', 100,
                                       'Head size when the config leaves it unset (-1).'),
      warmup_seconds=flags.DEFINE_float(
          'warmup_seconds', 0.0, 'After --warmup calls, untimed rounds until this '
          'much time has passed.'),
      profile_calls=flags.DEFINE_integer(
          'profile_calls', 0, 'train mode: after timing, profile this many calls of '
          'each step and print ms by phase (forward, backward, optimizer) and part '
          '(dense/attention matmuls, softmax, GELU, LayerNorm, RNG, merge, other).'),
      curve=flags.DEFINE_bool(
          'curve', False, 'Print the measured speed-up vs FLOPs ratio over the '
          'schedule families of --methods (PYRA: Eq. 8; ToMe: constant r), the '
          "choices model.schedule='speedup:<x>' picks from; --batch_size, "
          '--num_iters apply (pyra_jax/speedup_curve.py).'),
      curve_points=flags.DEFINE_integer('curve_points', 10,
                                        '--curve: schedules timed per family.'),
      curve_png=flags.DEFINE_string('curve_png', '', '--curve: also plot it to this PNG.'),
      preset=flags.DEFINE_enum(
          'preset', '', ['', 'paper'],
          "paper: the authors' timing (batch 512, 10 s warm-up, then rounds "
          'until 10 s are timed; PRESETS), for an accelerator; --batch_size, '
          '--warmup_seconds, --min_seconds and --num_iters given on the command '
          'line override it. In train mode a batch that does not fit is split '
          'with --config.grad_accum_steps=k (the same 512-image update).'),
  )


# Timing settings a `--preset` stands for. 'paper': the authors'
# test_model_latency (engine.py of their code): batch 512, 10 s of untimed
# calls, then calls until 10 s are timed; throughput = 512 / mean time.
PRESETS = {
    'paper': {'batch_size': 512, 'warmup_seconds': 10.0, 'min_seconds': 10.0,
              'num_iters': 1},
}
PRESET_FLAGS = ('batch_size', 'warmup_seconds', 'min_seconds', 'num_iters')


# The numeric flags and the values that work; a negative batch or round count
# would otherwise fail inside JAX with a traceback.
FLAG_RANGES: dict[str, field_ranges.Range] = {
    'batch_size': field_ranges.Range(0, integer=True, why='images per call; 0: 8 on CPU, 64 otherwise'),
    'image_size': field_ranges.Range(0, integer=True, why="0: the config's model.image_size"),
    'num_iters': field_ranges.Range(0, integer=True, why='timed rounds; 0: the default'),
    'min_seconds': field_ranges.Range(0, why='seconds of timed rounds at least'),
    'warmup': field_ranges.Range(0, integer=True, why='untimed calls per model'),
    'warmup_seconds': field_ranges.Range(0, why='seconds of untimed rounds'),
    'matmul_size': field_ranges.Range(1, integer=True, why='n of the reference matmul'),
    'num_classes': field_ranges.Range(1, integer=True, why='the head size'),
    'profile_calls': field_ranges.Range(0, integer=True, why='profiled calls per step'),
    'curve_points': field_ranges.Range(2, integer=True, why='schedules timed per family'),
}


def check_flags(values: dict[str, Any]) -> None:
  """Refuses a numeric flag outside FLAG_RANGES, in one sentence naming it."""
  for name, spec in FLAG_RANGES.items():
    if name in values and not spec.admits(values[name]):
      raise BenchmarkError(field_ranges.message(f'--{name}', values[name], spec))


def settings_from_flags(preset: str, given: dict[str, Any],
                        defaults: dict[str, Any]) -> dict[str, Any]:
  """The timing settings: `given` (flags on the command line) over the preset
  over `defaults`."""
  out = dict(defaults)
  if preset:
    if preset not in PRESETS:
      raise BenchmarkError(f'--preset={preset!r}: use one of {sorted(PRESETS)}.')
    out.update(PRESETS[preset])
  out.update(given)
  return out


def main(argv: Sequence[str], fl: dict[str, Any]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = fl['config'].value
  if config is None:
    raise app.UsageError('Give --config=configs/<setting>.py (a file with get_config()).')
  methods = tuple(fl['methods'].value)
  if methods == ('all',):
    methods = METHODS
  bad = [m for m in methods if m not in METHODS]
  if bad or not methods:
    raise app.UsageError(f'--methods: use some of {tuple(registry.METHODS)}, got {methods}.')
  check_flags({k: fl[k].value for k in FLAG_RANGES})
  if fl['curve'].value:
    run_curve(config, fl, methods)
    return
  if fl['curve_png'].value:
    raise app.UsageError('--curve_png plots the --curve measurement: add --curve.')
  train = fl['mode'].value == 'train'
  defaults = {'batch_size': 8 if jax.devices()[0].platform == 'cpu' else 64,
              'num_iters': 5 if train else 10, 'min_seconds': 0.0,
              'warmup_seconds': 0.0}
  given = {k: fl[k].value for k in PRESET_FLAGS
           if flags.FLAGS[k].present and (fl[k].value or k.endswith('seconds'))}
  timing = settings_from_flags(fl['preset'].value, given, defaults)
  kwargs = dict(batch_size=timing['batch_size'], dtype=fl['dtype'].value,
                image_size=fl['image_size'].value,
                num_iters=timing['num_iters'],
                min_seconds=timing['min_seconds'], warmup=fl['warmup'].value,
                warmup_seconds=timing['warmup_seconds'],
                matmul_size=fl['matmul_size'].value, methods=methods,
                params_path=fl['params'].value, num_classes=fl['num_classes'].value)
  if not train:
    kwargs['gemm_bound'] = fl['gemm_bound'].value
    kwargs['peft_modules'] = tuple(fl['peft'].value)
    kwargs['schedules_'] = tuple(fl['schedules'].value)
  if train:
    kwargs['profile_calls'] = fl['profile_calls'].value
  elif fl['profile_calls'].value:
    raise app.UsageError('--profile_calls profiles the training step: add --mode=train.')
  if train and fl['peft'].value:
    raise app.UsageError('--peft is for the forward mode: drop it or --mode=train.')
  elif train and fl['schedules'].value:
    raise app.UsageError('--schedules is for the forward mode: use one config per '
                         'schedule with --mode=train.')
  # A setting that cannot run raises a PyraError: one `Error:` line (cli.run).
  res = (train_step.run_train if train else forward.run_forward)(config, **kwargs)
  res['settings']['preset'] = fl['preset'].value or None
  print(formatting.format_table(res))
  out = fl['out'].value
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w') as f:
      json.dump(res, f, indent=2)
    print(f'wrote {out}')
  sys.stdout.flush()


def run_curve(config: ml_collections.ConfigDict, fl: dict[str, Any],
              methods: Sequence[str]) -> None:
  """--curve: speedup_curve's table (and JSON with --out, PNG with --curve_png)."""
  from pyra_jax import speedup_curve, speedup_timer  # pylint: disable=g-import-not-at-top
  if fl['mode'].value == 'train':
    raise app.UsageError('--curve times deployed models: drop --mode=train.')
  config = ml_collections.ConfigDict(config.to_dict())
  if fl['image_size'].value:
    config.model.image_size = fl['image_size'].value
  if fl['dtype'].value != 'float32':
    config.dtype = fl['dtype'].value
  res = speedup_curve.curve(  # A PyraError is one `Error:` line (cli.run).
      config, methods=methods, points=fl['curve_points'].value,
      batch=fl['batch_size'].value or speedup_timer.default_batch(),
      rounds=fl['num_iters'].value or 10)
  print(speedup_curve.format_curve(res))
  for path, write in ((fl['out'].value, lambda p: json.dump(res, open(p, 'w'), indent=2)),
                      (fl['curve_png'].value, lambda p: speedup_curve.plot_curve(res, p))):
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      write(path)
      print(f'wrote {path}')
  sys.stdout.flush()


def run() -> None:
  """The `pyra-jax-benchmark` command (also `python -m pyra_jax.benchmark`)."""
  from pyra_jax import configs  # pylint: disable=g-import-not-at-top
  configs.resolve_argv(sys.argv)  # A packaged setting by name: --config=vitb_high.
  fl = define_flags()
  for holder in fl.values():  # --help lists the flags of the program run (argv[0])
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])
  cli.run(lambda argv: main(argv, fl))  # One `Error:` line per user error; quiet.
