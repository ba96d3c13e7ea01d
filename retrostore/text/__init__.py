"""Text in: input files (:mod:`.inputs`), tokenizers and chunking
(:mod:`.tokenizer`, :mod:`.chunking`), embedders (:mod:`.embed`, the default
model in :mod:`.models`). Imports only ``errors``, ``types`` and ``storage``
from the package (docs/architecture.md).
"""
