"""Building a store from input files (``retrostore build``): the plain
streaming build, which reads, chunks, embeds and commits in this process, or a
sharded build (:mod:`.sharded`) when an engine is asked for. Both record what
they built (:mod:`.records`): building the same inputs again adds nothing
unless asked to, and an interrupted build resumes."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..errors import InvalidInputError, RetrostoreError, check_bool
from ..storage import manifest as _manifest
from ..storage.layout import MANIFEST
from ..storage.metadata import clean_metadata
from ..store.create import create, open_store
from ..text.inputs import check_fields, expand_named, read_file
from ..threads import check_threads
from .common import BuildResult, check_same_settings, merge_trained_segments, remove_uncommitted_store
from .records import BUILDS, Records, fields_of, file_digest, same_input
from .sharded import build_sharded

__all__ = ["build_store"]

#: Characters handed to one ``Store.append`` call (~1,000 chunks of 64 WordPiece tokens).
BATCH_CHARS = 250_000


def _continues(st, path: Path, digest: dict, prior: dict, text_field: str, meta_field: str) -> bool:
    """Whether the first documents of ``path`` are the ones an unfinished build of a file of the
    same name committed (``prior``, its record), text for text: then this file is that one repaired,
    and resuming after them adds no second copy. A deleted or differing document says no."""
    first, n = int(prior["first_doc_id"]), int(prior["documents"])
    try:
        with contextlib.closing(read_file(path, digest["rel"], text_field, meta_field, None)) as docs:
            texts = [doc.text for doc in itertools.islice(docs, n)]
        return len(texts) == n and all(st.get_document(first + i).text == t for i, t in enumerate(texts))
    except RetrostoreError:  # a document deleted since, or an unreadable file (the build reports it)
        return False


def build_store(
    store: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    tokenizer: str | os.PathLike | None = None,
    chunk_tokens: int | None = None,
    text_field: str = "text",
    meta_field: str = "meta",
    index: str | None = None,
    commit_every: int = 20_000,
    threads: int | None = None,
    progress: bool = True,
    append: bool = False,
    engine: str | None = None,
    shards: int | None = None,
    address: str | None = None,
    device: str = "cpu",
    work_dir: str | os.PathLike | None = None,
) -> BuildResult:
    """Chunk, embed and commit every document of ``inputs`` into ``store``.

    Creates the store when it does not exist, adds to it otherwise. Commits
    every ``commit_every`` chunks and at the end, so an interrupted build keeps
    what it committed.

    Re-running is safe: the store records which input files it holds the
    documents of (by sha256, with the fields read; :mod:`retrostore.build.records`).
    An input file a finished build holds already is skipped (a second copy of
    each document would let RETRO retrieve the very text it is trained on); a
    file an interrupted build stopped in is resumed after its last committed
    document, and so is a file of the same name with other bytes whose first
    documents are the ones that build committed (the failed input repaired: a
    truncated download completed, a bad line fixed), or the ones a finished
    build of that name stored (the file grew: only its new documents are
    added); the rest are built, a file of the same name with other first
    documents in full and with a warning in ``BuildResult.notes`` naming the
    earlier documents' ids.
    ``append=True`` adds the documents of files built before once more, as a new
    copy. A ``.txt`` file is matched whatever ``text_field``/``meta_field`` say.

    With ``engine`` (or any of ``shards``, ``work_dir``, ``device="cuda"``,
    which imply ``engine="local"``) the build runs in stages: plan shards,
    train the index template if needed, build the shards in this process
    (``"local"``) or as Ray tasks (``"ray"``), merge them in shard order and
    verify (:func:`retrostore.build.sharded.build_sharded`). The records equal
    those of the plain build; re-running a finished sharded build does
    nothing, re-running an interrupted one reuses its finished shards.

    Parameters
    ----------
    store : path-like
    inputs : sequence of path-like
        ``.txt``, ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` files or directories.
    tokenizer, chunk_tokens, index
        Settings of a new store (see :func:`retrostore.create`); for an
        existing store they must be omitted or equal to the stored ones.
    text_field, meta_field : str
        JSON fields of a document's text and metadata.
    commit_every : int, default 20000
        Chunks between commits.
    threads : int, optional
    progress : bool, default True
        Show a tqdm progress bar (input bytes, documents, chunks, chunks/s).
    append : bool, default False
        Add the documents of input files the store holds already, once more.
    engine : {None, "local", "ray"}
        None: the plain streaming build. See above and ``docs/scaling.md``.
    shards, address, device, work_dir
        Sharded builds only; see :func:`retrostore.build.sharded.build_sharded`.

    Returns
    -------
    BuildResult

    Raises
    ------
    InvalidInputError
        Bad inputs (see :func:`retrostore.text.inputs.iter_documents`) or settings
        that contradict an existing store.
    """
    append = check_bool("append", append)
    check_fields(text_field, meta_field)  # helper-38: else a per-line error of the first input, or none
    threads = check_threads(threads)  # before anything is read or created
    if engine is None and (shards is not None or work_dir is not None or device != "cpu"):
        engine = "local"
    if engine is not None:
        return build_sharded(store, inputs, engine=engine, shards=shards, address=address, device=device,
                             work_dir=work_dir, tokenizer=tokenizer, chunk_tokens=chunk_tokens,
                             text_field=text_field, meta_field=meta_field, index=index,
                             commit_every=commit_every, threads=threads, progress=progress, append=append)
    if address is not None:
        raise InvalidInputError("address= (--address) needs engine='ray'")
    t0 = time.perf_counter()
    root = Path(store)
    files = expand_named(inputs)  # checks the inputs before anything is created
    digests = [file_digest(path, rel) for path, rel in files]
    created = not (root / MANIFEST).exists()
    made_dir = not root.exists()  # an empty directory the user made for the store stays theirs
    if not created:
        st = open_store(root, "a", threads=threads)
        check_same_settings(st, tokenizer, chunk_tokens, index)
    else:
        st = create(root, tokenizer=tokenizer, chunk_tokens=64 if chunk_tokens is None else chunk_tokens,
                    index="auto" if index is None else index, threads=threads)
    records = Records(st.manifest)
    todo: list[tuple[Path, dict, str, dict]] = []  # (path, digest, record id, record)
    skipped: list[str] = []
    repaired: list[str] = []  # inputs resumed after the documents a build of their earlier bytes committed
    grown: list[str] = []  # inputs of which a finished build stored the first documents: only the rest added
    notes: list[str] = []  # what the user must know (a same-named file of other documents added beside)
    run_shas = {d["sha256"] for d in digests}
    for (path, _), digest in zip(files, digests):
        if any(same_input(digest, d) for _, d, _, _ in todo) and not append:
            skipped.append(f"{digest['rel']}: the same content as an input before it")
            continue
        fields = fields_of(digest["rel"], text_field, meta_field)
        found = records.to_build(digest, *fields, append=append)
        if found is None and records.unfinished_sharded(digest) and not records.copies(digest, *fields):
            # helper-39: "already built ... nothing to add", exit 0, with most documents missing
            st.close()
            raise InvalidInputError(f"{digest['rel']}: {records.holder(digest, *fields)}; a plain build would "
                                    "leave it unfinished (or, with --append, store its documents twice)")
        if found is None:
            skipped.append(f"{digest['rel']}: {records.holder(digest, *fields)}")
            continue
        rid, rec = found
        prior = records.same_name_other_bytes(digest, run_shas) if rid not in records.all and not append else None
        if prior is not None and _continues(st, path, digest, prior[1], text_field, meta_field):
            # helper-17: the repaired file (a truncated download completed, a bad line fixed) was built
            # from its first document again, a second copy of what the failed build committed;
            # helper-38: so was a file that grew after its build finished
            rid, rec = prior
            (grown if rec["done"] else repaired).append(digest["rel"])
            rec.update(sha256=digest["sha256"], size=digest["size"], content_sha256=digest["content_sha256"],
                       done=False)
        elif prior is not None:  # helper-38: its documents were stored beside the earlier ones, silently
            first, n = int(prior[1]["first_doc_id"]), int(prior[1]["documents"])
            notes.append(
                f"{digest['rel']}: a {'finished' if prior[1]['done'] else 'stopped'} build of a file of this name "
                f"stored documents {first}..{first + n - 1} from other bytes, and this file's first documents "
                f"differ from those; all of its documents are added beside them (if it replaces that file, "
                f"`retrostore delete STORE` those ids, then `retrostore compact STORE`)")
        records.all[rid] = rec
        todo.append((path, digest, rid, rec))
    resumed = sum(rec["documents"] for _, _, _, rec in todo)
    bar = tqdm(total=sum(d["size"] for _, d, _, _ in todo), unit="B", unit_scale=True, disable=not progress or not todo,
               desc="input read", dynamic_ncols=True)  # (no bar when every input is held already; helper-58:
    # "build: 2.33M/2.33M" did not say that it counts the input files' bytes, compressed as they are)
    writer = st._writer  # build records ride on the commits (the sanctioned internal interface)
    n_docs = n_chunks = since_commit = 0
    committed_docs = committed_chunks = 0
    interrupted = False
    texts: list[str] = []
    metas: list = []
    owners: list[str] = []  # the record id of each buffered document
    size = 0
    # ~4 characters per token: keep batches below one commit's worth of chunks.
    batch_chars = min(BATCH_CHARS, max(1_000, commit_every * 4 * 16))

    def commit() -> None:
        nonlocal since_commit, committed_docs, committed_chunks
        writer.batch.fields[BUILDS] = records.all  # what this commit makes true
        st.commit()
        since_commit = 0
        committed_docs, committed_chunks = n_docs, n_chunks

    def flush() -> None:
        nonlocal texts, metas, owners, size, n_docs, n_chunks, since_commit
        if not texts:
            return
        first_doc = st.manifest["next_doc_id"] + writer.batch.docs
        before = writer.batch.chunks
        st.append(texts, metadata=metas)
        per_doc_first = first_doc
        for rid in owners:  # documents were appended in order: count them per input file
            rec = records.all[rid]
            if rec["first_doc_id"] is None:
                rec["first_doc_id"] = per_doc_first
            rec["documents"] += 1
            per_doc_first += 1
        added = writer.batch.chunks - before
        n_docs += len(texts)
        n_chunks += added
        since_commit += added
        texts, metas, owners, size = [], [], [], 0
        if since_commit >= commit_every:
            commit()
        show(refresh=False)

    def show(refresh: bool) -> None:
        rate = n_chunks / max(time.perf_counter() - t0, 1e-9)
        # strings: tqdm shows a number in its shortest form (30,000 chunks as "3e+4")
        # committed: the version an interruption keeps (helper-58: nothing said when the build committed)
        bar.set_postfix(docs=f"{n_docs:,}", chunks=f"{n_chunks:,}", chunks_per_s=f"{rate:.0f}",
                        committed=f"{committed_chunks:,} chunks, version {st.version}", refresh=refresh)

    try:
        with st:
            for path, digest, rid, rec in todo:
                docs = read_file(path, digest["rel"], text_field, meta_field, lambda n: bar.update(n))
                read = with_meta = 0
                for doc in itertools.islice(docs, rec["documents"], None):  # resume after the committed ones
                    read += 1
                    with_meta += doc.metadata is not None
                    texts.append(doc.text)
                    # checked here, as a sharded build does, so that an error names file:line, not
                    # "metadata[1]" of a batch (helper-17)
                    metas.append(clean_metadata(doc.metadata, f"{doc.source} metadata"))
                    owners.append(rid)
                    size += len(doc.text)
                    if size >= batch_chars:
                        flush()
                flush()
                rec["done"] = True  # published by the next commit, with the file's last documents
                if read and not with_meta and meta_field != "meta" and fields_of(digest["rel"], text_field,
                                                                                  meta_field)[1] is not None:
                    notes.append(f"{digest['rel']}: none of its {read} documents has a {meta_field!r} field "
                                 "(--meta-field), so none has metadata; check the field's name")
            if todo:
                commit()
                show(refresh=True)  # (helper-60: the bar ended at the commit before the last)
                merge_trained_segments(st)
            version = st.version
    except KeyboardInterrupt:
        interrupted = True
        version = _manifest.read_manifest(root)["version"]
    except BaseException:
        # A build that created the store and failed before its first commit leaves
        # nothing behind, so that fixing the input and re-running starts clean.
        if created:
            remove_uncommitted_store(root, made_dir)
        raise
    finally:
        bar.close()
    return BuildResult(version, committed_docs, committed_chunks, time.perf_counter() - t0, interrupted,
                       skipped=tuple(skipped), resumed_documents=resumed, repaired=tuple(repaired),
                       grown=tuple(grown), notes=tuple(notes))
