"""Writes tests/golden/logits.npz: every method x PEFT module on fixed weights and images.

Run once, before a refactor that must not change behaviour:
  python tests/golden/make_golden.py
tests/test_golden.py rebuilds each case through the public model entry point and
compares. Weights: drawn from the parameter shapes alone (`weights`), seeded by each
parameter's path, so the file pins the forward computation and the parameter names.
"""
from __future__ import annotations

import os
import sys
import zlib

import numpy as np

# As the test suite runs (tests/conftest.py): the same XLA options, so the file and
# the test differ only by what the code under test changes.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from pyra_jax.configs import common  # noqa: E402
from pyra_jax.models import vit  # noqa: E402

IMAGE, PATCH = 32, 8           # 16 patches + class token
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'logits.npz')


def base(**kw):
  c = common.get_base_config().model
  c.variant, c.image_size, c.patch_size = 'Ti/8', IMAGE, PATCH
  c.width, c.depth, c.num_heads, c.mlp_dim = 32, 3, 2, 64
  c.num_classes = 5
  c.lora_rank, c.schedule = 4, '3,2,1'
  c.peft_dim = 4
  c.fact_rank = 4
  for k, v in kw.items():
    c[k] = v
  return c


RATES = '17,14,14;14,12,11'   # DiffRate kept counts (after prune ; after merge)

METHOD_CASES = {
    'peft': dict(method='peft'),
    'tome': dict(method='tome'),
    'pyra': dict(method='pyra'),
    'evit': dict(method='evit', evit_layers='1,2', evit_keep_rate=0.7),
    'evit_flops': dict(method='evit', evit_layers='1,2', evit_match_flops=True),
    'tofu': dict(method='tofu', tofu_prune_layers=1),
    'ats': dict(method='ats'),
    'ats_all_layers': dict(method='ats', ats_layers='0,1,2'),
    'ltmp': dict(method='ltmp'),
    'diffrate': dict(method='diffrate', diffrate_rates=RATES),
    'diffrate_search': dict(method='diffrate', diffrate_search=True,
                            diffrate_flops_ratio=1.5),
    'diffrate_search_authors_loss': dict(method='diffrate', diffrate_search=True,
                                         diffrate_flops_ratio=1.5,
                                         diffrate_flops_loss='authors'),
}
PEFT_CASES = {
    'lora': dict(peft='lora'),
    'lora_tn': dict(peft='lora', lora_init='trunc_normal'),
    'adapter': dict(peft='adapter'),
    'adapter_tn': dict(peft='adapter', adapter_init='trunc_normal'),
    'convpass': dict(peft='convpass'),
    'fact_tt': dict(peft='fact', fact_variant='tt'),
    'fact_tk': dict(peft='fact', fact_variant='tk', fact_tk_layout='authors'),
    'snf': dict(peft='snf'),
}
EXTRA_CASES = {
    f'pyra_{m}__lora': dict(method='pyra', modulation=m)
    for m in ('low_rank', 'sigmoid_wd_only', 'full_matrix', 'mlp')
}
EXTRA_CASES.update({
    'pyra__lora__deit_avg': dict(method='pyra', distilled=True, distilled_eval='avg'),
    'tome__lora__deit_cls': dict(method='tome', distilled=True),
    'pyra__lora__deit_train_cls_eval_avg': dict(method='pyra', distilled=True,
                                                distilled_train='cls', distilled_eval='avg'),
    'pyra__snf_first2': dict(method='pyra', peft='snf', snf_blocks=2),
    'pyra__lora__layerscale_nobias': dict(method='pyra', layerscale=True, qkv_bias=False),
    'pyra__lora__dpa': dict(method='pyra', attention='dot_product_attention'),
    'pyra__lora__noprop_wrnormal': dict(method='pyra', prop_attn=False, wr_init='normal'),
    'tome__lora__inflect': dict(method='tome', schedule='3,-0.5'),
    'pyra__lora__flops': dict(method='pyra', schedule='flops:1.4'),
})


def cases():
  """Every method with LoRA, every PEFT module with PYRA (Convpass also with ToMe), and
  the model switches the refactor must carry (DeiT heads, LayerScale, attention paths,
  PYRA's variants, schedule forms)."""
  out = {f'{m}__lora': kw for m, kw in METHOD_CASES.items()}
  out.update({f'pyra__{p}': dict(method='pyra', **kw) for p, kw in PEFT_CASES.items()
              if p != 'lora'})
  out['tome__convpass'] = dict(method='tome', peft='convpass')
  out['diffrate__fact_tk_paper'] = dict(METHOD_CASES['diffrate'], peft='fact', fact_variant='tk',
                                        fact_tk_layout='paper')
  out['ltmp__adapter'] = dict(method='ltmp', peft='adapter')
  out.update(EXTRA_CASES)
  return out


def weights(shapes):
  """Fixed weights for a tree of shapes: each leaf drawn from a seed made of its path.

  Independent of the model's initialisers (pinned by their own tests), so no
  initialisation is compiled here; every parameter is non-zero, so LoRA's `up`,
  PYRA's `w_d` and the modules' biases all show in the logits. LTMP's thresholds
  are kept in [0, 1], as training keeps them.
  """
  flat = traverse_util.flatten_dict(shapes, sep='/')
  out = {}
  for path, leaf in flat.items():
    rs = np.random.RandomState(zlib.crc32(path.encode()))
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    v = rs.standard_normal(leaf.shape) / np.sqrt(max(fan_in, 1))
    if path.endswith(('scale',)):
      v = 1.0 + 0.1 * v
    if path.endswith(('merge_threshold', 'prune_threshold')):
      v = rs.uniform(0.2, 0.8, leaf.shape)
    out[path] = np.asarray(v, np.float32)
  return traverse_util.unflatten_dict(out, sep='/')


def images():
  return np.random.RandomState(0).uniform(-1, 1, (3, IMAGE, IMAGE, 3)).astype(np.float32)


def run_case(kw, build=vit.build_model):
  """{eval logits, train logits with a fixed dropout key[, FLOPs penalty]} of one case.

  Jitted as the trainer runs the model; the model is built by `build(model_config)`.
  """
  cfg = base(**kw)
  model = build(cfg)
  x = jnp.asarray(images())
  params = weights(jax.eval_shape(
      lambda: model.init({'params': jax.random.PRNGKey(0)}, x[:1], train=False))['params'])

  @jax.jit
  def forward(p):
    v = {'params': p}
    logits_eval = model.apply(v, x, train=False)
    logits_train, state = model.apply(v, x, train=True, mutable=['losses'],
                                      rngs={'dropout': jax.random.PRNGKey(1)})
    return logits_eval, logits_train, state

  logits_eval, logits_train, state = jax.device_get(forward(params))
  out = {'eval': np.asarray(logits_eval), 'train': np.asarray(logits_train)}
  for leaf in jax.tree.leaves(state.get('losses', {})):
    out['penalty'] = np.asarray(leaf)
  return out


def main():
  arrays = {}
  for name, kw in cases().items():
    for k, v in run_case(kw).items():
      arrays[f'{name}/{k}'] = v
    print(name, arrays[f'{name}/eval'][0, :3])
  np.savez_compressed(OUT, **arrays)
  print('wrote', OUT, len(arrays))


if __name__ == '__main__':
  main()
