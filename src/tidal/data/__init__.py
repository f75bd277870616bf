"""Batches of sparse ids, file readers, string hashing and the synthetic data generator."""

from tidal.data.batch import SparseBatch
from tidal.data.criteo import CRITEO_COLUMNS
from tidal.data.extract import Extractor
from tidal.data.generate import GeneratedData, auc, generate
from tidal.data.hashing import hash_strings
from tidal.data.readers import BadRows, read_batches

__all__ = ["BadRows", "CRITEO_COLUMNS", "Extractor", "GeneratedData", "SparseBatch", "auc", "generate", "hash_strings",
           "read_batches"]
