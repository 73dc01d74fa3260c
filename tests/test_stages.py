"""The three-stage pipeline of RaP and SPViT through the CLI, on the tiny config:
stage 1 (method=peft) reused (by SPViT from RaP's workdir too), a killed stage 2 (RaP's search) and a killed
stage 3 resumed, eval of the pruned model (docs/algorithm.md §18.3)."""

import json
import os

import numpy as np

from pyra_jax import checkpointing
from pyra_jax.methods import rap as rap_lib
from pyra_jax.training import loop
from pyra_jax.training import stages
from tests.helpers.cli import reset_flags, run_main
from tests.helpers.runs import kill_after


def _args(workdir, method, *extra):
  return ('--config=configs/tiny.py:method=' + method, f'--workdir={workdir}',
          '--config.num_epochs=2', '--config.warmup_epochs=0', *extra)


def test_rap_pipeline_resumes_killed_stages_and_spvit_reuses_its_stage_1(
    tmp_path, capsys, monkeypatch):
  """RaP's three stages, stages 2 and 3 killed and resumed; then SPViT's pipeline
  on RaP's stage 1 (`model.stage1_workdir`), which it reuses untouched."""
  rap_dir, spvit_dir = tmp_path / 'rap', tmp_path / 'spvit'
  args = _args(rap_dir, 'rap', '--config.model.rap_candidates=4',
               '--config.model.rap_score_batches=1')
  sample = rap_lib.sample_candidate
  calls = []

  def dying_sample(*a, **k):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt()  # as a kill: exit 130, resumable
    return sample(*a, **k)
  monkeypatch.setattr(rap_lib, 'sample_candidate', dying_sample)
  code, out, err = run_main(capsys, monkeypatch, *args)
  reset_flags()
  assert code == 130, err
  s1, s2 = rap_dir / stages.STAGE1, rap_dir / stages.STAGE2
  assert (s1 / 'results.json').exists()
  stage1_time = os.path.getmtime(s1 / 'results.json')
  first = (s2 / stages.CANDIDATES_FILE).read_text().splitlines()
  assert 1 <= len(first) <= 2 and not (s2 / stages.PRUNED_FILE).exists()

  # Stage 3 killed after 30 of its 50 steps (checkpoint at 25).
  monkeypatch.setattr(rap_lib, 'sample_candidate', sample)
  original = loop.train_batches
  monkeypatch.setattr(loop, 'train_batches', kill_after(30, KeyboardInterrupt))  # exit 130
  code, out, err = run_main(capsys, monkeypatch, *args)
  reset_flags()
  assert code == 130, err
  lines = (s2 / stages.CANDIDATES_FILE).read_text().splitlines()
  assert lines[:len(first)] == first and len(lines) == 4  # resumed, not restarted
  widths = json.loads((s2 / rap_lib.WIDTHS_FILE).read_text())
  best = min((json.loads(l) for l in lines), key=lambda r: r['loss'])
  assert widths['heads'] == best['heads'] and widths['mlp'] == best['mlp']
  assert checkpointing.Checkpointer(str(rap_dir / 'checkpoints')).latest_step() == 25

  monkeypatch.setattr(loop, 'train_batches', original)
  code, out, err = run_main(capsys, monkeypatch, *args)
  reset_flags()
  assert code == 0, err
  assert 'final accuracy' in out
  assert os.path.getmtime(s1 / 'results.json') == stage1_time  # stage 1 reused
  assert checkpointing.Checkpointer(str(rap_dir / 'checkpoints')).latest_step() == 50
  results = json.loads((rap_dir / 'results.json').read_text())
  assert results['steps'] == 50
  # The pruned model is evaluated with its own widths.
  code, out, err = run_main(capsys, monkeypatch, *args, '--mode=eval')
  reset_flags()
  assert code == 0, err

  # SPViT on RaP's stage 1: the pruning methods' own settings differ, stage 1 does not.
  code, out, err = run_main(capsys, monkeypatch, *_args(
      spvit_dir, 'spvit', f'--config.model.stage1_workdir={s1}'))
  reset_flags()
  assert code == 0, err
  assert os.path.getmtime(s1 / 'results.json') == stage1_time
  assert not (spvit_dir / stages.STAGE1).exists()
  info = json.loads((spvit_dir / stages.STAGE2 / stages.SPVIT_FILE).read_text())
  assert info['layers'] == [0, 1] and len(info['keeps']) == 2
  pruned = np.load(spvit_dir / stages.STAGE2 / stages.PRUNED_FILE)
  assert any('/spvit/' in k for k in pruned.files)
  assert json.loads((spvit_dir / 'results.json').read_text())['steps'] == 50
