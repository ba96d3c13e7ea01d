"""The one writer: staging appended documents and deletes, committing them as
a new version, publishing maintenance versions, and cleaning up after a crash.

Commit order (docs/format.md, "Commit protocol and guarantees"): the batch's
index segment and raw vectors file are written and fsynced, their directories
fsynced; the LMDB records (written by ``append``) and the commit's record are
synced; then the manifest is published: its retained copy in ``versions/`` and
``manifest.json`` itself, each by temporary file, fsync, rename and directory
fsync. The rename of ``manifest.json`` is the commit point. Every write, fsync
and rename goes through :mod:`retrostore.storage.fileio`, where the
fault-injection tests make each one fail in turn.
"""

from __future__ import annotations

import copy
import hashlib
import secrets
from pathlib import Path
from typing import Any, Callable

import lmdb
import numpy as np

from ..errors import CorruptStoreError, InvalidEmbeddingsError, InvalidInputError, RetrostoreError, is_int, shown
from ..storage import fileio
from ..storage import manifest as _manifest
from ..storage.chunktable import ChunkTable
from ..storage.layout import DATA_MDB, INDEX_DIR, VECTORS_DIR, version_tag
from ..storage.tombstones import Tombstones, write_tombstones
from .commit import Commit, collect_garbage
from .batch import write_batch_files
from .encoding import YIELD_CHUNKS, BatchEncoder
from .indexer import fp16_batches
from .staging import Batch
from .version import Head

__all__ = ["Writer"]

_FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


