"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def shown(path) -> str:
    """A path as a one-line message can show it: as it is, or quoted with escapes where it holds a newline or
    another unprintable character (file names may)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def one_line(exc: BaseException) -> str:
    """The last meaningful line of an exception message.

    DataLoader workers re-raise errors with the worker's traceback folded into the message; the
    user only needs the final line, stripped of the exception's module path.
    """
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    for prefix in ("ssl_bench.errors.UserError: ", "UserError: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last
