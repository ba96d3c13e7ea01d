"""The Store's maintenance and diagnostics methods, a base class of
:class:`~retrostore.store.store.Store`: take-downs (:meth:`~Upkeep.delete`),
:meth:`~Upkeep.reindex`, :meth:`~Upkeep.compact`, :meth:`~Upkeep.evaluate`,
:meth:`~Upkeep.info` and :meth:`~Upkeep.verify`. Each checks the handle and
delegates to the module docs/architecture.md names; ``store.py`` keeps the
handle's lifetime, reads and writes.
"""

from __future__ import annotations

from typing import Iterable

import lmdb

from ..errors import CorruptStoreError, RetrostoreError
from ..storage.fileio import maintenance_error
from ..storage.manifest import read_manifest
from . import maintenance
from .evaluate import evaluate
from .inspect import store_info
from .verify import retokenize_problems, unopened_problems, verify_version

__all__ = ["Upkeep"]


class Upkeep:
    """Maintenance and diagnostics of an open :class:`~retrostore.store.store.Store`
    (a mixin: it uses the handle's ``_check``, ``_writer``, ``_reader``,
    ``_head``, ``_table``, ``chunker`` and ``readonly_media``)."""

    def delete(self, doc_ids: int | Iterable[int]) -> int:
        """Stage a take-down of committed documents; it takes effect at :meth:`commit`.

        From that version on their chunks are never returned by search,
        neighbours or precomputed neighbours, and reading them by id raises;
        :meth:`compact` then purges them from the index, the raw vectors and the
        LMDB records (see :meth:`compact` for LMDB's free pages). Returns the number
        of documents newly staged (already deleted ones are skipped).

        Raises
        ------
        InvalidInputError
            An id is not an int or not committed.
        ReadOnlyStoreError, StoreClosedError
        """
        with self._writing():
            return self._writer.delete(doc_ids)

    def reindex(self, index: str | None = None, *, train_size: int | None = None, seed: int | None = None,
                params: dict | None = None, mmap: bool | None = None, progress: bool = True) -> int:
        """Retrain and rebuild the index from the stored vectors (no re-embedding); commits a new version.

        ``index`` is a FAISS factory string or ``"auto"`` (default: the
        store's current target). Training uses a seeded random sample of
        ``train_size`` live vectors. ``params`` become the store's search
        parameters; ``mmap`` changes the store's setting. Returns the version.

        Raises
        ------
        IndexTrainingError
            Too few vectors to train a stage (the message names a factory that fits).
        RetrostoreError
            No raw vectors are kept and the index cannot give its vectors back.
        InvalidInputError
            Bad factory string or parameters, ``train_size`` below 1, ``seed``
            not an int >= 0, or uncommitted appends/deletes.
        StoreIOError
            A write failed (``errno.ENOSPC``: a full disk); the message says
            whether the new version was published (else the store is unchanged).
        """
        return self._maintain("reindex", lambda: maintenance.reindex(
            self._writer, index, train_size=train_size, seed=seed, params=params, mmap=mmap, progress=progress))

    def compact(self, *, progress: bool = True) -> int:
        """Merge the index segments into one and purge deleted documents from the index, the
        raw vectors (rows zeroed) and the LMDB records (deleted).

        LMDB does not overwrite the pages it frees: the purged records' bytes can stay in free
        pages of ``chunks.lmdb/data.mdb`` until later writes reuse them (no read returns them).
        :func:`retrostore.pack` writes the records into a new file, so a packed (and unpacked)
        copy holds none of them: ship that (docs/index.md, "Deletes and compaction").

        Chunk ids stay stable (purged ids become documented holes). After a
        purge, earlier versions are retired: they name files holding the
        purged data. Returns the new version (the current one when there is
        nothing to do).

        Raises
        ------
        InvalidInputError
            Uncommitted appends or deletes.
        StoreIOError
            A write failed (``errno.ENOSPC``: a full disk); the message says
            whether the new version was published (else the store is unchanged).
        """
        return self._maintain("compact", lambda: maintenance.compact(self._writer, progress=progress))

    def _maintain(self, what: str, run) -> int:
        """``run()``, a maintenance version (a write: :meth:`_writing`), with FAISS's and the disk's
        failures as RetrostoreErrors (helper-37: a full disk gave a bare OSError traceback)."""
        with self._writing():
            before = self._head.version.number
            try:
                return run()
            except RuntimeError as exc:  # FAISS: nothing was published
                raise RetrostoreError(f"{what} failed in FAISS ({' '.join(str(exc).split())[:300]}); the store is "
                                      "unchanged") from exc
            except (OSError, lmdb.Error) as exc:
                if isinstance(exc, RetrostoreError):
                    raise
                raise maintenance_error(exc, what, before, self._head.version.number) from exc

    def evaluate(self, queries: int = 1000, k: int = 10, *, params: dict | None = None, seed: int = 0) -> dict:
        """Recall@k of the index against exact search over the stored vectors, and latency
        (``retrostore eval``).

        Queries are a seeded sample of the store's own live vectors (the RETRO
        workload: neighbours of stored chunks); each query's own chunk is left
        out of both result lists, and recall is tie-aware (a result counts when
        its exact score reaches the k-th exact score, so duplicate chunks are
        no misses).

        Parameters
        ----------
        queries : int, default 1000
            Query vectors sampled (seeded) from the live stored vectors.
        k : int, default 10
            At most the live vectors less one (each query's own chunk is left out).
        params : dict, optional
            Search parameters for the measured searches (over the store's).
        seed : int, default 0
            Seed of the query sample, >= 0.

        Returns
        -------
        dict
            ``recall_at_k`` (tie-aware k-recall@k), ``nn_in_top_k`` (share of
            queries whose exact nearest neighbour is found), ``latency_ms``
            (``p50``, ``p99``, ``mean`` of single-query searches, up to 1,000
            of them), ``batch_qps``, ``queries``, ``k``, ``vectors``,
            ``factory``, ``params`` (effective).

        Raises
        ------
        InvalidInputError
            ``queries``, ``k`` or ``seed`` out of range (``k`` above the live
            vectors less one), bad ``params``, or results that would not fit in memory.
        RetrostoreError
            The stored vectors cannot be read (no raw vectors and a compressed index).
        """
        self._check()
        return evaluate(self._reader, queries=queries, k=k, params=params, seed=seed)

    def info(self) -> dict:
        """Everything ``retrostore inspect`` shows, as a JSON-ready dict.

        Returns
        -------
        dict
            ``path``; ``format_version``, ``min_reader_version`` (docs/format.md);
            ``version``, ``retained_versions``; counts ``documents``, ``chunks``,
            ``vectors`` (indexed chunks); ``dim``, ``metric``, ``chunk_tokens``;
            ``tokenizer`` and ``embedder`` (the manifest's fingerprints);
            ``index``: ``factory``, ``target``, ``params`` (in force, as FAISS
            reports them), ``stored_params`` (the manifest's), ``param_overrides``
            (the user's), ``segments`` (count), ``codec`` (``"float16"`` when Flat
            segments are stored as float16, the default below 5,000 vectors, else None), ``segments_searched`` (this
            handle: 1 once a read-only handle's first search merged IVF fast-scan
            segments in memory; docs/index.md, "Segments"),
            ``trained``, ``mmap`` (this handle), ``bytes_per_vector`` (segment bytes / vectors),
            ``template_bytes``, ``hint`` (the training policy's advice, or None);
            ``deletes`` (counts, purged included, and ``deleted_documents``: one
            ``{"doc_id", "chunks": [first, end), "purged_at_version"}`` per deleted
            document, ``purged_at_version`` None until ``compact``); ``files`` (bytes):
            ``index_bytes``, ``vectors_bytes``, ``vectors_disk_bytes`` (the disk
            blocks they occupy: less where ``compact`` left purged rows as holes),
            ``vectors_dtype``, ``vectors_in_index`` (an ``index="Flat"`` store keeping its raw
            vectors in its segments), ``lmdb_bytes``, ``tokenizer_bytes``,
            ``referenced_files`` (files the current manifest names),
            ``total_bytes`` (the whole directory, retained versions included),
            ``total_disk_bytes`` (the disk blocks it occupies: less than ``total_bytes``
            where ``compact`` left holes, as ``du`` counts);
            ``settings``; ``manifest_sha256`` (of ``manifest.json``, as
            ``sha256sum`` prints it); ``created_at``, ``committed_at`` (manifest,
            UTC ISO-8601), ``modified_at`` (``manifest.json``'s mtime);
            ``readonly_media`` (the directory cannot or must not be written:
            LMDB is read without its lock file and a writer is refused).
        """
        self._check()
        return store_info(self._head.version, readonly_media=self.readonly_media)

    def _moved_on(self) -> bool:
        """Whether the store's manifest names another version than this handle serves."""
        try:
            return read_manifest(self.path)["version"] != self._head.version.number
        except RetrostoreError:  # (a damaged manifest: the problems found say what they say)
            return False

    def verify(self, *, retokenize: bool = False) -> list[str]:
        """Check the store's integrity (what ``retrostore verify`` runs).

        Checks the manifest schema and paths, every referenced file's size and
        sha256, the LMDB file's structure and every committed record (ids,
        crc32 seals, documents tiling the chunks, commit records and the
        content hash chain against the manifest), and that the index holds one
        vector per chunk. The LMDB records are scanned in a short-lived child
        process, so a damaged page that makes LMDB crash is reported as a
        problem instead of ending this process. Writes nothing.

        Checksums prove the files are those that were committed, not that
        each chunk's token ids are those of its text: with ``retokenize``,
        every document is also cut again by the store's tokenizer and its
        chunks compared (token ids and spans), for stores fed
        ``append(chunks=...)`` (checked only in part there) or received from
        elsewhere. That costs what tokenizing the corpus costs (about 3 s for
        11 M characters on 2 cores).

        Parameters
        ----------
        retokenize : bool, default False
            Also re-tokenize every document and compare its chunks (once
            every other check holds: damaged records are reported first).

        Returns
        -------
        list of str
            One precise line per problem, starting with the file it concerns;
            empty when the store is intact.

        Notes
        -----
        A reader checks the version it serves. When that version was retired
        since (a later commit or ``compact`` in another process deleted files
        it names) and problems are found, the store's newest version is checked
        instead, by a new read-only handle: a reader that had not refreshed
        reported files "missing" from an intact store (helper-53). A handle
        opened at a given ``version`` checks that version as it is.
        """
        self._check()
        problems = self._verify_this_version(retokenize)
        if problems and self.mode == "r" and self._pinned_version is None and self._moved_on():
            try:
                newest = type(self)(self.path, mode="r")
            except CorruptStoreError as exc:  # (as verify_store reports a store that does not open)
                return unopened_problems(self.path, exc)
            with newest:
                return newest._verify_this_version(retokenize)
        return problems

    def _verify_this_version(self, retokenize: bool) -> list[str]:
        problems = verify_version(self._head.version, self._table, readonly_media=self.readonly_media)
        if retokenize and not problems:  # records known to be intact first
            problems += retokenize_problems(self._head.version, self._table, self.chunker)
        return problems
