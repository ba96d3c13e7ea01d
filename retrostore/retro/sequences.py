"""Training sequences: the store's documents as RETRO training windows, and their neighbours.

A RETRO model trains on rows of ``L + 1`` tokens: ``L`` inputs (C = L / T
chunks of T tokens) and the label shift, the token after them
(Borgeaud et al. 2021, §2.2-2.4). Here each window is **chunk-aligned**: its
C slots are C stored chunks, so the neighbours of a window's chunks are
neighbours of stored chunks, computed from the stored vectors without
embedding anything.

Layout of one window (T = ``chunk_tokens``)::

    tokens[j*T : (j+1)*T]   slot j: the tokens of chunk chunk_ids[j], padded
                            with pad_id to T (a document's last chunk is
                            shorter); all pad_id where chunk_ids[j] == -1
    tokens[L]               the label token: the first token of the chunk
                            after the last slot when it continues the same
                            document; eos_id when the last slot ends its
                            document; pad_id after an empty slot

``mode="document"``: windows never cross documents; each document gives
``ceil(n_chunks / C)`` windows, the last padded with empty slots, and
``eos_id`` stands right after the document's last token (the first pad slot
of its last chunk, the first token of the empty slot after a full one, or the
label), as retro-pytorch's own preprocessing puts ``[SEP]`` after each text:
a model trained on these windows learns to end a document (helper-44). The
label is then pad_id when that eos_id is already inside the window
(``RETRODataset`` zeroes everything after a window's first ``eos_id``).
``mode="packed"``: the chunks of all documents, in id order, cut every C
chunks; a window may hold the end of one document and the start of the next
(``doc_ids`` per slot says which), and only the store's last window is padded.

This is exactly what retro-pytorch's ``RETRODataset`` builds from the files
:func:`retrostore.retro.export_retro_pytorch` writes (pad_id 0), so either
can feed the same training loop.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
from tqdm import tqdm

from ..errors import InvalidInputError, check_bool, check_int, is_int, shown
from ..storage.fileio import atomic_write, check_output_file, sha256_file
from ._checks import (check_eos_id, check_exclude, check_k_of, check_ngram, check_pad_id, check_several_documents,
                      check_threshold, output_lock)
from .leakage import DEFAULT_NGRAM, DEFAULT_OVERLAP_THRESHOLD, filter_neighbors, future_overlap
from .table import ChunkTable, check_table, chunk_table, mark_document_ends, store_identity

if TYPE_CHECKING:
    from retrostore import Store

__all__ = ["Sequences", "training_sequences", "default_eos_id", "sequence_neighbors", "chunk_neighbors", "MODES"]

MODES = ("document", "packed")
_EOS_NAMES = ("[SEP]", "</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")


def default_eos_id(store: "Store") -> int:
    """The store tokenizer's end-of-sequence token: the first of ``[SEP]``, ``</s>``,
    ``<|endoftext|>``, ``<eos>``, ``<|end_of_text|>`` in its vocabulary.

    Raises
    ------
    InvalidInputError
        The tokenizer has none of them (pass ``eos_id=`` explicitly).
    """
    tok = store.chunker.tokenizer
    for name in _EOS_NAMES:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    raise InvalidInputError(
        f"the store's tokenizer has none of {', '.join(_EOS_NAMES)}; pass eos_id= (a token id of the store's "
        "tokenizer that never occurs inside a chunk) to mark document ends")


def _check_eos(store: "Store", eos_id: Any, pad: int) -> int:
    """``eos_id`` checked, or the tokenizer's document-end token when None."""
    return check_eos_id(store, default_eos_id(store) if eos_id is None else eos_id, pad)


