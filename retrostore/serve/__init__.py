"""Serving a store over HTTP: ``retrostore serve STORE`` and ``retrostore.connect(url)``.

- :func:`retrostore.serve.run` (what the ``retrostore serve`` command calls)
  verifies the store and runs the app on uvicorn with N worker processes.
- :func:`retrostore.serve.app.create_app` is the ASGI app itself (Starlette),
  for uvicorn, any ASGI server, or :func:`retrostore.serve.ray_serve.deployment`.
- :func:`connect` returns a :class:`RemoteStore`, a client with the read API of
  :class:`retrostore.Store`; it needs only urllib3 and numpy.

The server side needs the ``serve`` extra (``pip install '.[serve]'``):
starlette, uvicorn, prometheus_client and urllib3, imported only when used.
See docs/serving.md.
"""

from __future__ import annotations

from .client import RemoteStore, connect
from .errors import MissingDependencyError, ServerError, ServerStoppingError, ServerUnavailableError
from .runner import run
from .settings import ServeSettings

__all__ = ["connect", "RemoteStore", "ServeSettings", "run", "ServerUnavailableError", "ServerError",
           "ServerStoppingError", "MissingDependencyError"]
