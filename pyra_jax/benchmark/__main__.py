"""`python -m pyra_jax.benchmark`: the command line (pyra_jax.benchmark.command)."""

from pyra_jax import benchmark
from pyra_jax.benchmark import command

__doc__ = benchmark.__doc__  # pylint: disable=redefined-builtin  (what --help prints)

if __name__ == '__main__':
  command.run()
