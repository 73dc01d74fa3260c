r"""The deployed model for other tools: safetensors weights, a model card, and a
compiled program that runs with jax alone.

Every export (`python -m pyra_jax.main --mode=export`) writes, beside the model:

  params.safetensors  every parameter of the deployed model (LoRA and FacT
                      folded in), one tensor per '/'-joined path of the linen
                      layout (docs/architecture.md), e.g.
                      'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'
  card.json           the model card: setting, method, schedule (r per layer)
                      and its FLOPs ratio, PEFT module, backbone, image size,
                      classes, trainable parameter counts, and the run's
                      accuracy and measured speed-up when it recorded them

With `--format=stablehlo` the model itself is, instead of an Orbax checkpoint,
the deployed model (merging static, eval mode) compiled ahead of time with
`jax.export` (StableHLO inside), its batch dimension symbolic so any batch
size runs:

  model.jax_export    the serialised `jax.export.Exported`:
                      logits = call(weights, images), `weights` the list of
                      params.safetensors' tensors in the order of
                      signature.json's `parameter_names`, `images` float32
                      (batch, size, size, 3), RGB, normalised as signature.json
                      says; logits (batch, num_classes)
  signature.json      what the program expects: image size, input layout,
                      dtype and normalisation, number of classes, class names
                      where the data source knows them, parameter names in
                      order, platforms it was lowered for
  run.py              a loader that needs only jax, numpy and safetensors
                      (and flatbuffers, which jax.export's format needs and
                      jax does not install; `LOADER`, also in docs/deploy.md)

The weights stay beside the program rather than baked into it as constants:
the program stays small (tens to hundreds of KB, whatever the backbone), the
weights stay inspectable and reusable in other tools from the same file, and
the program compiles without embedding hundreds of MB of constants.

The program is lowered for the platform it is exported on plus every platform
`jax.export` can lower for without the hardware (PLATFORMS: cpu, cuda, tpu); a
platform that fails to lower is left out and named in signature.json's
`platforms_failed`.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from pyra_jax import schedules
from pyra_jax.errors import ExportError, PyraError

PyTree = Any

FORMATS = ('orbax', 'stablehlo')
PROGRAM = 'model.jax_export'
WEIGHTS = 'params.safetensors'
SIGNATURE = 'signature.json'
CARD = 'card.json'
LOADER_FILE = 'run.py'
# What every export adds beside its model; what a StableHLO export holds.
WEIGHT_FILES = frozenset({WEIGHTS, CARD})
STABLEHLO_FILES = frozenset({PROGRAM, WEIGHTS, SIGNATURE, CARD, LOADER_FILE})
PLATFORMS = ('cpu', 'cuda', 'tpu')
SIGNATURE_FORMAT = 'pyra_jax stablehlo 1'

# config.data.normalization as (mean, std) of RGB pixels scaled to [0, 1]: the
# input pipeline computes (pixels / 255 - mean) / std. 'inception' is
# pixels / 127.5 - 1, i.e. mean = std = 0.5.
NORMALIZATIONS = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'inception': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# The loader written into a StableHLO export (and shown in docs/deploy.md):
# jax, numpy and safetensors only.
LOADER = '''\
"""Runs this exported model with jax, numpy and safetensors only
(pip install jax numpy safetensors flatbuffers: jax reads the program with flatbuffers).

  python run.py [images.npy]   # uint8 RGB images (batch, size, size, 3); default: random
"""
import json, os, sys
import jax
import numpy as np
from safetensors.numpy import load_file

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, 'signature.json')) as f:
  signature = json.load(f)
with open(os.path.join(here, signature['program']), 'rb') as f:
  program = jax.export.deserialize(bytearray(f.read()))
params = load_file(os.path.join(here, signature['weights']))
weights = jax.device_put([params[name] for name in signature['parameter_names']])
norm = signature['input']['normalization']
call = jax.jit(program.call)  # compiles once per batch size

def logits(images):
  """Normalised float32 images (batch, size, size, 3) -> logits (batch, classes)."""
  return np.asarray(call(weights, np.asarray(images, np.float32)))

def predict(pixels):
  """uint8 RGB images (batch, size, size, 3) -> logits, normalised as in training."""
  return logits((np.asarray(pixels, np.float32) / 255 - norm['mean']) / norm['std'])

if __name__ == '__main__':
  size = signature['input']['image_size']
  pixels = (np.load(sys.argv[1]) if len(sys.argv) > 1 else
            np.random.default_rng(0).integers(0, 256, (4, size, size, 3), np.uint8))
  names = signature['class_names'] or [str(i) for i in range(signature['num_classes'])]
  for row in predict(pixels):
    print(names[int(row.argmax())], float(row.max()))
'''


# ----------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------

def flat_params(params: PyTree) -> dict[str, np.ndarray]:
  """{'/'-joined linen path: numpy array}, sorted by path: the program's order."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  return {k: np.ascontiguousarray(np.asarray(flat[k])) for k in sorted(flat)}


