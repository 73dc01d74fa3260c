"""What every command of pyra_jax shares: flag parsing, one error style, quiet logs.

Every command (`python -m pyra_jax.main`, `.vtab`, `.benchmark`,
`.param_counts`, `.convert`, `.experiments.*`) parses its flags with absl and
reports a problem the user can fix as ONE line on stderr, `Error: <what to do>`
(`fail`), with exit status 2 for a command line that cannot work and 1 for
anything else; a traceback means a bug.

Quiet by default (`quiet_libraries`): TensorFlow's C++ banners (oneDNN, CPU
instructions), XLA's and libtpu's start-up notices and the INFO/WARNING chatter
of Orbax, JAX and TensorFlow are hidden, because a user cannot act on them;
the command's own messages are not. Giving absl's `--verbosity` (`-v`) flag
brings them back: `--verbosity=0` shows them at INFO, `--verbosity=1` adds
debug logs.

Commands run under `app.run` (global absl flags) use `parse_flags` and `run`.
Commands whose `main(argv)` is also called in-process (tests, notebooks) keep
their flags in their own `flags.FlagValues` and parse with `parse`, so two of
them never clash over a flag name and a second call starts from the defaults.

No absl flag is defined on import here, so every command can use these helpers
without defining the others' flags.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, NoReturn, Sequence

from absl import app
from absl import flags

from pyra_jax import configs
from pyra_jax import errors
from pyra_jax.errors import UsageError

# The one prefix of every user error a command prints.
ERROR_PREFIX = 'Error: '
# Exit status of a command line that cannot work (absl's and argparse's too).
USAGE_EXIT = 2
HELP_FLAGS = ('--help', '-help', '--helpfull', '-helpfull', '--helpshort',
              '-helpshort', '-h', '-?', '--helpxml')


# ----------------------------------------------------------------------------
# One error style.
# ----------------------------------------------------------------------------

def print_error(message: str) -> None:
  """Prints `Error: message` as one line on stderr (for a main that returns
  its exit status instead of exiting)."""
  text = ' '.join(l.strip() for l in str(message).splitlines() if l.strip())
  print(f'{ERROR_PREFIX}{text}', file=sys.stderr, flush=True)


def fail(message: str, code: int = 1) -> NoReturn:
  """Prints `Error: message` as one line on stderr and exits with `code`."""
  print_error(message)
  sys.exit(code)


def flag_error_text(error: BaseException) -> str:
  """absl's message for a bad flag, as one sentence (it spans several lines)."""
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  text = lines[-1] if lines else type(error).__name__
  missing = re.search(r'Flag --(\w+) must have a value other than None', text)
  if missing:
    return f'--{missing[1]} is required: give --{missing[1]}=... (--help lists the flags).'
  return text


def wants_help(argv: Sequence[str]) -> bool:
  return any(a in HELP_FLAGS for a in argv)


def is_user_error(e: BaseException) -> bool:
  """A `pyra_jax.errors.PyraError` or a missing file: its message is for users."""
  return isinstance(e, (errors.PyraError, FileNotFoundError))


# ----------------------------------------------------------------------------
# Quiet by default.
# ----------------------------------------------------------------------------

# Python loggers of the libraries whose INFO and WARNING notices are hidden.
LIBRARY_LOGGERS = ('jax', 'jaxlib', 'tensorflow', 'tensorflow_datasets', 'orbax',
                   'etils', 'flax', 'h5py', 'matplotlib', 'PIL')
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OnlyOurs(std_logging.Filter):
  """On absl's logger (which Orbax also logs through): records below ERROR
  pass only when they come from pyra_jax or the script being run."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.ERROR:
      return True
    path = os.path.abspath(record.pathname or '')
    return path.startswith(_PACKAGE_DIR) or 'site-packages' not in path


_QUIET_FILTER = _OnlyOurs()


def verbosity_given(argv: Sequence[str]) -> bool:
  """Whether the command line sets absl's --verbosity (or -v)."""
  for a in argv[1:]:
    if a == '--':
      break
    name = a.split('=', 1)[0]
    if name in ('--verbosity', '-verbosity', '-v', '--v') or (
        a.startswith('-v') and a[2:].lstrip('-').isdigit()):
      return True
  return False


