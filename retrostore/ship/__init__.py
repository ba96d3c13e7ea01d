"""Shipping a store as one file: :mod:`.pack` writes one committed version as a
reproducible tar (zstd-compressed when asked), :mod:`.unpack` takes an archive
from a stranger safely. Above ``store`` in the layers (docs/architecture.md).
"""
