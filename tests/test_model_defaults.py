"""One source for every model default: configs/common.py.

The config says "take it from the variant / the task" with an unset typed
field (None), never a magic number; `model_kwargs` reads each field without a
fallback of its own, so a config that lacks a field is refused by name; the
linen modules carry no copy of a config default; and configs stored by older
runs (fields missing, -1 for unset) still rebuild their model.
"""

import dataclasses
import importlib
import inspect
import json

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pyra_jax import checkpointing
from pyra_jax import registry
from pyra_jax.configs import vitb_high
from pyra_jax.configs.common import get_base_config
from pyra_jax.models import lora, peft, pyra, vit
from pyra_jax.training import export as export_lib
from pyra_jax.training import setup
from tests.helpers.cli import reset_flags, run_main
from tests.helpers.data import require_offline_mnist
from tests.helpers.models import tiny_config

# Module fields that are not config fields, so a default there is no second copy.
# Wiring between modules (set by the block for the method at hand), not config.
# head_dim and out_dim: a pruned block's widths (RaP), set by the block.
NOT_CONFIG_FIELDS = {'trace_source', 'hidden', 'kernel_init', 'request', 'head_dim', 'out_dim'}
UNSET_FIELDS = ('num_classes', 'width', 'depth', 'num_heads', 'mlp_dim', 'patch_size')


def test_base_config_says_unset_without_magic_numbers():
  model = get_base_config().model
  negatives = {k: v for k, v in model.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0}
  assert negatives == {}
  for name in UNSET_FIELDS:
    assert model[name] is None, name
    assert model.get_ref(name).get_type() is int, name  # An override must be an int.


@pytest.mark.parametrize('field', sorted(get_base_config().model.keys()))
def test_a_config_without_a_field_is_refused_naming_it(field):
  """Every model field is read from the config: none has a fallback elsewhere."""
  model = get_base_config().model  # method 'pyra': every field is read.
  vit.model_kwargs(model, num_classes=10)  # Complete: resolves.
  del model[field]
  with pytest.raises(ValueError, match=rf'no field model\.{field}: start it from '
                     r'pyra_jax\.configs\.common\.get_base_config\(\)'):
    vit.model_kwargs(model, num_classes=10)


def _module_classes():
  """The linen modules, the settings they carry and every method's reducer."""
  libs = (vit, lora, pyra, peft) + tuple(
      importlib.import_module(r.__module__) for r in registry.methods().values())
  for lib in libs:
    for _, cls in inspect.getmembers(lib, inspect.isclass):
      if dataclasses.is_dataclass(cls) and cls.__module__ == lib.__name__:
        yield cls


def test_modules_carry_no_copy_of_a_config_default():
  classes = list(_module_classes())
  assert {c.__name__ for c in classes} >= {
      'VisionTransformer', 'Encoder', 'EncoderBlock', 'Attention', 'MlpBlock',
      'LoRA', 'PyraGenerator', 'PeftSettings', 'BlockSettings', 'Pyra', 'LTMP',
      'DiffRate', 'EViT', 'ATS', 'ToFu'}
  defaulted = {
      f'{cls.__name__}.{f.name}' for cls in classes for f in dataclasses.fields(cls)
      if f.name not in ('parent', 'name') and (
          f.default is not dataclasses.MISSING or
          f.default_factory is not dataclasses.MISSING)}
  assert {d.split('.')[1] for d in defaulted} <= NOT_CONFIG_FIELDS, defaulted


def test_model_kwargs_takes_every_value_from_the_config():
  """Non-default values of the fields passed through all reach the module."""
  model = tiny_config().model
  changed = dict(modulation_rank=3, wr_init='normal', pyra_ln_eps=1e-3, prop_attn=False,
                 qkv_bias=False, layerscale=True, ln_eps=1e-4, distilled_eval='avg',
                 drop_path=0.25, head_init_std=0.5, lora_rank=2, lora_dropout=0.3,
                 lora_init='trunc_normal', num_classes=7)
  base = get_base_config().model
  assert all(base[k] != v for k, v in changed.items())
  model.update(changed)
  kw = vit.model_kwargs(model)
  # Where each field lands: the method's settings, the block's, the PEFT module's.
  arch, peft_settings, reducer = kw['arch'], kw['peft'], kw['reducer']
  got = dict(modulation_rank=reducer.rank, wr_init=reducer.wr_init,
             pyra_ln_eps=reducer.ln_eps, prop_attn=arch.prop_attn,
             qkv_bias=arch.qkv_bias, layerscale=arch.layerscale, ln_eps=arch.ln_eps,
             lora_rank=peft_settings.lora_rank, lora_dropout=peft_settings.lora_dropout,
             lora_init=peft_settings.lora_init,
             **{k: kw[k] for k in ('distilled_eval', 'drop_path', 'head_init_std',
                                   'num_classes')})
  assert got == changed


