"""FAISS indexes above the segment files: factory strings (:mod:`.factory`),
search parameters (:mod:`.params`), the size-following policy
(:mod:`.policy`), training (:mod:`.training`), merging segments
(:mod:`.merge`), searching a version's segments (:mod:`.search`) and reading
stored vectors back (:mod:`.source`). Imports only ``errors``, ``types``,
``storage`` and ``text`` from the package (docs/architecture.md).
"""
