"""TensorFlow, imported once for the data package, without its start-up notices
when the command is quiet.

Why a module of its own: TensorFlow 2.21 prints "oneDNN custom operations are
on" through absl's C++ log before that log is initialised, straight to file
descriptor 2, and TF_CPP_MIN_LOG_LEVEL does not reach it (on processors where
oneDNN is switched on by default). When the libraries are quieted
(TF_CPP_MIN_LOG_LEVEL=3, which every pyra_jax command sets unless --verbosity
is given, and which a user may set too), the import runs with file descriptor 2
pointed at the null device; import errors still raise, as Python exceptions.
Every module of `pyra_jax.data` takes `tf` from here, so whichever is imported
first imports TensorFlow quietly.
"""

import os
import sys


def _import_quietly() -> None:
  if 'tensorflow' in sys.modules or os.environ.get('TF_CPP_MIN_LOG_LEVEL') != '3':
    return
  sys.stderr.flush()
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


_import_quietly()
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

__all__ = ['tf']
