"""``retrostore neighbors`` and ``retrostore export``: RETRO training data from a
store (precomputed neighbour ids, training windows, a trainer's files), over
:mod:`retrostore.retro` and ``Store.precompute_neighbors``."""

from __future__ import annotations

import functools
import warnings

import click
import numpy as np

import retrostore
from retrostore import retro

from .common import friendly

__all__ = ["neighbors", "export"]


def _leakage_options(fn, seq_len_required: bool = False):
    """Options shared by ``neighbors --sequences`` and ``export`` (retrostore.retro.sequence_neighbors)."""
    for opt in reversed([
        # no default at all when required: click 8.3+ takes an explicit default=None as a value
        click.option("--seq-len", type=int, **({"required": True} if seq_len_required else {"default": None}),
                     help="Training window length L (a multiple of the chunk size); windows are L + 1 tokens."),
        click.option("--mode", type=click.Choice(["packed", "document"]), default="packed", show_default=True,
                     help="Windows packed across documents, or each within one document (padded)."),
        click.option("--eos-id", type=int, default=None,
                     help="Token after a document's last one: the label that ends it, and in document mode the "
                          "token right after its text (default: the tokenizer's [SEP] / </s> / ...)."),
        click.option("--exclude", type=click.Choice(["sequence", "chunk"]), default="sequence", show_default=True,
                     help="Never retrieve from any document of the window (sequence) or the chunk's own (chunk)."),
        click.option("--overlap-threshold", type=float, default=retro.DEFAULT_OVERLAP_THRESHOLD, show_default=True,
                     help="Drop neighbours holding this share of the query chunk's 13-grams (RETRO's leakage "
                          "measure, Borgeaud et al. 2021), or, with their continuation, of a chunk of the window "
                          "from the query's on; exact copies are always dropped."),
        click.option("--no-overlap-filter", is_flag=True, help="Turn the n-gram overlap filters off."),
        click.option("--ngram", type=int, default=retro.DEFAULT_NGRAM, show_default=True,
                     help="N-gram length of the overlap filters (RETRO: 13; at most the chunk size)."),
    ]):
        fn = opt(fn)
    return fn


def _threshold(overlap_threshold, no_overlap_filter):
    """The overlap threshold asked for; None with --no-overlap-filter, which refuses an --overlap-threshold
    given beside it (helper-47: the threshold was silently ignored)."""
    if no_overlap_filter and click.get_current_context().get_parameter_source(
            "overlap_threshold") == click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--no-overlap-filter turns the overlap filters off, so --overlap-threshold "
                               f"{overlap_threshold} would be ignored; give one of the two")
    return None if no_overlap_filter else overlap_threshold


def _window_counts(summary: dict) -> str:
    """What ``sequence_neighbors``' leakage rules dropped, as ``neighbors --sequences`` and ``export``
    print it (helper-44: export left out the excluded documents and the searches again)."""
    d = summary["dropped"]
    return (f"dropped {d['excluded_docs']} from excluded documents, {d['duplicates']} exact copies, "
            f"{d['overlap']} over the overlap threshold, {d['window']} holding the window's own later text; "
            f"{summary['research']} searched again, {summary['short']} with fewer than k")


@click.command(short_help="Precompute every chunk's k nearest chunk ids (.npy).")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Destination .npy (int64, -1 padded). Beside it, filtered modes write OUT's stem + "
                   ".summary.json and keep OUT's stem + .candidates-*.npy (the candidates searched, reused by a "
                   "rerun) and OUT.lock (held while writing, removed when done; safe to delete after a killed run).")
@click.option("--k", "k", type=click.IntRange(min=1), default=2, show_default=True, help="Neighbours per chunk (RETRO: 2).")
@click.option("--exclude-same-doc/--include-same-doc", default=None,
              help="For the store's own chunks: skip neighbours from the chunk's own document and copies of the "
                   "chunk in others (the leakage filters, --overlap-threshold; the default: RETRO, Borgeaud et al. "
                   "2021, §2.4, else each chunk's nearest is itself, its continuation the text to predict); "
                   "--include-same-doc gives the nearest chunks unfiltered.")
@click.option("--batch-size", type=int, default=1024, show_default=True,
              help="Query chunks per search call (with --queries or --include-same-doc).")
