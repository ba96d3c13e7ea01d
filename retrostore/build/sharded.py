"""Sharded builds: the stages of :mod:`retrostore.build.plan` and
:mod:`retrostore.build.shards` run in this process or on a Ray cluster, merged
into one ordinary store.

``build_sharded`` is what ``retrostore build --engine local|ray`` runs
(the stages' work is in :mod:`.plan` and :mod:`.shards`, where it runs in
:mod:`.engines`):

1. plan the shards (input files counted in parallel) and save the plan in the
   work directory (default ``STORE.build/`` beside the store);
2. when the store is new and its factory string needs training, train a
   template once on a seeded sample of the build's chunks and commit it
   (:func:`retrostore.store.maintenance.install_template`); shard tasks then encode their vectors
   with clones of it and the merge's commits adopt those codes. ``auto`` and ``Flat`` skip the stage (``auto``
   trains at the commit that crosses its threshold, as in-process builds do),
   and so does a sample too small for the factory;
3. run one task per unfinished shard: a Ray task on CPUs, or a call on one of
   the model-holding actors (one per GPU) with ``device="cuda"``;
4. merge the shards in shard order as they finish, through
   the store's writer (``stage``) with the shards' vectors, committing every
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
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..errors import CorruptStoreError, IndexTrainingError, InvalidInputError, WriterLockedError, check_int
from ..storage import fileio
from ..storage import manifest as _manifest
from ..storage.layout import TMP_PREFIX
from ..store.create import create, open_store
from ..store.maintenance import install_template
from ..text.models import DEFAULT_MODEL_SHA256
from ..threads import check_threads
from . import plan as _plan
from . import shards as _shards
from .common import BuildResult, check_same_settings, merge_trained_segments, remove_uncommitted_store
from .engines import DEVICES, ENGINES, LocalEngine, RayEngine, check_ray_address
from .records import BUILDS, Records, fields_of, file_digest, same_input

__all__ = ["build_sharded"]

#: The most shards a build may ask for (each is a task with its own store directory).
MAX_SHARDS = 1 << 16

log = logging.getLogger("retrostore")
# How to ask for a plain build, which the refusals below point to: any of these options makes a build sharded.
_PLAIN = "without --engine, --shards, --work-dir or --device (in Python: engine, shards and work_dir None, device 'cpu')"


def _settings(m: dict, text_field: str, meta_field: str) -> dict:
    return {
        "tokenizer_sha256": m["tokenizer"]["sha256"], "token_dtype": m["tokenizer"]["token_dtype"],
        # the index policy (target), not the factory in force: stage 2 or a commit may train it
        "chunk_tokens": m["chunk_tokens"], "embedder": m["embedder"],
        "index": m["index"].get("target", m["index"]["factory"]),
        "metric": m["metric"], "dim": m["index"]["dim"], "text_field": text_field, "meta_field": meta_field,
    }


def _finished(m: dict, *, key: str | None = None, build_id: str | None = None) -> dict | None:
    for bid, rec in m.get(BUILDS, {}).items():
        if "shards" in rec and (bid == build_id or rec.get("key") == key) and rec["merged"] == rec["shards"]:
            return dict(rec, build_id=bid)
    return None


def _remove_work(work: Path, own_dir: bool, *, keep_lock: bool = False) -> None:
    for p in list(work.glob("shard-*")) + list(work.glob(f"{TMP_PREFIX}*")):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for name in (_plan.PLAN, _plan.TOKENIZER, _shards.TEMPLATE) + (() if keep_lock else ("LOCK",)):
        (work / name).unlink(missing_ok=True)
    if own_dir and not keep_lock:
        try:
            work.rmdir()
        except OSError:
            pass


def _check_work_dir(work: Path) -> None:
    """Refuse a work directory that cannot be made, before the store is created (helper-39: a
    traceback from mkdir, and an empty store left behind)."""
    existing = next((p for p in (work, *work.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InvalidInputError(f"the work directory {work} cannot be made: {existing} is a file; pass --work-dir "
                                "with a directory")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInputError(f"the work directory {work} cannot be made or written: {existing} is not writable; "
                                "pass --work-dir with a writable directory")


def _plan_difference(plan: dict, files: list[dict], settings: dict, shards: int | None, shard_chars: int) -> list[str]:
    """What differs between ``plan`` and this build, in words: "inputs", "settings", "--shards"."""
    body = plan["body"]
    out = []
    if ([[f["rel"], f["size"], f.get("sha256")] for f in body["files"]]
            != [[f["rel"], f["size"], f.get("sha256")] for f in files]):
        out.append("inputs")
    if body["settings"] != settings:
        out.append("settings (tokenizer, chunk size, fields)")
    if body["shards_requested"] != shards or body["shard_chars"] != shard_chars:
        out.append("--shards")
    return out or ["inputs"]


def _clean_after_failure(root: Path, work: Path, created: bool, made_dir: bool, own_dir: bool) -> None:
    """After a failed build: remove a store this call created that holds no commit (as a plain
    build does), and a work directory of ours that holds no plan (helper-39: an empty store and a
    STORE.build holding only its LOCK were left)."""
    if created:
        remove_uncommitted_store(root, made_dir)
    if own_dir and work.is_dir() and not (work / _plan.PLAN).exists():
        (work / "LOCK").unlink(missing_ok=True)
        try:
            work.rmdir()
        except OSError:
            pass


def _same_inputs(plan: dict, files: list[dict], settings: dict, shards: int | None, shard_chars: int) -> bool:
    """Whether ``plan`` is this build's although its key differs: the same settings and shard
    request, and the same inputs by name, size and sha256 (plans record the bytes since helper-24),
    only moved or touched."""
    body = plan["body"]
    return (body["settings"] == settings and body["shards_requested"] == shards
            and body["shard_chars"] == shard_chars and all("sha256" in f for f in body["files"])
            and [[f["rel"], f["size"], f["sha256"]] for f in body["files"]]
            == [[f["rel"], f["size"], f.get("sha256")] for f in files])


def _stage2_due(m: dict) -> bool:
    """Whether stage 2 trains a template: an empty, untrained store whose index policy is a
    factory string that needs training (``auto`` trains at the commit that crosses its threshold)."""
    idx = m["index"]
    target = idx.get("target", idx["factory"])
    return (target != "auto" and not idx.get("template") and m["counts"]["vectors"] == 0
            and _shards.needs_training(target, idx["dim"], m["metric"]))


def _train_stage(st, plan: dict, work: Path, local: LocalEngine) -> None:
    """Stage 2: train the store's factory on a seeded sample of the build's chunks, install it.

    A sample too small for the factory (a small build) leaves the store as it is: served by
    exact Flat until a commit has enough vectors to train it, as an in-process build does.
    """
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
    install_template(st._writer, path.read_bytes(), target, sample=info.get("sample", 0), seed=seed,
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
    shard_chars: int = _plan.SHARD_CHARS,
    progress: bool = True,
    append: bool = False,
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
    append : bool, default False
        Refused (``InvalidInputError``): a second copy of held inputs is built
        plainly (:func:`retrostore.build.build_store` without an engine). A
        sharded build skips the inputs finished builds hold
        (``BuildResult.skipped``) and builds the others; an input an
        unfinished build holds is refused until that build is finished.
    Other parameters as :func:`retrostore.build.build_store`.

    Returns
    -------
    BuildResult

    Raises
    ------
    InvalidInputError
        Bad arguments, inputs or settings; ``append``; a work directory that cannot be made or
        holds another build (the message says what differs); inputs an unfinished build holds;
        a Ray ``address`` nothing answers at (within ``engines.CONNECT_TIMEOUT_S``).
    WriterLockedError
        Another build uses the work directory.
    IndexTrainingError
        The index factory needs training and this store cannot take a template.
    CorruptStoreError
        A damaged plan or shard, or the merged store fails verification.
    RetrostoreError
        A shard task failed for good (the message says why).
    """
    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise InvalidInputError(f"engine={engine!r} must be one of {', '.join(ENGINES)}")
    if device not in DEVICES:
        raise InvalidInputError(f"device={device!r} must be 'cpu' or 'cuda'")
    if shards is not None:
        shards = check_int("shards", shards, 1, MAX_SHARDS)
    if address is not None and engine != "ray":
        raise InvalidInputError("address= (--address) needs engine='ray'")
    if append:  # helper-39: refused or a second copy depending on whether --shards was given
        raise InvalidInputError(
            "--append (add the documents of inputs the store holds already once more) works with a plain build "
            "only: drop --engine, --shards, --work-dir and --device. New inputs need no --append: a sharded "
            "build adds them and skips the inputs the store holds")
    threads = check_threads(threads)
    root = Path(store)
    work = Path(work_dir) if work_dir is not None else root.parent / f"{root.name}.build"
    files = _plan.input_files(inputs)  # checks the inputs before anything is created
    _check_work_dir(work)
    if engine == "ray":
        check_ray_address(address)  # ray.init waits without end for an address nothing answers at
    created = not (root / _manifest.MANIFEST).exists()
    made_dir = False
    if not created:
        st = open_store(root, "a", threads=threads)
        check_same_settings(st, tokenizer, chunk_tokens, index)
    else:
        made_dir = not root.exists()
        st = create(root, tokenizer=tokenizer, chunk_tokens=64 if chunk_tokens is None else chunk_tokens,
                    index="auto" if index is None else index, threads=threads)
    writer = st._writer  # the sanctioned internal interface: the merge stages shards directly
    failed = False
    eng = None
    lock = None
    interrupted = False
    skipped: tuple[str, ...] = ()
    n_docs = n_chunks = reused = 0
    plan: dict | None = None
    try:
        m = st.manifest
        if m["embedder"].get("model_sha256") != DEFAULT_MODEL_SHA256:
            raise InvalidInputError(f"{root} uses the embedder {m['embedder'].get('name')!r}; sharded builds run "
                                    "the default embedder only. Build it plainly: " + _PLAIN)
        settings = _settings(m, text_field, meta_field)
        key = _plan.plan_key(files, settings, shards, shard_chars)
        done = _finished(m, key=key)
        if done is not None:
            if work.is_dir() and (_plan.read_plan(work) or {}).get("build_id") == done["build_id"]:
                _remove_work(work, work_dir is None)  # left over from a crash after the last commit
            return BuildResult(st.version, 0, 0, time.perf_counter() - t0, shards=done["shards"],
                               build_id=done["build_id"], engine=engine, device=device)
        digests = [file_digest(Path(f["path"]), f["rel"]) for f in files]
        records = Records(m)  # (read-only here: the merge commits write the sharded build's own record)
        # the same documents twice in one run (a copy, or re-compressed): once, as a plain build does
        keep = [i for i, d in enumerate(digests) if not any(same_input(d, e) for e in digests[:i])]
        skipped = tuple(f"{digests[i]['rel']}: the same content as an input before it"
                        for i in range(len(digests)) if i not in keep)
        files, digests = [files[i] for i in keep], [digests[i] for i in keep]
        # Inputs finished builds hold are skipped, as a plain build skips them (a re-run over a
        # growing list of inputs builds the new ones); an unfinished build's inputs are not:
        # the check after planning refuses them unless they are this build's own (same plan).
        done_by = [records.finished_holder(d, *fields_of(d["rel"], text_field, meta_field)) for d in digests]
        skipped += tuple(f"{d['rel']}: {how}" for d, how in zip(digests, done_by) if how)
        files = [f for f, how in zip(files, done_by) if not how]
        digests = [d for d, how in zip(digests, done_by) if not how]
        if not files:
            stale = _plan.read_plan(work) if work.is_dir() else None
            rec = m.get(BUILDS, {}).get(stale["build_id"]) if stale is not None else None
            if stale is not None and stale["key"] == key and (rec is None or rec["merged"] == rec["shards"]):
                _remove_work(work, work_dir is None)  # this command's plan, unmerged or finished (helper-24/25)
            return BuildResult(st.version, 0, 0, time.perf_counter() - t0, engine=engine, device=device,
                               skipped=skipped)
        for f, d in zip(files, digests):
            f["sha256"] = d["sha256"]  # into the plan: the build id names the inputs' bytes
        own_dir = work_dir is None  # STORE.build is ours to remove; a given --work-dir is emptied, not removed
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidInputError(f"the work directory {work} cannot be made ({exc.strerror or exc}); pass "
                                    "--work-dir with a writable directory") from exc
        try:
            lock = fileio.WriterLock(work / "LOCK")
        except WriterLockedError as exc:  # helper-39: the message spoke of a store and a Python option
            raise WriterLockedError(f"another build is using the work directory {work} (it holds {work / 'LOCK'}); "
                                    "wait for it to finish, or pass another --work-dir") from exc
        _shards.clean_temporaries(work)

        # Stage 1: plan (reused from the work directory when it is this build's).
        plan = _plan.read_plan(work)
        if plan is not None and plan["key"] != key and _same_inputs(plan, files, settings, shards, shard_chars):
            plan["key"] = key  # this build's plan; only the inputs' paths or times changed (helper-25: a touch)
        if plan is not None and plan["key"] != key:
            differs = _plan_difference(plan, files, settings, shards, shard_chars)
            if differs == ["inputs"] and own_dir and plan["build_id"] not in m.get(BUILDS, {}):
                # helper-39: an input fixed after the build failed on it (nothing of that plan was merged,
                # and STORE.build serves this store only): the old plan cannot be finished, plan again
                log.info("%s: the inputs changed since its plan was made and nothing of it was merged; planning "
                         "again", work)
                _remove_work(work, False, keep_lock=True)
                plan = None
            else:
                raise InvalidInputError(
                    f"{work} holds an unfinished build (plan {plan['build_id'][:12]}) of other "
                    f"{' and '.join(differs)}; to finish it, run its own command again (the same inputs"
                    f"{', --shards ' + str(plan['body']['shards_requested']) if plan['body']['shards_requested'] else ', no --shards'}"
                    "); if nothing of it was merged into a store, delete the directory or pass another --work-dir")
        if plan is not None and ([[f["rel"], f["size"]] for f in plan["body"]["files"]]
                                 != [[f["rel"], f["size"]] for f in files]):
            # This command's plan from before another build finished some of its inputs (reusing it
            # built them a second time: helper-23). Nothing of it is merged (its record would hold
            # those inputs, unfinished, and they would not have been skipped): plan again.
            if plan["build_id"] in m.get(BUILDS, {}):
                raise InvalidInputError(
                    f"{work} holds a partly merged plan of these inputs that no longer matches the store; "
                    "finish it with the command that started it")
            log.info("%s: the plan predates inputs other builds finished (%s); planning again", work, "; ".join(skipped))
            _remove_work(work, False, keep_lock=True)  # (this process holds the lock)
            plan = None
        if engine == "ray":
            eng = RayEngine(None, work, device, address, max_retries, cpus_per_task)
        if plan is None:
            calls = [(f["path"], f["rel"], text_field, meta_field) for f in files]
            counts = (eng.map if eng else lambda fn, c: [fn(*a) for a in c])(_plan.count_file, calls)
            plan = _plan.make_plan(files, counts, settings, shards=shards, shard_chars=shard_chars, key=key)
            fileio.atomic_write(work / _plan.TOKENIZER, [(root / m["tokenizer"]["path"]).read_bytes()])
            _plan.write_plan(work, plan)
        build_id, n_shards = plan["build_id"], len(plan["body"]["shards"])
        done = _finished(m, build_id=build_id)
        if done is not None:
            _remove_work(work, own_dir)
            return BuildResult(st.version, 0, 0, time.perf_counter() - t0, shards=n_shards, build_id=build_id,
                               engine=engine, device=device)
        held = [(d["rel"], records.holder(d, *fields_of(d["rel"], text_field, meta_field),
                                          exclude=build_id))
                for d in digests]
        held = [(rel, how) for rel, how in held if how]
        other = next(((d, rid) for d in digests
                      if (rid := records.sharded_stopped_in_other_bytes(d, exclude=build_id))), None)
        if (other or held) and build_id not in m.get(BUILDS, {}):
            _remove_work(work, own_dir)  # a refused run leaves no plan to block the next (helper-25)
        if other is not None:
            raise InvalidInputError(
                f"{other[0]['rel']!r} has other bytes than when the interrupted sharded build {other[1][:12]} "
                "merged documents of it; restore its earlier bytes and re-run that build to finish it, or build "
                "these bytes plainly with --append beside the documents it merged")
        if held:
            raise InvalidInputError(
                f"{root} holds the documents of {len(held)} of these inputs already (e.g. {held[0][0]!r}: "
                f"{held[0][1]}); building them again would store a second copy of each (RETRO would "
                "retrieve the text it is trained on): build only the new inputs (a second copy: a plain build "
                "with --append)")
        if eng is None:
            eng = LocalEngine(plan, work, device, threads)
        else:
            eng.plan = plan

        # Stage 2: the index template, when the store is empty and its factory needs training.
        if _stage2_due(st.manifest):
            _train_stage(st, plan, work, eng if isinstance(eng, LocalEngine) else LocalEngine(plan, work, "cpu", threads))
        tpl = st.manifest["index"].get("template")
        if tpl and not (work / _shards.TEMPLATE).is_file():  # a trained store: shards encode with its template
            fileio.atomic_write(work / _shards.TEMPLATE, [(root / tpl["path"]).read_bytes()])

        # Stages 3 and 4: shards run on the engine, merged here in shard order as they finish.
        builds = m.get(BUILDS, {})
        record = builds.get(build_id) or {"key": key, "shards": n_shards, "merged": 0, "documents":
                                          plan["body"]["documents"], "first_doc_id": m["next_doc_id"],
                                          "first_chunk_id": m["next_chunk_id"], "files": digests,
                                          "text_field": text_field, "meta_field": meta_field}
        todo = list(range(record["merged"], n_shards))
        missing = [i for i in todo if not _shards.shard_complete(work, plan, i)]
        reused = len(todo) - len(missing)
        if missing:
            eng.start(missing)
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
                writer.stage(texts, per_doc, metas, vectors, codes)  # codes None: the commit encodes
                n_docs += len(texts)
                n_chunks += len(vectors)
                record = dict(record, merged=i + 1)
                writer.batch.fields[BUILDS] = dict(st.manifest.get(BUILDS, {}), **{build_id: record})
                merged_dirs.append(_shards.shard_dir(work, i))
                if writer.batch.chunks >= commit_every or i == n_shards - 1:
                    st.commit()
                    for d in merged_dirs:  # committed: the shard is no longer needed
                        shutil.rmtree(d, ignore_errors=True)
                    merged_dirs = []
                bar.update(1)
                bar.set_postfix(chunks=f"{n_chunks:,}", chunks_per_s=f"{n_chunks / (time.perf_counter() - t0):.0f}",
                                refresh=False)
        finally:
            bar.close()
        merge_trained_segments(st)
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
    except BaseException:
        failed = True
        raise
    finally:
        if eng is not None:
            eng.close()
        if lock is not None:
            lock.release()
        st.close()
        if failed:
            _clean_after_failure(root, work, created, made_dir, work_dir is None)
    committed = (n_docs, n_chunks) if not interrupted else _committed(root, plan)
    return BuildResult(version, committed[0], committed[1], time.perf_counter() - t0, interrupted,
                       shards=len(plan["body"]["shards"]) if plan else 0, reused_shards=reused,
                       build_id=plan["build_id"] if plan else None, engine=engine, device=dev, skipped=skipped)


def _committed(root: Path, plan: dict | None) -> tuple[int, int]:
    """Documents and chunks of ``plan`` committed so far (after an interrupt)."""
    if plan is None:
        return 0, 0
    m = _manifest.read_manifest(root)
    rec = m.get(BUILDS, {}).get(plan["build_id"])
    if rec is None:
        return 0, 0
    return m["next_doc_id"] - rec["first_doc_id"], m["next_chunk_id"] - rec["first_chunk_id"]
