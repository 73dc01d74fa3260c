"""The trainable module's settings, one frozen value passed through the model.

`model.peft` chooses the module (`registry.PEFT_MODULES`: LoRA, Adapter,
Convpass, FacT, SNF; docs/algorithm.md §2, §13-15) and its `model.*` fields set
it. `PeftSettings.from_config` reads and checks them once; attention, the MLP
and the block take the one value instead of a dozen fields each.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Optional

import ml_collections

from pyra_jax import registry
from pyra_jax.errors import ConfigError
from pyra_jax.field_ranges import Choices, Range
from pyra_jax.models.adapter import ADAPTER_INITS
from pyra_jax.models.convpass import CONVPASS_INITS
from pyra_jax.models.fact import FACT_TK_LAYOUTS, FACT_VARIANTS
from pyra_jax.models.lora import LORA_INITS

_PROBABILITY = ('a dropout probability; 1 or more would drop every input, so nothing '
                'behind it trains')
# The allowed values of the modules' fields (configs/common.py documents each),
# checked whatever the module, with the model's other field tables.
FIELD_RANGES: dict[str, Range | Choices] = {
    'lora_rank': Range(0, integer=True, why='0 disables LoRA'),
    'lora_dropout': Range(0, 1, high_open=True, why=_PROBABILITY),
    'lora_init': Choices(LORA_INITS),
    'peft_dim': Range(1, integer=True, why='the bottleneck width of adapter / convpass'),
    'peft_dropout': Range(0, 1, high_open=True, why=_PROBABILITY),
    'convpass_scale': Range(0, low_open=True, why=(
        "the bypasses' output scale; at 0 they would never train")),
    'adapter_init': Choices(ADAPTER_INITS),
    'convpass_init': Choices(CONVPASS_INITS),
    'fact_variant': Choices(FACT_VARIANTS),
    'fact_tk_layout': Choices(FACT_TK_LAYOUTS),
    'fact_rank': Range(1, integer=True, why="FacT's rank r"),
    'fact_scale': Range(0, low_open=True, why="FacT's scale s; at 0 FacT would never train"),
    'fact_dropout': Range(0, 1, high_open=True, why=_PROBABILITY),
    'snf_flow_length': Range(0, integer=True, why="SNF's number of planar flow steps"),
}


@dataclasses.dataclass(frozen=True)
class PeftSettings:
  """model.peft and its module's fields (configs/common.py documents each)."""
  module: str            # a registry.PEFT_MODULES name
  lora_rank: int         # 0 unless module == 'lora' (another module turns LoRA off)
  lora_dropout: float
  lora_init: str
  dim: int               # model.peft_dim: Adapter / Convpass bottleneck
  dropout: float         # model.peft_dropout: inside Adapter / Convpass, training only
  adapter_init: str
  convpass_scale: float
  convpass_init: str
  fact_variant: str
  fact_rank: int
  fact_scale: float
  fact_dropout: float
  fact_tk_layout: str
  snf_flow_length: int
  snf_blocks: Optional[int]  # SNF in the first N blocks only; None: every block

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, *, width: int, mlp: int
                  ) -> 'PeftSettings':
    """Reads and checks the module's fields (their ranges: FIELD_RANGES)."""
    module = c.peft
    if module not in registry.PEFT_MODULES:
      raise ConfigError(f'model.peft must be one of {tuple(registry.PEFT_MODULES)}, '
                        f'got {module!r}.')
    snf_blocks = c.snf_blocks
    if snf_blocks is not None and (isinstance(snf_blocks, bool) or not isinstance(
        snf_blocks, numbers.Integral) or snf_blocks <= 0):
      raise ConfigError(f'model.snf_blocks must be a positive integer or unset (every '
                        f'block), got {snf_blocks!r}.')
    dim = c.peft_dim
    if module in ('adapter', 'convpass') and (isinstance(dim, bool) or not isinstance(
        dim, numbers.Integral) or dim <= 0):
      raise ConfigError(f'model.peft_dim must be a positive integer for '
                        f'model.peft={module!r}, got {dim!r}.')
    if module == 'adapter' and c.adapter_init not in ADAPTER_INITS:
      raise ConfigError(f'model.adapter_init must be one of {ADAPTER_INITS}, '
                        f'got {c.adapter_init!r}.')
    if module == 'convpass' and c.convpass_init not in CONVPASS_INITS:
      raise ConfigError(f'model.convpass_init must be one of {CONVPASS_INITS}, '
                        f'got {c.convpass_init!r}.')
    if module == 'fact':
      if c.fact_variant not in FACT_VARIANTS:
        raise ConfigError(f'model.fact_variant must be one of {FACT_VARIANTS}, '
                          f'got {c.fact_variant!r}.')
      if c.fact_tk_layout not in FACT_TK_LAYOUTS:
        raise ConfigError(f'model.fact_tk_layout must be one of {FACT_TK_LAYOUTS}, '
                          f'got {c.fact_tk_layout!r}.')
      if mlp % width:
        raise ConfigError(f'FacT cuts the MLP kernels into (D, D) slices, so model.mlp_dim '
                          f'({mlp}) must be a multiple of model.width ({width}).')
    return cls(
        module=module, lora_rank=c.lora_rank if module == 'lora' else 0,
        lora_dropout=c.lora_dropout, lora_init=c.lora_init, dim=dim, dropout=c.peft_dropout,
        adapter_init=c.adapter_init, convpass_scale=c.convpass_scale,
        convpass_init=c.convpass_init, fact_variant=c.fact_variant, fact_rank=c.fact_rank,
        fact_scale=c.fact_scale, fact_dropout=c.fact_dropout,
        fact_tk_layout=c.fact_tk_layout, snf_flow_length=c.snf_flow_length,
        snf_blocks=snf_blocks)

  def at_layer(self, layer: int) -> 'PeftSettings':
    """The settings of block `layer`: past model.snf_blocks, a plain block."""
    if self.module == 'snf' and self.snf_blocks is not None and layer >= self.snf_blocks:
      return dataclasses.replace(self, module='lora')  # lora_rank is already 0
    return self

  def fields(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
