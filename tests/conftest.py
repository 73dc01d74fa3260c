"""Shared pytest setup: make the repository importable and keep JAX on the CPU."""

import os
import sys
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# Tests compile many small programs once each: XLA's backend optimisations cost
# more compile time (3x for a train step) than they save in run time here.
# Numerics are unchanged up to float32 round-off; benchmarks never run with this.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))
