"""What values a numeric (or enumerated) config field may take, as tables.

Each config section is checked against one table, field -> `Range` or
`Choices`, in the module that owns the section: `pyra_jax.models.vit` the
model section (`vit.MODEL_FIELDS`, when `vit.model_kwargs` resolves it, so
`training.setup.check_model_config` reports it before any data is read),
`pyra_jax.training.checks` the loop (`checks.check_config`). One table per
section keeps every field's allowed values in one place and makes a missing
check visible, where an `if` per field spread over the code that uses the
fields would not.

Why ranges matter: many wrong values train without an error and without
effect. A dropout rate of 1.5 zeroes LoRA's input, so LoRA never trains; a
negative stochastic-depth rate rescales the residuals by 1/1.5; a negative
LoRA rank means no LoRA; an infinite learning rate or weight decay turns the
first update into NaN, which then reads as a divergence. Every refusal is one
sentence naming the field, its value and the values that work.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional, Union

from pyra_jax.errors import ConfigError


def _number(x: float) -> str:
  """A bound as a reader writes it: 0, 1, 2**63 - 1 (not 1.0 or 9223372036854775807)."""
  if isinstance(x, int) and abs(x) >= 2 ** 62:
    return f'-2**{(abs(x) - 1).bit_length()}' if x < 0 else f'2**{x.bit_length()} - 1'
  return f'{x:g}' if isinstance(x, float) else str(x)


@dataclasses.dataclass(frozen=True)
class Range:
  """A finite number (or integer) between optional bounds, plus listed extra values.

  `low`/`high` None: unbounded on that side (the value must still be finite).
  `also`: values allowed outside the range (e.g. -1 = "same as lr").
  `why`: what the field means or what goes wrong outside the range, for the message.
  """
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  integer: bool = False
  also: tuple = ()
  why: str = ''

  def admits(self, value: Any) -> bool:
    if isinstance(value, bool):
      return False
    kind = numbers.Integral if self.integer else numbers.Real
    if not isinstance(value, kind):
      return False
    if value in self.also:
      return True
    if not math.isfinite(value):
      return False
    if self.low is not None and (value < self.low or self.low_open and value == self.low):
      return False
    if self.high is not None and (value > self.high or self.high_open and value == self.high):
      return False
    return True

  def describe(self) -> str:
    what = 'an integer' if self.integer else 'a number'
    lo, hi = self.low, self.high
    if lo is not None and hi is not None:
      if self.low_open and self.high_open:
        text = f'{what} strictly between {_number(lo)} and {_number(hi)}'
      elif not self.low_open and not self.high_open:
        text = f'{what} from {_number(lo)} to {_number(hi)}'
      else:
        text = (f'{what} in {"(" if self.low_open else "["}{_number(lo)}, '
                f'{_number(hi)}{")" if self.high_open else "]"}')
    elif lo is not None:
      text = f'{what} {">" if self.low_open else ">="} {_number(lo)}'
    elif hi is not None:
      text = f'{what} {"<" if self.high_open else "<="} {_number(hi)}'
    else:
      text = what
    if not self.integer and (lo is None or hi is None):  # inf passes a one-sided bound.
      text = text.replace('a number', 'a finite number', 1)
    if self.also:
      text += ', or ' + ' or '.join(_number(v) for v in self.also)
    return text


@dataclasses.dataclass(frozen=True)
class Choices:
  """One of a fixed set of values (strings, usually)."""
  values: tuple
  why: str = ''

  def admits(self, value: Any) -> bool:
    return value in self.values

  def describe(self) -> str:
    return 'one of ' + ', '.join(repr(v) for v in self.values)


Spec = Union[Range, Choices]


def _get(section: Any, dotted: str) -> tuple[bool, Any]:
  """(present, value) of a dotted field of a ConfigDict or dict."""
  node = section
  for part in dotted.split('.'):
    try:
      if part not in node:
        return False, None
      node = node[part]
    except TypeError:
      return False, None
  return True, node


def message(name: str, value: Any, spec: Spec) -> str:
  """'<name> = <value>: use <range> (<why>).' — the refusal of one field."""
  why = f' ({spec.why})' if spec.why else ''
  return f'{name} = {value!r}: use {spec.describe()}{why}.'


def check_fields(section: Any, table: Mapping[str, Spec], prefix: str) -> None:
  """Raises ConfigError for the first field of `section` outside its range.

  `prefix` is how the message names the section ('model.', 'config.'). A field
  the section lacks is left to the code that requires it (an older stored
  config, a partial dict in a test).
  """
  for name, spec in table.items():
    present, value = _get(section, name)
    if present and not spec.admits(value):
      raise ConfigError(message(prefix + name, value, spec))


# `model.schedule = 'speedup:<x>[@<batch>]'` (pyra_jax.speedup) and the
# `config.speedup` section that tunes its measurement (configs/common.py).
SPEEDUP_TARGET = Range(1, low_open=True, why=(
    'the speed-up over the uncompressed model; 1 is the uncompressed model itself'))
SPEEDUP_BATCH = Range(1, integer=True, why='images per timed forward pass')
SPEEDUP_FIELDS: dict[str, Spec] = {
    'rounds': Range(1, integer=True, why='timed rounds per measurement'),
    'candidates': Range(2, integer=True, why=(
        'schedules timed per pass; the first pass needs both ends of the family')),
    'tolerance': Range(0, low_open=True, why=(
        'how far above x, as a fraction of x, the pick may measure before '
        'schedules in between are timed')),
}
