"""`DataError`, the error the data package raises (see `pyra_jax.errors`)."""

from pyra_jax.errors import DataError  # pylint: disable=unused-import
