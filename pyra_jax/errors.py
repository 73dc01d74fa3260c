"""The errors pyra_jax raises for problems a user can fix, under one base class.

Every message is meant to be read alone: one or two sentences that name the
field, file or command involved and say what to do. `pyra_jax.main` (and the
other commands) catch `PyraError` and print the message without a traceback;
anything else is a bug and keeps its traceback. The subclasses say where the
problem lies, for callers that want to handle one kind (a notebook retrying
with other data, a sweep skipping a bad setting).

They derive from ValueError, as the error classes they replace did, so code
that caught ValueError keeps working.
"""


class PyraError(ValueError):
  """A problem the user can fix; the message says what to do."""


class UsageError(PyraError):
  """A command line that cannot work."""


class ConfigError(PyraError):
  """A config value that cannot work; the message names the field."""


class ScheduleError(ConfigError):
  """A merging schedule that cannot be applied to the model it was given."""


class DataError(PyraError):
  """A dataset is missing, unprepared or malformed."""


class CheckpointError(PyraError):
  """Pretrained weights that cannot be loaded into the model."""


class CheckpointMismatchError(PyraError):
  """The workdir holds a checkpoint of a different run; the message says which fields differ."""


class CheckpointUnreadableError(PyraError):
  """No checkpoint of the workdir (or not the one asked for) can be read."""


class WorkdirInUseError(PyraError):
  """Another live process trains in this workdir; the message names it."""


class TrainingError(PyraError):
  """A run that cannot continue (e.g. a non-finite loss); the message says why."""


class DivergedError(TrainingError):
  """The loss or the parameters became non-finite; the message names the lr to lower."""


class ExportError(PyraError):
  """An export that cannot be written or read."""


class BenchmarkError(PyraError):
  """A benchmark request that cannot run."""


class StudyError(PyraError):
  """A study definition or command line that cannot work."""


class MissingExtraError(PyraError, ImportError):
  """A feature needs an optional extra that is not installed; the message names
  the `pip install 'pyra_jax[...]'` that adds it.

  Also an ImportError, so code that guarded the import keeps working.
  """
