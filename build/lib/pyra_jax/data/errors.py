"""The one exception the data package raises for problems a user can fix.

`main` catches `DataError` and prints its message alone (no traceback): every
message is one or two sentences that name the file, split or command involved.
"""


class DataError(ValueError):
  """A dataset is missing, unprepared or malformed; the message says what to do."""
