"""No token reduction (`model.method='peft'`): the PEFT-only model, the 1x baseline."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import ml_collections

from pyra_jax.methods import base


@dataclasses.dataclass(frozen=True)
class NoReduction(base.TokenReducer):
  """Every block keeps every token."""
  name: ClassVar[str] = 'peft'
  keeps_source: ClassVar[bool] = True

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: base.Geometry) -> 'NoReduction':
    return cls(schedule=(0,) * geo.depth, num_protected=geo.num_protected)
