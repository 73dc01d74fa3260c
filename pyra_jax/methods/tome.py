"""ToMe (Bolya et al., ICLR 2023) and PYRA (Xiong et al., ECCV 2024) as token reducers.

ToMe merges `r_l` tokens in block l (docs/algorithm.md §1): bipartite soft
matching on the head-averaged keys (`merge.bipartite_soft_matching`; the class
token is never merged, DeiT's distillation token never a source), then the
size-weighted average of each destination and its sources (`merge.merge_wavg`),
sizes adding up for proportional attention. PYRA is ToMe whose sources pass
through a learned generator (`models.pyra.PyraGenerator`, in the block's `pyra`
scope, sized by the block's r) between gathering and merging; at initialisation
it returns them unchanged, so PYRA starts exactly as ToMe.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import ml_collections

from pyra_jax import merge as merge_lib
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Choices, Range
from pyra_jax.methods import base
from pyra_jax.models.pyra import MODULATIONS, WR_INITS, PyraGenerator


@dataclasses.dataclass(frozen=True)
class ToMe(base.TokenReducer):
  """Merges schedule[l] tokens in block l."""
  name: ClassVar[str] = 'tome'
  keeps_source: ClassVar[bool] = True

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'ToMe':
    return cls(schedule=base.config_schedule(c, geo), num_protected=geo.num_protected)

  def modulator(self, layer: int) -> Optional[Any]:
    """What modulates the sources of `layer`'s merge (ToMe: nothing)."""
    return None

  def reduce(self, layer: int, tokens: base.Tokens, attended: base.Attended, *,
             train: bool) -> tuple[base.Tokens, Any]:
    r = self.schedule[layer]
    if r <= 0:
      return tokens, None
    plan = merge_lib.bipartite_soft_matching(
        attended.metric, r, class_token=True, distill_token=self.distilled)
    modulate = self.modulator(layer)
    tokens = tokens.with_size()
    x, size = merge_lib.merge_wavg(tokens.x, tokens.size, plan,
                                   distill_token=self.distilled, modulate=modulate)
    source = tokens.source
    if source is not None:
      source = merge_lib.merge_source(source, plan, distill_token=self.distilled)
    return tokens._replace(x=x, size=size, source=source), None


@dataclasses.dataclass(frozen=True)
class Pyra(ToMe):
  """ToMe with PYRA's generators (or one of the paper's ablation variants)."""
  modulation: str
  rank: int
  wr_init: str
  ln_eps: float

  name: ClassVar[str] = 'pyra'
  config_fields: ClassVar[tuple[str, ...]] = (
      'modulation', 'modulation_rank', 'wr_init', 'pyra_ln_eps')
  field_ranges: ClassVar[dict] = {
      'modulation_rank': Range(1, integer=True, why="the rank s of modulation='low_rank'"),
      'wr_init': Choices(WR_INITS),
      'pyra_ln_eps': Range(0, low_open=True, why="the generators' LayerNorm epsilon"),
  }

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'Pyra':
    if c.modulation not in MODULATIONS:
      raise ConfigError(f'model.modulation must be one of {MODULATIONS}, '
                        f'got {c.modulation!r}.')
    return cls(schedule=base.config_schedule(c, geo), num_protected=geo.num_protected,
               modulation=c.modulation, rank=c.modulation_rank, wr_init=c.wr_init,
               ln_eps=c.pyra_ln_eps)

  def modulator(self, layer: int) -> PyraGenerator:
    return PyraGenerator(r=self.schedule[layer], modulation=self.modulation,
                         rank=self.rank, wr_init=self.wr_init, ln_eps=self.ln_eps,
                         name='pyra')
