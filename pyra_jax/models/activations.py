"""The exact GELU, under a name the step profile can find.

GELU(x) = x·Φ(x) = x/2·erfc(−x/√2), the exact form of timm and PyTorch (the
authors' model), not the tanh approximation; computed by
`jax.nn.gelu(approximate=False)`.

Why not the erf form x/2·(1 + erf(x/√2)), PyTorch's own formula: on XLA's CPU
backend it is about 4× faster (ViT-B MLP activation, (8, 197, 3072) float32,
value and gradient: 2.9 ms against 11.9 ms; on the whole training step the
gain stayed within run-to-run spread), but for x ≪ 0 the 1 + erf
cancels, so GELU there is rounded to multiples of ~6e-8·|x| instead of being
relatively accurate. Training the same run on one and on two processes then
drifted 100× further apart (largest parameter difference after 25 steps of
the multi-host test: 8e-5 against 5e-7), because AdamW turns near-zero
gradient components' round-off into whole steps. Reproducibility across
device counts matters more to our users than 10 % of a CPU step (docs/performance.md,
"Against the authors' PyTorch code").
"""

from __future__ import annotations

import jax


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in x's dtype, under a `gelu` name scope, so that the step
  profile (pyra_jax/profiling.py) finds its forward and backward ops by name."""
  with jax.named_scope('gelu'):
    return jax.nn.gelu(x, approximate=False)
