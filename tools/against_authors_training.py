r"""Training trajectories: the PYRA authors' training loop against ours with recipe=authors_code.

  /work/torchenv/bin/python tools/against_authors_training.py --authors_repo=PATH/TO/PYRA \
      [--epochs=12 --steps_per_epoch=2 --warmup_epochs=3 --batch_size=8] [--models=vit,deit]

`--authors_repo` is a checkout of github.com/THU-MIG/PYRA; its `model/`,
`engine.py` and `lib/` are imported from there at run time (nothing of it is
copied here), and timm 0.5.4's scheduler from the environment, in one Python
with both frameworks (tools/against_authors.py says how to make it; its
stand-ins for modules that cannot load here are reused: torchvision, and
fvcore, which their engine imports for FLOP counting only).

Both sides train the same tiny PYRA model (ViT width 32, depth 3, 2 heads,
32 px images in 8 px patches, LoRA rank 4, PYRA merging 2 tokens per block,
10 classes), from the same weights (theirs, randomly initialised as their code
does, copied into ours with our 'pyra_torch' checkpoint reader), on the same
random batches, with dropout and stochastic depth off on both sides (the
random draws of two frameworks cannot be matched), for epochs x
steps_per_epoch steps (default 12 x 2 = 24):

  theirs  their `create_optimizer` (AdamW, weight decay 1e-4 off for biases and
          1-D parameters, their PYRA lr group), timm's `create_scheduler` with
          their train.py's arguments, and their loop: `train_one_epoch` (their
          engine.py, CrossEntropyLoss, no AMP) for each epoch, then
          `lr_scheduler.step(epoch)` (train.py, lines ~470-484, written out
          here: their train.py itself cannot be imported without their data
          and launcher packages). `torch.cuda.synchronize`, which their step
          calls, is a no-op on the CPU.
  ours    `pyra_jax.training.steps.make_train_step` (the step a training run executes)
          and its optimiser, with `config.recipe = 'authors_code'` resolved as
          a run resolves it.

'deit' is the same with a distillation token and head: their loop trains the
class-token head (`outputs, _ = model(samples)`), ours trains
`distilled_train='cls'`; after training both evaluate the mean of both heads.

Printed: per step, each side's learning rate and loss; then the largest
differences of the losses, of every trained parameter after the last step,
and of the evaluation logits; and, for contrast, the same for ours with the
default recipe (the paper's: per-step schedule, distillation heads as
evaluated). Exit status 1 if a difference with recipe=authors_code exceeds
--tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import against_authors  # pylint: disable=g-import-not-at-top,wrong-import-position

WIDTH, DEPTH, HEADS, MLP, IMAGE, PATCH, RANK, NUM_CLASSES = 32, 3, 2, 64, 32, 8, 4, 10
MERGE = (2, 2, 2)  # tokens merged per block (their `model.r` / `pyra_r`)
MODELS = ('vit', 'deit')


# --------------------------------------------------------------------------- #
# Theirs.
# --------------------------------------------------------------------------- #

def their_modules(authors_repo: str) -> dict:
  """Their packages, imported from the checkout (stand-ins for what cannot load)."""
  against_authors.real_or_stand_in('torchvision', 'the PyPI wheel cannot load against this torch')
  against_authors.real_or_stand_in('fvcore', 'their engine imports it for FLOP counts only')
  import torch  # pylint: disable=g-import-not-at-top
  torch.cuda.synchronize = lambda *a, **k: None  # Their step syncs CUDA; nothing to sync here.
  if authors_repo not in sys.path:
    sys.path.insert(0, authors_repo)
  import engine  # pylint: disable=g-import-not-at-top
  from model import optim_factory, tome  # pylint: disable=g-import-not-at-top
  from model.vision_transformer_timm import VisionTransformer  # pylint: disable=g-import-not-at-top
  from timm.scheduler import create_scheduler  # pylint: disable=g-import-not-at-top
  return {'torch': torch, 'engine': engine, 'optim_factory': optim_factory, 'tome': tome,
          'VisionTransformer': VisionTransformer, 'create_scheduler': create_scheduler}


def their_model(mods: dict, distilled: bool, seed: int):
  """Their tiny PYRA ViT, built as their train.py builds a model (pyra_r = the
  merging schedule, apply_tome, model.r; a new head for the task)."""
  mods['torch'].manual_seed(seed)
  with contextlib.redirect_stdout(io.StringIO()):  # Their constructors print a lot.
    m = mods['VisionTransformer'](
        img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
        mlp_ratio=MLP / WIDTH, qkv_bias=True, distilled=distilled, drop_rate=0.0,
        drop_path_rate=0.0, prompt_tuning_dim=0, LoRA_dim=RANK, adapter_dim=0,
        prefix_dim=0, drop_rate_LoRA=0.0, drop_rate_prompt=0.0, drop_rate_adapter=0.0,
        pyra_r=list(MERGE))
    mods['tome'].apply_tome(m)
    m.r = list(MERGE)
    m.reset_classifier(NUM_CLASSES)
  return m


def recording_loss(torch, optimizer):
  """Their criterion (CrossEntropyLoss), recording each step's loss and lr."""
  class Recording(torch.nn.CrossEntropyLoss):
    def __init__(self):
      super().__init__()
      self.losses, self.lrs = [], []

    def forward(self, outputs, targets):  # pylint: disable=arguments-renamed
      loss = super().forward(outputs, targets)
      self.losses.append(float(loss.item()))
      self.lrs.append(float(optimizer.param_groups[1]['lr']))  # the decayed group
      return loss
  return Recording()


