"""What a finished run left in its workdir: checkpoint steps, parameters, losses."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from pyra_jax import metrics
from pyra_jax.training import loop
from pyra_jax.training import setup
from tests.helpers.models import tiny_run_config


class Killed(Exception):
  """What `kill_after`'s batches raise: a kill between two training steps."""


def kill_after(n: int, error: type[BaseException] = Killed):
  """A `loop.train_batches` (set it with monkeypatch) that raises `error` instead
  of yielding its (n+1)-th batch, like a SIGKILL between steps (KeyboardInterrupt:
  a Ctrl-C, which the command line turns into exit 130)."""
  original = loop.train_batches

  def batches(data, start_step):
    for i, batch in enumerate(original(data, start_step)):
      if i == n:
        raise error()
      yield batch
  return batches


def checkpoint_steps(workdir) -> list[int]:
  """The steps of the checkpoints on disk (Orbax's unfinished saves excluded)."""
  return sorted(int(p.name) for p in (Path(workdir) / 'checkpoints').iterdir()
                if p.name.isdigit())


def trained_params(workdir, step: int | None = None,
                   config: ml_collections.ConfigDict | None = None
                   ) -> tuple[int, dict[str, np.ndarray]]:
  """(step, {'a/b/c': array}) of the trainable parameters restored from a
  checkpoint (the latest if `step` is None) of a run of `config` (default: the
  TINY command line)."""
  _, trainable, s = setup.restore_run(config or tiny_run_config(), str(workdir), step)
  return s, traverse_util.flatten_dict(jax.device_get(trainable), sep='/')


def losses(workdir) -> dict[int, float]:
  """{step: training loss} from the run's metrics.jsonl."""
  return {m['step']: m['loss'] for m in metrics.read_metrics(str(workdir)) if 'loss' in m}