@click.option("--queries", type=click.Path(exists=True, dir_okay=False),
              help="External token file (.npy, (n, L) ints); output is (n, L/chunk_tokens, k).")
@click.option("--label-token", is_flag=True,
              help="--queries rows are L + 1 tokens (training rows: inputs, then the label); the last is dropped.")
@click.option("--sequences", is_flag=True,
              help="Neighbours of the store's training windows (--seq-len): OUT is (windows, L/chunk_tokens, k), "
                   "leakage-filtered; the windows go to OUT's stem + .windows.npy (int32, (n, L + 1)), "
                   ".window_chunks.npy and .window_docs.npy (int64, (n, C)); and a summary to .summary.json.")
@_leakage_options
@click.option("--tokens", "tokens_out", type=click.Path(dir_okay=False),
              help="Also write the neighbours as RETRO tokens, read from the ids (nothing embedded): TOKENS "
                   "(.npy, int32, OUT's shape + (2 * chunk_tokens,), neighbour then continuation, padded with the "
                   "store's pad id) and TOKENS's stem + .mask.npy (bool).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@friendly
def neighbors(store, out, k, exclude_same_doc, batch_size, queries, label_token, sequences, seq_len, mode, eos_id,
              exclude, overlap_threshold, no_overlap_filter, ngram, tokens_out, quiet):
    """Precompute the k nearest chunk ids of every chunk of STORE (or of a token
    file, or of training windows) into a .npy array for RETRO training.
    Interrupt and re-run to resume."""
    same_doc = None if exclude_same_doc is None else ("--exclude-same-doc" if exclude_same_doc
                                                       else "--include-same-doc")
    if same_doc and queries:
        raise click.UsageError(f"{same_doc} applies to the store's own chunks, not to --queries (a token file's "
                               "rows are not stored chunks: their neighbours are the nearest chunks, unfiltered; "
                               "Store.neighbors(exclude_doc_ids=) leaves documents out in Python)")
    if sequences and (queries or same_doc or label_token):
        given = [name for name, on in (("--queries", queries), (same_doc, same_doc), ("--label-token", label_token))
                 if on]
        raise click.UsageError("--sequences cuts the store's own windows and always excludes their documents "
                               f"(--exclude); drop {', '.join(given)}")
    if sequences and seq_len is None:
        raise click.UsageError("--sequences needs --seq-len L (e.g. 512 for 8 chunks of 64 tokens)")
    if not sequences and seq_len is not None:
        raise click.UsageError("--seq-len applies with --sequences")
    # Options that do not apply to the mode asked for are refused, not ignored (helper-31).
    given = {name for name in ("batch_size", "label_token", "mode", "eos_id", "exclude", "overlap_threshold",
                               "no_overlap_filter", "ngram")
             if click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if sequences:
        mode_name, unused = "--sequences", given & {"batch_size"}
    elif queries:
        mode_name, unused = "--queries", given - {"batch_size", "label_token"}
    elif exclude_same_doc is False:
        mode_name, unused = "--include-same-doc", given - {"batch_size"}
    else:
        mode_name, unused = "the store's chunks (the default)", given & {"batch_size", "label_token", "mode",
                                                                          "eos_id", "exclude"}
    if unused:
        names = ", ".join("--" + n.replace("_", "-") for n in sorted(unused))
        verb, it = ("does", "it") if len(unused) == 1 else ("do", "them")
        raise click.UsageError(f"{names} {verb} not apply to {mode_name}; drop {it} (the leakage options apply to "
                               "--sequences and to the store's chunks, --batch-size to --queries and "
                               "--include-same-doc, --label-token to --queries)")
    threshold = _threshold(overlap_threshold, no_overlap_filter)
    if tokens_out:  # checked before the work, not after it (review: a missing directory failed at the end)
        try:
            retro.NeighborFile.check_tokens_path(tokens_out, out, name="--tokens")
        except retrostore.InvalidInputError as exc:
            raise click.UsageError(str(exc)) from None
    with retrostore.open(store) as st:
        if sequences:
            seqs = retro.training_sequences(st, seq_len, mode=mode, eos_id=eos_id)
            summary = retro.sequence_neighbors(st, seqs, out, k=k, exclude=exclude,
                                               overlap_threshold=threshold,
                                               ngram=ngram,
                                               progress=not quiet)
            stem = out[:-4] if out.endswith(".npy") else out
            windows = np.lib.format.open_memmap(stem + ".windows.npy", mode="w+", dtype=np.int32,
                                                shape=(len(seqs), seq_len + 1))
            for start, rows in seqs.batches(1024):
                windows[start:start + len(rows)] = rows
            windows.flush()
            np.save(stem + ".window_chunks.npy", seqs.chunk_ids)
            np.save(stem + ".window_docs.npy", seqs.doc_ids)
            click.echo(f"wrote {stem}.windows.npy: {len(seqs)} windows of {seq_len} + 1 tokens ({mode})")
            click.echo(f"neighbours: {summary['chunks']} window chunks, {_window_counts(summary)}")
            path = out
        elif not queries and exclude_same_doc is not False:
            # The store's own chunks, leakage-filtered (helper-28: each chunk was its own neighbour; helper-29:
            # then, on a store built twice, its copy in the other document).
            summary = retro.chunk_neighbors(st, out, k=k, overlap_threshold=threshold,
                                            ngram=ngram, progress=not quiet)
            d = summary["dropped"]
            click.echo(f"neighbours: {summary['chunks']} chunks (own documents excluded), dropped "
                       f"{d['duplicates']} exact copies, {d['overlap']} near copies, {d['window']} holding the chunk "
                       f"or the next {summary['ahead']} with their continuation; {summary['research']} searched again, "
                       f"{summary['short']} with fewer than k")
            path = out
        else:
            path = st.precompute_neighbors(out, k=k, batch_size=batch_size, queries=queries,
                                           label_token=label_token, progress=not quiet)
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        click.echo(f"wrote {path}: shape {arr.shape} int64")
        if tokens_out:
            # document-mode windows: their neighbours end documents with the windows' eos_id, as TrainingSet and
            # the export's rows do (helper-59: these tokens had no eos where TrainingSet's had one)
            marks = {"table": seqs.table, "eos_id": seqs.eos_id} if sequences and mode == "document" else {}
            knn = retro.NeighborFile(st, path, **marks)
            written, mask = knn.write_tokens(tokens_out)
            shape = knn.shape + (2 * int(st.manifest["chunk_tokens"]),)
            click.echo(f"wrote {written}: shape {shape} int32, and {mask} (bool)")


@click.command(short_help="Export training windows and neighbours for retro-pytorch.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["retro-pytorch"]), default="retro-pytorch", show_default=True,
              help="The trainer whose files are written (retro-pytorch 0.3.9's RETRODataset).")
@click.option("--k", "k", type=click.IntRange(min=1), default=2, show_default=True, help="Neighbours per chunk (num_neighbors).")
@functools.partial(_leakage_options, seq_len_required=True)
@click.option("--allow-pad-collision", is_flag=True,
              help="Export although token id 0 is real text in this store (retro-pytorch pads with 0).")
@click.option("--force", is_flag=True, help="Replace OUT if it is an earlier export.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@friendly
def export(store, out, fmt, k, seq_len, mode, eos_id, exclude, overlap_threshold, no_overlap_filter, ngram,
           allow_pad_collision, force, quiet):
    """Export STORE's training windows and neighbours for a RETRO trainer: OUT holds
    the files retro-pytorch's RETRODataset reads and retro_pytorch.json with its
    keyword arguments (docs/retro-training.md)."""
    threshold = _threshold(overlap_threshold, no_overlap_filter)
    with retrostore.open(store) as st, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        try:
            info = retro.export_retro_pytorch(st, out, seq_len=seq_len, k=k, mode=mode, eos_id=eos_id,
                                              exclude=exclude, overlap_threshold=threshold, ngram=ngram,
                                              allow_pad_collision=allow_pad_collision, force=force,
                                              progress=not quiet)
        finally:
            for w in caught:  # (an earlier interrupted export's leftovers)
                click.echo(f"warning: {w.message}", err=True)
    click.echo(f"wrote {out}: {info['retro_dataset']['num_sequences']} windows of {seq_len} + 1 tokens ({mode}), "
               f"{info['retro_dataset']['num_chunks']} chunk rows, k={k}; {_window_counts(info['neighbors'])}")
    click.echo(f"open it with RETRODataset(**retrostore.retro.retro_dataset_kwargs({out!r})); "
               f"model: RETRO(num_tokens={info['retro_model']['num_tokens']}, ...)")
