"""The Criteo display-ads layout: a label, 13 integer and 26 categorical columns."""

from __future__ import annotations

from tidal.config import DenseFeature, FeatureConfig, LabelFeature, SparseFeature

__all__ = ["CRITEO_COLUMNS", "CRITEO_DENSE", "CRITEO_SPARSE", "criteo_features"]

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS = ("label", *CRITEO_DENSE, *CRITEO_SPARSE)


def criteo_features(table: str = "criteo") -> list[FeatureConfig]:
    """The usual Criteo features: 26 hashed ids in one shared `table` (each feature in
    its own namespace), 13 log-transformed counts, and the click label."""
    return [
        *(SparseFeature(name=c, columns=[c], table=table) for c in CRITEO_SPARSE),
        *(DenseFeature(name=c, column=c, transform="log") for c in CRITEO_DENSE),
        LabelFeature(name="label", column="label"),
    ]
