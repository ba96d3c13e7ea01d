"""What every command of the front end shares."""

from __future__ import annotations

import functools

import click

from retrostore import RetrostoreError

__all__ = ["friendly"]


def friendly(fn):
    """Turn RetrostoreError into click's one-line ``Error: ...`` (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RetrostoreError as exc:
            # (errors that are also OSErrors print their message without the "[Errno 11] " prefix)
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise click.ClickException(f"{type(exc).__name__}: {message}") from None

    return wrapper
