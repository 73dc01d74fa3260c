"""The real timing behind `speedup:` (pyra_jax.speedup), on the device the run is on.

`resolve(config, workdir)` is what the commands call before anything is
built: it reads the model's shape, the device and the batch (the cache key),
and hands `speedup.resolve_config` a timer that measures deployed models
(LoRA folded, eval mode, random weights: speed does not depend on their
values) round-robin against the uncompressed model in the same rounds, through
`pyra_jax.throughput` (the library side of the benchmark).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from pyra_jax import speedup
from pyra_jax import throughput
from pyra_jax.errors import ConfigError
from pyra_jax.methods import base as methods_base
from pyra_jax.models import vit

# Images per timed pass when 'speedup:<x>' gives no '@<batch>': what the
# benchmark command times by default (a CPU serves small batches).
DEFAULT_BATCH_CPU, DEFAULT_BATCH_ACCELERATOR = 8, 64


def device_kind() -> str:
  """jax's device kind; on a CPU (kind 'cpu') with the CPU's name, since the
  speeds differ between CPUs."""
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    return f'cpu ({throughput.cpu_name()})'
  return dev.device_kind


def uncompressed(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model section without merging: what the speed-up is over."""
  c = ml_collections.ConfigDict(model_config.to_dict())
  c.schedule = 'none'
  return c


def geometry_and_about(config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any]]:
  """The model's shape (a Geometry) and what decides its speeds (the cache key)."""
  c = uncompressed(config.model)
  kw = vit.model_kwargs(c, num_classes=c.num_classes or 100)
  size = c.image_size
  geo = methods_base.Geometry(depth=kw['depth'], num_patches=(size // kw['patch_size']) ** 2,
                              num_protected=1 + int(kw['distilled']), width=kw['width'],
                              mlp_dim=kw['mlp_dim'])
  dep = vit.deployed_config(c)
  backbone = {k: kw[k] for k in ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size',
                                 'distilled')}
  backbone.update(variant=c.variant, qkv_bias=c.qkv_bias, layerscale=c.layerscale,
                  peft_deployed=dep.peft if dep.peft != 'lora' else 'none')
  about = {'platform': jax.devices()[0].platform, 'device_kind': device_kind(),
           'backbone': backbone, 'image_size': size, 'method': c.method,
           'dtype': config.get('dtype', 'float32')}
  if c.method == 'pyra':
    about['modulation'] = c.modulation
  return geo, about


def measure(config: ml_collections.ConfigDict, schedules_: Sequence[str],
            batch: int, rounds: int) -> dict[str, dict[str, float]]:
  """Times the uncompressed model and the method at each schedule round-robin
  (`throughput.build_forward`, `throughput.round_robin`: one call of each per
  round); returns, per schedule text, the paired speed-up (median over rounds of
  the within-round ratio), its spread, and both throughputs."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model = uncompressed(config.model)
  method = config.model.method
  fm = throughput.build_forward(c, batch_size=batch, dtype=c.get('dtype', 'float32'),
                                methods=('peft', method), schedules_=tuple(schedules_))
  times = throughput.round_robin(fm.calls, num_iters=rounds, min_seconds=0.0, warmup=1)
  base = times['peft']
  out = {}
  for s in schedules_:
    t = times[f'{method}@{s}']
    spread = throughput.speedup_spread(base, t)
    out[s] = {'speedup': throughput.paired_median(base, t),
              'speedup_q25': spread['q25'], 'speedup_q75': spread['q75'],
              'images_per_sec': batch / float(np.median(t)),
              'uncompressed_images_per_sec': batch / float(np.median(base)),
              'rounds': len(t)}
  return out


def make_timer(config: ml_collections.ConfigDict, batch: int, rounds: int) -> speedup.Timer:
  """A `speedup.Timer` measuring `config`'s method at the candidates' schedules."""
  method = config.model.method

  def timer(cands: Sequence[speedup.Candidate]) -> Mapping[str, speedup.Measurement]:
    texts = [speedup.schedule_text(method, c) for c in cands]
    got = measure(config, texts, batch, rounds)
    return {c.key: got[t] for c, t in zip(cands, texts)}
  return timer


def default_batch() -> int:
  return DEFAULT_BATCH_CPU if jax.devices()[0].platform == 'cpu' else DEFAULT_BATCH_ACCELERATOR


def resolve(config: ml_collections.ConfigDict, workdir: Optional[str], *,
            timer: Optional[speedup.Timer] = None, log=print) -> Optional[dict]:
  """`speedup.resolve_config` on this device: config.model.schedule becomes the
  chosen schedule (a 'speedup:' one only; anything else is left alone).

  `timer`: a stand-in for the real timing (tests); it is called as the real one.
  """
  if not speedup.is_speedup(config.model.schedule):
    return None
  geo, about = geometry_and_about(config)
  def make(batch: int, rounds: int) -> speedup.Timer:
    if jax.process_count() > 1:  # each process would time, and could choose, its own
      raise ConfigError(
          f'config.model.schedule = {config.model.schedule!r} needs timing, which one '
          'process must do: run the command once on a single host (it caches the '
          'measurement), then start the multi-host run.')
    return timer if timer is not None else make_timer(config, batch, rounds)

  return speedup.resolve_config(config, workdir, geometry=geo, about=about,
                                default_batch=default_batch(), make_timer=make, log=log)