def test_unset_fields_come_from_the_variant_and_the_task():
  model = get_base_config().model
  model.variant = 'S/14'
  kw = vit.model_kwargs(model, num_classes=37)
  assert (kw['width'], kw['depth'], kw['num_heads'], kw['mlp_dim'], kw['patch_size'],
          kw['num_classes']) == (384, 12, 6, 1536, 14, 37)
  model.depth, model.num_classes, model.schedule = 3, 5, 'none'  # Set fields win.
  kw = vit.model_kwargs(model, num_classes=37)
  assert (kw['depth'], kw['num_classes']) == (3, 5)
  model.width = -1  # The old sentinel is not a width.
  with pytest.raises(ValueError, match=r'model\.width must be a positive integer or '
                     r'unset \(from the variant\), got -1'):
    vit.model_kwargs(model)


def test_stored_configs_of_older_runs_read_back_in_todays_form():
  current = checkpointing.config_to_dict(vitb_high.get_config())
  legacy = json.loads(json.dumps(current))
  legacy['model'].update({k: -1 for k in UNSET_FIELDS})
  del legacy['model']['pyra_ln_eps'], legacy['keep_checkpoints']  # Newer fields.
  assert checkpointing.stored_config(legacy) == current
  # A checkpoint of such a run is this config's run (resume/eval compatible).
  meta = {'config': legacy, 'frozen_fingerprint': 'fp', 'step': 1}
  assert checkpointing.check_compatible(meta, vitb_high.get_config(), 'fp', '/w') == {}
  # Only the unset fields' -1 is a legacy marker; elsewhere -1 is a value.
  assert checkpointing.stored_config(legacy)['pyra_lr'] == -1.0


def test_an_older_diffrate_search_reads_back_with_the_lr_it_ran_at():
  # Before `diffrate_lr` existed the rate logits trained at the base lr (-1).
  search = checkpointing.config_to_dict(vitb_high.get_config())
  search['model']['diffrate_search'] = True
  del search['diffrate_lr']
  assert checkpointing.stored_config(search)['diffrate_lr'] == -1.0
  # Any other older run never had the logits: it reads as today's default, so a
  # resume or an eval is not refused over the new field.
  other = checkpointing.config_to_dict(vitb_high.get_config())
  del other['diffrate_lr']
  assert checkpointing.stored_config(other)['diffrate_lr'] == vitb_high.get_config().diffrate_lr
  meta = {'config': other, 'frozen_fingerprint': 'fp', 'step': 1}
  assert checkpointing.check_compatible(meta, vitb_high.get_config(), 'fp', '/w') == {}


def test_an_export_of_an_older_run_rebuilds_its_model(tmp_path):
  """Saved with -1 for the variant's values and without a newer field."""
  config = tiny_config(model=dict(variant='Ti/8', mlp_dim=768, patch_size=8, num_classes=10,
                                  lora_rank=0))
  model = vit.build_model(config.model)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
  shapes = jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i), x)['params']
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  meta = checkpointing.config_to_dict(config)
  meta['model'].update(mlp_dim=-1, patch_size=-1)  # Ti: 768 and /8.
  del meta['model']['pyra_ln_eps']
  meta['export_info'] = {'workdir': '/old', 'step': 1}
  ckptr = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
  ckptr.save(str(tmp_path / 'export'), args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(meta)))
  ckptr.close()

  loaded, cfg = export_lib.load_export(str(tmp_path / 'export'))
  assert (cfg.model.mlp_dim, cfg.model.patch_size) == (None, None)
  assert cfg.model.pyra_ln_eps == get_base_config().model.pyra_ln_eps
  rebuilt = setup.build_model(cfg.model)
  got = jax.eval_shape(lambda i: rebuilt.init(jax.random.PRNGKey(0), i), x)['params']
  assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, loaded)


def _needs_mnist():
  require_offline_mnist()


def test_cli_overrides_an_unset_field(tmp_path, capsys, monkeypatch):
  """--config.model.num_heads=5 replaces the variant's 12; width stays B's 768."""
  _needs_mnist()
  code, _, err = run_main(
      capsys, monkeypatch, '--config=configs/vitb_high.py', f'--workdir={tmp_path}',
      '--config.model_init=random', '--config.data.source=mnist',
      '--config.data.task=mnist', '--config.model.num_heads=5')
  reset_flags()
  assert code == 1 and len(err.strip().splitlines()) == 1, err
  assert 'model.width 768 is not divisible by model.num_heads 5.' in err


def test_cli_refuses_a_config_file_without_a_model_field(tmp_path, capsys, monkeypatch):
  _needs_mnist()
  path = tmp_path / 'mine.py'
  path.write_text('from pyra_jax.configs import tiny\n\n\n'
                  'def get_config():\n'
                  '  config = tiny.get_config()\n'
                  '  del config.model.lora_dropout\n'
                  '  return config\n')
  code, _, err = run_main(capsys, monkeypatch, f'--config={path}',
                          f'--workdir={tmp_path / "run"}')
  reset_flags()
  assert code == 1 and len(err.strip().splitlines()) == 1 and 'Traceback' not in err
  assert 'no field model.lora_dropout: start it from' in err