def train_theirs(mods: dict, model, batches: list, a: argparse.Namespace,
                 distilled: bool) -> dict:
  """Their loop on `batches` (NCHW float32, int64 labels), epoch by epoch."""
  torch = mods['torch']
  opt_args = argparse.Namespace(  # train.py's flags, as their scripts set them
      opt='adamw', lr=a.lr, weight_decay=a.weight_decay, momentum=0.9, opt_eps=1e-8,
      opt_betas=None, opt_args=None, separate_lr_for_pyra=True, pyra_lr=a.lr)
  optimizer = mods['optim_factory'].create_optimizer(opt_args, model)
  sched_args = argparse.Namespace(  # train.py's defaults, epochs/warm-up as given
      epochs=a.epochs, sched='cosine', min_lr=a.min_lr, warmup_lr=a.warmup_lr,
      warmup_epochs=a.warmup_epochs, cooldown_epochs=10, lr_noise=None,
      lr_noise_pct=0.67, lr_noise_std=1.0, seed=0, decay_rate=0.1)
  lr_scheduler, _ = mods['create_scheduler'](sched_args, optimizer)
  criterion = recording_loss(torch, optimizer)
  spe = a.steps_per_epoch
  with contextlib.redirect_stdout(io.StringIO()):  # MetricLogger's lines.
    for epoch in range(a.epochs):  # train.py, the loop of main()
      loader = [(torch.from_numpy(x), torch.from_numpy(y))
                for x, y in batches[epoch * spe:(epoch + 1) * spe]]
      mods['engine'].train_one_epoch(
          model, criterion, loader, optimizer, torch.device('cpu'), epoch, None,
          None, None, None, amp=False, teacher_model=None, teach_loss=None,
          deit=distilled)
      lr_scheduler.step(epoch)
  return {'losses': criterion.losses, 'lrs': criterion.lrs}


def their_logits(mods: dict, model, x: np.ndarray) -> np.ndarray:
  model.eval()  # Their evaluate(): eval mode, both heads averaged for DeiT.
  with mods['torch'].no_grad():
    return model(mods['torch'].from_numpy(x)).numpy()


def state_numpy(model) -> dict:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- #
# Ours.
# --------------------------------------------------------------------------- #

