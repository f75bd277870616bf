"""Checks shared by the tests of training runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

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


def stop_with_sigterm(config: dict, tmp_path: Path, after_step: int = 10) -> subprocess.CompletedProcess:
    """Run `tidal train` on `config` in another process and send it a SIGTERM once its
    log has step `after_step`; what the process printed and returned."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = Path(config["training"]["run_dir"]) / "metrics.jsonl"
    process = subprocess.Popen([sys.executable, "-c", "import sys; from tidal.cli import main; sys.exit(main(sys.argv[1:]))",
                                "train", "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not _logged(metrics, after_step) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _logged(metrics: Path, step: int) -> bool:
    if not metrics.exists():
        return False
    return any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line.endswith("}"))
