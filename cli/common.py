"""What every command of the front end shares."""

from __future__ import annotations

import functools

import click

from retrostore import ReadOnlyStoreError, RetrostoreError, WriterLockedError

__all__ = ["friendly"]


#: What a command-line user does where the library's message advises a Python argument that no
#: command has (helper-56): per error class, that argument, and the hint given instead. An error
#: of the same class whose message names no such argument (an export's own lock, helper-61) gets none.
CLI_HINTS = {
    WriterLockedError: ("timeout_s=", "from the command line: wait until the other writer (a build, delete, reindex "
                                      "or compact still running) has finished, then run this command again"),
    ReadOnlyStoreError: ("mode=", "from the command line: this command writes to the store; run it on a writable "
                                  "copy (search, inspect and verify only read)"),
}


def friendly(fn):
    """Turn RetrostoreError into click's one-line ``Error: ...`` (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RetrostoreError as exc:
            # (errors that are also OSErrors print their message without the "[Errno 11] " prefix)
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            hint = next((f" ({h})" for cls, (arg, h) in CLI_HINTS.items()
                         if isinstance(exc, cls) and arg in str(message)), "")
            raise click.ClickException(f"{type(exc).__name__}: {message}{hint}") from None

    return wrapper
