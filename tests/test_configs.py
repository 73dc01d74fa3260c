"""Every setting in configs/ loads, builds, and matches the paper's tables.

Expected numbers are the paper's (Tables 10-13 and "86M + 9.4K" for ViT-B high,
as transcribed in docs/algorithm.md §1-4), not values read from the configs.
"""


import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from pyra_jax import configs
from pyra_jax.configs import paper
from pyra_jax.models import vit
from tests.helpers.models import load_setting

CONFIG_DIR = configs.SETTINGS_DIR
HELPERS = {"common.py", "paper.py", "fullft.py", "__init__.py"}
SETTINGS = sorted(p.name for p in CONFIG_DIR.glob('*.py') if p.name not in HELPERS)

VITB_HIGH = (40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3)
VITL_HIGH = (20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2,
             1, 1, 1, 1)
# file -> (variant, distilled, lora rank, batch, schedule) from docs/algorithm.md §2-4.
PAPER = {
    'vitb_low.py': ('B/16', False, 8, 64, (16,) * 11 + (10,)),
    'vitb_high.py': ('B/16', False, 8, 64, VITB_HIGH),
    'vitl_low.py': ('L/16', False, 12, 32, (8,) * 23 + (6,)),
    'vitl_high.py': ('L/16', False, 12, 32, VITL_HIGH),
    'vitl_mae_low.py': ('L/16', False, 12, 32, (8,) * 23 + (6,)),
    'vitl_mae_high.py': ('L/16', False, 12, 32, VITL_HIGH),
    'deitb_low.py': ('B/16', True, 8, 128, (16,) * 6 + (10,) * 6),
    'deitb_high.py': ('B/16', True, 8, 128, VITB_HIGH),
    'vits_peft.py': ('S/16', False, 4, 64, (0,) * 12),
    'deits_peft.py': ('S/16', True, 4, 128, (0,) * 12),
    # PE-Dist students (Table 15): the smaller backbone, PEFT, no merging.
    'vits_pedist.py': ('S/16', False, 4, 64, (0,) * 12),
    'vitb_pedist.py': ('B/16', False, 8, 64, (0,) * 12),
    # Tables 18-20: Adapter / Convpass in LoRA's place (lora_rank stays, ignored).
    'vitb_high_adapter.py': ('B/16', False, 8, 64, VITB_HIGH),
    'vitl_high_adapter.py': ('L/16', False, 12, 32, VITL_HIGH),
    'vits_peft_adapter.py': ('S/16', False, 4, 64, (0,) * 12),
    'vitb_high_convpass.py': ('B/16', False, 8, 64, VITB_HIGH),
    'vitb_low_convpass.py': ('B/16', False, 8, 64, (16,) * 11 + (10,)),
}


load = load_setting


def test_every_paper_setting_has_a_file():
  assert set(PAPER) <= set(SETTINGS)


@pytest.mark.parametrize('name', SETTINGS)
def test_setting_loads_and_builds(name):
  config = load(name)
  kw = vit.model_kwargs(config.model, num_classes=10)  # Resolves the schedule.
  assert len(kw['reducer'].schedule) == kw['depth']
  vit.build_model(config.model, num_classes=10)
  if name in PAPER:
    variant, distilled, rank, batch, schedule = PAPER[name]
    assert (config.model.variant, config.model.distilled, config.model.lora_rank,
            config.batch_size) == (variant, distilled, rank, batch)
    assert tuple(kw['reducer'].schedule) == schedule
    assert config.lr == 1e-3 and config.num_epochs == 100
  if name not in PAPER and name != 'tiny.py':
    return  # Other authors' settings (e.g. demo.py) may take other arguments.
  other = load(name, 'task=dtd,method=tome,pyra_lr=3e-4')
  assert (other.data.task, other.model.method, other.pyra_lr) == ('dtd', 'tome', 3e-4)


@pytest.mark.parametrize('name,pyra_params', [
    # docs/algorithm.md §1: 12*768 + 192 = 9,408, the paper's "86M + 9.4K".
    ('vitb_high.py', 12 * 768 + sum(VITB_HIGH)),
    ('vitb_low.py', 12 * 768 + 16 * 11 + 10),
    ('vits_peft.py', 0),
])
def test_parameter_shapes_without_initialising(name, pyra_params):
  config = load(name)
  model = vit.build_model(config.model, num_classes=100)
  s = config.model.image_size
  shapes = jax.eval_shape(
      lambda k: model.init({'params': k}, jnp.zeros((1, s, s, 3)), train=False),
      jax.random.key(0))['params']
  flat = traverse_util.flatten_dict(shapes, sep='/')
  generators = sum(v.size for k, v in flat.items()
                   if k.endswith(('pyra/w_r', 'pyra/w_d')))
  assert generators == pyra_params
  rank = PAPER[name][2]
  assert flat['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/lora/down'].shape[1] == rank
  assert flat['head/kernel'].shape[1] == 100


def test_mae_pyra_lr_in_the_tuned_range():
  for name in ('vitl_mae_low.py', 'vitl_mae_high.py'):
    assert 1e-6 <= load(name).pyra_lr <= 3e-5


def test_argument_grammar():
  c = load('vitb_high.py', 'method=peft,modulation=wr_only,lr=5e-4,source=folder,'
           'data_dir=/data/vtab,init=/w/ViT-B_16.npz')
  assert c.model.method == 'peft' and c.model.schedule == 'none'
  assert (c.model.modulation, c.lr, c.data.source, c.data.data_dir, c.model_init) == (
      'wr_only', 5e-4, 'folder', '/data/vtab', '/w/ViT-B_16.npz')
  with pytest.raises(ValueError, match='keys from task, method'):
    paper.parse_arg('tsk=dtd')
  with pytest.raises(ValueError, match='key=value'):
    paper.parse_arg('dtd')
  with pytest.raises(ValueError, match='not a number'):
    load('vitb_high.py', 'lr=fast')
  with pytest.raises(ValueError, match='use one of peft, tome, pyra'):
    load('vitb_high.py', 'method=fast')