def quiet_libraries(quiet: bool = True) -> None:
  """Hides the libraries' notices (module doc); with quiet=False shows them.

  Must run before TensorFlow is first imported (its C++ log level is read
  then); pyra_jax imports TensorFlow only inside `pyra_jax.data`, after the
  flags are parsed. A TF_CPP_MIN_LOG_LEVEL the user set is kept.
  """
  absl_logger = std_logging.getLogger('absl')
  if not quiet:
    absl_logger.removeFilter(_QUIET_FILTER)
    for name in LIBRARY_LOGGERS:
      std_logging.getLogger(name).setLevel(std_logging.NOTSET)
    return
  # TensorFlow's and XLA's C++ logs (oneDNN, CPU features, TPU/GPU probing).
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('GRPC_VERBOSITY', 'ERROR')
  os.environ.setdefault('GLOG_minloglevel', '2')
  for name in LIBRARY_LOGGERS:
    std_logging.getLogger(name).setLevel(std_logging.ERROR)
  if _QUIET_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_QUIET_FILTER)


# ----------------------------------------------------------------------------
# absl commands run under app.run (global flags).
# ----------------------------------------------------------------------------

def config_arg(argv: Sequence[str]) -> str | None:
  """The value of --config on a command line, or None."""
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str], *, check_config: bool = True) -> list[str]:
  """A `flags_parser` for `app.run`: one-line errors, setting names, quiet logs.

  A packaged setting may be named (`--config=vitb_high`); a missing config
  file, a misspelt --config.<field> or a bad flag is one `Error:` line (exit
  2); the libraries are quieted unless --verbosity is given.
  """
  configs.resolve_argv(argv)
  configs.resolve_argv(sys.argv)
  quiet_libraries(not verbosity_given(argv))
  if check_config and not wants_help(argv):
    spec = config_arg(argv)
    try:
      if spec:
        check_overrides(load_config(spec), argv)
    except UsageError as e:
      fail(str(e), USAGE_EXIT)
  return parse_global(argv)


