"""Checks shared by the tests of training runs."""

from __future__ import annotations

import numpy as np
import torch

from tidal.runtime import Trainer


def assert_same_state(a: Trainer, b: Trainer) -> None:
    """Dense weights, and every table's rows, row metadata and counters, bit for bit
    (not its memory, which a loaded table lays out afresh)."""
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name
    counters = ("rows", "lookups", "misses", "admitted", "not_admitted", "evicted", "dropped_full")
    for x, y in zip(a.collection.tables, b.collection.tables):
        assert [getattr(x.stats(), c) for c in counters] == [getattr(y.stats(), c) for c in counters]
        assert x.clocks() == y.clocks()
        keys = np.concatenate([x.snapshot_shard(s, since_save=False)["keys"] for s in range(x.num_shards)])
        (rows_x, found_x), (rows_y, found_y) = x.pull_rows(keys), y.pull_rows(keys)
        assert found_x.all() and found_y.all()
        for field in ("values", "state", "last_seen", "counts"):
            np.testing.assert_array_equal(getattr(rows_x, field), getattr(rows_y, field), err_msg=field)
