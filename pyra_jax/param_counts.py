r"""Parameter counts, split the way the paper reports them (Table 1, Tables 6-8).

  python -m pyra_jax.param_counts --config=configs/vitb_high.py

prints, for the config's backbone and schedule, each modulation variant's
generator count beside the paper's, and the trainable parameters of the
config's own model as a share of the frozen backbone. Counting needs only the
shapes: the model is initialised under `jax.eval_shape`, so no weights are
read and nothing is computed.

Every parameter falls in one category, by its path:
  lora             '.../lora/...'         the LoRA factors
  module           '.../adapter/...', '.../convpass/...', '.../fact/...',
                   '.../snf/...'          the PEFT module that replaces LoRA
                                          (config model.peft)
  generators       '.../pyra/...' except the LayerNorm: W_r, W_D, W, the MLP
  generator_norms  '.../pyra/norm/...'    the generators' LayerNorm (2·D per
                                          layer); the paper never counts it
                                          (its "86M + 9.4K" for PYRA is L·D + Σr)
  head             'head/...', 'head_dist/...'  the classification head(s)
  backbone         everything else        the pretrained ViT
The paper's trainable percentages (e.g. 0.35 % for PYRA at ViT-B high) are
(LoRA + generators) over the backbone: no head, no generator LayerNorm; with
another module (Tables 18-19: Adapter, 0.19 % at ViT-B high) it takes LoRA's
place in that sum.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

PyTree = Any
CATEGORIES = ('backbone', 'lora', 'module', 'generators', 'generator_norms', 'head')
# The scopes of the PEFT modules other than LoRA (pyra_jax/models/vit.py PEFT_MODULES).
MODULE_SCOPES = ('adapter', 'convpass', 'fact', 'snf')
# What the modules' own papers report for ViT-B/16 (trainable, no head).
PAPER_PEFT_COUNTS: Mapping[str, tuple[float, str]] = {
    'fact': (0.040e6, 'FacT paper, FacT-TT (rank <= 16, averaged over VTAB tasks); '
                      'FacT-TK (rank <= 32): 0.069M'),
    'snf': (0.036e6, 'SNF paper, abstract'),
}

# The paper's generator counts at ViT-B/16 high compression, in parameters as
# printed (K = 1,000), with where they are printed. Table 6 prints one count
# per set of generators, the same with or without σ. Fig. 6 prints none.
PAPER_GENERATOR_COUNTS: Mapping[str, tuple[Optional[float], str]] = {
    'pyra': (9.4e3, 'Table 1, "86M + 9.4K"; Table 6 prints 8.64K'),
    'sigmoid_wr_only': (0.19e3, 'Table 6'),
    'wr_only': (0.19e3, 'Table 6'),
    'sigmoid_wd_only': (8.45e3, 'Table 6'),
    'wd_only': (8.45e3, 'Table 6'),
    'no_sigmoid': (8.64e3, 'Table 6'),
    'full_matrix': (70.66e3, 'Table 7'),
    'mlp': (73.73e3, 'Table 8'),
    'low_rank': (None, 'Fig. 6 prints no count'),
}
PAPER_TRAINABLE_PERCENT_PYRA_VITB_HIGH = 0.35  # Table 1
PAPER_TRAINABLE_PERCENT_ADAPTER_VITB_HIGH = 0.19  # Tables 18-19 (Adapter instead of LoRA)
# RaP's trainable percentages in Tables 2-5, by (backbone, level); the paper
# does not say what they count (docs/methods.md compares ours).
PAPER_TRAINABLE_PERCENT_RAP = {('vitb', 'high'): 0.86, ('vitl', 'high'): 0.65,
                               ('vitl_mae', 'low'): 2.01, ('vitl_mae', 'high'): 0.76,
                               ('deitb', 'low'): 3.57, ('deitb', 'high'): 1.09}


def category(path: str) -> str:
  """The category of a '/'-joined parameter path (see the module docstring)."""
  parts = path.split('/')
  if 'lora' in parts:
    return 'lora'
  if any(name in parts for name in MODULE_SCOPES):
    return 'module'
  if 'pyra' in parts:
    return 'generator_norms' if 'norm' in parts[parts.index('pyra'):] else 'generators'
  if parts[0] in ('head', 'head_dist'):
    return 'head'
  return 'backbone'


def count_by_category(*trees: PyTree) -> dict[str, int]:
  """Parameter counts of one or more trees (arrays or shape structs), by category."""
  counts = dict.fromkeys(CATEGORIES, 0)
  for tree in trees:
    for path, leaf in traverse_util.flatten_dict(tree, sep='/').items():
      counts[category(path)] += int(np.prod(np.shape(leaf), dtype=np.int64))
  return counts


def abstract_params(model_config: ml_collections.ConfigDict, num_classes: int) -> PyTree:
  """The model's parameter shapes, without initialising (or loading) any weight."""
  from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
  model = vit.build_model(model_config, num_classes=num_classes)
  size = model_config.image_size
  dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init({'params': jax.random.PRNGKey(0)}, x, train=False), dummy)
  return variables['params']


