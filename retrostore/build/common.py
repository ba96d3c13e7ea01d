"""What every kind of build shares: its result, and the check that an existing
store's settings are the ones asked for."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInputError
from ..storage.fileio import sha256_file
from ..store.store import Store

__all__ = ["BuildResult", "check_same_settings"]


@dataclass(frozen=True)
class BuildResult:
    """What one build run added.

    Attributes
    ----------
    version : int
        The store's version after the run.
    documents, chunks : int
        Documents and chunks committed by this run.
    seconds : float
        Wall time of the run.
    interrupted : bool
        True when stopped by Ctrl-C; everything committed before stays.
    shards, reused_shards : int
        Sharded builds (``engine=``): shards in the plan, and finished shards
        of an earlier, interrupted run that this run reused.
    build_id : str or None
        Sharded builds: sha256 of the plan, recorded in the manifest's ``builds``.
    engine : str or None
        ``"local"``, ``"ray"``, or None for the plain streaming build.
    device : str
        Where shards were embedded (``"cpu"`` after a fallback from ``"cuda"``).
    skipped : tuple of str
        Input files not built because the store holds their documents
        already, each with the reason (``append=True`` adds them again).
    resumed_documents : int
        Documents of the inputs an interrupted earlier run had committed (not
        read into the store again).
    """

    version: int
    documents: int
    chunks: int
    seconds: float
    interrupted: bool = False
    shards: int = 0
    reused_shards: int = 0
    build_id: str | None = None
    engine: str | None = None
    device: str = "cpu"
    skipped: tuple[str, ...] = ()
    resumed_documents: int = 0

    @property
    def already_built(self) -> bool:
        """Nothing was added because every input was built before."""
        return not self.interrupted and self.documents == 0 and (bool(self.skipped) or (
            self.engine is not None and self.shards > 0))


def check_same_settings(st: Store, tokenizer, chunk_tokens, index) -> None:
    m = st.manifest
    problems = []
    if chunk_tokens is not None and chunk_tokens != m["chunk_tokens"]:
        problems.append(f"--chunk-tokens {chunk_tokens} (the store uses {m['chunk_tokens']})")
    current = m["index"].get("target", m["index"]["factory"])
    if index is not None and index != current:
        problems.append(f"--index {index!r} (the store uses {current!r}; change it with `retrostore reindex`)")
    if tokenizer is not None:
        if sha256_file(tokenizer)[1] != m["tokenizer"]["sha256"]:
            problems.append(f"--tokenizer {tokenizer} (differs from the store's tokenizer.json)")
    if problems:
        st.close()
        raise InvalidInputError(
            f"{st.path} already exists with other settings: {'; '.join(problems)}. Omit these options "
            "to append with the store's own settings, or build into a new path"
        )
