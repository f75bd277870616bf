"""`tidal bench data`: rows per second read from files and extracted into SparseBatches.

Workload: generated Criteo-like TSV and Parquet files (13 counts, 26 hashed ids, a
label), read in batches by pyarrow and turned into `SparseBatch`es by the `Extractor`
with the usual Criteo features. Parsing and extraction are timed apart and together.
"""

from __future__ import annotations

import json
import tempfile
import time

from tidal.data.criteo import criteo_features
from tidal.data.extract import Extractor
from tidal.data.generate import generate
from tidal.data.readers import BadRows, read_batches

__all__ = ["run"]


def _measure(paths: list[str], extractor: Extractor, batch_rows: int) -> dict:
    report = BadRows()
    start = time.perf_counter()
    batches = list(read_batches(paths, batch_rows=batch_rows, bad_rows=report))
    parsed = time.perf_counter()
    rows = sum(b.num_rows for b in batches)
    for batch in batches:
        extractor(batch)
    done = time.perf_counter()
    return {"rows": rows, "parse_rows_per_s": rows / (parsed - start),
            "extract_rows_per_s": rows / (done - parsed), "rows_per_s": rows / (done - start),
            "bad_rows": report.count}


def run(rows: int = 500_000, batch_rows: int = 8192, as_json: bool = False) -> dict:
    """Generate `rows` rows in each format, then time reading and extracting them."""
    extractor = Extractor(criteo_features())
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for file_format in ("tsv", "parquet"):
            data = generate(f"{scratch}/{file_format}", rows=rows, file_format=file_format, seed=1)
            extractor(next(read_batches(data.paths, batch_rows=batch_rows)))  # compile the kernels
            results[file_format] = result = _measure(data.paths, extractor, batch_rows)
            print(f"{file_format:>8}: {result['rows']:,d} rows  parse {result['parse_rows_per_s']:,.0f} rows/s  "
                  f"extract {result['extract_rows_per_s']:,.0f} rows/s  both {result['rows_per_s']:,.0f} rows/s",
                  flush=True)
    summary = {"tsv_rows_per_s": results["tsv"]["rows_per_s"], "parquet_rows_per_s": results["parquet"]["rows_per_s"],
               **{f"{k}_{m}": v[m] for k, v in results.items() for m in ("parse_rows_per_s", "extract_rows_per_s")}}
    if as_json:
        print(json.dumps(summary))
    return summary