def write_weights(path: str, params: PyTree) -> list[str]:
  """Writes `params` as one safetensors file; returns the tensor names in order.

  Flat '/'-joined names (the linen layout), so any tool that reads
  safetensors gets every tensor by its path; `read_weights` rebuilds the tree.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  flat = flat_params(params)
  save_file(flat, path, metadata={'format': 'pyra_jax',
                                  'layout': 'flax linen, /-joined paths'})
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; the rest of an export is not.
  return list(flat)


def read_weights(path: str) -> PyTree:
  """The nested parameter tree of a params.safetensors (for `model.apply`)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return traverse_util.unflatten_dict(load_file(path), sep='/')


# ----------------------------------------------------------------------------
# What the model expects, and the card.
# ----------------------------------------------------------------------------

def normalization(name: str) -> dict[str, Any]:
  """config.data.normalization as the mean and std a user applies to pixels / 255."""
  if name not in NORMALIZATIONS:
    raise ExportError(f'Unknown data.normalization {name!r}: use one of '
                      f'{", ".join(NORMALIZATIONS)}.')
  mean, std = NORMALIZATIONS[name]
  return {'name': name, 'mean': list(mean), 'std': list(std),
          'formula': '(pixels / 255 - mean) / std, per RGB channel'}


def class_names(data_config: ml_collections.ConfigDict, image_size: int,
                num_classes: int) -> list[str] | None:
  """The class names the run's data source knows, else None.

  Read from the eval split's `Data` (an image tree's folders, a TFDS
  ClassLabel, the MNIST digits); None where the source has none, where they
  do not match the head, or where the data cannot be read here (moved, or the
  `data` extra not installed): the export does not need its data.
  """
  try:
    from pyra_jax import data  # pylint: disable=g-import-not-at-top
    split = data.get_data(data_config, data_config.eval_split, 1,
                          image_size=image_size, train=False, seed=0)
  except (PyraError, ImportError, OSError):
    return None
  names = split.class_names
  if names is None or len(names) != num_classes:
    return None
  return [str(n) for n in names]


def setting_name(config_file: str | None) -> str | None:
  """'vitb_high:task=dtd' from a --config value ('.../configs/vitb_high.py:task=dtd')."""
  if not config_file:
    return None
  path, sep, arg = config_file.partition(':')
  name = os.path.basename(path)
  name = name[:-3] if name.endswith('.py') else name
  return f'{name}{sep}{arg}'


