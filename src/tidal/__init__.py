"""Tidal: a heterogeneous CPU + GPU engine for large sparse recommendation models.

Every raw feature ID gets its own embedding row (no modulo hashing); CPUs do the sparse
work, the dense network runs wherever it runs best.

The public names load lazily (PEP 562): `import tidal` (and so the `tidal` command
line, whose package this is) imports only `tidal.errors`; the first use of another name
imports the module that defines it, which may load torch, numba and pyarrow.
"""

from __future__ import annotations

from importlib import import_module as _import_module
from typing import TYPE_CHECKING

from tidal.errors import (BatchError, CheckpointError, ConfigError, CorruptCheckpointError, DataError, DataPathError,
                          RunStoppedError, TidalError)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these
    from tidal.config import (
        Adagrad,
        Adam,
        AdamW,
        CountAdmission,
        DenseFeature,
        EmbeddingFeature,
        Eviction,
        Ftrl,
        Initializer,
        LabelFeature,
        ModelConfig,
        ProbabilityAdmission,
        RowWiseAdagrad,
        Sgd,
        SparseFeature,
        TableConfig,
    )
    from tidal.data import BadRows, Extractor, SparseBatch, generate, read_batches
    from tidal.embedding import (
        EmbeddingCollection,
        EmbeddingTable,
        PooledContext,
        RowBlock,
        RowLookup,
        TableStats,
        load_tables,
        save_tables,
        save_tables_delta,
    )
    from tidal.models import RankingModel

__version__ = "0.1.0"

__all__ = [
    "Adagrad",
    "Adam",
    "AdamW",
    "BadRows",
    "BatchError",
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpointError",
    "CountAdmission",
    "DataError",
    "DataPathError",
    "DenseFeature",
    "EmbeddingCollection",
    "EmbeddingFeature",
    "EmbeddingTable",
    "Eviction",
    "Extractor",
    "Ftrl",
    "Initializer",
    "LabelFeature",
    "ModelConfig",
    "PooledContext",
    "ProbabilityAdmission",
    "RankingModel",
    "RowBlock",
    "RowLookup",
    "RowWiseAdagrad",
    "RunStoppedError",
    "Sgd",
    "SparseBatch",
    "SparseFeature",
    "TableConfig",
    "TableStats",
    "TidalError",
    "generate",
    "load_tables",
    "read_batches",
    "save_tables",
    "save_tables_delta",
]

# the module that defines each public name but the errors (light, imported above): those under TYPE_CHECKING
_MODULE_NAMES = {
    "tidal.config": (
        "Adagrad",
        "Adam",
        "AdamW",
        "CountAdmission",
        "DenseFeature",
        "EmbeddingFeature",
        "Eviction",
        "Ftrl",
        "Initializer",
        "LabelFeature",
        "ModelConfig",
        "ProbabilityAdmission",
        "RowWiseAdagrad",
        "Sgd",
        "SparseFeature",
        "TableConfig",
    ),
    "tidal.data": ("BadRows", "Extractor", "SparseBatch", "generate", "read_batches"),
    "tidal.embedding": (
        "EmbeddingCollection",
        "EmbeddingTable",
        "PooledContext",
        "RowBlock",
        "RowLookup",
        "TableStats",
        "load_tables",
        "save_tables",
        "save_tables_delta",
    ),
    "tidal.models": ("RankingModel",),
}
_SOURCE = {name: module for module, names in _MODULE_NAMES.items() for name in names}


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use and kept in this module's
    globals, so later uses do not come back here (PEP 562)."""
    module = _SOURCE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """What the module holds now and every public name, loaded or not."""
    return sorted({*globals(), *__all__})
