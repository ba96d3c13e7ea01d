"""What every command of the front end shares."""

from __future__ import annotations

import functools

import click

from retrostore import ReadOnlyStoreError, RetrostoreError, WriterLockedError

__all__ = ["friendly"]


#: What a command-line user does where the library's message advises Python arguments
#: (``mode='r'``, ``timeout_s=``) that no command has (helper-56).
CLI_HINTS = {
    WriterLockedError: "from the command line: wait until the other writer (a build, delete, reindex or "
                         "compact still running) has finished, then run this command again",
    ReadOnlyStoreError: "from the command line: this command writes to the store; run it on a writable copy "
                          "(search, inspect and verify only read)",
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
            # only where the library's fix names Python arguments (helper-61: an export's own lock got the store's hint)
            python_args = "mode=" in str(message) or "timeout_s=" in str(message)
            hint = next((f" ({h})" for cls, h in CLI_HINTS.items() if isinstance(exc, cls)), "") if python_args else ""
            raise click.ClickException(f"{type(exc).__name__}: {message}{hint}") from None

    return wrapper