def _peft(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The PEFT module as trained, and whether the deployed model folded it."""
  module = model_config.get('peft', 'lora')
  fields = {'lora': ('lora_rank',), 'adapter': ('peft_dim',), 'convpass': ('peft_dim',),
            'fact': ('fact_variant', 'fact_rank'), 'snf': ('snf_flow_length',)}
  out = {'module': module}
  for name in fields.get(module, ()):
    if name in model_config:
      out[name] = model_config[name]
  out['folded'] = module == 'fact' or (module == 'lora' and model_config.lora_rank > 0)
  return out


def _schedule(model: Any, model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The merging as configured, resolved: r per layer, tokens, FLOPs ratio."""
  r = [int(v) for v in model.schedule]
  n0 = (model_config.image_size // model.patch_size) ** 2 + 1 + int(model.distilled)
  ratio = model.mlp_dim / model.width
  flops = schedules.vit_flops(r, num_tokens=n0, width=model.width, mlp_ratio=ratio)
  full = schedules.vit_flops([0] * len(r), num_tokens=n0, width=model.width,
                             mlp_ratio=ratio)
  return {'spec': model_config.get('schedule'), 'r_per_layer': r,
          'tokens_per_layer': schedules.token_counts(r, n0),
          'gflops_per_image': flops / 1e9,
          'flops_ratio': full / flops if flops else None}


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _accuracy(workdir: str, step: int, method: str, schedule: Any,
              two_stage: bool) -> dict[str, Any] | None:
  """The run's recorded accuracy of exactly this model, from results.json.

  Training's result belongs to its last step; a two-stage export takes the
  '--two_stage' evaluation of this step with this merging, if one was run.
  """
  results = _read_json(os.path.join(workdir, 'results.json'))
  if results is None:
    return None
  if two_stage:
    for entry in reversed(results.get('two_stage') or []):
      evaluated = entry.get('evaluated') or {}
      if (entry.get('step') == step and evaluated.get('method') == method
          and evaluated.get('schedule') == schedule):
        return {'accuracy': entry.get('accuracy'), 'split': entry.get('split'),
                'count': entry.get('count'), 'source': 'results.json two_stage'}
    return None
  if results.get('steps') != step:
    return None
  return {'accuracy': results.get('headline_accuracy', results.get('final_accuracy')),
          'headline': results.get('headline', 'final'),
          'final_accuracy': results.get('final_accuracy'),
          'max_accuracy_paper_protocol': results.get('max_accuracy_paper_protocol'),
          'split': results.get('eval_split'),
          'count': results.get('num_test_images'), 'source': 'results.json'}


def _speedup(workdir: str, method: str) -> dict[str, Any] | None:
  """The measured speed-up over the uncompressed model, from speedup.json."""
  res = _read_json(os.path.join(workdir, 'speedup.json'))
  models = (res or {}).get('models') or {}
  fast, slow = models.get(method), models.get('peft')
  if not isinstance(fast, dict) or method == 'peft':
    return None
  return {'speedup': fast.get('speedup'),
          'speedup_spread': fast.get('speedup_spread'),
          'images_per_sec': fast.get('images_per_sec'),
          'uncompressed_images_per_sec': (slow or {}).get('images_per_sec'),
          'flops_ratio': fast.get('flops_ratio'),
          'batch_size': (res.get('settings') or {}).get('batch_size'),
          'device': (res.get('machine') or {}).get('device_kind'),
          'source': 'speedup.json'}


def model_card(config: ml_collections.ConfigDict,
               model_config: ml_collections.ConfigDict, *, workdir: str,
               step: int, trainable: dict[str, Any] | None = None,
               setting: str | None = None, two_stage: bool = False,
               names: Sequence[str] | None = None,
               export_format: str = 'orbax') -> dict[str, Any]:
  """The model card of an export (card.json), without the parameter count.

  `model_config`: the run's resolved model section as trained (the PEFT
  module before folding); `trainable`: `param_counts.trainable_report` of the
  run; accuracy and speed-up are read from the workdir's results.json and
  speedup.json where they describe this model.
  """
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.build_model(vit.deployed_config(model_config))
  m = model_config
  method = m.method
  return {
      'setting': setting,
      'format': export_format,
      'method': method,
      'modulation': m.get('modulation') if method == 'pyra' else None,
      'schedule': _schedule(model, m),
      'peft': _peft(m),
      'backbone': {'variant': m.variant, 'pretrained': config.get('model_init'),
                   'pretrained_format': config.get('model_init_format'),
                   'width': m.width, 'depth': m.depth, 'num_heads': m.num_heads,
                   'mlp_dim': m.mlp_dim, 'patch_size': m.patch_size},
      'image_size': m.image_size,
      'num_classes': m.num_classes,
      'class_names': list(names) if names is not None else None,
      'data': {'source': config.data.get('source'), 'task': config.data.get('task'),
               'normalization': normalization(config.data.get('normalization',
                                                              'imagenet'))},
      'dtype': config.get('dtype', 'float32'),
      'trainable_parameters': trainable,
      'accuracy': _accuracy(workdir, step, method, m.get('schedule'), two_stage),
      'speedup': _speedup(workdir, method),
      'source': {'workdir': os.path.abspath(workdir), 'step': int(step),
                 'two_stage': bool(two_stage)},
      'created': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
      'jax_version': jax.__version__,
  }


def write_card(folder: str, params: PyTree, card: dict[str, Any]) -> None:
  """Writes params.safetensors and card.json (with the deployed parameter count)."""
  names = write_weights(os.path.join(folder, WEIGHTS), params)
  flat = flat_params(params)
  card = dict(card, deployed_parameters=int(sum(flat[n].size for n in names)),
              weights=WEIGHTS)
  _write_json(os.path.join(folder, CARD), card)


def _write_json(path: str, obj: dict) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)
    f.write('\n')


# ----------------------------------------------------------------------------
# The compiled program.
# ----------------------------------------------------------------------------

def _platforms() -> tuple[str, ...]:
  """The platform this runs on first, then the others jax.export can lower for."""
  local = jax.export.default_export_platform()
  return (local,) + tuple(p for p in PLATFORMS if p != local)


def export_program(params: PyTree, model_config: ml_collections.ConfigDict, *,
                   dtype: str = 'float32',
                   platforms: Sequence[str] | None = None
                   ) -> tuple[Any, list[str], dict[str, str]]:
  """(the jax.export.Exported, parameter names in order, {platform: why it failed}).

  `model_config` is the deployed model's (`vit.deployed_config`) and `params`
  its parameters. The program is `model.apply(..., train=False)` of the
  weights list and a (batch, size, size, 3) float32 image batch, `batch`
  symbolic. It is lowered for every platform in `platforms` (default: this
  one, then cpu, cuda, tpu) at once; if that fails, each alone, keeping those
  that lower; this machine's platform must.
  """
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.build_model(model_config, dtype=dtype)
  flat = flat_params(params)
  names = list(flat)

  def forward(weights: list[jax.Array], images: jax.Array) -> jax.Array:
    tree = traverse_util.unflatten_dict(dict(zip(names, weights)), sep='/')
    return model.apply({'params': tree}, images, train=False)

  (batch,) = jax.export.symbolic_shape('batch')
  size = int(model_config.image_size)
  args = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flat.values()],
          jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32))
  wanted = tuple(dict.fromkeys(platforms or _platforms()))
  lower = lambda plats: jax.export.export(jax.jit(forward), platforms=plats)(*args)
  try:
    return lower(wanted), names, {}
  except Exception:  # pylint: disable=broad-except
    pass  # Lowering fails in many ways (unsupported ops, shapes): one at a time.
  kept, failed = [], {}
  for platform in wanted:
    try:
      lower((platform,))
      kept.append(platform)
    except Exception as e:  # pylint: disable=broad-except
      failed[platform] = ' '.join(str(e).split())[:300] or type(e).__name__
  local = jax.export.default_export_platform()
  if local in failed or not kept:
    where = local if local in failed else ', '.join(wanted)
    raise ExportError(
        f'The model cannot be compiled with jax.export for {where} '
        f'({failed.get(local) or next(iter(failed.values()))}): export it with '
        '--format=orbax (the default), which needs no compilation.')
  return lower(tuple(kept)), names, failed


