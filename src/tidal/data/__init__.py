"""Batches of sparse ids (and, later, readers and feature extraction)."""

from tidal.data.batch import SparseBatch

__all__ = ["SparseBatch"]
