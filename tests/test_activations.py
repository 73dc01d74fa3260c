"""The exact GELU against a float64 numpy transcription of x·Φ(x), tail included."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from pyra_jax.models import activations

_erf = np.vectorize(math.erf)


def _gelu64(x):
  return 0.5 * x * np.vectorize(math.erfc)(-x / math.sqrt(2.0))


def _dgelu64(x):  # Φ(x) + x·φ(x)
  return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def test_gelu_and_its_gradient_equal_the_definition_to_float32_round_off():
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(size=20000) * 3, np.linspace(-12, 12, 2001)]).astype(np.float32)
  x64 = x.astype(np.float64)
  y = np.asarray(jax.jit(activations.gelu)(x))
  # Relatively accurate in the negative tail too (no 1 + erf cancellation:
  # the reason for the erfc form, pyra_jax/models/activations.py).
  tail = x < -3
  np.testing.assert_allclose(y[tail], _gelu64(x64)[tail], rtol=1e-4, atol=1e-30)
  np.testing.assert_allclose(y, _gelu64(x64), rtol=2e-6, atol=1e-7)
  g = np.asarray(jax.jit(jax.grad(lambda v: activations.gelu(v).sum()))(x))
  np.testing.assert_allclose(g, _dgelu64(x64), rtol=2e-6, atol=2e-6)


def test_gelu_keeps_the_dtype():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 197, 96)).astype(np.float32)) * 4
  xb = x.astype(jnp.bfloat16)
  assert activations.gelu(xb).dtype == jnp.bfloat16
