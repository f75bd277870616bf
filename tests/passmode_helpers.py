"""Small collections, batches and pass plans for the pass-mode tests."""

from __future__ import annotations

from tidal.config import EmbeddingFeature, Sgd, TableConfig
from tidal.data import SparseBatch
from tidal.embedding import EmbeddingCollection
from tidal.passmode.plan import Residency, plan_pass


def collection_of(optimizer=None, **table) -> EmbeddingCollection:
    tables = [TableConfig(name="a", dim=4, optimizer=optimizer or Sgd(lr=0.5), **table), TableConfig(name="b", dim=4)]
    features = [EmbeddingFeature(name="x", table="a"), EmbeddingFeature(name="y", table="b", pooling="mean"),
                EmbeddingFeature(name="z", table="a", pooling="sqrtn")]
    return EmbeddingCollection(tables, features)


def batch_of(x, y, z, weights=None) -> SparseBatch:
    return SparseBatch.from_lists({"x": x, "y": y, "z": z}, weights=weights)


def plan_of(collection, batches, before=None, first_step=1):
    before = before or Residency.empty(len(collection.tables))
    return plan_pass(collection, [(0, n, b) for n, b in enumerate(batches)], before, first_step)
