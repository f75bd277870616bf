"""Tidal: a heterogeneous CPU + GPU engine for large sparse recommendation models.

Every raw feature ID gets its own embedding row (no modulo hashing); CPUs do the sparse
work, the dense network runs wherever it runs best.
"""

from tidal.config import (
    Adagrad,
    Adam,
    AdamW,
    CountAdmission,
    EmbeddingFeature,
    Eviction,
    Ftrl,
    Initializer,
    ProbabilityAdmission,
    RowWiseAdagrad,
    Sgd,
    TableConfig,
)
from tidal.data import SparseBatch
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
from tidal.errors import BatchError, CheckpointError, ConfigError, CorruptCheckpointError, TidalError

__version__ = "0.1.0"

__all__ = [
    "Adagrad",
    "Adam",
    "AdamW",
    "BatchError",
    "CheckpointError",
    "ConfigError",
    "CorruptCheckpointError",
    "CountAdmission",
    "EmbeddingCollection",
    "EmbeddingFeature",
    "EmbeddingTable",
    "Eviction",
    "Ftrl",
    "Initializer",
    "PooledContext",
    "ProbabilityAdmission",
    "RowBlock",
    "RowLookup",
    "RowWiseAdagrad",
    "Sgd",
    "SparseBatch",
    "TableConfig",
    "TableStats",
    "TidalError",
    "load_tables",
    "save_tables",
    "save_tables_delta",
]
