"""A small trained model and its bundle for the serving tests, and request builders."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from tidal.config import RunConfig
from tidal.data import BadRows, generate
from tidal.data.criteo import CRITEO_DENSE, CRITEO_SPARSE
from tidal.runtime import Trainer

USER_SPARSE = ("C1", "C2", "C3")
USER_DENSE = ("I1", "I2")


def serving_config(root: Path, **serving) -> RunConfig:
    """Criteo features with a user side, a user x item cross, a multi-value column
    and two targets; small enough to train in seconds."""
    train = generate(root / "train", rows=16_000, seed=3)
    side = lambda c: "user" if c in USER_SPARSE + USER_DENSE else "item"  # noqa: E731
    return RunConfig(
        data={"train": train.paths, "batch_size": 1024},
        features=[
            *({"kind": "sparse", "name": c, "columns": [c], "table": "ids", "side": side(c)} for c in CRITEO_SPARSE),
            {"kind": "sparse", "name": "C1xC6", "columns": ["C1", "C6"], "table": "ids"},
            {"kind": "sparse", "name": "C7_bag", "columns": ["C7"], "table": "ids", "separator": "|", "pooling": "mean"},
            *({"kind": "dense", "name": c, "column": c, "transform": "log", "side": side(c)} for c in CRITEO_DENSE),
            {"kind": "label", "name": "ctr", "column": "label"},
            {"kind": "label", "name": "cvr", "column": "label", "weight": 0.5},
        ],
        tables=[{"name": "ids", "dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.05}}],
        model={"kind": "dlrm", "bottom_sizes": [16], "hidden_sizes": [32]},
        training={"epochs": 1, "lr": 0.003, "log_every": 100, "run_dir": str(root / "run")},
        serving={"buckets": [1, 4, 16, 64, 256], "max_batch_rows": 256, "chunk_rows": 64, "max_delay_ms": 2.0,
                 "fusion": {"kind": "product", "weights": {"ctr": 1.0, "cvr": 0.5}}, **serving},
    )


def trained(root: Path) -> Trainer:
    trainer = Trainer(serving_config(root))
    trainer.fit()
    return trainer


def file_rows(trainer: Trainer, rows: int) -> pa.RecordBatch:
    """The first `rows` rows of the training files, as the reader gives them (strings)."""
    batch = next(iter(trainer.reader_spec(trainer.config.data.train).epoch(BadRows())))
    return batch.slice(0, rows)


def with_user_of(rows: pa.RecordBatch, specs: dict, user_row: int = 0) -> pa.RecordBatch:
    """`rows` with every user column holding row `user_row`'s value: what a request
    of those candidates for that user means."""
    columns = []
    for name in rows.schema.names:
        column = rows.column(name)
        if name in specs and specs[name].side != "item":
            column = column.take(pa.array(np.full(rows.num_rows, user_row)))
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=rows.schema.names)


def pieces(predictor, rows: pa.RecordBatch, sizes: list[int]) -> list:  # type: ignore[no-untyped-def]
    """`rows` cut into pieces of `sizes` candidates, each for the user of its first row."""
    from tidal.serving import Piece

    out, start = [], 0
    for size in sizes:
        part = rows.slice(start, size)
        out.append(Piece(items=pa.RecordBatch.from_pydict({c: part.column(c) for c in predictor.item_columns}),
                         user=pa.RecordBatch.from_pydict({c: part.column(c).slice(0, 1)
                                                          for c in predictor.user_columns})))
        start += size
    return out


def assert_scores_as_torch(compiled, bundle, trainer: Trainer, sizes: list[int]) -> None:  # type: ignore[no-untyped-def]
    """`compiled` (a predictor on a compiled backend) scores pieces of `sizes` candidates
    as a predictor of `bundle` on the torch program does."""
    from tidal.serving import Predictor

    rows = file_rows(trainer, sum(sizes))
    torch_predictor = Predictor(bundle, device="cpu")
    assert torch_predictor.backend == "torch"
    found = compiled.predict(pieces(compiled, rows, sizes))
    assert found.shape == (sum(sizes), 2)
    np.testing.assert_allclose(found, torch_predictor.predict(pieces(torch_predictor, rows, sizes)), rtol=1e-5,
                               atol=1e-6)


def assert_damaged_file_refused(bundle_dir: Path, name: str, scratch: Path) -> None:
    """A copy of the bundle at `bundle_dir` whose file `name` lost its last bytes is refused by the file's name."""
    import re
    import shutil

    import pytest

    from tidal.errors import CorruptCheckpointError
    from tidal.serving import load_bundle

    damaged = Path(shutil.copytree(bundle_dir, scratch / "damaged"))
    file = damaged / name
    file.write_bytes(file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(file))):
        load_bundle(damaged)


def numpy_strings(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def until(condition, what: str, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for `condition()` to hold, failing the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
