r"""The StableHLO export's throughput against the in-process deployed model.

  python tools/deploy_speed.py [--settings=demo,vitb_high] [--batch_sizes=8,32]
      [--rounds=15] [--json=docs/benchmarks/deploy_speed.json]

For each setting, the deployed model (LoRA folded, merging static, eval mode)
with random weights of the setting's shapes (throughput does not depend on
their values) is run two ways on the same images:

  in-process  jax.jit of `vit.build_model(deployed config).apply(..., train=False)`,
              what pyra_jax's own evaluation and benchmark run;
  exported    the program `pyra_jax.deploy.write_stablehlo` writes, loaded from
              disk by the export's own run.py (jax.export.deserialize, weights
              from params.safetensors put on the device once) and called as
              run.py's `logits` does, input conversion included.

Both are compiled and warmed up first, then timed in alternating rounds (one
call of each per round, so background load on a shared machine hits both
alike); the median seconds per batch give images/s, and the paired ratio (the
median over rounds of in-process time / exported time) the relative speed.
Prints a table; `--json` writes every timing, the CPU, the date and the load
average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import runpy
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pyra_jax import deploy
from pyra_jax import throughput
from pyra_jax.models import vit

NUM_CLASSES = {'demo': 10}  # MNIST; the paper settings' default task is CIFAR-100.


def random_deployed(setting: str):
  """(config, deployed model config, model, random params of its shapes)."""
  config = importlib.import_module(f'pyra_jax.configs.{setting}').get_config()
  config.model.num_classes = NUM_CLASSES.get(setting, 100)
  deployed = vit.deployed_config(config.model)
  model = vit.build_model(deployed)
  size = deployed.image_size
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))['params']
  rng = np.random.default_rng(0)
  params = traverse_util.unflatten_dict({
      k: ((k[-1] == 'scale') + rng.standard_normal(s.shape) * 0.02).astype(s.dtype)
      for k, s in traverse_util.flatten_dict(shapes).items()})
  return config, deployed, model, params


def measure(setting: str, batch_sizes: list[int], rounds: int, folder: str) -> dict:
  config, deployed, model, params = random_deployed(setting)
  card = deploy.model_card(config, config.model, workdir=folder, step=0,
                           setting=setting, export_format='stablehlo')
  t0 = time.perf_counter()
  sig = deploy.write_stablehlo(folder, params, deployed, card)
  export_s = time.perf_counter() - t0
  loader = runpy.run_path(os.path.join(folder, deploy.LOADER_FILE), run_name='loader')
  exported = loader['logits']
  on_device = jax.device_put(params)
  in_process = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
  size = deployed.image_size
  out = {'setting': setting, 'image_size': size, 'variant': deployed.variant,
         'schedule': card['schedule'], 'export_seconds': export_s,
         'program_bytes': os.path.getsize(os.path.join(folder, deploy.PROGRAM)),
         'weights_bytes': os.path.getsize(os.path.join(folder, deploy.WEIGHTS)),
         'platforms': sig['platforms'], 'batches': {}}
  for b in batch_sizes:
    x = np.random.default_rng(b).standard_normal((b, size, size, 3)).astype(np.float32)
    calls = {'in_process': lambda: np.asarray(in_process(on_device, x)),
             'exported': lambda: exported(x)}
    first = {}
    for name, fn in calls.items():  # Compile, then warm up.
      t0 = time.perf_counter()
      fn()
      first[name] = time.perf_counter() - t0
      fn()
    diff = float(np.abs(calls['in_process']() - calls['exported']()).max())
    times = {name: [] for name in calls}
    for _ in range(rounds):
      for name, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = statistics.median(a / e for a, e in zip(times['in_process'], times['exported']))
    out['batches'][b] = {
        'images_per_sec': {k: b / v for k, v in med.items()},
        'seconds_median': med, 'exported_speed_over_in_process': paired,
        'first_call_seconds': first, 'max_abs_logit_difference': diff,
        'round_seconds': times}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--settings', default='demo,vitb_high')
  parser.add_argument('--batch_sizes', default='8,32')
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  load_before = list(os.getloadavg())
  res = {'cpu': throughput.cpu_name(), 'cpu_count': os.cpu_count(),
         'date': datetime.date.today().isoformat(), 'jax': jax.__version__,
         'device': jax.devices()[0].device_kind, 'load_average_before': load_before,
         'rounds': args.rounds, 'settings': []}
  for setting in args.settings.split(','):
    with tempfile.TemporaryDirectory() as folder:
      r = measure(setting, [int(b) for b in args.batch_sizes.split(',')], args.rounds,
                  os.path.join(folder, 'export'))
    res['settings'].append(r)
    for b, m in r['batches'].items():
      ips = m['images_per_sec']
      print(f"{setting:<10} batch {b:>3}: in-process {ips['in_process']:8.1f} images/s, "
            f"exported {ips['exported']:8.1f} images/s, exported/in-process "
            f"{m['exported_speed_over_in_process']:.3f} (max |logit diff| "
            f"{m['max_abs_logit_difference']:.1e})", flush=True)
  res['load_average_after'] = list(os.getloadavg())
  print(f"{res['cpu']} ({res['cpu_count']} cores), {res['date']}, jax {res['jax']}, "
        f"load average before {load_before[0]:.1f}, after {res['load_average_after'][0]:.1f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(res, f, indent=1)
      f.write('\n')


if __name__ == '__main__':
  sys.exit(main())
