"""Errors raised for bad user input, so CLIs can print them without a traceback, and the exit code they use."""

EXIT_BAD_INPUT = 2  # the exit status of every CLI for a ConfigError, DataError or other bad input


class ConfigError(ValueError):
  """A config field holds a value that is not allowed. The message names field, value and allowed values."""

  def __init__(self, field: str, value, allowed: str):
    self.field, self.value, self.allowed = field, value, allowed
    super().__init__(f"config field '{field}' = {value!r} is not allowed: {allowed}")


class DataError(ValueError):
  """The data cannot be read or is unusable (missing paths, empty corpus, too short for seq_len)."""
