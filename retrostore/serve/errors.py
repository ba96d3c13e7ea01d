"""Errors of the server and its client (all subclasses of ``retrostore.RetrostoreError``).

A server's 4xx answers come back from the client as the library's own classes
(``InvalidInputError``, ``EmbedderMismatchError``, ...), carrying ``status``,
``field``, ``value`` and ``limit`` attributes; these classes cover what only a
network service can fail at.
"""

from __future__ import annotations

from retrostore.errors import RetrostoreError

__all__ = ["ServerUnavailableError", "ServerError", "ServerStoppingError", "MissingDependencyError"]


class ServerUnavailableError(RetrostoreError, ConnectionError):
    """The server could not be reached, or did not answer in time."""


class ServerError(RetrostoreError):
    """The server failed to answer (HTTP 5xx) with an error no other class describes.

    ``status`` holds the HTTP status.
    """

    status: int = 500


class ServerStoppingError(RetrostoreError):
    """The server is shutting down; the request was not answered (retry, or ask another replica)."""


class MissingDependencyError(RetrostoreError, ImportError):
    """A package that serving needs is not installed (``pip install '.[serve]'``)."""
