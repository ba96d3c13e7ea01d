"""uvicorn's h11 protocol with a deadline on a request's headers.

uvicorn closes an idle keep-alive connection after 5 s, and the app gives a body
``body_timeout_s`` to arrive, but nothing bounds the headers: a client that sends
half a request line and stops holds its connection (and its slot) for ever
(helper-27: still open after 100 s), a slow-headers attack on any server bound
beyond 127.0.0.1. Here a connection waiting for a request's headers, the first or
the next on a keep-alive connection, is closed after the settings'
``body_timeout_s`` (the same budget as for a body, default 30 s).
"""

from __future__ import annotations

import asyncio
import os

from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import SETTINGS_ENV, ServeSettings

__all__ = ["HeaderDeadlineH11"]

_TIMEOUT: list[float] = []  # the worker's settings' body_timeout_s, read once


def header_timeout_s() -> float:
    """The deadline for a request's headers, in seconds: ``body_timeout_s`` of the worker's settings."""
    if not _TIMEOUT:
        text = os.environ.get(SETTINGS_ENV)
        # Without them (the protocol given to a uvicorn the app's user runs): the settings' default.
        default = ServeSettings.__dataclass_fields__["body_timeout_s"].default
        _TIMEOUT.append(ServeSettings.from_json(text).body_timeout_s if text else default)
    return _TIMEOUT[0]


class HeaderDeadlineH11(H11Protocol):
    """:class:`uvicorn.protocols.http.h11_impl.H11Protocol`, closing a connection whose request
    headers have not all arrived :func:`header_timeout_s` after it began waiting for them."""

    _deadline: asyncio.TimerHandle | None = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(header_timeout_s(), self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.logger.info("closing a connection whose request headers did not arrive in %g s", header_timeout_s())
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._waiting_for_headers():
            self._disarm()  # a request began: its body has the app's own deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()  # (starts a pipelined request's cycle at once, when one is buffered)
        self._disarm()  # a fresh deadline for the next headers (helper-30: a stale one cut a pipelined connection)
        if not self.transport.is_closing() and self._waiting_for_headers():
            self._arm()  # the next request's headers on this keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
