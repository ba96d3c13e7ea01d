"""Scale-out past one machine: the same app as a Ray Serve deployment with replicas.

Each replica runs :func:`retrostore.serve.app.create_app` (built on the
replica, not pickled from the driver), opens the store read-only at the same
path, batches its own requests and follows commits; Ray Serve's HTTP proxy
spreads requests over the replicas. Every node that hosts a replica needs the
store at ``store`` (a shared file system, or a copy per node made with
``retrostore pack`` / ``retrostore unpack``). Needs the ``ray-serve`` extra
(``pip install '.[ray-serve]'`` in the retrostore checkout).

>>> from ray import serve                                          # doctest: +SKIP
>>> from retrostore.serve.ray_serve import deployment              # doctest: +SKIP
>>> serve.start(http_options={"host": "127.0.0.1", "port": 8808})  # doctest: +SKIP
>>> serve.run(deployment("wiki.rstore", replicas=4), route_prefix="/")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

from .app import create_app
from .errors import MissingDependencyError
from .settings import ServeSettings

__all__ = ["deployment"]


def deployment(store: str | os.PathLike, *, replicas: int = 2, name: str = "retrostore",
               ray_actor_options: dict | None = None, **settings: Any) -> Any:
    """A bound Ray Serve application serving ``store`` from ``replicas`` replicas.

    Parameters
    ----------
    store : path-like
        The store directory, at the same path on every node that runs a replica.
    replicas : int, default 2
        Number of replicas (Ray actors); each opens the store and runs its own batcher.
    name : str, default "retrostore"
        The deployment's name.
    ray_actor_options : dict, optional
        Resources of each replica; default ``{"num_cpus": 1}``.
    **settings
        Any other :class:`ServeSettings` field (``batch_window_ms``, ``max_batch``,
        ``max_k``, ``mmap``, ...). ``threads`` defaults to the replica's ``num_cpus``.

    Returns
    -------
    ray.serve.Application
        Pass it to ``ray.serve.run``.

    Raises
    ------
    MissingDependencyError
        Ray Serve is not installed.
    InvalidInputError
        A setting is out of range.
    """
    try:
        from ray import serve
    except ImportError as exc:
        raise MissingDependencyError(f"the Ray Serve deployment needs ray[serve] ({exc}): "
                                     "pip install '.[ray-serve]' in the retrostore checkout") from None
    options = dict(ray_actor_options or {"num_cpus": 1})
    settings.setdefault("threads", max(1, int(options.get("num_cpus", 1) or 1)))
    config = ServeSettings(store=os.path.abspath(os.fspath(store)), **settings).to_json()

    def build_app():  # runs on each replica: the store is opened there
        return create_app(ServeSettings.from_json(config))

    ingress = serve.ingress(build_app)()
    return serve.deployment(ingress, name=name, num_replicas=replicas, ray_actor_options=options).bind()
