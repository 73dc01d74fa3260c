"""`python -m pyra_jax.benchmark`: the command line (pyra_jax.benchmark.command)."""

from pyra_jax.benchmark import command

if __name__ == '__main__':
  command.run()
