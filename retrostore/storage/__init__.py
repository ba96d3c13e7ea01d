"""The on-disk format, and nothing above it.

Paths and names (:mod:`.layout`), durable file I/O and the writer lock
(:mod:`.fileio`), the manifest (:mod:`.manifest`), the LMDB chunk table
(:mod:`.chunktable`, :mod:`.records`, :mod:`.lmdbfile`, :mod:`.lmdbscan`), raw
vectors files (:mod:`.vectors`), index segment files and their codecs
(:mod:`.segments`, :mod:`.faisstypes`), tombstone files (:mod:`.tombstones`) and
what metadata values can be stored (:mod:`.metadata`). Imports only
:mod:`retrostore.errors` and :mod:`retrostore.types` from the package
(docs/architecture.md).
"""
