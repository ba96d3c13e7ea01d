"""Sharded builds: the stages of :mod:`retrostore._shards` run in this process
or on a Ray cluster, merged into one ordinary store.

``build_sharded`` is what ``retrostore build --engine local|ray`` runs:

1. plan the shards (input files counted in parallel) and save the plan in the
   work directory (default ``STORE.build/`` beside the store);
2. when the store is new and its factory string needs training, train a
   template once on a seeded sample of the build's chunks and commit it
   (``_maintenance.install_template``); shard tasks then encode their vectors
   with clones of it and the merge's commits adopt those codes. ``auto`` and ``Flat`` skip the stage (``auto``
   trains at the commit that crosses its threshold, as in-process builds do),
   and so does a sample too small for the factory;
3. run one task per unfinished shard: a Ray task on CPUs, or a call on one of
   the model-holding actors (one per GPU) with ``device="cuda"``;
4. merge the shards in shard order as they finish, through
   ``Store._append_chunked`` with the shards' vectors, committing every
   ``commit_every`` chunks; each commit records in the manifest (``builds``)
   how many shards of this build are merged. Then verify the store and remove
   the work directory.

Chunk and document ids follow shard order, so a store built on Ray equals one
built in this process, and equals a plain ``retrostore build`` of the same
inputs record for record. Re-running a finished build does nothing;
re-running an interrupted one reuses the finished shards and continues the
merge where its last commit stopped.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from . import _fileio, _manifest, _shards
from ._embed import DEFAULT_MODEL_SHA256
from .errors import CorruptStoreError, IndexTrainingError, InvalidInputError, RetrostoreError

__all__ = ["build_sharded", "ENGINES", "DEVICES"]

log = logging.getLogger("retrostore")

ENGINES = ("local", "ray")
DEVICES = ("cpu", "cuda")
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"
#: Texts per onnxruntime call on a GPU (the CPU default, 16, starves a GPU).
GPU_BATCH = 256
_embedders: dict[tuple, Any] = {}  # per worker process: (threads, providers) -> embedder


def _embedder(threads: int | None, providers: tuple[str, ...], batch_size: int = 16):
    """The default embedder, cached per process (Ray reuses worker processes)."""
    from ._embed import default_embedder

    key = (threads, providers, batch_size)
    if key not in _embedders:
        _embedders[key] = default_embedder(threads=threads, providers=list(providers), batch_size=batch_size)
    return _embedders[key]


def _active(emb) -> list[str]:
    return list(emb._session.get_providers())


def cuda_providers() -> tuple[tuple[str, ...], str | None]:
    """Providers for ``device="cuda"`` in this process, and why it falls back to CPU (or None)."""
    import onnxruntime as ort

    if _CUDA not in ort.get_available_providers():
        return (_CPU,), (f"--device cuda: onnxruntime {ort.__version__} here has no {_CUDA} (available: "
                         f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu matching your "
                         "CUDA to embed on GPUs. Embedding on CPU.")
    return (_CUDA, _CPU), None


def _fallback(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# -- engines ----------------------------------------------------------------------
class _LocalEngine:
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


class _RayEngine:
    """Stage 1 counting and stage 3 shards as Ray tasks (CPU) or actor calls (GPU)."""

    name = "ray"

    def __init__(self, plan: dict | None, work: Path, device: str, address: str | None, max_retries: int,
                 cpus_per_task: int):
        try:
            import ray
        except ImportError as exc:
            raise InvalidInputError('--engine ray needs Ray: pip install "retrostore[ray]"') from exc
        self.ray = ray
        self.plan, self.work, self.device = plan, work, device
        self.max_retries, self.cpus = max_retries, cpus_per_task
        self.started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level="WARNING")
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


# -- the build ----------------------------------------------------------------------
def _settings(m: dict, text_field: str, meta_field: str) -> dict:
    return {
        "tokenizer_sha256": m["tokenizer"]["sha256"], "token_dtype": m["tokenizer"]["token_dtype"],
        # the index policy (target), not the factory in force: stage 2 or a commit may train it
        "chunk_tokens": m["chunk_tokens"], "embedder": m["embedder"],
        "index": m["index"].get("target", m["index"]["factory"]),
        "metric": m["metric"], "dim": m["index"]["dim"], "text_field": text_field, "meta_field": meta_field,
    }


def _finished(m: dict, *, key: str | None = None, build_id: str | None = None) -> dict | None:
    for bid, rec in m.get("builds", {}).items():
        if (bid == build_id or rec.get("key") == key) and rec["merged"] == rec["shards"]:
            return dict(rec, build_id=bid)
    return None


def _remove_work(work: Path, own_dir: bool) -> None:
    for p in list(work.glob("shard-*")) + list(work.glob(f"{_fileio.TMP_PREFIX}*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for name in (_shards.PLAN, _shards.TOKENIZER, _shards.TEMPLATE, "LOCK"):
        (work / name).unlink(missing_ok=True)
    if own_dir:
        try:
            work.rmdir()
        except OSError:
            pass


def _stage2_due(m: dict) -> bool:
    """Whether stage 2 trains a template: an empty, untrained store whose index policy is a
    factory string that needs training (``auto`` trains at the commit that crosses its threshold)."""
    idx = m["index"]
    target = idx.get("target", idx["factory"])
    return (target != "auto" and not idx.get("template") and m["counts"]["vectors"] == 0
            and _shards.needs_training(target, idx["dim"], m["metric"]))


def _train_stage(st, plan: dict, work: Path, local: "_LocalEngine") -> None:
    """Stage 2: train the store's factory on a seeded sample of the build's chunks, install it.

    A sample too small for the factory (a small build) leaves the store as it is: served by
    exact Flat until a commit has enough vectors to train it, as an in-process build does.
    """
    from ._maintenance import install_template

    m = st.manifest
    target = m["index"].get("target", m["index"]["factory"])
    seed = int(m["settings"].get("train_seed", 0))
    t0 = time.perf_counter()
    info: dict = {}
    try:
        path = _shards.train_template(plan, work, local.embedder, factory=target,
                                      train_vectors=m["settings"].get("train_size"), seed=seed, info=info)
    except IndexTrainingError as exc:
        log.info("stage 2 skipped, the store trains at a commit once it has enough vectors: %s", exc)
        return
    if path is None:
        return
    install_template(st, path.read_bytes(), target, sample=info.get("sample", 0), seed=seed,
                     seconds=time.perf_counter() - t0)


def build_sharded(
    store: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    engine: str = "local",
    shards: int | None = None,
    address: str | None = None,
    device: str = "cpu",
    work_dir: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    chunk_tokens: int | None = None,
    text_field: str = "text",
    meta_field: str = "meta",
    index: str | None = None,
    commit_every: int = 20_000,
    threads: int | None = None,
    cpus_per_task: int = 1,
    max_retries: int = 3,
    shard_chars: int = _shards.SHARD_CHARS,
    progress: bool = True,
):
    """Build ``store`` from ``inputs`` in shards (see the module docstring).

    Parameters
    ----------
    engine : {"local", "ray"}
        Where stages 1 and 3 run; stage 4 (the merge) always runs here.
    shards : int, optional
        Number of shards; default one per ``shard_chars`` characters of input.
    address : str, optional
        Ray cluster address (``ray.init(address=...)``); default: the running
        Ray instance of this process, else ``RAY_ADDRESS``, else a new local one.
    device : {"cpu", "cuda"}
        ``"cuda"``: onnxruntime's CUDA execution provider, one model-holding
        Ray actor per GPU; falls back to CPU with a ``RuntimeWarning`` saying
        why when there is no GPU or no onnxruntime-gpu.
    work_dir : path-like, optional
        Where the plan and shards live until merged (default ``STORE.build``
        beside the store; on a cluster it must be storage every node shares,
        like the inputs).
    cpus_per_task : int, default 1
        CPUs (and onnxruntime threads) of each Ray shard task.
    max_retries : int, default 3
        Ray retries of a shard task whose worker died (or raised OSError).
    Other parameters as :func:`retrostore.build.build_store`.

    Returns
    -------
    BuildResult

    Raises
    ------
    InvalidInputError
        Bad arguments, inputs or settings; a work directory holding another build.
    IndexTrainingError
        The index factory needs training and this store cannot take a template.
    CorruptStoreError
        A damaged plan or shard, or the merged store fails verification.
    RetrostoreError
        A shard task failed for good (the message says why).
    """
    from ._create import create
    from ._create import open_store
    from .build import BuildResult, _check_same_settings

    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise InvalidInputError(f"engine={engine!r} must be one of {', '.join(ENGINES)}")
    if device not in DEVICES:
        raise InvalidInputError(f"device={device!r} must be 'cpu' or 'cuda'")
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1):
        raise InvalidInputError(f"shards={shards!r} must be an int >= 1")
    if address is not None and engine != "ray":
        raise InvalidInputError("address= (--address) needs engine='ray'")
    root = Path(store)
    work = Path(work_dir) if work_dir is not None else root.parent / f"{root.name}.build"
    files = _shards.input_files(inputs)  # checks the inputs before anything is created
    if (root / _manifest.MANIFEST).exists():
        st = open_store(root, "a", threads=threads)
        _check_same_settings(st, tokenizer, chunk_tokens, index)
    else:
        st = create(root, tokenizer=tokenizer, chunk_tokens=64 if chunk_tokens is None else chunk_tokens,
                    index=index or "auto", threads=threads)
    eng = None
    lock = None
    interrupted = False
    n_docs = n_chunks = reused = 0
    plan: dict | None = None
    try:
        m = st.manifest
        if m["embedder"].get("model_sha256") != DEFAULT_MODEL_SHA256:
            raise InvalidInputError(f"{root} uses the embedder {m['embedder'].get('name')!r}; sharded builds run "
                                    "the default embedder only. Build without --engine")
        settings = _settings(m, text_field, meta_field)
        key = _shards.plan_key(files, settings, shards, shard_chars)
        done = _finished(m, key=key)
        if done is not None:
            if work.is_dir() and (_shards.read_plan(work) or {}).get("build_id") == done["build_id"]:
                _remove_work(work, work_dir is None)  # left over from a crash after the last commit
            return BuildResult(st.version, 0, 0, time.perf_counter() - t0, shards=done["shards"],
                               build_id=done["build_id"], engine=engine, device=device)
        own_dir = work_dir is None  # STORE.build is ours to remove; a given --work-dir is emptied, not removed
        work.mkdir(parents=True, exist_ok=True)
        lock = _fileio.WriterLock(work / "LOCK")
        _shards.clean_temporaries(work)

        # Stage 1: plan (reused from the work directory when it is this build's).
        plan = _shards.read_plan(work)
        if plan is not None and plan["key"] != key:
            raise InvalidInputError(
                f"{work} holds an unfinished build of other inputs or settings (plan {plan['build_id'][:12]}); "
                "finish it with the same command, delete the directory, or pass another --work-dir")
        if engine == "ray":
            eng = _RayEngine(None, work, device, address, max_retries, cpus_per_task)
        if plan is None:
            calls = [(f["path"], f["rel"], text_field, meta_field) for f in files]
            counts = (eng.map if eng else lambda fn, c: [fn(*a) for a in c])(_shards.count_file, calls)
            plan = _shards.make_plan(files, counts, settings, shards=shards, shard_chars=shard_chars, key=key)
            _fileio.atomic_write(work / _shards.TOKENIZER, [(root / m["tokenizer"]["path"]).read_bytes()])
            _shards.write_plan(work, plan)
        build_id, n_shards = plan["build_id"], len(plan["body"]["shards"])
        done = _finished(m, build_id=build_id)
        if done is not None:
            _remove_work(work, own_dir)
            return BuildResult(st.version, 0, 0, time.perf_counter() - t0, shards=n_shards, build_id=build_id,
                               engine=engine, device=device)
        if eng is None:
            eng = _LocalEngine(plan, work, device, threads)
        else:
            eng.plan = plan

        # Stage 2: the index template, when the store is empty and its factory needs training.
        if _stage2_due(st.manifest):
            _train_stage(st, plan, work, eng if isinstance(eng, _LocalEngine) else _LocalEngine(plan, work, "cpu", threads))
        tpl = st.manifest["index"].get("template")
        if tpl and not (work / _shards.TEMPLATE).is_file():  # a trained store: shards encode with its template
            _fileio.atomic_write(work / _shards.TEMPLATE, [(root / tpl["path"]).read_bytes()])

        # Stages 3 and 4: shards run on the engine, merged here in shard order as they finish.
        builds = m.get("builds", {})
        record = builds.get(build_id) or {"key": key, "shards": n_shards, "merged": 0, "documents":
                                          plan["body"]["documents"], "first_doc_id": m["next_doc_id"],
                                          "first_chunk_id": m["next_chunk_id"]}
        todo = list(range(record["merged"], n_shards))
        missing = [i for i in todo if not _shards.shard_complete(work, plan, i)]
        reused = len(todo) - len(missing)
        if missing:
            eng.start(missing)
        from tqdm import tqdm

        bar = tqdm(total=n_shards, initial=record["merged"], unit="shard", disable=not progress,
                   desc=f"build ({engine})", dynamic_ncols=True)
        merged_dirs: list[Path] = []
        try:
            for i in todo:
                if i in missing:
                    eng.result(i)
                texts, per_doc, metas, vectors = _shards.load_shard(work, plan, i)
                tpl = st.manifest["index"].get("template")
                codes = _shards.load_codes(work, plan, i, tpl["sha256"]) if tpl else None
                st._append_chunked(texts, per_doc, metas, vectors)
                st._pending_codes.append(codes)  # encoded by the shard, or None: the commit encodes
                n_docs += len(texts)
                n_chunks += len(vectors)
                record = dict(record, merged=i + 1)
                st._pending_fields["builds"] = dict(st.manifest.get("builds", {}), **{build_id: record})
                merged_dirs.append(_shards.shard_dir(work, i))
                if st._pending_chunks >= commit_every or i == n_shards - 1:
                    st.commit()
                    for d in merged_dirs:  # committed: the shard is no longer needed
                        shutil.rmtree(d, ignore_errors=True)
                    merged_dirs = []
                bar.update(1)
                bar.set_postfix(chunks=n_chunks, chunks_per_s=f"{n_chunks / (time.perf_counter() - t0):.0f}",
                                refresh=False)
        finally:
            bar.close()
        problems = st.verify()
        if problems:
            raise CorruptStoreError(f"{root}: the merged store fails verification: {'; '.join(problems[:5])}")
        version = st.version
        dev = eng.device if eng is not None else device
        if lock is not None:
            lock.release()
            lock = None
        _remove_work(work, own_dir)
    except KeyboardInterrupt:
        interrupted = True
        version = _manifest.read_manifest(root)["version"]
        dev = device
    finally:
        if eng is not None:
            eng.close()
        if lock is not None:
            lock.release()
        st.close()
    committed = (n_docs, n_chunks) if not interrupted else _committed(root, plan)
    return BuildResult(version, committed[0], committed[1], time.perf_counter() - t0, interrupted,
                       shards=len(plan["body"]["shards"]) if plan else 0, reused_shards=reused,
                       build_id=plan["build_id"] if plan else None, engine=engine, device=dev)


def _committed(root: Path, plan: dict | None) -> tuple[int, int]:
    """Documents and chunks of ``plan`` committed so far (after an interrupt)."""
    if plan is None:
        return 0, 0
    m = _manifest.read_manifest(root)
    rec = m.get("builds", {}).get(plan["build_id"])
    if rec is None:
        return 0, 0
    return m["next_doc_id"] - rec["first_doc_id"], m["next_chunk_id"] - rec["first_chunk_id"]