@dataclass(frozen=True)
class Sequences:
    """Chunk-aligned training windows of ``L + 1`` tokens over one store version.

    Attributes
    ----------
    chunk_ids : ndarray, shape (n, C), int64
        The stored chunk in each slot; -1 for an empty (padding) slot.
    doc_ids : ndarray, shape (n, C), int64
        Their documents; -1 for an empty slot.
    labels : ndarray, shape (n,), int64
        Each window's last token (``tokens[:, L]``).
    seq_len : int
        L (a multiple of ``chunk_tokens``).
    mode : {"document", "packed"}
    pad_id, eos_id : int
    table : ChunkTable
        The chunk tokens the windows are made of.
    """

    chunk_ids: np.ndarray
    doc_ids: np.ndarray
    labels: np.ndarray
    seq_len: int
    mode: str
    pad_id: int
    eos_id: int
    table: ChunkTable

    def __len__(self) -> int:
        return len(self.chunk_ids)

    @property
    def chunks_per_sequence(self) -> int:
        return self.chunk_ids.shape[1]

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token rows ``[start, stop)``: shape ``(stop - start, L + 1)``, int64."""
        n = len(self)
        stop = n if stop is None else check_int("stop", stop, 0, n)
        start = check_int("start", start, 0, stop)
        ids = self.chunk_ids[start:stop]
        body = self.table.padded(ids, self.pad_id).reshape(len(ids), self.seq_len)
        if self.mode == "document":
            mark_document_ends(body, ids, self.table, self.eos_id)
        return np.concatenate([body, self.labels[start:stop, None]], axis=1)

    def __getitem__(self, i: int) -> np.ndarray:
        """One window's ``L + 1`` tokens, int64."""
        i = check_int("index", i, 0, len(self) - 1)
        return self.tokens(i, i + 1)[0]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, tokens (b, L + 1))`` for consecutive batches of windows."""
        batch_size = check_int("batch_size", batch_size, 1)
        for s in range(0, len(self), batch_size):
            yield s, self.tokens(s, min(len(self), s + batch_size))


def _near(seq_len: object, t: int) -> tuple[int, int]:
    """Two valid lengths around ``seq_len``: the multiples of ``t`` below and above it (at least t, 2t)."""
    low = max(t, (seq_len // t) * t) if is_int(seq_len) and seq_len > 0 else t
    return low, low + t


def training_sequences(store: "Store", seq_len: int, *, mode: str = "packed", pad_id: int | None = None,
                       eos_id: int | None = None, table: ChunkTable | None = None) -> Sequences:
    """Cut the store's documents into chunk-aligned windows of ``seq_len + 1`` tokens.

    Parameters
    ----------
    store : Store
    seq_len : int
        L, the model's input length (retro-pytorch's ``max_seq_len`` /
        ``RETRODataset(seq_len=...)``): a positive multiple of
        ``chunk_tokens``. Each window holds ``L + 1`` tokens.
    mode : {"packed", "document"}, default "packed"
        See the module docstring.
    pad_id : int, optional
        Default: the store's pad id.
    eos_id : int, optional
        The token after a document's last one: the label of a window whose last slot ends its
        document; in ``"document"`` mode right after the text, inside the window. Default:
        :func:`default_eos_id`.
    table : ChunkTable, optional
        A :func:`chunk_table` of this version (read when not given).

    Returns
    -------
    Sequences

    Raises
    ------
    InvalidInputError
        ``seq_len`` is not a positive multiple of ``chunk_tokens``, an unknown
        ``mode``, a ``pad_id`` / ``eos_id`` outside the vocabulary or equal.
    """
    t = int(store.manifest["chunk_tokens"])
    if not is_int(seq_len) or seq_len < t or seq_len % t:
        low, high = _near(seq_len, t)
        raise InvalidInputError(
            f"seq_len={shown(seq_len)} is not a positive multiple of the store's chunk size {t}; RETRO cuts its input "
            f"into chunks of {t} tokens: use e.g. {low} or {high}")
    most = max(1, len(store)) * t  # one window holding every chunk of the store
    if seq_len > most:  # helper-17: 6.4e9 tokens per window was a MemoryError, 6.4e10 an OOM kill
        raise InvalidInputError(f"seq_len={shown(seq_len, ',')} is more than the store's {len(store):,} chunks of {t} tokens "
                                f"({most:,}): its windows would be padding; ask for seq_len <= {most:,} (RETRO "
                                "trains on 2,048)")
    if mode not in MODES:
        raise InvalidInputError(f"mode={mode!r}; expected one of {MODES}")
    pad = check_pad_id(store, pad_id)
    eos = _check_eos(store, eos_id, pad)
    if table is None:
        table = chunk_table(store)
    else:
        check_table(store, table)
    c = int(seq_len) // t
    live = np.flatnonzero(table.live)
    if mode == "packed":
        n = -(-len(live) // c)
        slots = np.full(n * c, -1, np.int64)
        slots[:len(live)] = live
        chunk_ids = slots.reshape(n, c)
    else:
        docs = table.doc_ids[live]
        starts = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]]) if len(live) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(live)]
        rows = []
        for s, e in zip(starts.tolist(), ends.tolist()):
            m = -(-(e - s) // c)
            block = np.full(m * c, -1, np.int64)
            block[:e - s] = live[s:e]
            rows.append(block.reshape(m, c))
        chunk_ids = np.concatenate(rows) if rows else np.zeros((0, c), np.int64)
    doc_ids = np.where(chunk_ids >= 0, table.doc_ids[np.maximum(chunk_ids, 0)], -1)
    last = chunk_ids[:, -1] if len(chunk_ids) else np.zeros(0, np.int64)
    safe = np.maximum(last, 0)
    nxt = np.minimum(safe + 1, max(len(table) - 1, 0))
    labels = np.where(last < 0, pad, np.where(table.next_in_doc[safe], table.tokens[nxt, 0], eos)).astype(np.int64)
    if mode == "document":  # a short last chunk holds its document's eos_id itself (mark_document_ends)
        labels[(last >= 0) & ~table.next_in_doc[safe] & (table.lengths[safe] < t)] = pad
    return Sequences(chunk_ids, doc_ids, labels, int(seq_len), mode, pad, eos, table)


def _window_exclusions(seqs: Sequences, per: str) -> np.ndarray:
    """Per window slot, the documents its neighbours may not come from, shape (n, C, e)."""
    n, c = seqs.chunk_ids.shape
    if per == "chunk":
        return seqs.doc_ids[:, :, None]
    # Every document of the window: a packed window's chunk must not retrieve
    # a later (or earlier) part of the same training sequence.
    docs = np.sort(seqs.doc_ids, axis=1)
    return np.broadcast_to(docs[:, None, :], (n, c, c))


def sequence_neighbors(store: "Store", seqs: Sequences, out: str | os.PathLike, *, k: int = 2,
                       exclude: str = "sequence", overlap_threshold: float | None = DEFAULT_OVERLAP_THRESHOLD,
                       ngram: int = DEFAULT_NGRAM, drop_duplicates: bool = True, candidates: int | None = None,
                       batch_size: int = 512, progress: bool = False) -> dict:
    """Precompute the k neighbours of every chunk of every training window, leakage-filtered.

    Candidates come from ``Store.precompute_neighbors(..., exclude_same_doc=True)``
    (the stored vectors searched, nothing embedded; resumable), written once
    beside ``out`` as ``OUT.candidates-STORE-kM.npy`` (STORE: the first 16 hex
    digits of the sha256 of the version's manifest, so that they are never reused
    for another store or version). Each window slot then keeps the first k candidates that are not from an excluded document, not an exact
    copy of the query chunk, do not hold ``overlap_threshold`` of its
    n-grams, and, with their continuation, do not hold ``overlap_threshold``
    of a chunk of the window from the slot's own on (a copy of the text the
    window predicts, stored in another document: :func:`~retrostore.retro.leakage.future_overlap`). A slot left with fewer than k (the candidates ran out: boilerplate
    with many near copies) is searched again with the chunk's stored vector
    (read back, not embedded), widening until k are found,
    the store is exhausted or 16,384 candidates were searched; the summary counts these (``research``).

    Parameters
    ----------
    store : Store
        The store ``seqs`` were cut from (same version).
    seqs : Sequences
    out : path-like
        Destination ``.npy``: int64, shape ``(len(seqs), C, k)``, -1 for an
        empty slot or a missing neighbour. Written to ``OUT.partial`` with
        progress in ``OUT.progress.json`` and renamed when complete: run
        again with the same arguments to resume.
    k : int, default 2
    exclude : {"sequence", "chunk"}, default "sequence"
        ``"sequence"``: no neighbour from any document of the window (RETRO
        excludes the training sequence's own document, §2.4; a packed window
        has several). ``"chunk"``: only the slot's own document.
    overlap_threshold : float or None, default 0.5
        See :mod:`retrostore.retro.leakage` (the near-copy and the window
        filters); None turns both off.
    ngram : int, default 13
    drop_duplicates : bool, default True
    candidates : int, optional
        Candidates per chunk searched (default ``2 * k + 8``).
    batch_size : int, default 512
        Windows per filtering step (and per progress record).
    progress : bool, default False
        Show progress bars.

    Returns
    -------
    dict
        The summary, also written beside ``out`` (``knn.npy``: ``knn.summary.json``): ``rows``,
        ``chunks`` (non-empty slots), ``k``, ``exclude``,
        ``overlap_threshold``, ``ngram``, ``dropped`` (``excluded_docs``,
        ``duplicates``, ``overlap``, ``window``, ``purged``: candidates dropped),
        ``store`` (the version's identity), ``windows_sha`` (which windows),
        ``ids_sha256`` (the file's bytes: :class:`TrainingSet` checks all three), ``research`` (slots
        searched again), ``short`` (slots still with fewer than k).

    Raises
    ------
    InvalidInputError
        Bad ``k``, ``exclude``, ``overlap_threshold``, ``ngram`` (1 to
        ``chunk_tokens``), ``candidates``, ``batch_size`` or ``out``; ``seqs``
        of another store version, or no window at all; a store whose live
        chunks are all in one document (none could have a neighbour).
    WriterLockedError
        Another process is writing ``out`` (it holds ``OUT.lock``, a file
        beside ``out``, removed when the run completes).
    """
    k = check_k_of(store, k)
    exclude = check_exclude(exclude)
    overlap_threshold = check_threshold(overlap_threshold)
    drop_duplicates = check_bool("drop_duplicates", drop_duplicates)
    progress = check_bool("progress", progress)
    if not isinstance(seqs, Sequences):
        raise InvalidInputError(f"seqs is {type(seqs).__name__}; pass the windows of "
                                "retrostore.retro.training_sequences(store, seq_len)")
    ngram = check_ngram(ngram, seqs.table.chunk_tokens)
    n_cand = check_int("candidates", 2 * k + 8 if candidates is None else candidates, k)
    batch_size = check_int("batch_size", batch_size, 1)
    check_table(store, seqs.table, "seqs' table (cut them again with training_sequences(store, ...))")
    out = check_output_file(out)
    n, c = seqs.chunk_ids.shape
    if n == 0:
        raise InvalidInputError(f"seqs holds no window: version {store.version} of the store has no live chunk "
                                f"({len(store):,} chunks, of deleted or empty documents); append documents and commit")
    check_several_documents(store, seqs.table)
    n_cand = min(n_cand, max(len(store) - 1, 1))
    lock = output_lock(out, "neighbours")
    try:
        summary = _sequence_neighbors(store, seqs, out, k, exclude, overlap_threshold, ngram, drop_duplicates, n_cand,
                                      batch_size, progress)
        lock.done()
        return summary
    finally:
        lock.release()


def _sequence_neighbors(store, seqs: Sequences, out: Path, k: int, exclude: str, overlap_threshold, ngram: int,
                        drop_duplicates: bool, n_cand: int, batch_size: int, progress: bool) -> dict:
    n, c = seqs.chunk_ids.shape
    table = seqs.table
    ident = store_identity(store)
    cand_all = _candidates(store, out, ident, n_cand, progress)
    params = {"store": ident, "store_version": store.version, "k": k, "exclude": exclude, "mode": seqs.mode,
              "seq_len": seqs.seq_len, "rows": n, "overlap_threshold": overlap_threshold, "ngram": ngram,
              "drop_duplicates": drop_duplicates, "candidates": n_cand,
              "windows_sha": window_digest(seqs),
              "window_filter": 1}  # (a run of the code before the window filter is not resumed: mixed rows)
    partial = out.with_name(out.name + ".partial")
    state_path = out.with_name(out.name + ".progress.json")
    done, totals = 0, {"excluded_docs": 0, "duplicates": 0, "overlap": 0, "window": 0, "purged": 0, "research": 0,
                       "short": 0}
    if partial.exists() and state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("params") == params:
            done, totals = int(state["done"]), state["totals"]
    arr = (np.lib.format.open_memmap(partial, mode="w+", dtype=np.int64, shape=(n, c, k)) if done == 0
           else np.load(partial, mmap_mode="r+", allow_pickle=False))
    excl_all = _window_exclusions(seqs, exclude)
    bar = _bar(n, done, progress)
    try:
        while done < n:
            end = min(n, done + batch_size)
            q = seqs.chunk_ids[done:end].ravel()
            have = q >= 0
            qi = q[have]
            cand = np.asarray(cand_all[qi], np.int64)
            share = win = real = None
            if overlap_threshold is not None:
                win, real = _window_text(seqs, done, end)
                full = np.full((len(q), cand.shape[1]), -1, np.int64)
                full[have] = cand
                spans, span_len = _spans(table, full)
                share = future_overlap(win, real, table.chunk_tokens, spans.reshape(end - done, c, *spans.shape[1:]),
                                       span_len.reshape(end - done, c, -1), ngram).reshape(len(q), -1)[have]
            kept, st = _filter(table, qi, cand, excl_all[done:end].reshape(-1, excl_all.shape[-1])[have], k,
                               overlap_threshold, ngram, drop_duplicates, share)
            for key in ("excluded_docs", "duplicates", "overlap", "window", "purged"):
                totals[key] += getattr(st, key)
            # Slots short of k: search again, wider (also where the candidates were fewer than asked:
            # an IVF index's probed lists ran out, helper-32).
            short = np.flatnonzero((kept < 0).any(1))
            if len(short):
                slot = np.flatnonzero(have)[short]  # (window - done) * C + u of each short slot
                ahead = None if win is None else [  # each slot's text from its own chunk on: what it may not retrieve
                    (win[i // c, (i % c) * table.chunk_tokens:], real[i // c, (i % c) * table.chunk_tokens:])
                    for i in slot]
                kept[short] = _research(store, table, qi[short], excl_all[done:end].reshape(
                    -1, excl_all.shape[-1])[have][short], k, n_cand, overlap_threshold, ngram, drop_duplicates,
                    ahead)
                totals["research"] += len(short)
            totals["short"] += int((kept < 0).any(1).sum())
            block = np.full((len(q), k), -1, np.int64)
            block[have] = kept
            arr[done:end] = block.reshape(end - done, c, k)
            arr.flush()
            done = end
            _atomic_json(state_path, {"params": params, "done": done, "totals": totals})
            bar.update(end - bar.n)
    finally:
        bar.close()
    del arr
    os.replace(partial, out)
    state_path.unlink(missing_ok=True)
    summary = {"rows": n, "chunks": int((seqs.chunk_ids >= 0).sum()), "k": k, "exclude": exclude,
               "mode": seqs.mode, "seq_len": seqs.seq_len, "overlap_threshold": overlap_threshold, "ngram": ngram,
               "drop_duplicates": drop_duplicates, "candidates": n_cand, "store_version": store.version,
               "store": params["store"], "windows_sha": params["windows_sha"], "ids_sha256": sha256_file(out)[1],
               "dropped": {key: totals[key] for key in ("excluded_docs", "duplicates", "overlap", "window", "purged")},
               "research": totals["research"], "short": totals["short"]}
    _atomic_json(out.with_name(out.name[:-4] + ".summary.json"), summary)
    return summary


def chunk_neighbors(store: "Store", out: str | os.PathLike, *, k: int = 2,
                    overlap_threshold: float | None = DEFAULT_OVERLAP_THRESHOLD, ngram: int = DEFAULT_NGRAM,
                    progress: bool = False) -> dict:
    """The k neighbours of every stored chunk, leakage-filtered, by chunk id (``retrostore neighbors STORE``).

    RETRO's per-chunk neighbours (retro-pytorch's ``chunks.knn.dat``): chunk
    i's serve the prediction of the text after it. So none comes from i's
    own document (Borgeaud et al. 2021, §2.4), none is an exact or near copy
    of i, and none holds, with its continuation, ``overlap_threshold`` of i
    or of the :data:`AHEAD` chunks after it in its document (a page stored
    twice: helper-29 found half the neighbours were copies of their chunk;
    helper-31 then a copy of the *next* chunk, whose continuation is the one
    after). ``Store.precompute_neighbors`` gives them unfiltered.

    Parameters
    ----------
    store : Store
    out : path-like
        Destination ``.npy``: int64, shape ``(len(store), k)``, row i the
        neighbours of chunk i, -1 for a deleted chunk or one left short of
        k (counted in the summary, ``OUT.summary.json``): a chunk whose
        candidates all fell is searched again with its stored vector, wider,
        until k pass, the store is exhausted or 16,384 candidates were searched. Candidates
        (``2k + 8`` a chunk, from the stored vectors) are cached beside it
        (``OUT.candidates-STORE-kM.npy``): a run interrupted during their
        search resumes it.
    k : int, default 2
    overlap_threshold : float or None, default 0.5
        None: only the own-document rule.
    ngram : int, default 13
    progress : bool, default False

    Returns
    -------
    dict
        The summary: ``rows``, ``chunks`` (live), ``k``, ``dropped``
        (``duplicates``, ``overlap``, ``window``, ``purged``), ``research``
        (chunks searched again), ``short``, ``store``, ``ids_sha256``.

    Raises
    ------
    InvalidInputError
        Bad ``k`` / ``overlap_threshold`` / ``ngram`` / ``out``, or a store
        whose live chunks are all in one document (none could have a
        neighbour).
    WriterLockedError
        Another process is writing ``out``.
    """
    k = check_k_of(store, k)
    threshold = check_threshold(overlap_threshold)
    t = int(store.manifest["chunk_tokens"])
    ngram = check_ngram(ngram, t)
    progress = check_bool("progress", progress)
    out = check_output_file(out)
    table = chunk_table(store)
    live = np.flatnonzero(table.live)
    check_several_documents(store, table)
    lock = output_lock(out, "neighbours")
    try:
        n_cand = min(2 * k + 8, max(len(store) - 1, 1))
        ident = store_identity(store)
        cand_all = _candidates(store, out, ident, n_cand, progress)
        ids = np.full((len(store), k), -1, np.int64)
        totals = {"duplicates": 0, "overlap": 0, "window": 0, "purged": 0, "research": 0, "short": 0}
        bar = _bar(len(live), 0, progress, "chunk", "chunk neighbors")
        try:
            for start in range(0, len(live), 2048):
                q = live[start:start + 2048]
                cand = np.asarray(cand_all[q], np.int64)
                share = win = real = None
                if threshold is not None:
                    win, real = _chunk_and_after(table, q)
                    spans, span_len = _spans(table, cand)
                    share = future_overlap(win, real, t, spans[:, None], span_len[:, None], ngram)[:, 0]
                own = table.doc_ids[q][:, None]
                kept, st = _filter(table, q, cand, own, k, threshold, ngram, True, share)
                for key in ("duplicates", "overlap", "window", "purged"):
                    totals[key] += getattr(st, key)
                # Rows short of k: searched again, wider, as sequence_neighbors does (134 of 6,116 chunks
                # of a store built twice were left short).
                short = np.flatnonzero((kept < 0).any(1))
                if len(short):
                    ahead = None if win is None else [(win[i], real[i]) for i in short]
                    kept[short] = _research(store, table, q[short], own[short], k, n_cand, threshold, ngram, True,
                                            ahead)
                    totals["research"] += len(short)
                ids[q] = kept
                totals["short"] += int((kept < 0).any(1).sum())
                bar.update(len(q))
        finally:
            bar.close()
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(ids))
        _, ids_sha = atomic_write(out, [header.getvalue(), memoryview(ids).cast("B")])  # hashed as written
        summary = {"rows": len(store), "chunks": int(len(live)), "k": k, "by": "chunk id",
                   "overlap_threshold": threshold, "ngram": ngram, "ahead": AHEAD, "candidates": n_cand,
                   "store_version": store.version, "store": ident,
                   "dropped": {key: totals[key] for key in ("duplicates", "overlap", "window", "purged")},
                   "research": totals["research"], "short": totals["short"], "ids_sha256": ids_sha}
        _atomic_json(out.with_name(out.name[:-4] + ".summary.json"), summary)
        lock.done()
        return summary
    finally:
        lock.release()


#: Chunks after a chunk (in its document) that its neighbours, with their continuations, may not copy.
AHEAD = 2


def _chunk_and_after(table: ChunkTable, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each chunk of ``q`` followed by up to :data:`AHEAD` next chunks of its document: tokens
    ``(b, (1 + AHEAD) * T)`` and which are text."""
    cols = [q]
    for _ in range(AHEAD):
        prev = cols[-1]
        ok = (prev >= 0) & table.next_in_doc[np.maximum(prev, 0)]
        cols.append(np.where(ok, prev + 1, -1))
    ids = np.stack(cols, axis=1)
    return table.padded(ids, 0).reshape(len(q), -1), table.text_mask(ids).reshape(len(q), -1)


