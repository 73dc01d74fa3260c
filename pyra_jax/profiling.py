"""Where a compiled step spends its time, from a JAX profile of the real program.

`profile_compiled(fn, hlo_text, num_calls)` runs `fn` under `jax.profiler`,
reads the trace's per-op events (on CPU, one event per executed HLO
instruction: each fusion, dot, copy) and attributes every event to a *phase*
and a *part* through the instruction's `op_name` metadata, which JAX writes
from the traced Python:

  phase   forward    the op is under `jvp(...)` and not `transpose(...)`;
          backward   under `transpose(jvp(...))`, i.e. the VJP;
          optimizer  everything else: the optimiser update, the loss's
                     reductions outside the model, bookkeeping.
  part    rng        dropout / stochastic-depth bits (`jit(_bernoulli)`,
                     `jit(_uniform)`, `random_bits`, `threefry`);
          attention matmul   the two (B, H, N, N) contractions (their einsum
                     equations, `bhqd,bhkd->bhqk` and `bhqk,bhkd->bhqd`);
          merge      ToMe/PYRA/other token-reduction code (a scope named
                     `merge`, `pyra`, `tome`, or a method's: the PYRA
                     generators' matmuls count here, not as dense);
          dense matmul  any other `dot_general` (q/k/v/out/MLP kernels, LoRA,
                     patch embedding, head);
          softmax    the attention's max and exp (its normalising sum and
                     division count as other);
          gelu       anything under the `gelu` name scope of
                     `models.activations.gelu`, or an erf/erfc;
          layernorm  anything under a `LayerNorm` or `encoder_norm` scope;
          other      the rest (residual adds, transposes, copies, ...).

A fused op is attributed by the code its root came from, except that a fusion
containing a matmul (XLA CPU fuses q·kᵀ with the softmax's max and exp, a
kernel with its bias and activation) counts as that matmul, elementwise work
included. This is a profile of the one compiled program, unlike the
benchmark's subtraction of separately compiled programs: exact about each
op's time, approximate about attribution. On CPU, XLA runs independent ops
concurrently on its threads, and an op's event lasts until all of its
parallel partitions finish, so the parts can add up to more than the wall
time (`ops_ms` against `wall_ms`).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping

import jax

PHASES = ('forward', 'backward', 'optimizer')
PARTS = ('dense matmul', 'attention matmul', 'softmax', 'gelu', 'layernorm', 'rng',
         'merge', 'other')
# Instructions whose events enclose their children's: counting them would count
# the children twice.
_CONTAINERS = ('while', 'conditional', 'call', 'async-start', 'async-done')
_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Trace events named like an HLO instruction (`fusion.12`, `dot`, `ynn_fusion`).
_EVENT_LIKE_INSTRUCTION = re.compile(r'^[a-z][a-z0-9_\-]*(\.\d+)?$')
# The attention contractions as our attention writes them (vit.py: the
# default einsum form, the class-attention row of EViT/ATS/DiffRate) and the
# `jax.nn.dot_product_attention` path.
_ATTENTION_EINSUMS = ('bhqd,bhkd->bhqk', 'bhqk,bhkd->bhqd', 'bhd,bnhd->bhn',
                      'dot_product_attention')
_RNG = ('_bernoulli', '_uniform', 'random_bits', 'threefry', 'rng_bit_generator')
_MERGE = ('merge', 'pyra', 'tome', 'tofu', 'evit', 'ats', 'ltmp', 'diffrate')


_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) .*\{\s*$')
_CALLS = re.compile(r'calls=%([\w.\-]+)')


def instruction_metadata(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, op_name metadata)} over every computation.

  A fusion that contains a matmul (XLA CPU fuses e.g. q·kᵀ with the softmax's
  max and exp) reads as that matmul: ('dot', the dot's own op_name), so its
  time counts as matmul time, not as the elementwise op at its root.
  """
  out, calls = {}, {}
  dots = {}  # computation -> op_name of its (first) dot or convolution
  computation = None
  for line in hlo_text.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      computation = c.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    op = _OP_NAME.search(line)
    op_name = op.group(1) if op else ''
    opcode = m.group(2)
    out[m.group(1)] = (opcode, op_name)
    if opcode in ('dot', 'convolution') and computation and computation not in dots:
      dots[computation] = op_name
    called = _CALLS.search(line)
    if opcode == 'fusion' and called:
      calls[m.group(1)] = called.group(1)
  for name, computation in calls.items():
    if computation in dots:
      out[name] = ('dot', dots[computation])
  return out