class Writer:
    """The writer of one store (the handle holding its lock).

    Parameters
    ----------
    root : Path
        The store directory.
    table : ChunkTable
        The LMDB chunk table, opened for writing.
    head : Head
        The handle's served version; a published version is loaded into it.
    on_lost : callable
        Called when a failed commit leaves it unknown which version is current:
        it closes the handle.
    threads : int
        FAISS threads of the batch encoder once a commit waits for it
        (:class:`~retrostore.store.encoding.BatchEncoder`): ``Store.threads``.
    """

    def __init__(self, root: Path, table: ChunkTable, head: Head, on_lost: Callable[[], None], threads: int = 1):
        self.root = root
        self.threads = threads
        self.table = table
        self.head = head
        self._on_lost = on_lost
        self.batch = Batch()

    @property
    def manifest(self) -> dict:
        """The manifest of the version the writer builds on."""
        return self.head.version.manifest

    # -- staging -------------------------------------------------------------
    def stage(self, docs: list[str], per_doc: list, metas: list, vectors: np.ndarray, codes: Any = None) -> list[int]:
        """Stage documents already cut by the store's chunker, with their vectors; their ids.

        ``metas`` must be cleaned already (:func:`retrostore.storage.metadata.clean_metadata`)
        and ``vectors`` hold one float32 row per chunk, in order. ``codes``: the
        vectors encoded by the store's template (a sharded build's shard), or None.
        The records are written to LMDB now, beyond the committed high-water
        marks, invisible to readers until :meth:`commit`.

        Raises
        ------
        InvalidEmbeddingsError
            The vectors hold NaN or inf, or values beyond float16 in a float16 store.
        StoreIOError
            LMDB could not write the records (a full disk); nothing of this call is staged.
        """
        n_chunks = sum(len(c) for c in per_doc)
        self._check_values(vectors)
        m = self.manifest
        b = self.batch
        next_chunk = m["next_chunk_id"] + b.chunks
        next_doc = m["next_doc_id"] + b.docs
        encoding = self._encode(vectors, codes)
        chunk_recs: list[tuple[bytes, bytes]] = []
        doc_recs: list[tuple[bytes, bytes]] = []
        ids = list(range(next_doc, next_doc + len(docs)))
        try:
            packed = 0  # chunks packed since the encoder last got the GIL
            for doc_id, text, chunks, meta in zip(ids, docs, per_doc, metas):
                if encoding and packed >= YIELD_CHUNKS:
                    b.encoder.let_run()
                    packed = 0
                packed += len(chunks)
                chunk_recs += self.table.pack_chunks(next_chunk, doc_id, text, chunks)
                doc_recs.append(self.table.pack_doc(doc_id, next_chunk, len(chunks), meta, None if chunks else text))
                next_chunk += len(chunks)
            try:
                self.table.put_records(chunk_recs, doc_recs)
            except BaseException:  # a full disk part-way: no record of this call stays beyond the staged ones
                try:
                    self.table.truncate(m["next_chunk_id"] + b.chunks, m["next_doc_id"] + b.docs, m["version"])
                except Exception:
                    pass  # the next writer removes them at start-up
                raise
        except BaseException:
            if encoding:  # the part is not staged: the commit encodes the batch itself
                b.close()
            raise
        b.hasher.add(chunk_recs, doc_recs)
        if n_chunks:
            b.vectors.append(vectors)
        b.codes.append(codes)
        b.chunks += n_chunks
        b.docs += len(docs)
        return ids

    def _encode(self, vectors: np.ndarray, codes: Any) -> bool:
        """Start encoding a part given without codes, in a store with a trained IVF
        template, when every part before it was too (:class:`BatchEncoder`); whether it was."""
        b = self.batch
        if codes is not None:  # a sharded build's part: the commit adopts codes or encodes the batch
            b.close()
            return False
        if not len(vectors):
            return False
        if b.encoder is None:
            if b.vectors:  # an earlier part was not encoded: the commit encodes the batch
                return False
            m = self.manifest
            b.encoder = BatchEncoder.for_store(self.head.template(m["index"]), self.threads)
            if b.encoder is None:
                return False
        b.encoder.add(vectors)
        return True

    def _check_values(self, arr: np.ndarray) -> None:
        # max/min propagate NaN and reach inf: one pass each, no temporary array
        hi, lo = (float(arr.max()), float(arr.min())) if arr.size else (0.0, 0.0)
        if not (np.isfinite(hi) and np.isfinite(lo)):
            bad = int(np.argwhere(~np.isfinite(arr))[0][0])
            raise InvalidEmbeddingsError(f"embeddings row {bad} holds NaN or inf; every value must be finite")
        peak = max(hi, -lo)
        if self.manifest["vectors"]["dtype"] == "float16" and peak > _FLOAT16_MAX:
            bad = int(np.argmax(np.abs(arr).max(axis=1)))
            raise InvalidEmbeddingsError(
                f"embeddings row {bad} holds {peak:.6g}, beyond float16's largest value {_FLOAT16_MAX:g}; the "
                "store keeps vectors as float16 (raw vectors files, Flat segments): normalise the vectors, or "
                "create the store with vector_dtype='float32'"
            )

    def delete(self, doc_ids: Any) -> int:
        """Stage deletes of committed documents; the number newly staged (see ``Store.delete``).

        Raises
        ------
        InvalidInputError
            An id is not an int or not committed.
        """
        if isinstance(doc_ids, (int, np.integer)) and not isinstance(doc_ids, bool):
            doc_ids = [doc_ids]
        if isinstance(doc_ids, (str, bytes, bytearray, memoryview)):  # b"3" iterates as [51] (helper-37)
            raise InvalidInputError(f"doc_ids={shown(doc_ids)} must be an int or an iterable of ints, not "
                                    f"{type(doc_ids).__name__}")
        try:
            ids = [d for d in doc_ids]
        except TypeError:
            raise InvalidInputError(f"doc_ids must be an int or an iterable of ints, not {type(doc_ids).__name__}") from None
        limit = int(self.manifest["next_doc_id"])
        clean = []
        for d in ids:
            if not is_int(d):
                raise InvalidInputError(f"document id {shown(d)} is not an int")
            d = int(d)
            if not 0 <= d < limit:
                extra = " (appended but not committed: commit first, or close() to discard it)" \
                    if limit <= d < limit + self.batch.docs else ""
                raise InvalidInputError(f"document id {shown(d)} is outside the committed range [0, {limit}){extra}")
            clean.append(d)
        tomb = self.head.version.tombstones
        already = tomb.doc_mask(np.array(clean, np.int64)) if clean else []
        new = {d for d, dead in zip(clean, already) if not dead} - self.batch.deletes
        self.batch.deletes.update(new)
        return len(new)

    # -- commit ----------------------------------------------------------------
    def commit(self) -> int:
        """Publish the staged batch as a new version; see ``Store.commit``.

        Raises
        ------
        CommitError
            An I/O error; the previous version is intact and the batch stays staged.
        RetrostoreError
            FAISS failed while building or merging segments.
        """
        b = self.batch
        if b.empty:
            return self.head.version.number
        m = self.manifest
        c = Commit(self.root, self.head, version_tag(m["version"] + 1))
        # Names depend only on the version, so building the same inputs twice gives
        # the same files and manifests (reproducible artifacts). A failed attempt's
        # files are removed by abort or, after a crash, by the next writer.
        c.new.update(copy.deepcopy(b.fields))  # e.g. "builds" (retrostore.build.sharded)
        first_id = m["next_chunk_id"]
        c.stage = "preparing the batch"
        try:
            vectors = b.stacked(m["index"]["dim"], fp16_batches(m))
            c.stage = "writing the deletes"
            tomb = self._write_deletes(c)
            if len(vectors) or b.deletes:
                if len(vectors):
                    encoded = b.encoder.result if b.encoder is not None else None
                    write_batch_files(c, vectors, first_id, tomb, b.codes, encoded)
                c.stage = "syncing the index and vectors directories"
                fileio.fsync_dir(self.root / INDEX_DIR)
                fileio.fsync_dir(self.root / VECTORS_DIR)
            chunk_range = (first_id, first_id + b.chunks)
            doc_range = (m["next_doc_id"], m["next_doc_id"] + b.docs)
            digest = b.hasher.hexdigest()
            c.stage = "committing the LMDB records"
            self.table.put_commit(c.version, chunk_range, doc_range, digest)
            fileio.sync_lmdb(self.table.env)
            c.new["lmdb"]["chain"] = hashlib.sha256((m["lmdb"]["chain"] + digest).encode()).hexdigest()
            c.new["next_chunk_id"] = chunk_range[1]
            c.new["next_doc_id"] = doc_range[1]
            c.finish_fields()
            c.new["counts"].update(documents=doc_range[1], chunks=chunk_range[1])
            c.stage = "publishing the manifest"
            _manifest.write_manifest(self.root, c.new)
        except BaseException as exc:
            stage = c.stage
            c.abort(exc, self._on_lost)
            if isinstance(exc, (OSError, lmdb.Error)):
                raise fileio.commit_error(exc, stage) from exc
            if isinstance(exc, RuntimeError):  # FAISS failures while building or merging
                raise RetrostoreError(f"commit failed while {stage}: {exc}") from exc
            raise
        b.close()
        self.batch = Batch()
        self.head.load(c.new)
        self.collect_garbage()
        return c.version

    def _write_deletes(self, c: Commit) -> Tombstones:
        """Write the tombstone file of the version being committed; its tombstones."""
        old = c.base.tombstones
        if not self.batch.deletes:
            return old
        rows = []
        for d in sorted(self.batch.deletes):
            rec = self.table.get_doc(d)
            if rec is None:
                raise CorruptStoreError(f"{DATA_MDB}: committed document {d} is missing")
            rows.append((d, rec.first_chunk, rec.n_chunks, 0))
        merged = np.concatenate([old.rows, np.array(rows, np.int64).reshape(-1, 4)])
        merged = merged[np.argsort(merged[:, 0], kind="stable")]
        tomb = Tombstones(merged)
        write_tombstones(self.root, c.new, tomb, c.tag, c.new_files)
        return tomb

    # -- maintenance versions ----------------------------------------------------
    def begin(self, what: str) -> Commit:
        """A maintenance version (reindex, compact, a template) from the current one.

        Raises
        ------
        InvalidInputError
            Appends or deletes are staged: they must be committed first.
        """
        if not self.batch.empty:
            raise InvalidInputError(f"{what} needs a clean writer: commit() the appended or deleted documents first")
        return Commit(self.root, self.head, f"{version_tag(self.manifest['version'] + 1)}-{secrets.token_hex(4)}")

    def publish(self, c: Commit, before: Callable[[Callable[[str | None], None]], Any] | None = None) -> int:
        """Publish a maintenance version; its number.

        The manifest is written through ``before(publish)`` when the LMDB purge
        must wrap it (``compact``). New files are removed on failure unless the
        manifest naming them was already published; then the next writer
        finishes the purge (:meth:`recover`) and this handle serves the new
        version.
        """
        c.finish_fields()
        published: list[bool] = []

        def publish(chain: str | None = None) -> None:
            if chain is not None:
                c.new["lmdb"]["chain"] = chain
            _manifest.write_manifest(self.root, c.new)
            published.append(True)

        try:
            fileio.fsync_dir(self.root / INDEX_DIR)
            fileio.fsync_dir(self.root / VECTORS_DIR)
            c.stage = "publishing the manifest"
            if before is None:
                publish()
            else:
                before(publish)
        except BaseException as exc:
            if not published:
                # manifest.json may have been renamed into place before its directory's fsync
                # failed: put the base one back (or close this writer when that fails too), then
                # remove the files and the version's retained copy (helper-37's full disk).
                c.abort(exc, self._on_lost)
                raise
            self.head.load(c.new)
            raise
        self.head.load(c.new)
        self.collect_garbage()
        return c.version

    # -- cleaning up ---------------------------------------------------------------
    def collect_garbage(self) -> None:
        """Drop unretained manifests and unreferenced files (errors ignored: a later writer retries)."""
        try:
            collect_garbage(self.root, self.manifest)
        except OSError:
            pass

    def recover(self) -> None:
        """Writer start-up: remove what a crashed writer left behind (records beyond the
        high-water marks, an unfinished purge, unreferenced files)."""
        m = self.manifest
        self.table.truncate(m["next_chunk_id"], m["next_doc_id"], m["version"])
        self.table.sync()
        self._finish_purge()
        collect_garbage(self.root, m)

    def _finish_purge(self) -> int:
        """Redo the LMDB purge of the current version if a crash cut it short.

        ``compact`` publishes the manifest inside the LMDB write transaction that
        removes the records; a crash between the two leaves records the manifest
        says are gone. Returns the number of documents purged now.
        """
        m = self.manifest
        tomb = self.head.version.tombstones
        rows = tomb.rows[tomb.rows[:, 3] == m["version"]] if len(tomb) else tomb.rows
        left = [tuple(int(x) for x in r[:3]) for r in rows if self.table.get_doc(int(r[0])) is not None]
        if not left:
            return 0
        chain = self.table.purge(left, lambda chain: None, m["version"])
        if chain != m["lmdb"]["chain"]:
            raise CorruptStoreError(
                f"{DATA_MDB}: after finishing the purge of version {m['version']}, the content hash chain "
                f"{chain[:16]}... differs from the manifest's {m['lmdb']['chain'][:16]}..."
            )
        return len(left)

    def discard(self) -> None:
        """Remove the staged records (a writer closing without commit); errors are left
        for the next writer, which removes them at start-up."""
        self.batch.close()
        if not self.batch.chunks and not self.batch.docs:
            return
        m = self.manifest
        try:
            self.table.truncate(m["next_chunk_id"], m["next_doc_id"], m["version"])
        except Exception:
            pass
