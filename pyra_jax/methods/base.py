"""The one interface every token-reduction method implements.

A method is a frozen dataclass, a subclass of `TokenReducer`, built once from a
config's model section by `from_config` (where every check of its settings
happens) and then carried by the model as a field, so the model stays hashable
and every per-layer count is a static Python int. The transformer block asks it
two things, in order:

  1. `attention(layer, train=...)`: what the block's attention must return
     besides its output (the class token's attention, the value norms, the
     attention each token receives) and whether its keys are masked;
  2. `reduce(layer, tokens, attended, train=...)`: the block's token reduction,
     after attention and its residual, before the MLP. It runs inside the
     block's compact `__call__`, so a method may create its own parameters
     there (submodules with fixed names: `pyra`, `ltmp`, `diffrate`), and it
     returns the new tokens plus what its regulariser needs from this layer.

After the last block the encoder asks `regulariser(aux)` for the FLOPs term
of the methods that learn their compression; the training step asks
`project(trainable)` after every update for the constraints a method keeps
(LTMP's thresholds in [0, 1]).

Adding a method: its own module under `pyra_jax/methods/` with a
`TokenReducer` subclass, one line in `pyra_jax/registry.py`, the config fields
it reads in `configs/common.py`, and its tests (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections

from pyra_jax import schedules
from pyra_jax.field_ranges import Choices, Range

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What a method knows about the model it is configured for."""
  depth: int
  num_patches: int
  num_protected: int  # the class token, and DeiT's distillation token
  width: int
  mlp_dim: int
  num_heads: int = 0  # 0 where unknown (a Geometry rebuilt inside the encoder)

  @property
  def num_tokens(self) -> int:
    return self.num_patches + self.num_protected

  @property
  def mlp_ratio(self) -> float:
    return self.mlp_dim / self.width

  @property
  def distilled(self) -> bool:
    return self.num_protected > 1


class Tokens(NamedTuple):
  """What flows from block to block.

  x (B, N, D); size (B, N, 1) the patches each token stands for (None until a
  method first needs it: all ones); source (B, N, N0) the 0/1 map from tokens to
  input positions (kept for Convpass and `trace_source`, else None); mask (B, N)
  the active tokens of the methods that mask rather than remove (else None).
  """
  x: Array
  size: Optional[Array]
  source: Optional[Array]
  mask: Optional[Array]

  def with_size(self) -> 'Tokens':
    """The same tokens with sizes materialised (all ones if none yet)."""
    if self.size is not None:
      return self
    return self._replace(size=jnp.ones(self.x.shape[:2] + (1,), self.x.dtype))

  def with_mask(self) -> 'Tokens':
    """The same tokens with a mask materialised (all active if none yet)."""
    if self.mask is not None:
      return self
    return self._replace(mask=jnp.ones(self.x.shape[:2], jnp.float32))


@dataclasses.dataclass(frozen=True)
class AttentionRequest:
  """What a block's attention computes for the method at one layer."""
  cls_attn: bool = False    # the class token's attention (B, H, N)
  value_norm: bool = False  # |v_j| over all heads (B, N)
  mean_attn: bool = False   # the attention each key receives (B, N)
  masked: bool = False      # keys weighted by Tokens.mask (softmax computed explicitly)
  mask_eps: float = 0.0     # the masked softmax's eps (training stabiliser)
  mask_keep_self: bool = False  # each query also keeps its own key
  size_bias: bool = False   # log(size) enters the logits even without prop_attn


class Attended(NamedTuple):
  """What a block's attention returned besides its output."""
  metric: Array                       # the keys averaged over heads (B, N, D/H)
  cls_attn: Optional[Array] = None    # (B, H, N)
  value_norm: Optional[Array] = None  # (B, N)
  mean_attn: Optional[Array] = None   # (B, N)