def parse_global(argv: list[str]) -> list[str]:
  """flags.FLAGS(argv) with a bad flag as one `Error:` line (exit 2); --help
  prints absl's help and exits 0 (absl's own help flags exit 1)."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    if wants_help(argv) and e.code in (None, 0, 1):
      sys.exit(0)
    raise
  except flags.Error as e:
    fail(flag_error_text(e), USAGE_EXIT)
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections' config overrides raise these for a value of the wrong type.
    msg = str(e).strip().strip('\'"').replace('\\n', ' ')
    fail(f'Bad command line: {msg.splitlines()[-1] if msg else type(e).__name__}',
         USAGE_EXIT)


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """`main` with user errors as one `Error:` line: a PyraError or a missing
  file (exit 1), a wrong command line (UsageError, absl's app.UsageError:
  exit 2). Anything else keeps its traceback: it is a bug."""

  def wrapped(argv: list[str]) -> Any:
    try:
      return call(lambda: main(argv))
    except app.UsageError as e:  # `call` leaves absl's own usage errors to us
      fail(str(e), USAGE_EXIT)

  return wrapped


def run(main: Callable[[list[str]], Any],
        flags_parser: Callable[[list[str]], list[str]] = parse_flags) -> None:
  """app.run(main) with the shared parser and error style."""
  app.run(guarded(main), flags_parser=flags_parser)


def no_arguments(argv: Sequence[str]) -> None:
  """Refuses positional arguments (absl passes them on to main)."""
  if len(argv) > 1:
    raise UsageError(f'Unexpected arguments: {" ".join(argv[1:])} (flags are '
                     'written --name=value; --help lists them).')


# ----------------------------------------------------------------------------
# absl commands with their own FlagValues (main(argv) callable in-process).
# ----------------------------------------------------------------------------

def define_verbosity(fv: flags.FlagValues) -> None:
  """--verbosity/-v on a command's own FlagValues, as absl's (module doc)."""
  flags.DEFINE_integer(
      'verbosity', None, 'Logging verbosity. Left out: only this command\'s '
      'messages and errors (TensorFlow, JAX and Orbax notices hidden); 0: those '
      'notices too; 1: debug logs as well.', short_name='v', flag_values=fv)


def help_text(fv: flags.FlagValues, prog: str, doc: str) -> str:
  return f'{doc.strip()}\n\nUsage: {prog} [flags]\n\nflags:\n{fv.get_help(include_special_flags=False)}\n'


def parse(fv: flags.FlagValues, argv: Sequence[str] | None, *, prog: str, doc: str,
          positional: int = 0) -> list[str]:
  """Parses `argv` (without the program name; None: sys.argv[1:]) into `fv`.

  --help prints `doc` and the flags and exits 0; a bad flag or a missing
  required one is one `Error:` line (exit 2). Returns up to `positional`
  positional arguments (more are refused). Flags not given go back to their
  defaults first, so calling a command's main twice in one process is safe.
  """
  args = list(sys.argv[1:] if argv is None else argv)
  if wants_help(args):
    print(help_text(fv, prog, doc))
    sys.exit(0)
  fv.unparse_flags()
  try:
    rest = fv([prog, *args])[1:]
    fv.validate_all_flags()
  except flags.Error as e:
    fail(flag_error_text(e), USAGE_EXIT)
  if len(rest) > positional:
    extra = rest[positional:]
    fail(f'Unexpected arguments: {" ".join(extra)} (flags are written '
         f'--name=value; {prog} --help lists them).', USAGE_EXIT)
  verbosity = fv['verbosity'].value if 'verbosity' in fv else None
  quiet_libraries(verbosity is None)
  if verbosity is not None:
    std_logging.getLogger().setLevel(
        std_logging.DEBUG if verbosity >= 1 else std_logging.INFO)
  return rest


def call(body: Callable[[], Any], *, interrupted: str | None = None) -> Any:
  """Runs `body` (after `parse`) with user errors as one `Error:` line.

  `interrupted`: the sentence for Ctrl-C (exit 130); None keeps Python's.
  """
  try:
    return body()
  except KeyboardInterrupt:
    if interrupted is None:
      raise
    fail(interrupted, 130)
  except UsageError as e:
    fail(str(e), USAGE_EXIT)
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e):
      raise
    fail(str(e), 1)


# ----------------------------------------------------------------------------
# Configs on the command line.
# ----------------------------------------------------------------------------

def load_config(spec: str):
  """Loads 'path.py[:arg]' like ml_collections does, with a one-line error."""
  path, sep, arg = spec.partition(':')  # As ml_collections splits it.
  if not os.path.isfile(path):
    raise UsageError(f'Config file {path!r} not found (relative paths are from '
                     f'{os.getcwd()}); the packaged settings, runnable by name '
                     f'(--config=vitb_high:task=dtd): {", ".join(configs.setting_names())}.')
  try:
    module_spec = importlib.util.spec_from_file_location('_pyra_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*([arg] if sep else []))
  except (TypeError, ValueError, KeyError, AttributeError, ImportError) as e:
    raise UsageError(f'Cannot build config {spec!r}: {e}') from None


def check_overrides(config, argv: Sequence[str]) -> None:
  """Rejects --config.<field> names that do not exist, listing valid ones."""
  for a in argv:
    if not a.startswith('--config.'):
      continue
    path = a[len('--config.'):].split('=', 1)[0]
    node, walked = config, 'config'
    for part in path.split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ''
        raise UsageError(
            f'Unknown config field --config.{path}: {walked} has no field '
            f'{part!r}.{hint} Valid fields of {walked}: {", ".join(sorted(keys))}.')
      node, walked = node[part], f'{walked}.{part}'
