"""One place names every method, PEFT module, task and setting; every other list agrees.

`pyra_jax.registry` is the list; configs, the command lines, the benchmark, the
VTAB protocol and the data's task table read it or must match it, and each
method's module must be what its entry says.
"""

import re

import pytest

from pyra_jax import registry
from pyra_jax.configs import common
from pyra_jax.configs import paper
from pyra_jax.methods import base
from pyra_jax.models import vit
from tests.helpers.cli import ROOT


def test_every_method_entry_is_a_reducer_of_that_name():
  for name, cls in registry.methods().items():
    assert issubclass(cls, base.TokenReducer), name
    assert cls.name == name


def test_the_settings_list_is_the_settings_folder():
  files = {p.stem for p in (ROOT / 'pyra_jax' / 'configs').glob('*.py')}
  assert set(registry.SETTINGS) == files - {'__init__', 'common', 'paper', 'fullft'}
  assert len(set(registry.SETTINGS)) == len(registry.SETTINGS)


def test_the_task_lists_are_the_data_tasks():
  tasks = pytest.importorskip('pyra_jax.data.tasks')  # TensorFlow: the [data] extra.
  assert sorted(registry.VTAB_TASKS) == sorted(tasks.TASKS)
  assert set(registry.EXTRA_TASKS) == set(tasks.EXTRA_TASKS)


def test_configs_cli_benchmark_and_vtab_use_the_registry():
  from pyra_jax import benchmark  # pylint: disable=g-import-not-at-top
  from pyra_jax import vtab  # pylint: disable=g-import-not-at-top
  assert paper.METHODS == tuple(registry.METHODS)
  assert paper.PEFT_MODULES == tuple(registry.PEFT_MODULES)
  assert tuple(m for m in benchmark.METHODS if m != 'evit_own') == tuple(registry.METHODS)
  assert vtab.VTAB_TASKS == registry.VTAB_TASKS
  assert vtab.GROUPS == registry.VTAB_GROUPS


def test_the_config_documents_every_method_and_module():
  """configs/common.py's comments (the --helpfull and docs/configs.md text) name them all."""
  source = (ROOT / 'pyra_jax' / 'configs' / 'common.py').read_text()
  method_doc = source[source.index('model.method ='):source.index('model.schedule =')]
  assert set(re.findall(r"'(\w+)'", method_doc)) == set(registry.METHODS)
  peft_doc = source[source.index('# The trainable module'):source.index('model.peft =')]
  assert set(registry.PEFT_MODULES) <= set(re.findall(r"'(\w+)'", peft_doc))


def test_every_model_field_is_read_by_the_backbone_a_module_or_a_method():
  """No dead model field: each is the backbone's, the PEFT module's or a method's."""
  fields = set(common.get_base_config().model.keys())
  read = (set(vit.BACKBONE_FIELDS) | set(vit.PEFT_CONFIG_FIELDS) |
          {'variant', 'num_classes', 'width', 'depth', 'num_heads', 'mlp_dim',
           'patch_size', 'qkv_bias', 'layerscale', 'distilled', 'distilled_eval',
           'distilled_train', 'attention', 'prop_attn', 'method', 'schedule'})
  for cls in registry.methods().values():
    read |= set(cls.config_fields)
  assert fields == read, (fields - read, read - fields)
