"""RETRO training on a store: training windows, neighbour tokens from ids, leakage
controls, and an exporter for retro-pytorch 0.3.9 (docs/retro-training.md).

Built on the store's public API only (``Store.neighbor_tokens``,
``neighbors``, ``precompute_neighbors``, ``search_vectors``, ``manifest``). torch and
retro-pytorch are optional: only :func:`fetch_fn` returns torch tensors, and
only when torch is installed (``pip install ".[retro]"``).
"""

from __future__ import annotations

from .dataset import TrainingSet
from .export import FILES, export_retro_pytorch, retro_dataset_kwargs
from .generation import fetch_fn, model_neighbors
from .leakage import (DEFAULT_NGRAM, DEFAULT_OVERLAP_THRESHOLD, FilterStats, duplicate_chunks, filter_neighbors,
                      future_overlap, ngram_overlap)
from .sequences import Sequences, chunk_neighbors, default_eos_id, sequence_neighbors, training_sequences
from .table import ChunkTable, chunk_table
from .tokens import NeighborFile, NeighborTokens, neighbor_tokens

__all__ = [
    "neighbor_tokens", "NeighborTokens", "NeighborFile",
    "training_sequences", "Sequences", "default_eos_id", "sequence_neighbors", "chunk_neighbors",
    "TrainingSet",
    "chunk_table", "ChunkTable",
    "ngram_overlap", "future_overlap", "duplicate_chunks", "filter_neighbors", "FilterStats",
    "DEFAULT_NGRAM", "DEFAULT_OVERLAP_THRESHOLD",
    "export_retro_pytorch", "retro_dataset_kwargs", "FILES",
    "model_neighbors", "fetch_fn",
]
