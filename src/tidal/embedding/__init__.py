"""Collision-free dynamic embedding tables, the fused pooling operator, checkpoints."""

from tidal.embedding.checkpoint import load as load_tables
from tidal.embedding.checkpoint import save as save_tables
from tidal.embedding.checkpoint import save_delta as save_tables_delta
from tidal.embedding.collection import EmbeddingCollection, PooledContext
from tidal.embedding.table import EmbeddingTable, RowBlock, RowLookup, TableStats

__all__ = [
    "EmbeddingCollection",
    "EmbeddingTable",
    "PooledContext",
    "RowBlock",
    "RowLookup",
    "TableStats",
    "load_tables",
    "save_tables",
    "save_tables_delta",
]
