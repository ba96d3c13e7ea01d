"""The Store and what it composes: the version a handle serves
(:mod:`.version`), reads (:mod:`.reading`, :mod:`.retrieval`,
:mod:`.precompute`), the writer (:mod:`.writer`, :mod:`.commit`,
:mod:`.indexer`), maintenance (:mod:`.maintenance`), ``inspect``, ``verify``
and ``eval`` (:mod:`.inspect`, :mod:`.verify`, :mod:`.evaluate`), and
``create``/``open`` (:mod:`.create`). The public facade is
:class:`~retrostore.store.store.Store` (docs/architecture.md).
"""
