"""The error every job raises for input it cannot use; main prints it as one `error:` line."""


class ConfigError(ValueError):
  """A configuration that cannot work; the message says what to change."""