def phase_of(op_name: str, differentiated: bool = True) -> str:
  """forward / backward / optimizer; a program with no VJP is all forward."""
  if not differentiated:
    return 'forward'
  if 'transpose(jvp(' in op_name:
    return 'backward'
  if 'jvp(' in op_name:
    return 'forward'
  return 'optimizer'


def part_of(opcode: str, op_name: str) -> str:
  """The part of the model an instruction computes (see the module docstring)."""
  scopes = op_name.split('/')
  leaf = scopes[-1] if scopes else ''
  if any(r in op_name for r in _RNG):
    return 'rng'
  if any(e in op_name for e in _ATTENTION_EINSUMS):
    return 'attention matmul'
  if any(s.split('_')[0] in _MERGE for s in scopes[1:-1]):
    return 'merge'
  if opcode in ('dot', 'convolution') or leaf in ('dot_general', 'conv_general_dilated'):
    return 'dense matmul'
  if 'LayerNorm' in op_name or 'encoder_norm' in op_name:
    return 'layernorm'
  if leaf in ('erf', 'erfc', 'erf_inv') or 'gelu' in op_name:
    return 'gelu'
  if leaf in ('reduce_max', 'exp') and 'MultiHead' in op_name:
    return 'softmax'
  return 'other'


def trace_events(logdir: str) -> list[tuple[str, float]]:
  """(name, duration in microseconds) of every complete event in the trace."""
  paths = glob.glob(os.path.join(logdir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise RuntimeError(f'jax.profiler wrote no perfetto trace under {logdir}.')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return [(e['name'], float(e.get('dur', 0.0))) for e in events if e.get('ph') == 'X']


def summarise(events: Iterable[tuple[str, float]],
              metadata: Mapping[str, tuple[str, str]], num_calls: int) -> dict[str, Any]:
  """Milliseconds per call by phase and part, and the largest single ops."""
  table = {ph: collections.Counter() for ph in PHASES}
  per_op = collections.Counter()
  unmatched = 0.0
  differentiated = any('jvp(' in op for _, op in metadata.values())
  for name, dur in events:
    if name not in metadata:
      # An HLO-instruction-like name the program text does not hold means the
      # text is not the program that ran: say how much time that leaves out.
      if _EVENT_LIKE_INSTRUCTION.match(name):
        unmatched += dur / 1e3 / num_calls
      continue
    opcode, op_name = metadata[name]
    if opcode in _CONTAINERS:
      continue
    ms = dur / 1e3 / num_calls
    table[phase_of(op_name, differentiated)][part_of(opcode, op_name)] += ms
    per_op[name] += ms
  ops_ms = sum(per_op.values())
  top = [{'name': n, 'ms': ms, 'opcode': metadata[n][0], 'op_name': metadata[n][1]}
         for n, ms in per_op.most_common(15)]
  return {'ms': {ph: {p: table[ph][p] for p in PARTS if table[ph][p]} for ph in PHASES},
          'ops_ms': ops_ms, 'unmatched_ms': unmatched, 'top_ops': top}


def profile_compiled(fn: Callable[[], Any], hlo_text: str, num_calls: int = 3,
                     logdir: str = '') -> dict[str, Any]:
  """Profiles `num_calls` calls of `fn` (already compiled and warm).

  `hlo_text` is the compiled program's HLO (`jitted.lower(...).compile()
  .as_text()`), whose instruction names the trace's events carry.
  Returns `summarise`'s dict plus the wall time per call the profile saw.
  """
  if num_calls < 1:
    raise ValueError(f'num_calls must be >= 1, got {num_calls}.')
  tmp = logdir or tempfile.mkdtemp(prefix='pyra_jax_profile_')
  try:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(num_calls):
        jax.block_until_ready(fn())
      wall = (time.perf_counter() - t0) / num_calls
    out = summarise(trace_events(tmp), instruction_metadata(hlo_text), num_calls)
  finally:
    if not logdir:
      shutil.rmtree(tmp, ignore_errors=True)
  out['wall_ms'] = wall * 1e3
  out['num_calls'] = num_calls
  return out