def trainable_report(trainable: PyTree, frozen: PyTree) -> dict[str, Any]:
  """What a run trains, split as in Table 1, and its share of the backbone.

  `trainable` and `frozen` are the two halves of `optim.split_params`, so a
  parameter counts as trained exactly when the optimiser updates it.
  """
  trained = count_by_category(trainable)
  # The backbone's size whether frozen or not: full fine-tuning trains all of it
  # (then 'other_trained' holds it, and the share is over 100 %).
  backbone = count_by_category(frozen)['backbone'] + trained['backbone']
  total = sum(trained.values())
  paper_like = trained['lora'] + trained['module'] + trained['generators']
  pct = lambda n: 100.0 * n / backbone if backbone else float('nan')
  return {
      'backbone': backbone,
      'lora': trained['lora'],
      'module': trained['module'],
      'generators': trained['generators'],
      'generator_norms': trained['generator_norms'],
      'head': trained['head'],
      'other_trained': trained['backbone'],
      'trainable': total,
      'trainable_percent_of_backbone': pct(total),
      'lora_generators_percent_of_backbone': pct(paper_like),
  }


def format_trainable(report: Mapping[str, Any]) -> str:
  """One line for the training log."""
  line = (f"Trainable parameters: {report['trainable']:,} = "
          f"{report['trainable_percent_of_backbone']:.3f}% of the backbone "
          f"({report['backbone']:,}): LoRA {report['lora']:,}, "
          + (f"module {report['module']:,}, " if report.get('module') else '') +
          f"generators "
          f"{report['generators']:,} (+ LayerNorm {report['generator_norms']:,}), "
          f"head {report['head']:,}")
  if report['other_trained']:
    line += f", other {report['other_trained']:,}"
  return (line + f"; LoRA/module + generators (the paper's convention): "
          f"{report['lora_generators_percent_of_backbone']:.3f}%.")


def variant_counts(model_config: ml_collections.ConfigDict, num_classes: int,
                   modulations: Sequence[str]) -> dict[str, dict[str, int]]:
  """Category counts of the config's model with each PYRA modulation variant."""
  out = {}
  for modulation in modulations:
    c = ml_collections.ConfigDict(model_config.to_dict())
    c.method, c.modulation = 'pyra', modulation
    out[modulation] = count_by_category(abstract_params(c, num_classes))
  return out


def num_classes_of(config: ml_collections.ConfigDict) -> int:
  """The head size: model.num_classes if set, else the task's class count."""
  if config.model.num_classes is not None:
    return int(config.model.num_classes)
  from pyra_jax.data import tasks  # pylint: disable=g-import-not-at-top
  return tasks.get_task(config.data.task).num_classes