def _candidates(store: "Store", out: Path, ident: str, n_cand: int, progress: bool) -> np.ndarray:
    """The ``n_cand`` nearest chunks of every stored chunk outside its document (memory-mapped), searched
    once into ``OUT.candidates-STORE-kM.npy``: named by the store's identity (its manifest's sha256) and
    width, so never reused for another store or version (helper-17: one named by the version number was)."""
    path = out.with_name(f"{out.name[:-4]}.candidates-{ident[:16]}-k{n_cand}.npy")
    if not path.exists():
        store.precompute_neighbors(path, k=n_cand, exclude_same_doc=True, progress=progress)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _filter(table: ChunkTable, q: np.ndarray, cand: np.ndarray, excluded: np.ndarray, k: int, threshold,
            ngram: int, drop_duplicates: bool, share: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """:func:`filter_neighbors` for query chunks ``q`` and their candidates, read from ``table``
    (a candidate no longer live counts as purged)."""
    safe = np.maximum(cand, 0)
    return filter_neighbors(
        cand, k, q_tokens=table.tokens[q], q_len=table.lengths[q], c_tokens=table.tokens[safe],
        c_len=np.where(cand >= 0, table.lengths[safe], 0),
        c_docs=np.where((cand >= 0) & table.live[safe], table.doc_ids[safe], -1), excluded=excluded,
        threshold=threshold, n=ngram, drop_duplicates=drop_duplicates, window_share=share)


def _window_text(seqs: Sequences, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``[start, stop)``' tokens (b, L + 1) and which of them are text (not slot padding)."""
    ids = seqs.chunk_ids[start:stop]
    real = seqs.table.text_mask(ids).reshape(len(ids), -1)
    return seqs.tokens(start, stop), np.concatenate([real, (seqs.labels[start:stop] != seqs.pad_id)[:, None]], 1)


def _spans(table: ChunkTable, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's neighbour then continuation tokens, ``(..., 2T)``, and their real lengths
    (0 for -1): the text a retrieved slot hands the model."""
    safe = np.maximum(cand, 0)
    nxt = np.minimum(safe + 1, len(table.lengths) - 1)
    cont = (cand >= 0) & table.next_in_doc[safe]
    spans = np.concatenate([table.tokens[safe], table.tokens[nxt]], axis=-1)
    lengths = np.where(cand >= 0, table.lengths[safe] + np.where(cont, table.lengths[nxt], 0), 0)
    return spans, lengths


#: Most candidates a slot whose candidates all fell is searched for (``_research``): a chunk copied
#: thousands of times (boilerplate) stays short rather than scanning the store once per slot
#: (helper-35: 4x the chunks took 34x as long with every short slot searched to the end).
RESEARCH_LIMIT = 16_384
#: (slot, candidate) pairs filtered at a time when searching again (the n-gram comparison holds
#: ~6 KB per pair: 400 slots x 1,600 candidates at once took 3.8 GB, helper-35's store).
_RESEARCH_PAIRS = 8_192


def _research(store, table: ChunkTable, chunk_ids: np.ndarray, excluded: np.ndarray, k: int, start: int,
              threshold, ngram: int, drop_duplicates: bool,
              ahead: list[tuple[np.ndarray, np.ndarray]] | None = None) -> np.ndarray:
    """k admissible neighbours of chunks whose candidates ran out: their stored vectors (those
    the candidates were searched with) searched ever wider (8x the candidates, then doubling)
    until k pass the filters, the store is exhausted or :data:`RESEARCH_LIMIT` candidates were
    searched.

    Returns
    -------
    ndarray, shape (len(chunk_ids), k), int64, -1 padded.
    """
    kept = np.full((len(chunk_ids), k), -1, np.int64)
    # Read back, not embedded again (5 ms per chunk on one core: 36% of a filtered run's time on a
    # store built twice); a store fed its own vectors is searched again too.
    vecs = store._stored_vectors(chunk_ids)
    index = store.info()["index"]["params"]
    nlist, nprobe = int(index.get("nlist", 0)), int(index.get("nprobe", 0))
    todo = np.arange(len(chunk_ids))
    limit = min(len(store), RESEARCH_LIMIT)
    want = min(limit, start * 8)
    while len(todo):
        # An IVF index answers from the lists it probes: as many more as the search is wider (4x the
        # lists `want` vectors fill on average), all of them at the last step, with no cap on the codes
        # scanned (helper-32, helper-35: slots were left short with admissible chunks in lists never probed).
        probe = nlist if want >= limit else min(nlist, max(nprobe, -(-4 * want * nlist // max(len(store), 1))))
        params = {"nprobe": probe, "max_codes": 0} if nlist else None
        again = np.zeros(len(todo), bool)
        step = max(1, _RESEARCH_PAIRS // want)  # slots at a time: the filters' arrays grow with slots x want
        for lo in range(0, len(todo), step):
            part = todo[lo:lo + step]
            _, cand = store.search_vectors(vecs[part], want, params=params)
            share = None
            if ahead is not None and threshold is not None:  # each slot as a window of its text from its chunk on
                spans, span_len = _spans(table, cand)
                width = max(len(ahead[i][0]) for i in part)  # (padding is not text: it holds no n-gram)
                win = np.zeros((len(part), width), np.int64)
                real = np.zeros((len(part), width), bool)
                for j, i in enumerate(part):
                    win[j, :len(ahead[i][0])], real[j, :len(ahead[i][1])] = ahead[i]
                share = future_overlap(win, real, table.chunk_tokens, spans[:, None], span_len[:, None], ngram)[:, 0]
            got, _ = _filter(table, chunk_ids[part], cand, excluded[part], k, threshold, ngram, drop_duplicates, share)
            kept[part] = got
            exhausted = (cand < 0).any(1) & (not nlist or probe == nlist)  # fewer than asked: none left to find
            again[lo:lo + step] = (got < 0).any(1) & ~exhausted
        if want >= limit:
            break
        todo = todo[again]
        want = min(limit, want * 2)
    return kept


def window_digest(seqs: Sequences) -> str:
    """Which windows: a digest of their chunk ids (in a neighbour file's summary, ``windows_sha``)."""
    return hashlib.sha256(np.ascontiguousarray(seqs.chunk_ids).tobytes()).hexdigest()[:16]


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _bar(total: int, initial: int, show: bool, unit: str = "seq", desc: str = "sequence neighbors"):
    return tqdm(total=total, initial=initial, unit=unit, disable=not show, desc=desc, dynamic_ncols=True)
