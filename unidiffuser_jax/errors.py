"""The error every job raises for input it cannot use; main prints it as one `error:` line."""


class ConfigError(ValueError):
  """A configuration that cannot work; the message says what to change."""


class StopError(RuntimeError):
  """A run that stops on purpose (too many NaN steps, a full disk, an unreadable checkpoint the
  user asked for); main prints it as one `error:` line and exits 1."""
