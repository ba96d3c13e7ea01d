"""Building stores from input files: the plain streaming build
(:mod:`.stream`) and sharded builds (:mod:`.plan`, :mod:`.shards`,
:mod:`.engines`, :mod:`.sharded`), in this process or on Ray. The top layer
of the library but for serving (docs/architecture.md).
"""

from .common import BuildResult
from .stream import build_store

__all__ = ["build_store", "BuildResult"]
