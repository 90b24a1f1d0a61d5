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


def find_user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind an exception, also when a Ray task or actor wrapped it (`.cause`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the original here; the wrapper
        if isinstance(inner, UserError):  # is itself an instance of UserError but prints the whole traceback
            return inner
        if isinstance(e, UserError):
            return e
        e = e.__cause__ or e.__context__
    return None