def report_text(config: ml_collections.ConfigDict) -> str:
  """The command's printout: variants vs the paper, then the config's own model."""
  from pyra_jax import optim  # pylint: disable=g-import-not-at-top
  from pyra_jax.models.pyra import MODULATIONS  # pylint: disable=g-import-not-at-top
  n_cls = num_classes_of(config)
  m = config.model
  module = {'lora': f'LoRA rank {m.lora_rank}', 'fact': f'FacT-{m.get("fact_variant", "").upper()} rank {m.get("fact_rank")}',
            'snf': f'SNF K = {m.get("snf_flow_length")}'}.get(
                m.get('peft', 'lora'), f'{m.get("peft")} width {m.get("peft_dim")}')
  lines = [f"model {m.variant}, schedule {m.schedule!r}, {module}, "
           f"low_rank s = {m.modulation_rank}, {n_cls} classes",
           f"{'variant':<16} {'generators':>11} {'+ LayerNorm':>12} {'paper':>9}  where"]
  for kind, counts in variant_counts(m, n_cls, MODULATIONS).items():
    paper, where = PAPER_GENERATOR_COUNTS[kind]
    paper_text = f'{paper / 1e3:.2f}K' if paper is not None else '-'
    lines.append(f"{kind:<16} {counts['generators']:>11,} {counts['generator_norms']:>12,} "
                 f"{paper_text:>9}  {where}")
  method = m.method if m.method != 'pyra' else f'pyra ({m.modulation})'
  if m.method == 'rap' and not m.get('rap_widths'):
    # Before its search RaP has no widths: count the pruned model at the
    # setting's FLOPs with every block pruned alike (what the benchmark times).
    from pyra_jax.models import vit  # pylint: disable=g-import-not-at-top
    m = ml_collections.ConfigDict(m.to_dict())
    m.rap_widths = vit.rap_uniform_widths(m)
    heads, units = (part.split(',')[0] for part in m.rap_widths.split(';'))
    method = f'rap, every block at {heads} heads and {units} MLP units (the FLOPs of the level)'
  params = abstract_params(m, n_cls)
  trainable, frozen = optim.split_params(params, config.trainable)
  lines.append(f'This config ({method}): ' + format_trainable(trainable_report(trainable, frozen)))
  peft = m.get('peft', 'lora')
  if peft in PAPER_PEFT_COUNTS:
    paper, where = PAPER_PEFT_COUNTS[peft]
    lines.append(f'{peft} at ViT-B/16 in its own paper: {paper / 1e6:.3f}M ({where}).')
  if m.method == 'pyra' and m.modulation == 'pyra' and peft == 'lora':
    lines.append(f'Paper (Table 1, PYRA at ViT-B high): '
                 f'{PAPER_TRAINABLE_PERCENT_PYRA_VITB_HIGH}% (LoRA + generators).')
  elif m.method == 'rap':
    paper = ', '.join(f'{b} {l} {v}%' for (b, l), v in PAPER_TRAINABLE_PERCENT_RAP.items())
    lines.append(f'Paper (Tables 2-5, RaP): {paper}. Our RaP trains LoRA + head of the '
                 'pruned model (set --config.model.rap_widths to a stage 2 rap_widths.json '
                 'to count the widths its search chose); SPViT also its selectors ("other").')
  elif peft == 'adapter':
    lines.append(f'Paper (Tables 18-19, Adapter at ViT-B high): '
                 f'{PAPER_TRAINABLE_PERCENT_ADAPTER_VITB_HIGH}% (Adapter + generators).')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from pyra_jax import cli  # pylint: disable=g-import-not-at-top
  cli.no_arguments(argv)
  config = flags.FLAGS.config
  if config is None:
    cli.fail('Give --config=configs/<setting>.py, e.g. configs/vitb_high.py.', cli.USAGE_EXIT)
  try:
    print(report_text(config))
  except ValueError as e:  # model_kwargs' and get_task's config checks
    cli.fail(str(e), 1)


def run() -> None:
  """`python -m pyra_jax.param_counts --config=...` (no TensorFlow: shapes only)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from pyra_jax import cli  # pylint: disable=g-import-not-at-top
  from pyra_jax import configs  # pylint: disable=g-import-not-at-top
  configs.resolve_argv(sys.argv)  # A packaged setting by name: --config=vitb_high.
  config_flags.DEFINE_config_file(
      'config', None, 'A config file with get_config(), e.g. configs/vitb_high.py.',
      lock_config=False)
  cli.run(main)


if __name__ == '__main__':
  run()
