"""The ``retrostore`` command line: a thin click front end over the library.

Every command calls the public API and nothing else; library errors become a
one-line message and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

import click

import retrostore
from retrostore import RetrostoreError
from retrostore.build import build_store

from .common import friendly
from .retro_commands import export, neighbors

__all__ = ["main", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(retrostore.__version__, prog_name="retrostore")
def cli() -> None:
    """retrostore: the on-disk retrieval database for RETRO-style models.

    Build a store from text, search it, and look inside it.
    """


@cli.command(short_help="Build or append to a store from text, jsonl and jsonl.zst files.")
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False),
              help="HF tokenizer.json used to cut chunks (default: the embedder's tokenizer). New stores only.")
@click.option("--chunk-tokens", type=int, default=None,
              help="Tokens per chunk (default 64, the RETRO value). New stores only.")
@click.option("--text-field", default="text", show_default=True, help="JSON field holding a document's text.")
@click.option("--meta-field", default="meta", show_default=True, help="JSON field stored as document metadata.")
@click.option("--index", "factory", default=None,
              help="FAISS factory string, or 'auto' (the default: exact Flat below 5,000 chunks, an HNSW32,SQfp16 "
                   "graph up to 100,000, trained IVF-PQ fast-scan beyond; docs/index.md). New stores only.")
@click.option("--commit-every", type=int, default=20_000, show_default=True,
              help="Commit after this many chunks, so an interrupted build keeps its committed part.")
@click.option("--threads", type=int, default=None, help="FAISS/onnxruntime threads (default: CPUs available).")
@click.option("--append", is_flag=True,
              help="Add the documents of inputs the store holds already once more (without it, inputs a build "
                   "finished are skipped and an interrupted build resumes).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default=None,
              help="Build in shards (plan, train, shard, merge): 'local' in this process, 'ray' as Ray tasks "
                   "(the ray extra: pip install \".[ray]\" in the retrostore checkout). Re-running resumes; see docs/scaling.md.")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray).")
@click.option("--shards", type=int, default=None,
              help="Number of shards (default: one per 64 M characters of input). Without --engine, implies "
                   "--engine local.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Embed shards on GPUs with onnxruntime's CUDA provider (one model per GPU); falls back to CPU.")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where shards wait to be merged (default STORE.build; shared storage on a cluster).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@friendly
def build(store, inputs, tokenizer, chunk_tokens, text_field, meta_field, factory, commit_every, threads,
          append, engine, address, shards, device, work_dir, quiet):
    """Build (or append to) STORE from INPUT files: .txt (one document per file),
    .jsonl, .jsonl.gz, .jsonl.zst (The Pile's {"text", "meta"} lines) and
    directories of these.

    Running it again is safe: input files whose documents the store holds
    already (recorded by the sha256 of the file and of its decompressed
    bytes: the same documents re-compressed count too) are skipped, an interrupted build resumes
    after its last commit, a file that grew since its build adds only its new
    documents, and new files are added; --append adds the same documents once
    more.

    With --engine (or --shards/--work-dir/--device cuda) the build runs in
    stages that give the same store: plan shards, train the index if needed,
    tokenize and embed each shard (on Ray with --engine ray), merge in order
    and verify. Running it again after an interruption reuses finished shards;
    after success it does nothing."""
    if commit_every < 1:
        raise click.BadParameter(f"{commit_every} must be >= 1", param_hint="--commit-every")
    if shards is not None and shards < 1:
        raise click.BadParameter(f"{shards} must be >= 1", param_hint="--shards")
    if address is not None and engine != "ray":
        raise click.UsageError("--address needs --engine ray")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = build_store(
            store, list(inputs), tokenizer=tokenizer, chunk_tokens=chunk_tokens, text_field=text_field,
            meta_field=meta_field, index=factory, commit_every=commit_every, threads=threads, progress=not quiet,
            append=append, engine=engine, shards=shards, address=address, device=device, work_dir=work_dir,
        )
    for w in caught:
        if issubclass(w.category, RuntimeWarning):
            click.echo(f"warning: {w.message}", err=True)
    verb = "interrupted; kept" if result.interrupted else "built"
    if result.already_built:
        verb = "already built"
    sharded = ""
    if result.engine:
        sharded = (f" [{result.engine}, {result.shards} shards"
                   f"{f', {result.reused_shards} reused' if result.reused_shards else ''}, {result.device}]")
    if result.already_built:  # nothing was read or added: no rate to report
        click.echo(f"{verb} {store}: version {result.version}, nothing to add{sharded}")
    else:
        click.echo(
            f"{verb} {store}: version {result.version}, +{_count(result.documents, 'document')}, +{_count(result.chunks, 'chunk')} "
            f"in {result.seconds:.1f} s ({result.chunks / max(result.seconds, 1e-9):.0f} chunks/s){sharded}"
        )
    if result.resumed_documents:
        click.echo(f"resumed: {result.resumed_documents} documents of these inputs were committed by an earlier "
                   "run" + (f" (of {', '.join(result.repaired)} before it was repaired: the same first documents, "
                            "other bytes)" if result.repaired else "")
                   + (f"; {', '.join(result.grown)} grew since it was built: only its documents after those were "
                      "added" if result.grown else ""))
    for note in result.notes:
        click.echo(f"warning: {note}", err=True)
    if not result.already_built and not result.interrupted and not result.documents and not result.skipped \
            and not result.resumed_documents:
        click.echo("warning: the inputs held no documents (empty files, or no text in their records); "
                   "nothing was added", err=True)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} input(s) the store holds already (pass --append to add their "
                   f"documents again): {'; '.join(result.skipped[:3])}{' ...' if len(result.skipped) > 3 else ''}")
    if result.interrupted:
        sys.exit(130)


@cli.command(short_help="Search for the chunks nearest to a query text.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("query")
@click.option("-k", "--k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="Number of neighbours.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object with the hits).")
@friendly
def search(store, query, k, as_json):
    """Search STORE for the chunks nearest to QUERY text.

    Each hit's text is shown on one line, its whitespace collapsed and cut at
    300 characters; --json prints the exact stored text, tokens and continuation.
    """
    with retrostore.open(store) as st:
        t0 = time.perf_counter()
        hits = st.search(query, k=k)
        ms = (time.perf_counter() - t0) * 1e3
        metas = st.get_metadata([h.doc_id for h in hits])
        if as_json:
            out = [dict(h.to_dict(), metadata=m) for h, m in zip(hits, metas)]
            click.echo(json.dumps({"query": query, "k": k, "version": st.version, "hits": out}, ensure_ascii=False))
            return
        if not hits:  # one line, no "(0 hits in 0.0 ms)" after it (helper-56)
            # (helper-60: "every document is deleted" where empty documents were live)
            why = "the store holds no chunks" if len(st) == 0 else "every chunk is of a deleted document"
            click.echo(f"no hits: {why} (version {st.version})")
            return
        for rank, (h, meta) in enumerate(zip(hits, metas), 1):
            source = meta.get("source") if isinstance(meta, dict) else None
            head = f"#{rank}  score {h.score:.4f}  chunk {h.chunk_id}  doc {h.doc_id}"
            # one line per hit: a source (a file name, a URL) with a line break or a control character is
            # shown escaped, as Python writes it (helper-48: a newline in a name split the hit's line)
            shown_source = str(source) if str(source).isprintable() else repr(str(source))
            click.echo(head + (f"  {shown_source}" if source else ""))
            text = " ".join(h.text.split())
            click.echo(f"    {text[:300]}{'...' if len(text) > 300 else ''}")
        warm = ""
        if ms > 50:  # helper-58: ~220 ms of a process's first search loads the model and the index, read as slow search
            t0 = time.perf_counter()
            st.search(query, k=k)
            warm = f", the first search of this process; the same search again: {(time.perf_counter() - t0) * 1e3:.1f} ms"
        click.echo(f"({_count(len(hits), 'hit')} in {ms:.1f} ms{warm})", err=True)


@cli.command(context_settings={"ignore_unknown_options": True}, short_help="Show a document (or, with --chunk, a chunk) by id.")  # (`show S -1`: an id error, not an option's)
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("ident", metavar="ID", type=int)
@click.option("--chunk", "is_chunk", is_flag=True, help="ID is a chunk id (as `search` prints after `chunk`).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the exact text, metadata, ids and offsets).")
@friendly
def show(store, ident, is_chunk, as_json):
    """Show document ID of STORE: its metadata, chunk ids and exact text (as
    `search` prints document ids after `doc`); with --chunk, chunk ID: its
    document, position, character offset, tokens and exact text. What to look
    at before `retrostore delete`."""
    with retrostore.open(store) as st:
        if is_chunk:
            _check_chunk_id(st, ident)
            [c] = st.get_chunks([ident])
            if as_json:
                click.echo(json.dumps({"chunk_id": c.chunk_id, "doc_id": c.doc_id, "position": c.position,
                                       "start": c.start, "text": c.text, "tokens": c.tokens.tolist(),
                                       "version": st.version}, ensure_ascii=False))
                return
            # first..last, as _doc_line writes chunk ids (helper-58: characters were first..end, ids first..last)
            click.echo(f"chunk {c.chunk_id}: doc {c.doc_id}, chunk {c.position} of the document, characters "
                       f"{c.start:,}..{c.start + len(c.text) - 1:,} ({len(c.text):,}), {_count(len(c.tokens), 'token')}")
            click.echo(c.text)
            return
        _check_doc_ids(st, [ident], "add --chunk to show a chunk")
        doc = st.get_document(ident)
        ids = doc.chunk_ids
        if as_json:
            # first and last, as the text line (helper-60: [start, stop) under the name chunk_ids read as two ids)
            click.echo(json.dumps({"doc_id": doc.doc_id, "metadata": doc.metadata, "chunks": len(ids),
                                   "first_chunk_id": ids.start if ids else None,
                                   "last_chunk_id": ids.stop - 1 if ids else None,
                                   "text": doc.text, "version": st.version}, ensure_ascii=False, default=str))
            return
        click.echo(_doc_line(doc))
        click.echo(doc.text)


def _on_disk(files: dict, what: str, form: str) -> str:
    """``form`` with the disk blocks (e.g. ", 1.3 MiB on disk") where ``what``'s files
    (``vectors``, ``total``) take much less disk than their sizes (compact's holes), else ""."""
    disk, size = files.get(f"{what}_disk_bytes"), files[f"{what}_bytes"]
    return form.format(_human(disk)) if disk is not None and disk < 0.9 * size else ""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cli.command(short_help="Show versions, counts, fingerprints, index and files.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def inspect(store, as_json):
    """Show what STORE holds: versions, counts, fingerprints, index, files.

    \b
    format     the store's format version (readers >= the oldest reader format that can read it:
               1, or 2 once documents are deleted, 3 once a Flat index is stored as float16)
    version    the current version (retained: versions open(path, version=V) can still read)
    documents, chunks, vectors   counts of the current version (ids ever committed, the deleted
                                 ones counted and said; vectors: indexed chunks)
    embedder, tokenizer          the fingerprints a store opened later must match; the tokenizer's
                                 vocabulary (a RETRO model's num_tokens must cover it) and the id
                                 that pads neighbour tokens
    index      factory string, search parameters in force, segments, segment bytes per vector
               (the trained template apart); for a store that trains later, the policy and a hint
    files      bytes of the current version's index, raw vectors (or "in the Flat segments":
               an index="Flat" store keeps them there) and LMDB; total: the whole directory,
               retained versions' files and the tokenizer included
    manifest   sha256 of manifest.json, as sha256sum prints it (for unpack --expect-manifest-sha256)

    --json prints Store.info(), the same and more (docs/api.md).
    """
    with retrostore.open(store) as st:
        info = st.info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    emb, tok, idx, files = info["embedder"], info["tokenizer"], info["index"], info["files"]
    rows = [
        ("path", info["path"]),
        ("format", f"{info['format_version']} (readers >= {info['min_reader_version']})"),
        ("version", f"{info['version']} (retained: {', '.join(map(str, info['retained_versions']))})"),
        ("documents", f"{info['documents']:,}" + _deleted(info["deletes"], "documents")),
        ("chunks", f"{info['chunks']:,} of {info['chunk_tokens']} tokens" + _deleted(info["deletes"], "chunks")),
        *([("deleted", _deleted_ids(info["deletes"]["deleted_documents"]))]
          if info["deletes"].get("deleted_documents") else []),
        ("vectors", f"{info['vectors']:,} x {info['dim']} ({info['metric']})"),
        ("embedder", _describe_embedder(emb)),
        ("tokenizer", f"sha256 {tok['sha256'][:16]}... vocab {tok['vocab_size']:,} {_describe_pad(tok)}"),
        ("index", f"{idx['factory']}{' (float16 codes)' if idx.get('codec') == 'float16' else ''} "
                  f"params {json.dumps(idx['params'])} segments {idx['segments']}"
                  + (f" ({idx['bytes_per_vector']} bytes/vector)" if idx["bytes_per_vector"] is not None else "")
                  + (f"; policy {idx['target']!r}: {idx['hint']}" if idx.get("hint") else "")),
        ("files", f"index {_human(files['index_bytes'])}, "
                  + ("vectors in the Flat segments " if files.get("vectors_in_index")
                     else f"vectors {_human(files['vectors_bytes'])} ")
                  + f"({files['vectors_dtype']}{_on_disk(files, 'vectors', ', {} on disk')}), lmdb {_human(files['lmdb_bytes'])}, "
                  f"total {_human(files['total_bytes'])}{_on_disk(files, 'total', ' ({} on disk)')}"),
        ("manifest", f"sha256 {info['manifest_sha256']}"),
        ("created", info["created_at"]),
        ("committed", info["committed_at"]),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _deleted(deletes: dict, what: str) -> str:
    """``" (N deleted, M of them purged)"``: ids count every document and chunk ever committed
    (helper-36: after delete + compact, nothing in the text said so)."""
    n, purged = int(deletes.get(what, 0)), int(deletes.get(f"purged_{what}", 0))
    if not n:
        return ""
    return f" ({n:,} deleted" + (f", {purged:,} of them purged by compact)" if purged else "; compact purges them)")


def _deleted_ids(docs: list[dict], shown: int = 20) -> str:
    """``"documents 6, 9 (purged at version 3)"``; the first ``shown`` ids (all: ``inspect --json``)."""
    ids = ", ".join(str(d["doc_id"]) for d in docs[:shown]) + (f", ... ({len(docs):,} in all)" if len(docs) > shown else "")
    at = sorted({d["purged_at_version"] for d in docs if d["purged_at_version"] is not None})
    pending = sum(d["purged_at_version"] is None for d in docs)
    when = ([f"purged at version {', '.join(map(str, at))}"] if at else []) + ([f"{pending:,} not purged yet"] if pending else [])
    return f"documents {ids} ({'; '.join(when)})"


def _describe_pad(tok: dict) -> str:
    """The pad id, its token, and a warning when it is a real token (the tokenizer has none)."""
    token = tok.get("pad_token")
    out = f"pad id {tok['pad_id']}" + (f" {token!r}" if token is not None else "")
    if str(tok.get("pad_source", "")).startswith("none"):
        out += " (not a padding token: the tokenizer has none; masks of tokens != pad id hide it)"
    elif tok.get("pad_source") == "argument":
        out += " (given at create)"
    return out


def _describe_embedder(emb: dict) -> str:
    """The manifest's embedder fingerprint in one line: the model file's sha256 and pooling
    for an ONNX model, the fingerprint's own fields for a user's embedder."""
    name = emb.get("name", emb.get("kind", "?"))
    if emb.get("model_sha256"):
        return (f"{name} sha256 {str(emb['model_sha256'])[:16]}... pooling={emb.get('pooling')} "
                f"normalize={emb.get('normalize')}")
    rest = ", ".join(f"{k}={v}" for k, v in sorted(emb.items()) if k not in ("name",))
    return f"{name} (a user's embedder: {rest})"


@cli.command(short_help="Check the manifest, checksums, records and index counts.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {ok, version, problems}.")
@click.option("--retokenize", is_flag=True,
              help="Also cut every document again with the store's tokenizer and compare each chunk's token ids "
                   "and span (as long as tokenizing the corpus).")
@friendly
def verify(store, as_json, retokenize):
    """Check STORE's integrity: manifest, checksums, LMDB records, index counts.

    Exit status 0 only when every check holds; each problem is one line."""
    report = retrostore.verify(store, retokenize=retokenize)
    problems, version = report["problems"], report["version"]
    if as_json:
        click.echo(json.dumps({"ok": not problems, "version": version, "problems": problems}, indent=2))
    else:
        for p in problems:
            click.echo(p)
        if not problems:
            click.echo(f"ok: {store} version {version} is intact"
                       + (" (every document cut again: token ids and spans match)" if retokenize else ""))
        elif not all("Permission denied" in p for p in problems):
            click.echo(f"{store} is damaged or incomplete: copy or download it again from its source, or restore "
                       "it from a backup (a file the manifest names cannot be rebuilt from the others)", err=True)
    if problems:
        sys.exit(1)


@cli.command(short_help="Pack the current version into one .tar or .tar.zst archive.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--no-vectors", is_flag=True,
              help="Leave out the raw vectors (a slim artifact; the manifest records it, and reindex, eval and neighbours "
                   "then work only from an index that holds its vectors, such as Flat).")
@click.option("--level", type=click.IntRange(1, 22), default=3, show_default=True,
              help="zstd compression level for .tar.zst.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@friendly
def pack(store, out, no_vectors, level, force):
    """Pack the current version of STORE into one archive OUT (.tar, or .tar.zst
    for zstd): compacted LMDB with only committed records, the referenced index
    and vector files, tokenizer and manifest. Packing the same version twice
    gives the same bytes."""
    try:
        res = retrostore.pack(store, out, vectors=not no_vectors, overwrite=force, level=level)
    except RetrostoreError:
        raise
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc}") from None
    click.echo(f"packed {store} version {res.version} into {res.path}: {res.files} files, "
               f"{_human(res.size_bytes)}{'' if res.vectors else ', raw vectors dropped'}")
    click.echo(f"manifest sha256 {res.manifest_sha256}")


@cli.command(short_help="Safely extract and verify a packed store archive.")
@click.argument("archive", type=click.Path(exists=True, dir_okay=False))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--expect-manifest-sha256", "expected", default=None, metavar="HEX",
              help="Refuse the archive unless its manifest.json has this sha256 (the published value).")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None,
              help="Refuse archives that extract to more bytes than this (default 1 TiB).")
@click.option("--max-member-bytes", type=click.IntRange(min=1), default=None,
              help="Refuse archives with a member larger than this (default 256 GiB).")
@friendly
def unpack(archive, dest, expected, max_bytes, max_member_bytes):
    """Safely extract a store ARCHIVE (made by `retrostore pack`) into the new
    directory DEST and verify every checksum before reporting success. Hostile
    archives (absolute paths, '..', links, device files, oversized members) are
    refused and nothing is written outside DEST."""
    limits = {}
    if max_bytes is not None:
        limits["max_total_bytes"] = max_bytes
    if max_member_bytes is not None:
        limits["max_member_bytes"] = max_member_bytes
    try:
        res = retrostore.unpack(archive, dest, expected_manifest_sha256=expected, **limits)
    except RetrostoreError:
        raise
    except OSError as exc:
        raise click.ClickException(f"cannot unpack {archive}: {exc}") from None
    click.echo(f"unpacked {archive} into {res.path}: version {res.version}, {res.files} files, "
               f"{_human(res.size_bytes)}, verified intact{'' if res.vectors else ' (raw vectors dropped at pack)'}")
    click.echo(f"manifest sha256 {res.manifest_sha256}")
def _params(pairs) -> dict | None:
    """``--param name=value`` options as a dict (None when none given)."""
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r} must look like name=value, e.g. nprobe=16", param_hint="--param")
        try:
            out[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: {value!r} is not a number", param_hint="--param") from None
    return out


_PARAM_HELP = "Search parameter name=value (nprobe, efSearch, quantizer_efSearch, max_codes, rerank, ...); repeatable."


@cli.command(context_settings={"ignore_unknown_options": True}, short_help="Delete documents (a take-down); try --dry-run first.")  # (`delete S -1`: an id error, not an option's)
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("doc_ids", nargs=-1, required=True, type=int)
@click.option("--dry-run", is_flag=True,
              help="Show each document that would be deleted (chunks, characters, metadata, first words); change nothing.")
@friendly
def delete(store, doc_ids, dry_run):
    """Delete documents DOC_IDS (document ids, as `search` prints them after
    `doc`) from STORE, a take-down: from the committed version on, their chunks
    are never returned; retained older versions and servers pinned to one still
    hold them until `retrostore compact` purges them from the index, vectors
    and records. Try it with --dry-run first (or `retrostore show STORE DOC_ID`):
    a chunk id pasted as a document id names another document."""
    doc_ids = list(dict.fromkeys(doc_ids))
    if dry_run:
        _delete_dry_run(store, doc_ids)
        return
    with retrostore.open(store, "a") as st:
        _check_doc_ids(st, doc_ids)
        n = st.delete(doc_ids)
        version = st.commit()
    click.echo(f"deleted {_count(n, 'document')} ({len(doc_ids) - n} already deleted); version {version}")
    if n:
        click.echo("note: retained versions before it still hold them; `retrostore compact` purges them")


def _doc_line(doc, meta_chars: int | None = None) -> str:
    """``doc 7: 41 chunks (ids 282..322), 9,277 characters, metadata {...}`` (``show``, ``delete
    --dry-run``); the metadata's JSON cut at ``meta_chars``."""
    ids = doc.chunk_ids
    span = (f" (id {ids.start:,})" if len(ids) == 1 else f" (ids {ids.start:,}..{ids.stop - 1:,})") if ids else ""
    meta = json.dumps(doc.metadata, ensure_ascii=False, default=str)[:meta_chars]
    return f"doc {doc.doc_id}: {_count(len(ids), 'chunk')}{span}, {_count(len(doc.text), 'character')}, metadata {meta}"


def _count(n: int, noun: str) -> str:
    """``1 document``, ``2,048 documents``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _check_chunk_id(st, chunk_id: int) -> None:
    """A committed chunk's id, or a ClickException in the words of ``_check_doc_ids`` (helper-58: a chunk id
    out of range gave the library's "InvalidInputError: ... outside the committed range [0, 51429)")."""
    if 0 <= chunk_id < len(st):
        return
    if not len(st):
        raise click.ClickException(f"{st.path} holds no chunks, so there is no chunk {chunk_id}")
    raise click.ClickException(f"chunk id {chunk_id} is not in {st.path}: its chunk ids are 0 to {len(st) - 1:,}. "
                               "Chunk ids are the numbers after `chunk` in `retrostore search` output")


def _check_doc_ids(st, doc_ids: list[int], then: str = "nothing was deleted") -> None:
    """Every id is a committed document's, or a ClickException that says what the id may be
    (helper-56: "outside the committed range [0, 16)" left a user who pasted chunk id 47 guessing)."""
    limit = int(st.manifest["next_doc_id"])
    bad = [d for d in doc_ids if not 0 <= d < limit]
    if not bad:
        return
    if not limit:
        raise click.ClickException(f"{st.path} holds no documents, so there is no document {bad[0]}")
    d = bad[0]
    hint = ""
    if 0 <= d < len(st):
        try:
            hint = f"; {d} is the id of a chunk of document {st.get_chunks([d])[0].doc_id}"
        except retrostore.RetrostoreError:  # (a chunk of a deleted document)
            hint = f"; {d} is a chunk id"
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise click.ClickException(
        f"document id {d}{more} is not in {st.path}: its document ids are 0 to {limit - 1}{hint}. "
        f"Document ids are the numbers after `doc` in `retrostore search` output; {then}")


def _delete_dry_run(store, doc_ids: list[int]) -> None:
    """``delete --dry-run``: what the delete would remove, read from the committed version; every
    id is checked before anything is printed."""
    with retrostore.open(store) as st:
        _check_doc_ids(st, doc_ids)
        deleted = {d["doc_id"] for d in st.info()["deletes"]["deleted_documents"]}
        lines, n, chunks = [], 0, 0
        for doc_id in doc_ids:
            if doc_id in deleted:
                lines.append(f"doc {doc_id}: already deleted")
                continue
            doc = st.get_document(doc_id)
            n += 1
            chunks += len(doc.chunk_ids)
            start = " ".join(doc.text[:120].split())
            lines.append(f"{_doc_line(doc, meta_chars=200)}\n    {start!r}")
    for line in lines:
        click.echo(line)
    click.echo(f"would delete {_count(n, 'document')} ({_count(chunks, 'chunk')}); nothing changed (dry run)")


@cli.command(short_help="Retrain and rebuild the index from the stored vectors.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--index", "factory", default=None,
              help="FAISS factory string, or 'auto' (size-following default). Default: the store's current choice.")
@click.option("--train-size", type=int, default=None, help="Vectors in the seeded training sample (default 64 per centroid, at least 16,384).")
@click.option("--seed", type=int, default=None, help="Seed of the training sample (default: the store's, 0).")
@click.option("--param", "params", multiple=True, help=_PARAM_HELP + " Stored as the store's parameters.")
@click.option("--mmap/--no-mmap", default=None, help="Record whether readers memory-map the index files.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@friendly
def reindex(store, factory, train_size, seed, params, mmap, quiet):
    """Retrain and rebuild STORE's index from its stored vectors (no re-embedding)."""
    if not quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    with retrostore.open(store, "a") as st:
        version = st.reindex(factory, train_size=train_size, seed=seed, params=_params(params), mmap=mmap,
                             progress=not quiet)
        idx = st.info()["index"]
    click.echo(f"reindexed {store}: version {version}, {idx['factory']} params {json.dumps(idx['params'])} "
               f"({idx['bytes_per_vector']} bytes/vector) in {time.perf_counter() - t0:.1f} s")


@cli.command(short_help="Merge index segments and purge deleted documents.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@friendly
def compact(store, quiet):
    """Merge STORE's index segments into one and purge deleted documents from
    the index, the raw vectors (zeroed) and the LMDB records. Chunk ids stay
    stable. LMDB does not overwrite the pages it frees: purged text can stay in
    free pages of chunks.lmdb/data.mdb until LMDB reuses them; `retrostore pack`
    writes a copy without them (docs/index.md, "Deletes and compaction")."""
    with retrostore.open(store, "a") as st:
        before, deletes = st.version, st.manifest.get("deletes") or {}
        pending = deletes.get("documents", 0) - deletes.get("purged_documents", 0)  # what this compact purges
        version = st.compact(progress=not quiet)
        info = st.info()
    if version == before:
        click.echo(f"nothing to compact in {store} (version {version})")
    else:
        click.echo(f"compacted {store}: version {version}, {_count(info['index']['segments'], 'segment')}, "
                   f"{_count(info['deletes'].get('purged_documents', 0), 'document')} purged in all")
        if pending:
            click.echo("note: their text can stay in free pages of chunks.lmdb/data.mdb until LMDB reuses them; "
                       "`retrostore pack` writes a copy that holds none of it")


@cli.command(name="eval", short_help="Recall@k and latency of the index against exact search.")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--queries", type=int, default=1000, show_default=True, help="Stored vectors sampled as queries.")
@click.option("--k", "k", type=click.IntRange(min=1), default=10, show_default=True, help="Neighbours per query.")
@click.option("--param", "params", multiple=True, help=_PARAM_HELP)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the query sample.")
@click.option("--threads", type=int, default=None, help="FAISS threads (default: CPUs available; 1 for serving-style latency).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def eval_(store, queries, k, params, seed, threads, as_json):
    """Recall@k of STORE's index against exact search over its stored vectors,
    and single-query latency p50/p99."""
    with retrostore.open(store, threads=threads) as st:
        res = st.evaluate(queries=queries, k=k, params=_params(params), seed=seed)
        threads = st.threads
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    lat = res["latency_ms"]
    click.echo(f"index      {res['factory']} params {json.dumps(res['params'])} ({res['vectors']:,} vectors)")
    click.echo(f"recall@{res['k']:<3} {res['recall_at_k']:.4f}  ({res['queries']} stored vectors as queries, "
               f"own chunk left out; exact nearest found in {res['nn_in_top_k']:.1%})")
    click.echo(f"latency    p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms (one query per call); "
               f"batch {res['batch_qps']:,.0f} queries/s ({_count(threads, 'thread')}; a busy machine slows both)")


@cli.command(short_help="Serve the store read-only over HTTP (JSON API, web page).")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; only this machine can connect unless told otherwise (e.g. 0.0.0.0).")
@click.option("--port", type=click.IntRange(0, 65535), default=8808, show_default=True, help="TCP port.")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Worker processes; each opens the store read-only (memory-mapped, sharing the index pages).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="FAISS/onnxruntime threads per worker (default: CPUs available / workers).")
@click.option("--batch-window-ms", type=click.FloatRange(0, 60_000), default=2.0, show_default=True,
              help="How long a batch waits for more concurrent requests (only while others are on their way).")
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True,
              help="Most queries one batch gathers from several requests.")
@click.option("--max-body-bytes", type=click.IntRange(1), default=8 << 20, show_default=True,
              help="Largest request body accepted (HTTP 413 beyond).")
@click.option("--body-timeout-s", type=click.FloatRange(0, 3600, min_open=True), default=30.0, show_default=True,
              help="Longest pause in a request's body, from its headers on (HTTP 408 beyond).")
@click.option("--max-queries", type=click.IntRange(1), default=1024, show_default=True,
              help="Most queries (or neighbour query chunks) in one request.")
@click.option("--max-k", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Largest k (n_docs) a request may ask for.")
@click.option("--max-neighbors", type=click.IntRange(1, 1 << 30), default=16_384, show_default=True,
              help="Most neighbours (rows x chunks x k) in one /v1/neighbors answer, and most hits (queries x k) "
                   "in one search answer; bounds their size.")
@click.option("--mmap/--no-mmap", default=None,
              help="Memory-map the index files (default: with several workers, where the factory allows).")
@click.option("--follow/--no-follow", default=True, show_default=True,
              help="Move to each newly committed version between batches.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Verify the store before serving it; a store that fails is refused with the problems.")
@click.option("--spin/--no-spin", default=False, show_default=True,
              help="onnxruntime's idle threads spin between the model's operations instead of sleeping: lower "
                   "latency for a lone client on a machine the server has to itself, at the price of a core kept "
                   "busy after each answer and of throughput under load (docs/serving.md).")
@friendly
def serve(store, host, port, workers, threads, batch_window_ms, max_batch, max_body_bytes, body_timeout_s,
          max_queries, max_k, max_neighbors, mmap, follow, verify, spin):
    """Serve STORE read-only over HTTP (JSON API under /v1, a page to try it at /,
    Prometheus metrics at /metrics) until interrupted. Concurrent requests are
    embedded and searched in batches; the server follows the writer's commits.
    Clients: retrostore.connect(URL), or any HTTP client (docs/serving.md).
    Needs the serve extra: pip install ".[serve]" in the retrostore checkout."""
    from retrostore.serve import ServeSettings, run

    run(ServeSettings(store=store, host=host, port=port, workers=workers, threads=threads,
                      batch_window_ms=batch_window_ms, max_batch=max_batch, max_body_bytes=max_body_bytes,
                      body_timeout_s=body_timeout_s, max_queries=max_queries, max_k=max_k,
                      max_neighbors=max_neighbors, mmap=mmap, follow=follow, verify=verify, spin=spin))


cli.add_command(neighbors)
cli.add_command(export)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="retrostore")


if __name__ == "__main__":
    main()
