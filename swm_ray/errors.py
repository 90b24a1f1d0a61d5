"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""

from __future__ import annotations

import re


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


def plain_user_error(e: UserError) -> UserError:
    """A copy of `e` that pickles on any Ray worker and carries no traceback or chained cause: UserError or
    RunError with the same message and exit code (what an actor raises, so the driver gets the one line)."""
    if isinstance(e, RunError):
        return RunError(str(e))
    return UserError(str(e), e.exit_code)


def find_user_error(e: BaseException | None) -> UserError | None:
    """The UserError behind an exception, also when Ray wrapped it: a task's RayTaskError keeps it as `.cause`
    (the wrapper is itself an instance of UserError but prints the whole remote traceback), and an actor whose
    `__init__` raised it dies with an error that keeps only its text (`actor_init_failed`)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(inner, UserError):
            return inner
        if isinstance(e, UserError):
            return e
        if getattr(e, "actor_init_failed", False) is True:
            found = _from_traceback_text(str(e))
            if found is not None:
                return found
        e = e.__cause__ or e.__context__
    return None


_LAST_LINE = re.compile(r"^(swm_ray(?:\.\w+)+)\.(\w+): (.+)$")


def _from_traceback_text(text: str) -> UserError | None:
    """The UserError named by the last line of a remote traceback (`swm_ray.errors.UserError: message`), rebuilt
    as the class it names where that is UserError or one of its subclasses known here; None otherwise."""
    for line in reversed(text.strip().splitlines()):
        m = _LAST_LINE.match(line.strip())
        if m is None:
            continue
        module, name, message = m.groups()
        if (module, name) == ("swm_ray.errors", "RunError"):
            return RunError(message)
        if (module, name) == ("swm_ray.errors", "UserError") or _is_user_error_class(module, name):
            return UserError(message)
        return None
    return None


def _is_user_error_class(module: str, name: str) -> bool:
    todo = list(UserError.__subclasses__())
    while todo:
        cls = todo.pop()
        if (cls.__module__, cls.__qualname__) == (module, name):
            return True
        todo += cls.__subclasses__()
    return False
