"""`tidal demo`: the embedding store at work, end to end, in well under a minute.

Until the trainer exists this is a store demonstration: it learns a planted logistic
signal over Zipf-distributed raw ids with a tiny torch head on top of pooled
embeddings, evicts, checkpoints (full + delta), reloads and checks the copy.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from tidal.config import Adagrad, CountAdmission, EmbeddingFeature, Eviction, Sgd, TableConfig
from tidal.data.batch import SparseBatch
from tidal.embedding import EmbeddingCollection, EmbeddingTable, load_tables, save_tables, save_tables_delta
from tidal.embedding.index import hash_keys

__all__ = ["run"]

DIM = 16
BATCH = 1024
HISTORY = 5  # ids per sample in the multi-value "history" feature


def _collection() -> EmbeddingCollection:
    tables = [
        TableConfig(name="user", dim=DIM, optimizer=Adagrad(lr=0.1),
                    admission=CountAdmission(min_count=2), eviction=Eviction(ttl_steps=150)),
        TableConfig(name="item", dim=DIM, optimizer=Sgd(lr=0.5), max_rows=40_000,
                    eviction=Eviction(capacity_policy="lfu")),
    ]
    features = [
        EmbeddingFeature(name="user_id", table="user"),
        EmbeddingFeature(name="item_id", table="item"),
        EmbeddingFeature(name="history", table="item", pooling="mean"),
    ]
    return EmbeddingCollection(tables, features)


def _effect(keys: np.ndarray, salt: int) -> np.ndarray:
    """The planted per-id effect: a fixed pseudo-random number in [-1.5, 1.5)."""
    bits = np.empty(keys.shape[0], dtype=np.uint64)
    hash_keys(keys ^ salt, 0, bits, np.empty(keys.shape[0], dtype=np.int64))
    return (bits >> np.uint64(11)).astype(np.float64) / 2.0**53 * 3.0 - 1.5


def _batch(rng: np.random.Generator) -> SparseBatch:
    users = rng.zipf(1.2, BATCH) + 10_000_000
    items = rng.zipf(1.3, BATCH)
    history = rng.zipf(1.3, BATCH * HISTORY)
    logit = _effect(users, 1) + _effect(items, 2)
    labels = (rng.random(BATCH) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return SparseBatch(keys=("user_id", "item_id", "history"), batch_size=BATCH,
                       values=np.concatenate([users, items, history]),
                       lengths=np.concatenate([np.ones(2 * BATCH, np.int32), np.full(BATCH, HISTORY, np.int32)]),
                       labels=labels[:, None])


def _train(collection: EmbeddingCollection, head: torch.nn.Module, steps: range,
           rng: np.random.Generator) -> float:
    """Train over `steps` (numbered for the progress lines); the mean loss of the last 50."""
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    start, losses = time.perf_counter(), []
    for step in steps:
        batch = _batch(rng)
        pooled, ctx = collection.forward(batch)  # [B, F, D]
        pooled.requires_grad_(True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(pooled.flatten(1)), torch.tensor(batch.labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        collection.backward(ctx, pooled.grad)
        losses.append(loss.item())
        if step % 50 == 0:
            rate = len(losses) * BATCH / (time.perf_counter() - start)
            print(f"  step {step:4d}  loss {np.mean(losses[-50:]):.4f}  {rate:,.0f} samples/s", flush=True)
    return float(np.mean(losses[-50:]))


def _print_stats(collection: EmbeddingCollection) -> None:
    print(f"  {'table':6} {'rows':>8} {'bytes/row idx+meta':>19} {'admitted':>9} {'not admitted':>13} {'evicted':>8}")
    for table in collection.tables:
        s = table.stats()
        print(f"  {s.name:6} {s.rows:8,d} {s.overhead_bytes_per_row:19.1f} {s.admitted:9,d} {s.not_admitted:13,d} {s.evicted:8,d}")


def _same(a: EmbeddingTable, b: EmbeddingTable, keys: np.ndarray) -> bool:
    (rows_a, found_a), (rows_b, found_b) = a.pull_rows(keys), b.pull_rows(keys)
    return bool(np.array_equal(found_a, found_b) and np.array_equal(rows_a.values, rows_b.values)
                and np.array_equal(rows_a.state, rows_b.state))


def run(steps: int = 300) -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    collection = _collection()
    head = torch.nn.Linear(3 * DIM, 1)
    print(f"Training pooled embeddings of raw ids on a planted signal ({steps} steps of {BATCH} samples)")
    first = _train(collection, head, range(1, 51), rng)
    last = _train(collection, head, range(51, steps + 1), rng)
    print(f"  loss {first:.4f} -> {last:.4f}")
    print("Evicting (user: TTL 150 steps; item: LFU down to 40,000 rows)")
    for table in collection.tables:
        print(f"  {table.name}: {table.evict():,d} rows evicted")
    _print_stats(collection)
    with tempfile.TemporaryDirectory() as root:
        save_tables(root, collection.tables)
        print("Saved a full checkpoint; 50 more steps, then a delta")
        _train(collection, head, range(steps + 1, steps + 51), rng)
        save_tables_delta(root, collection.tables)
        restored = load_tables(root)
        keys = np.concatenate([np.arange(1, 50_000), np.arange(10_000_001, 10_050_000)])
        ok = all(_same(t, restored[t.name], keys) for t in collection.tables)
        print(f"Checkpoint full + delta, reloaded: {'identical' if ok else 'DIFFERENT'} rows and optimizer state")
    if not ok:
        raise SystemExit("demo failed: the reloaded tables differ from the live ones")