def signature(model_config: ml_collections.ConfigDict, names: Sequence[str],
              card: dict[str, Any], exported: Any,
              failed: dict[str, str]) -> dict[str, Any]:
  """signature.json: everything a caller of the program needs to know."""
  size = int(model_config.image_size)
  out = exported.out_avals[0]
  return {
      'format': SIGNATURE_FORMAT,
      'program': PROGRAM,
      'weights': WEIGHTS,
      'call': 'logits = program.call(weights, images), weights = [params[name] '
              'for name in parameter_names]',
      'input': {'name': 'images', 'shape': ['batch', size, size, 3],
                'layout': 'NHWC: (batch, height, width, RGB channel)',
                'dtype': 'float32', 'image_size': size,
                'normalization': card['data']['normalization']},
      'output': {'name': 'logits', 'shape': ['batch', int(out.shape[-1])],
                 'dtype': str(out.dtype)},
      'num_classes': int(model_config.num_classes),
      'class_names': card.get('class_names'),
      'parameter_names': list(names),
      'platforms': list(exported.platforms),
      'platforms_failed': failed,
      'jax_version': jax.__version__,
  }


def write_stablehlo(folder: str, params: PyTree,
                    model_config: ml_collections.ConfigDict, card: dict[str, Any], *,
                    dtype: str = 'float32',
                    platforms: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes a StableHLO export into the (new) `folder`; returns its signature.

  `params` and `model_config` are the deployed model's (LoRA/FacT folded,
  `vit.deployed_config`); `card` is `model_card`'s.
  """
  exported, names, failed = export_program(params, model_config, dtype=dtype,
                                           platforms=platforms)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, PROGRAM), 'wb') as f:
    f.write(exported.serialize())
  sig = signature(model_config, names, card, exported, failed)
  _write_json(os.path.join(folder, SIGNATURE), sig)
  with open(os.path.join(folder, LOADER_FILE), 'w') as f:
    f.write(LOADER)
  write_card(folder, params, dict(card, format='stablehlo', platforms=sig['platforms']))
  return sig


def is_stablehlo_export(path: str) -> bool:
  """Whether `path` is laid out as a StableHLO export of ours (even if damaged)."""
  try:
    entries = set(os.listdir(path))
  except OSError:
    return False
  return SIGNATURE in entries and PROGRAM in entries and (
      entries <= STABLEHLO_FILES | {'__pycache__'})
