"""Shared pytest setup: keep JAX on the CPU, compile quickly.

The repository root is importable because tests/ is a package (pytest puts the
first folder above it without an __init__.py on the import path).
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Tests compile many small programs once each: XLA's backend optimisations cost
# more compile time (3x for a train step) than they save in run time here.
# Numerics are unchanged up to float32 round-off; benchmarks never run with this.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()