@dataclasses.dataclass(frozen=True)
class TokenReducer:
  """Base of every method: `schedule` is the tokens removed per block.

  The schedule is what FLOPs counts and token counts read
  (`schedules.vit_flops`, `schedules.token_counts`); a method whose reduction
  is data dependent (LTMP, the DiffRate search) runs every token in every
  block and has an all-zero schedule.
  """
  schedule: tuple[int, ...]
  num_protected: int

  # The name the registry and configs use (model.method).
  name: ClassVar[str] = ''
  # The model.<field> config fields the method reads (configs/common.py).
  config_fields: ClassVar[tuple[str, ...]] = ()
  # Their allowed values, checked whatever the method (model field tables).
  field_ranges: ClassVar[Mapping[str, Range | Choices]] = {}
  # Follows each token's input positions (`Tokens.source`): Convpass lays the
  # tokens on the patch grid through it.
  keeps_source: ClassVar[bool] = False
  # `trace_source` can follow this method's reductions.
  traces_source: ClassVar[bool] = True
  # Adds a FLOPs regulariser to the training loss (`regulariser`).
  has_regulariser: ClassVar[bool] = False
  # Masks tokens instead of removing them (the trainer reports the active tokens).
  masks_tokens: ClassVar[bool] = False

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict, geo: Geometry) -> 'TokenReducer':
    """The method configured from `c` (a model section) for a model of shape `geo`."""
    raise NotImplementedError

  @property
  def distilled(self) -> bool:
    return self.num_protected > 1

  def attention(self, layer: int, *, train: bool) -> AttentionRequest:  # pylint: disable=unused-argument
    return AttentionRequest()

  def reduce(self, layer: int, tokens: Tokens, attended: Attended, *,
             train: bool) -> tuple[Tokens, Any]:  # pylint: disable=unused-argument
    """The block's reduction; returns (tokens, aux for the regulariser or None)."""
    return tokens, None

  def block_widths(self, layer: int) -> Optional[tuple[int, int]]:  # pylint: disable=unused-argument
    """(attention heads, MLP hidden units) of a structurally pruned block; None: all."""
    return None

  def regulariser(self, aux: list[Any], geo: Geometry) -> tuple[Array, Array]:
    """(FLOPs fraction, penalty) from every layer's aux; only if `has_regulariser`."""
    raise NotImplementedError

  def project(self, trainable: PyTree) -> PyTree:
    """The trainable parameters after an update, with the method's constraints."""
    return trainable

  def masked_flops(self, keep_fractions: list[Array], *, num_tokens: int, width: int,
                   mlp_ratio: float) -> Array:
    """FLOPs fraction with the masked tokens removed; only if `masks_tokens`.

    keep_fractions[l]: the fraction of tokens active after block l.
    """
    raise NotImplementedError


def config_schedule(c: ml_collections.ConfigDict, geo: Geometry) -> tuple[int, ...]:
  """`model.schedule` resolved for the model (names, ToMe forms, flops:, per layer)."""
  spec = c.schedule
  if isinstance(spec, (list, tuple)):
    spec = tuple(spec)
  return schedules.resolve_schedule(
      spec, depth=geo.depth, num_patches=geo.num_patches,
      num_protected=geo.num_protected, width=geo.width, mlp_ratio=geo.mlp_ratio)


def layer_list(c: ml_collections.ConfigDict, name: str, depth: int) -> Optional[tuple[int, ...]]:
  """`model.<name>`, a comma-separated list of 0-based layers, sorted; None for ''."""
  from pyra_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  spec = c[name]
  if isinstance(spec, (list, tuple)):
    parts = list(spec)
  else:
    spec = str(spec).strip()
    if not spec:
      return None
    parts = [p for p in spec.replace('(', '').replace(')', '').split(',') if p.strip()]
  try:
    layers = tuple(int(p) for p in parts)
  except (TypeError, ValueError):
    raise ConfigError(f'model.{name} = {spec!r}: give 0-based layer numbers '
                      "separated by commas, e.g. '3,6,9'.") from None
  for l in layers:
    if not 0 <= l < depth:
      raise ConfigError(f'model.{name} has layer {l}, but the model has {depth} '
                        f'layers (0-based: 0 to {depth - 1}): remove it or lower it.')
  if len(set(layers)) != len(layers):
    raise ConfigError(f'model.{name} = {spec!r} names a layer twice.')
  return tuple(sorted(layers))
