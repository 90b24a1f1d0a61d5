"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class UserError(Exception):
    """A mistake in what the user asked for (a flag, a path, a config key), with what to do about it."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class RunError(UserError):
    """The run cannot go on for a reason outside the user's command (the cluster cannot place the actors, an
    actor died more often than it may restart): one line, exit code 1, nothing half-written."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)
