"""Where a sharded build's stages 1 and 3 run: in this process
(:class:`LocalEngine`), as Ray tasks on CPUs, or on model-holding Ray actors,
one per GPU (:class:`RayEngine`). Ray is an optional dependency, imported when
a Ray engine starts.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, RetrostoreError
from ..text.models import default_embedder
from . import shards as _shards

__all__ = ["ENGINES", "DEVICES", "LocalEngine", "RayEngine", "cuda_providers", "check_ray_address"]

#: Seconds to wait for a TCP connection to a given Ray cluster address before giving up.
#: ``ray.init`` itself retries an unreachable GCS without end and ignores Ctrl-C and SIGTERM
#: meanwhile (helper-39: still waiting after 287 s).
CONNECT_TIMEOUT_S = 10.0

ENGINES = ("local", "ray")
DEVICES = ("cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
#: Texts per onnxruntime call on a GPU (the CPU default, 16, starves a GPU).
GPU_BATCH = 256
_embedders: dict[tuple, Any] = {}  # per worker process: (threads, providers) -> embedder


def _embedder(threads: int | None, providers: tuple[str, ...], batch_size: int = 16):
    """The default embedder, cached per process (Ray reuses worker processes)."""
    key = (threads, providers, batch_size)
    if key not in _embedders:
        _embedders[key] = default_embedder(threads=threads, providers=list(providers), batch_size=batch_size)
    return _embedders[key]


def _active(emb) -> list[str]:
    return list(emb._session.get_providers())


def cuda_providers() -> tuple[tuple[str, ...], str | None]:
    """Providers for ``device="cuda"`` in this process, and why it falls back to CPU (or None)."""
    import onnxruntime as ort  # lazily, as retrostore.text.embed does (fork safety)

    if _CUDA not in ort.get_available_providers():
        return (_CPU,), (f"--device cuda: onnxruntime {ort.__version__} here has no {_CUDA} (available: "
                         f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu matching your "
                         "CUDA to embed on GPUs. Embedding on CPU.")
    return (_CUDA, _CPU), None


def _fallback(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# -- engines ----------------------------------------------------------------------
class LocalEngine:
    """Every stage in this process, one shard after another."""

    name = "local"

    def __init__(self, plan: dict, work: Path, device: str, threads: int | None):
        self.plan, self.work, self.threads = plan, work, threads
        self.device = device
        self._emb = None

    def map(self, fn, calls: list[tuple]) -> list:
        return [fn(*args) for args in calls]

    @property
    def embedder(self):
        if self._emb is None:
            providers, why = cuda_providers() if self.device == "cuda" else ((_CPU,), None)
            emb = _embedder(self.threads, providers, GPU_BATCH if _CUDA in providers else 16)
            if self.device == "cuda" and why is None and _CUDA not in _active(emb):
                why = f"--device cuda: onnxruntime could not start {_CUDA} (no usable GPU?). Embedding on CPU."
            if why:
                _fallback(why)
                self.device = "cpu"
            self._emb = emb
        return self._emb

    def start(self, indices: list[int]) -> None:
        pass

    def result(self, index: int) -> dict:
        return _shards.run_shard(self.plan, index, self.work, self.embedder)

    def close(self) -> None:
        pass


def _ray_call(fn, *args):
    return fn(*args)


def _ray_shard_task(plan: dict, index: int, work: str, threads: int) -> dict:
    return _shards.run_shard(plan, index, work, _embedder(threads, (_CPU,)))


class _GpuShardWorker:
    """A Ray actor holding the model on one GPU; runs whole shards."""

    def __init__(self, plan: dict, work: str, threads: int):
        self.plan, self.work = plan, work
        providers, self.why = cuda_providers()
        self.emb = _embedder(threads, providers, GPU_BATCH)
        if self.why is None and _CUDA not in _active(self.emb):
            self.why = (f"--device cuda: onnxruntime on {os.uname().nodename} could not start {_CUDA} "
                        "(no usable GPU?). Embedding on CPU there.")

    def fallback(self) -> str | None:
        return self.why

    def run(self, index: int) -> dict:
        return _shards.run_shard(self.plan, index, self.work, self.emb)


def check_ray_address(address: str | None) -> None:
    """Check that the Ray cluster ``address`` (else ``RAY_ADDRESS``) answers, before ``ray.init``.

    ``None``/``"auto"``/``"local"`` pass (Ray starts or finds a local instance and says when it
    cannot). ``host:port`` and ``ray://host:port`` must accept a TCP connection within
    :data:`CONNECT_TIMEOUT_S` seconds.

    Raises
    ------
    InvalidInputError
        A malformed address, or one nothing answers at (refused, unknown host, timed out).
    """
    given = address is not None
    address = address if given else os.environ.get("RAY_ADDRESS")
    if address is None or address.strip() in ("", "auto", "local"):
        return
    source = "--address" if given else "RAY_ADDRESS"
    rest = address.strip()
    rest = rest.split("://", 1)[1] if "://" in rest else rest
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"{source} {address!r} is not a Ray cluster address: give HOST:PORT of its head "
                                "node (e.g. 10.0.0.5:6379, as `ray start --head` prints), ray://HOST:10001, or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise InvalidInputError(
            f"cannot reach the Ray cluster at {source} {address!r} ({why}, within {CONNECT_TIMEOUT_S:.0f} s); check "
            "the address and that the cluster is up (`ray status` on its head node), or leave --address out to "
            "start a local Ray") from None


class RayEngine:
    """Stage 1 counting and stage 3 shards as Ray tasks (CPU) or actor calls (GPU)."""

    name = "ray"

    def __init__(self, plan: dict | None, work: Path, device: str, address: str | None, max_retries: int,
                 cpus_per_task: int):
        try:
            import ray
        except ImportError as exc:
            raise InvalidInputError('--engine ray needs Ray: pip install ".[ray]" in the retrostore checkout (the ray extra), or pip install ray') from exc
        self.ray = ray
        self.plan, self.work, self.device = plan, work, device
        self.max_retries, self.cpus = max_retries, cpus_per_task
        self.started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, logging_level="WARNING")
            except (ConnectionError, ValueError, RuntimeError) as exc:  # helper-39: tracebacks from ray.init
                where = f"at --address {address!r}" if address is not None else "(RAY_ADDRESS, or a new local one)"
                raise InvalidInputError(
                    f"Ray could not start or connect {where}: {' '.join(str(exc).split())[:300]}; check the address, "
                    "or leave --address out to start a local Ray") from exc
            self.started = True
        self._refs: dict[int, Any] = {}
        self._actors: list = []
        self._ordered = None
        if device == "cuda" and ray.cluster_resources().get("GPU", 0) < 1:
            _fallback("--device cuda: the Ray cluster has no GPUs (ray.cluster_resources() lists none). "
                      "Embedding on CPU.")
            self.device = "cpu"

    def map(self, fn, calls: list[tuple]) -> list:
        task = self.ray.remote(_ray_call).options(num_cpus=1, max_retries=self.max_retries,
                                                  retry_exceptions=[OSError])
        refs = [task.remote(fn, *args) for args in calls]
        return self._get(lambda: self.ray.get(refs))

    def start(self, indices: list[int]) -> None:
        ray = self.ray
        plan_ref = ray.put(self.plan)
        if self.device == "cpu":
            task = ray.remote(_ray_shard_task).options(num_cpus=self.cpus, max_retries=self.max_retries,
                                                       retry_exceptions=[OSError])
            self._refs = {i: task.remote(plan_ref, i, os.fspath(self.work), self.cpus) for i in indices}
            return
        from ray.util import ActorPool

        n_gpus = int(ray.cluster_resources().get("GPU", 0))
        cls = ray.remote(_GpuShardWorker).options(num_gpus=1, num_cpus=self.cpus, max_restarts=self.max_retries,
                                                   max_task_retries=self.max_retries)
        self._actors = [cls.remote(plan_ref, os.fspath(self.work), self.cpus) for _ in range(max(1, min(n_gpus,
                                                                                                        len(indices))))]
        whys = self._get(lambda: ray.get([a.fallback.remote() for a in self._actors]))
        for why in sorted(set(w for w in whys if w)):
            _fallback(why)
        if all(whys):
            self.device = "cpu"
        pool = ActorPool(self._actors)
        self._ordered = zip(indices, pool.map(lambda a, i: a.run.remote(i), indices))

    def result(self, index: int) -> dict:
        if self._ordered is not None:
            i, out = self._get(lambda: next(self._ordered))  # ActorPool.map yields in shard order
            assert i == index, (i, index)
            return out
        ref = self._refs.pop(index)
        return self._get(lambda: self.ray.get(ref))

    def _get(self, fn):
        """``fn()`` (a ``ray.get``), with Ray's errors turned into retrostore's."""
        try:
            return fn()
        except self.ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, RetrostoreError):
                raise cause from None
            raise RetrostoreError(f"a Ray task of the build failed: {cause or exc}") from exc
        except self.ray.exceptions.RayError as exc:
            raise RetrostoreError(
                f"a Ray task of the build failed after {self.max_retries} retries ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); run the build again: "
                "finished shards are reused") from exc

    def close(self) -> None:
        for ref in self._refs.values():
            try:
                self.ray.cancel(ref, force=True)
            except Exception:
                pass
        for a in self._actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        if self.started:
            self.ray.shutdown()