def our_config(a: argparse.Namespace, distilled: bool, recipe: str):
  from pyra_jax import recipe as recipe_lib  # pylint: disable=g-import-not-at-top
  from pyra_jax.configs import common  # pylint: disable=g-import-not-at-top
  c = common.get_base_config()
  c.model.update(variant='Ti/8', width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
                 image_size=IMAGE, patch_size=PATCH, lora_rank=RANK, lora_dropout=0.0,
                 drop_path=0.0, method='pyra', schedule=','.join(map(str, MERGE)),
                 distilled=distilled)
  c.model_init = 'random'  # Replaced by their weights below.
  c.recipe = recipe
  c.batch_size, c.num_epochs, c.warmup_epochs = a.batch_size, a.epochs, a.warmup_epochs
  c.lr, c.pyra_lr, c.weight_decay = a.lr, -1.0, a.weight_decay  # their PYRA group is the base lr
  c.min_lr, c.warmup_init_lr = a.min_lr, a.warmup_lr
  set_ = recipe_lib.apply(c)
  return c, set_


def train_ours(config, their_state: dict, batches: list, spe: int) -> dict:
  """Our training step from their initial weights; returns losses, lrs, the model."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pyra_jax import optim  # pylint: disable=g-import-not-at-top
  from pyra_jax.training import setup, steps  # pylint: disable=g-import-not-at-top
  from pyra_jax.checkpoints import loader, torch_formats  # pylint: disable=g-import-not-at-top
  run = setup.setup(config, NUM_CLASSES)
  fresh = optim.merge_params(jax.device_get(run.trainable), jax.device_get(run.frozen))
  conv = torch_formats.convert_torch_vit(their_state, HEADS, fmt='pyra_torch')
  params = loader.fit_to_model(conv, fresh, source='their initial weights')
  trainable, frozen = optim.split_params(params, config.trainable)
  run.trainable, run.frozen = trainable, run.replicate(frozen)
  step = steps.make_train_step(run, spe)
  _, schedules, tx_init = steps.make_optimizer(run, spe)
  opt_state = tx_init(trainable)
  key = setup.dropout_key(config)
  losses, lrs = [], []
  for s, (x, y) in enumerate(batches):
    batch = {'image': jnp.asarray(x.transpose(0, 2, 3, 1)), 'label': jnp.asarray(y, jnp.int32),
             'mask': jnp.ones(len(y), bool)}
    trainable, opt_state, m = step(trainable, opt_state, run.frozen, batch, np.int32(s), key)
    losses.append(float(m['loss']))
    lrs.append(float(schedules['lr'](s)))
  return {'losses': losses, 'lrs': lrs, 'trainable': jax.device_get(trainable), 'run': run}


def our_logits(result: dict, x: np.ndarray) -> np.ndarray:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pyra_jax import optim  # pylint: disable=g-import-not-at-top
  run = result['run']
  params = optim.merge_params(result['trainable'], run.frozen)
  return np.asarray(run.model.apply({'params': params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                    train=False))


def param_differences(ours_trainable, their_final: dict) -> dict[str, float]:
  """max |ours - theirs| per trained parameter (ours' names)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from pyra_jax.checkpoints import torch_formats  # pylint: disable=g-import-not-at-top
  theirs = torch_formats.convert_torch_vit(their_final, HEADS, fmt='pyra_torch').params
  ours = traverse_util.flatten_dict(ours_trainable, sep='/')
  return {k: float(np.abs(np.asarray(v, np.float64) - np.asarray(theirs[k], np.float64)).max())
          for k, v in sorted(ours.items())}


# --------------------------------------------------------------------------- #

def compare(authors_repo: str, a: argparse.Namespace, distilled: bool) -> dict:
  mods = their_modules(authors_repo)
  rng = np.random.default_rng(a.seed)
  n = a.epochs * a.steps_per_epoch
  batches = [(rng.normal(size=(a.batch_size, 3, IMAGE, IMAGE)).astype(np.float32),
              rng.integers(0, NUM_CLASSES, a.batch_size).astype(np.int64)) for _ in range(n)]
  x_eval = rng.normal(size=(16, 3, IMAGE, IMAGE)).astype(np.float32)
  model = their_model(mods, distilled, a.seed)
  initial = state_numpy(model)
  theirs = train_theirs(mods, model, batches, a, distilled)
  final, logits_theirs = state_numpy(model), their_logits(mods, model, x_eval)
  out = {'theirs': theirs, 'runs': {}}
  for recipe in ('authors_code', 'paper'):
    config, set_ = our_config(a, distilled, recipe)
    ours = train_ours(config, initial, batches, a.steps_per_epoch)
    diffs = param_differences(ours['trainable'], final)
    out['runs'][recipe] = {
        'set': set_, 'losses': ours['losses'], 'lrs': ours['lrs'],
        'max_loss_diff': float(np.abs(np.subtract(ours['losses'], theirs['losses'])).max()),
        'max_lr_diff': float(np.abs(np.subtract(ours['lrs'], theirs['lrs'])).max()),
        'param_diffs': diffs, 'max_param_diff': max(diffs.values()),
        'max_logit_diff': float(np.abs(our_logits(ours, x_eval) - logits_theirs).max()),
        'moved': max(float(np.abs(final[k] - initial[k]).max()) for k in final)}
  return out


def report(name: str, res: dict, a: argparse.Namespace) -> tuple[str, bool]:
  t, o, p = res['theirs'], res['runs']['authors_code'], res['runs']['paper']
  lines = [f'== {name}: {a.epochs} epochs x {a.steps_per_epoch} steps, warm-up '
           f'{a.warmup_epochs}, batch {a.batch_size}, lr {a.lr:g} ==',
           f'recipe=authors_code set: {", ".join(f"{k}={v!r}" for k, v in o["set"])}',
           '| step | epoch | lr theirs | lr ours | loss theirs | loss ours | |diff| |',
           '|---|---|---|---|---|---|---|']
  for s, (lt, lo, ft, fo) in enumerate(zip(t['lrs'], o['lrs'], t['losses'], o['losses'])):
    lines.append(f'| {s} | {s // a.steps_per_epoch} | {lt:.4e} | {lo:.4e} | {ft:.6f} | '
                 f'{fo:.6f} | {abs(ft - fo):.1e} |')
  worst = max(o['param_diffs'], key=o['param_diffs'].get)
  lines += [
      f'recipe=authors_code: max |loss diff| {o["max_loss_diff"]:.2e}, max |lr diff| '
      f'{o["max_lr_diff"]:.2e}, max |param diff| after the last step {o["max_param_diff"]:.2e} '
      f'({worst}; the largest move of a parameter: {o["moved"]:.2e}), max |eval logit diff| '
      f'{o["max_logit_diff"]:.2e}',
      f'recipe=paper (contrast): max |loss diff| {p["max_loss_diff"]:.2e}, max |lr diff| '
      f'{p["max_lr_diff"]:.2e}, max |param diff| {p["max_param_diff"]:.2e}, max |eval logit '
      f'diff| {p["max_logit_diff"]:.2e}']
  ok = max(o['max_loss_diff'], o['max_param_diff'], o['max_logit_diff']) <= a.tolerance
  lines.append(f'within {a.tolerance:g}: {"yes" if ok else "NO"}')
  return '\n'.join(lines), ok


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--authors_repo', required=True,
                 help='A checkout of github.com/THU-MIG/PYRA (its model/, engine.py and '
                      'lib/ are imported).')
  p.add_argument('--models', default=','.join(MODELS), help='vit, deit or both.')
  p.add_argument('--epochs', type=int, default=12)
  p.add_argument('--steps_per_epoch', type=int, default=2)
  p.add_argument('--warmup_epochs', type=int, default=3)
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--weight_decay', type=float, default=1e-4)
  p.add_argument('--min_lr', type=float, default=1e-5)
  p.add_argument('--warmup_lr', type=float, default=1e-6)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--tolerance', type=float, default=1e-4)
  a = p.parse_args(argv)
  repo = os.path.abspath(a.authors_repo)
  if not all(os.path.isfile(os.path.join(repo, f)) for f in ('engine.py', 'model/tome.py')):
    raise SystemExit(f'error: {a.authors_repo} has no engine.py and model/tome.py: give a '
                     'checkout of github.com/THU-MIG/PYRA with --authors_repo.')
  models = [m for m in a.models.split(',') if m]
  if not models or any(m not in MODELS for m in models):
    raise SystemExit(f'error: --models: use some of {",".join(MODELS)}.')
  all_ok = True
  for m in models:
    text, ok = report(m, compare(repo, a, distilled=(m == 'deit')), a)
    print(text, flush=True)
    all_ok &= ok
  sys.exit(0 if all_ok else 1)


if __name__ == '__main__':
  main()
