"""Tidal: a heterogeneous CPU + GPU engine for large sparse recommendation models.

Every raw feature ID gets its own embedding row (no modulo hashing); CPUs do the sparse
work, the dense network runs wherever it runs best.
"""

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
from tidal.errors import BatchError, CheckpointError, ConfigError, CorruptCheckpointError, DataError, TidalError
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
